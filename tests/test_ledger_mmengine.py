"""Every update accounted for, on a real MMEngine ``Runner``.

One momentum hook per runner; target updates exactly after the optimizer's
real steps (a step that torch's ``GradScaler`` skipped on inf gradients gets
none); resumes that change the schedule, or start inside an accumulation
window, or run past ``max_iters``, say so in the run's log. The references:
the online weights recorded after each iteration (whether the optimizer
stepped is read off them) and the closed-form schedule.
"""

import pytest
import torch

pytestmark = pytest.mark.mmengine
pytest.importorskip('mmengine')

from mmengine.optim import AmpOptimWrapper, OptimWrapper  # noqa: E402
from mmengine.registry import OPTIM_WRAPPERS
from momentum_testing import reference_momentum
from test_hook_mmengine import (
    HOOK,
    OnlineRecorder,
    TinyMomentumModel,
    _flat,
    build_runner,
    logged_momenta,
    reference_target,
)

BASE = 0.5


@OPTIM_WRAPPERS.register_module(name='CpuLossScalerOptimWrapper', force=True)
class CpuLossScalerOptimWrapper(AmpOptimWrapper):
    """``AmpOptimWrapper``'s own ``backward`` and ``step`` with torch's CPU
    ``GradScaler``, which skips ``optimizer.step()`` on inf gradients as the
    CUDA one does (MMEngine builds ``AmpOptimWrapper`` on accelerators only).
    """

    def __init__(self, **kwargs):
        OptimWrapper.__init__(self, **kwargs)
        self._scale_update_param = None
        self.loss_scaler = torch.amp.GradScaler('cpu', init_scale=4.0)

    def optim_context(self, model):
        return OptimWrapper.optim_context(self, model)


class PoisonedModel(TinyMomentumModel):
    """Its loss is inf in the training forwards numbered in ``poison``."""

    def __init__(self, poison):
        super().__init__(base_momentum=BASE)
        self.poison = poison

    def forward(self, inputs, data_samples=None, mode='tensor'):
        output = super().forward(inputs, data_samples, mode)
        if mode == 'loss' and len(self.seen) - 1 in self.poison:
            output['loss'] = output['loss'] * float('inf')
        return output


def log_text(work_dir):
    """The text log of the one run under ``work_dir``."""
    (log,) = work_dir.glob('*/*.log')
    return log.read_text()


def moved(recorder, iters, start=0):
    """The iterations after which the online weights changed."""
    before = recorder.initial
    changed = []
    for k in range(start, iters):
        after = recorder.after_iter[k]
        if not torch.equal(before, after):
            changed.append(k)
        before = after
    return changed


def assert_target_is_ema(model, initial, recorder, expected):
    """The target is the EMA from ``initial`` of the recorded online weights
    after the iterations of ``expected`` (``{k: m_k}``)."""
    torch.testing.assert_close(
        _flat(model.target).double(),
        reference_target(initial, recorder.after_iter, expected),
        rtol=1e-6,
        atol=1e-6,
    )


@pytest.mark.parametrize('second', [HOOK, 'momentum_hook.BYOLHook'])
def test_a_second_momentum_hook_is_refused_before_iteration_1(
    tmp_path, second
):
    model = TinyMomentumModel()
    runner = build_runner(
        tmp_path,
        model,
        [
            dict(type=HOOK, end_momentum=1.0),
            dict(type=second, end_momentum=1.0),
        ],
    )
    with pytest.raises(ValueError) as raised:
        runner.train()
    message = str(raised.value)
    assert 'the runner has 2 momentum hooks' in message
    assert (
        message.count(
            'momentum_hook.mmengine_hook.MomentumUpdateHook(end_momentum=1.0, '
            'update_interval=1)'
        )
        == 3
    )  # both entries, and the one to keep
    assert 'Keep one' in message
    assert model.seen == []


