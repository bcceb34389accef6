"""Every update accounted for, on real mmcv 1.x runners.

One momentum hook per runner; a step that ``Fp16OptimizerHook``'s loss
scaler skipped gets an update by default (MMSelfSup 0.x, bit for bit) or
none with ``on_skipped_step='hold'``, and the log counts them; resumes that
change the run length or start inside an accumulation window say so; the
``meta=None`` trap of mmcv's fp16 optimizer hooks is the documented one.
"""

from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.mmcv
pytest.importorskip('mmcv')

from mmcv.runner import Fp16OptimizerHook  # noqa: E402 (after the skip)
from momentum_testing import Interrupt, InterruptBefore, reference_momentum
from test_hook_mmcv import (
    BASE,
    ToyBYOL,
    assert_target_equal,
    make_runner,
    reference,
    run,
)

from momentum_hook.mmcv_hook import BYOLHook, MomentumUpdateHook

ERRORS = Path(__file__).resolve().parents[1] / 'docs' / 'errors.md'


class CpuFp16OptimizerHook(Fp16OptimizerHook):
    """mmcv's own ``Fp16OptimizerHook`` steps, with torch's CPU
    ``GradScaler``, which skips ``optimizer.step()`` on inf gradients as the
    CUDA one does (mmcv builds a CUDA scaler, disabled on a CPU)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.loss_scaler = torch.amp.GradScaler('cpu', init_scale=4.0)


class PoisonedBYOL(ToyBYOL):
    """Its loss is inf in the training steps numbered in ``poison``."""

    def __init__(self, poison):
        super().__init__()
        self.poison = poison

    def train_step(self, data, optimizer=None, **kwargs):
        outputs = super().train_step(data, optimizer, **kwargs)
        if self.forward_calls - 1 in self.poison:
            outputs['loss'] = outputs['loss'] * float('inf')
        return outputs


def test_a_second_momentum_hook_is_refused_before_iteration_1(tmp_path):
    runner, model, _ = make_runner(tmp_path)
    runner.register_hook(MomentumUpdateHook())
    runner.register_hook(BYOLHook(update_interval=1))
    with pytest.raises(ValueError) as raised:
        run(runner)
    message = str(raised.value)
    assert 'the runner has 2 momentum hooks' in message
    assert message.count('momentum_hook.mmcv_hook.MomentumUpdateHook(') == 3
    assert "type='BYOLHook'" in message
    assert model.forward_calls == 0


@pytest.mark.parametrize('policy', [None, 'update', 'hold'])
def test_a_step_the_loss_scaler_skipped(tmp_path, policy):
    poison = {1, 4}
    model = PoisonedBYOL(poison)
    runner, _, recorder = make_runner(
        tmp_path,
        model=model,
        length=6,
        optimizer_config=CpuFp16OptimizerHook(),
    )
    runner.meta = {}  # Fp16OptimizerHook keeps its scaler there
    initial = [p.clone() for p in model.target.parameters()]
    options = {} if policy is None else dict(on_skipped_step=policy)
    runner.register_hook(MomentumUpdateHook(end_momentum=1.0, **options))
    run(runner)

    onlines = [initial] + recorder.online
    stepped = [
        k
        for k in range(6)
        if not all(
            torch.equal(a, b) for a, b in zip(onlines[k], onlines[k + 1])
        )
    ]
    assert stepped == [0, 2, 3, 5]  # the scaler skipped k = 1 and 4
    log = (tmp_path / 'run.log').read_text()
    if policy == 'hold':
        target = [p.clone() for p in initial]
        for k in stepped:
            m = reference_momentum(k, 6, BASE)
            target = [
                t * m + o * (1.0 - m)
                for t, o in zip(target, recorder.online[k])
            ]
        assert_target_equal(model, target)
        assert (
            'momentum_hook: 4 target updates; 2 optimizer steps were '
            "skipped and the target was held (on_skipped_step='hold')"
        ) in log
    else:  # MMSelfSup 0.x: every iteration, bit for bit
        assert_target_equal(model, reference(initial, recorder, 6))
        assert (
            'momentum_hook: 6 target updates; 2 optimizer steps were '
            'skipped and the target was updated after 2 of them '
            "(on_skipped_step='update', MMSelfSup 0.x)"
        ) in log


def test_an_epoch_resume_inside_an_accumulation_window_warns(tmp_path):
    """4 iterations per epoch, gradients accumulated over 3: the checkpoint
    after epoch 1 is taken one iteration into a window."""
    accumulate = dict(
        type='GradientCumulativeOptimizerHook', cumulative_iters=3
    )
    first, _, _ = make_runner(
        tmp_path / 'first', 'epoch', length=3, optimizer_config=accumulate
    )
    first.register_hook(MomentumUpdateHook(update_interval=3))
    first.register_checkpoint_hook(dict(interval=1))
    first.register_hook(InterruptBefore(4), priority='LOWEST')
    with pytest.raises(Interrupt):
        run(first)

    resumed, _, recorder = make_runner(
        tmp_path / 'resumed', 'epoch', length=3, optimizer_config=accumulate
    )
    resumed.register_hook(MomentumUpdateHook(update_interval=3))
    resumed.resume(str(tmp_path / 'first' / 'epoch_1.pth'), map_location='cpu')
    run(resumed)

    assert recorder.iters == list(range(4, 12))
    log = (tmp_path / 'resumed' / 'run.log').read_text()
    assert (
        log.count(
            'resumed at iteration 4, inside a gradient-accumulation '
            'window of 3 '
            'iterations: the gradients of iterations 3 to 3 are not in the '
            'checkpoint'
        )
        == 1
    )


@pytest.mark.parametrize('new_epochs', [3, 5, 2])
def test_a_resume_with_another_max_epochs_says_what_changes(
    tmp_path, new_epochs
):
    """4 iterations per epoch; the checkpoint after epoch 2 (k = 8 of 12)
    is resumed with ``max_epochs=new_epochs``."""
    first, _, _ = make_runner(tmp_path / 'first', 'epoch', length=3)
    first.register_hook(MomentumUpdateHook())
    first.register_checkpoint_hook(dict(interval=1))
    first.register_hook(InterruptBefore(8), priority='LOWEST')
    with pytest.raises(Interrupt):
        run(first)

    resumed, _, _ = make_runner(
        tmp_path / 'resumed', 'epoch', length=new_epochs
    )
    resumed.register_hook(MomentumUpdateHook())
    resumed.resume(str(tmp_path / 'first' / 'epoch_2.pth'), map_location='cpu')
    run(resumed)

    log = (tmp_path / 'resumed' / 'run.log').read_text()
    new_iters = 4 * new_epochs
    before, after = (reference_momentum(8, K, BASE) for K in (12, new_iters))
    changed = (
        f'resumed at iteration 8 with max_iters={new_iters}, but the '
        'checkpoint was written by a run of max_iters=12'
    )
    if new_epochs == 3:
        assert changed not in log
        return
    assert log.count(changed) == 1
    assert f'changes from {before:.6g} to {after:.6g}' in log
    assert ('max_iters=8 is already reached' in log) == (new_epochs == 2)


def _documented_meta_none_error():
    """The row of docs/errors.md for mmcv's fp16 hooks on ``meta=None``."""
    (row,) = [
        line
        for line in ERRORS.read_text().splitlines()
        if 'meta=None' in line and "1.x's `TypeError" in line
    ]
    return row.split('`')[1]


@pytest.mark.parametrize('meta', [None, {}])
def test_gradient_cumulative_fp16_hook_on_meta_none(tmp_path, meta):
    from mmcv.runner import GradientCumulativeFp16OptimizerHook

    runner, model, _ = make_runner(
        tmp_path,
        optimizer_config=GradientCumulativeFp16OptimizerHook(
            cumulative_iters=2
        ),
    )
    runner.meta = meta
    runner.register_hook(MomentumUpdateHook(update_interval=1))
    with pytest.raises((TypeError, ValueError)) as raised:
        run(runner)
    if meta is None:  # mmcv's own, before the momentum hook runs: documented
        assert (
            f'{raised.type.__name__}: {raised.value}'
            == _documented_meta_none_error()
        )
    else:  # the momentum hook's
        assert raised.type is ValueError
        assert 'update_interval=1 does not follow the optimizer' in str(
            raised.value
        )
    assert model.forward_calls == 0