@pytest.mark.parametrize('policy', ['hold', 'update'])
@pytest.mark.parametrize('accumulation, poison', [(1, {1, 4}), (2, {3})])
def test_a_step_the_loss_scaler_skipped_gets_no_update(
    tmp_path, policy, accumulation, poison
):
    torch.manual_seed(0)
    model = PoisonedModel(poison)
    recorder = OnlineRecorder()
    runner = build_runner(
        tmp_path,
        model,
        [
            dict(
                type=HOOK,
                end_momentum=1.0,
                update_interval=accumulation,
                on_skipped_step=policy,
            ),
            recorder,
        ],
        iters=6,
        accumulative_counts=accumulation,
        optim_wrapper=dict(
            type='CpuLossScalerOptimWrapper',
            optimizer=dict(type='SGD', lr=0.1),
            accumulative_counts=accumulation,
        ),
    )
    runner.train()

    scheduled = [k for k in range(6) if (k + 1) % accumulation == 0]
    stepped = moved(recorder, 6)
    # The scaler skipped the steps due after the poisoned iterations.
    assert stepped == [k for k in scheduled if k not in poison]
    updates = stepped if policy == 'hold' else scheduled
    expected = {k: reference_momentum(k, 6, BASE) for k in updates}
    assert logged_momenta(runner) == pytest.approx(
        list(expected.values()), rel=0, abs=1e-12
    )
    assert_target_is_ema(model, recorder.initial, recorder, expected)
    summary = (
        f'momentum_hook: {len(updates)} target updates; '
        f'{len(poison)} optimizer steps were skipped'
    )
    summary += (
        " and the target was held (on_skipped_step='hold')"
        if policy == 'hold'
        else f' and the target was updated after {len(poison)} of them'
    )
    assert summary in log_text(tmp_path)


def _interrupted(tmp_path, iters, checkpoint, **options):
    """A run of ``iters`` saving every ``checkpoint`` iterations."""
    torch.manual_seed(0)
    runner = build_runner(
        tmp_path / 'first',
        TinyMomentumModel(BASE),
        [dict(type=HOOK, end_momentum=1.0, **options)],
        iters=iters,
        checkpoint_interval=checkpoint,
        **options and dict(accumulative_counts=options['update_interval']),
    )
    runner.train()
    return tmp_path / 'first'


@pytest.fixture
def trusted_checkpoints(monkeypatch):
    # MMEngine 0.10.7 checkpoints need it under torch >= 2.6.
    monkeypatch.setenv('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD', '1')


@pytest.mark.filterwarnings(
    'ignore:Environment variable TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD:UserWarning'
)
def test_a_resume_inside_an_accumulation_window_warns_and_follows_the_steps(
    tmp_path, trusted_checkpoints
):
    first = _interrupted(tmp_path, 8, 3, update_interval=2)
    recorder = OnlineRecorder()
    torch.manual_seed(1)
    model = TinyMomentumModel(BASE)
    runner = build_runner(
        tmp_path / 'resumed',
        model,
        [dict(type=HOOK, end_momentum=1.0, update_interval=2), recorder],
        iters=8,
        accumulative_counts=2,
        load_from=str(first / 'iter_3.pth'),
        resume=True,
    )
    runner.train()

    stepped = moved(recorder, 8, start=3)
    assert stepped == [3, 5, 7]
    expected = {k: reference_momentum(k, 8, BASE) for k in stepped}
    saved = torch.load(first / 'iter_3.pth', weights_only=False)['state_dict']
    target_at_resume = torch.cat(
        [saved['target.weight'].flatten(), saved['target.bias']]
    )
    assert_target_is_ema(model, target_at_resume, recorder, expected)
    assert (
        log_text(tmp_path / 'resumed').count(
            'resumed at iteration 3, inside a gradient-accumulation '
            'window of 2 '
            'iterations: the gradients of iterations 2 to 2 are not in the '
            'checkpoint'
        )
        == 1
    )


@pytest.mark.filterwarnings(
    'ignore:Environment variable TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD:UserWarning'
)
@pytest.mark.parametrize('new_iters', [8, 12, 3])
def test_a_resume_with_another_max_iters_says_what_changes(
    tmp_path, trusted_checkpoints, new_iters
):
    first = _interrupted(tmp_path, 8, 4)
    torch.manual_seed(1)
    runner = build_runner(
        tmp_path / 'resumed',
        TinyMomentumModel(BASE),
        [dict(type=HOOK, end_momentum=1.0)],
        iters=new_iters,
        load_from=str(first / 'iter_4.pth'),
        resume=True,
    )
    runner.train()

    log = log_text(tmp_path / 'resumed')
    before, after = (reference_momentum(4, K, BASE) for K in (8, new_iters))
    changed = (
        f'resumed at iteration 4 with max_iters={new_iters}, but the '
        'checkpoint was written by a run of max_iters=8: the cosine '
        'schedule now spans'
    )
    reached = 'resumed at iteration 4, but max_iters=3 is already reached'
    if new_iters == 8:
        assert changed not in log and reached not in log
        return
    assert log.count(changed) == 1
    if new_iters == 12:
        assert after < before  # the momentum would go backwards
        assert (
            f'at iteration 4 changes from {before:.6g} to {after:.6g} '
            '(backwards)'
        ) in log
        assert reached not in log
    else:
        assert log.count(reached) == 1


@pytest.mark.filterwarnings(
    'ignore:Environment variable TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD:UserWarning'
)
def test_iterations_past_max_iters_after_an_epoch_restart_are_announced(
    tmp_path, trusted_checkpoints
):
    hook = dict(type=HOOK, end_momentum=0.9)
    checkpoint = dict(type='CheckpointHook', interval=2, by_epoch=False)
    hooks = dict(
        checkpoint=checkpoint, logger=dict(type='LoggerHook', interval=1)
    )
    torch.manual_seed(0)
    build_runner(
        tmp_path / 'first',
        TinyMomentumModel(BASE),
        [hook],
        by_epoch=True,
        iters=6,
        default_hooks=hooks,
    ).train()
    torch.manual_seed(1)
    runner = build_runner(
        tmp_path / 'resumed',
        TinyMomentumModel(BASE),
        [hook],
        by_epoch=True,
        iters=6,
        default_hooks=hooks,
        load_from=str(tmp_path / 'first' / 'iter_2.pth'),
        resume=True,
    )
    runner.train()

    # MMEngine trains epoch 0 again from its first batch: k = 2 ... 7 of 6.
    assert runner.iter == 8
    log = log_text(tmp_path / 'resumed')
    assert (
        log.count(
            'iteration 6 is past max_iters=6, the end of the momentum schedule'
        )
        == 1
    )
    assert log.index('is past max_iters') < log.index('Epoch(train) [2][3/3]')
    assert logged_momenta(runner)[-2:] == [0.9, 0.9]


def test_the_leftover_step_at_the_end_of_a_run_is_followed(tmp_path):
    """7 iterations, accumulation 2: MMEngine also steps after the last
    iteration, with the one leftover micro-batch, and the target follows."""
    torch.manual_seed(0)
    model = TinyMomentumModel(BASE)
    recorder = OnlineRecorder()
    runner = build_runner(
        tmp_path,
        model,
        [dict(type=HOOK, end_momentum=1.0, update_interval=2), recorder],
        iters=7,
        accumulative_counts=2,
    )
    runner.train()

    stepped = moved(recorder, 7)
    assert stepped == [1, 3, 5, 6]
    expected = {k: reference_momentum(k, 7, BASE) for k in stepped}
    assert logged_momenta(runner) == pytest.approx(
        list(expected.values()), rel=0, abs=1e-12
    )
    assert_target_is_ema(model, recorder.initial, recorder, expected)
