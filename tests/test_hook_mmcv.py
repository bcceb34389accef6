"""The hook on real mmcv 1.x runners (EpochBasedRunner, IterBasedRunner).

The toy model is written the way MMSelfSup 0.x writes BYOL: its own update
loop ``t = t * m + o * (1 - m)``. The reference replays that loop in the test
from the online weights recorded after every optimizer step, so the target
must match it bit for bit, and the momenta must equal MMSelfSup's formula.
"""

import copy
import glob
import json
import os.path as osp

import pytest
import torch

pytestmark = pytest.mark.mmcv
pytest.importorskip('mmcv')
from mmcv.parallel import MMDataParallel
from mmcv.runner import (
    HOOKS,
    EpochBasedRunner,
    GradientCumulativeOptimizerHook,
    Hook,
    IterBasedRunner,
    build_runner,
)
from mmcv.utils import Config, build_from_cfg, get_logger
from momentum_testing import Interrupt, InterruptBefore, reference_momentum
from torch import nn
from torch.utils.data import DataLoader

from momentum_hook.mmcv_hook import MomentumUpdateHook, unwrap

BASE = 0.9


class ToyBYOL(nn.Module):
    """A two-parameter online network and its target, MMSelfSup style."""

    def __init__(self, base_momentum=BASE):
        super().__init__()
        torch.manual_seed(0)
        self.online = nn.Linear(1, 1)
        self.target = copy.deepcopy(self.online).requires_grad_(False)
        self.base_momentum = base_momentum
        self.momentum = base_momentum
        self.forward_calls = 0

    @torch.no_grad()
    def momentum_update(self):
        for param_tgt, param_ol in zip(
            self.target.parameters(), self.online.parameters()
        ):
            param_tgt.data = param_tgt.data * self.momentum + param_ol.data * (
                1.0 - self.momentum
            )

    def train_step(self, data, optimizer=None, **kwargs):
        self.forward_calls += 1
        loss = ((self.online(data) - 3 * data) ** 2).mean()
        return dict(
            loss=loss, log_vars=dict(loss=loss.item()), num_samples=len(data)
        )


class Recorder(Hook):
    """Records, after the optimizer step, the state the reference needs."""

    def __init__(self):
        self.iters, self.momenta, self.online = [], [], []

    def before_train_iter(self, runner):
        self.iters.append(runner.iter)

    def after_train_iter(self, runner):
        model = (
            runner.model.module
            if hasattr(runner.model, 'module')
            else runner.model
        )
        self.momenta.append(model.momentum)
        self.online.append(
            [p.detach().clone() for p in model.online.parameters()]
        )


def loader(samples=8, batch_size=2):
    data = torch.linspace(-1, 1, samples).unsqueeze(1)
    return DataLoader(data, batch_size=batch_size, shuffle=False)


def make_runner(
    tmp_path,
    kind='iter',
    model=None,
    wrap=False,
    length=6,
    optimizer_config=None,
):
    """A real mmcv runner with an SGD optimizer hook and a Recorder.

    Its logger writes ``run.log`` in ``tmp_path``.
    """
    model = model if model is not None else ToyBYOL()
    tmp_path.mkdir(parents=True, exist_ok=True)
    optimizer = torch.optim.SGD(
        model.online.parameters(), lr=0.1, momentum=0.9
    )
    runner_cls = IterBasedRunner if kind == 'iter' else EpochBasedRunner
    length_arg = 'max_iters' if kind == 'iter' else 'max_epochs'
    runner = runner_cls(
        MMDataParallel(model) if wrap else model,
        optimizer=optimizer,
        work_dir=str(tmp_path),
        **{length_arg: length},
        logger=get_logger(
            f'momentum_hook_test.{tmp_path}',
            log_file=str(tmp_path / 'run.log'),
        ),
    )
    runner.register_optimizer_hook(optimizer_config or dict(grad_clip=None))
    recorder = Recorder()
    runner.register_hook(recorder, priority='LOWEST')
    return runner, model, recorder


def run(runner, data=None):
    data = data if data is not None else loader()
    flow = [('train', 1)]
    runner.run([data], flow)


def reference(
    initial_target, recorder, max_iters, end=1.0, interval=1, base=BASE
):
    """Replay MMSelfSup's schedule and update loop on the recorded weights."""
    target = [p.clone() for p in initial_target]
    for k, online in zip(recorder.iters, recorder.online):
        if (k + 1) % interval:
            continue
        m = reference_momentum(k, max_iters, base, end)
        target = [t * m + o * (1.0 - m) for t, o in zip(target, online)]
    return target


def assert_target_equal(model, expected):
    for got, want in zip(model.target.parameters(), expected):
        assert torch.equal(got, want)


@pytest.mark.parametrize(
    'kind, wrap',
    [('iter', False), ('iter', True), ('epoch', False), ('epoch', True)],
)
def test_target_and_momenta_match_mmselfsup(tmp_path, kind, wrap):
    runner, model, recorder = make_runner(
        tmp_path, kind, wrap=wrap, length=3 if kind == 'epoch' else 7
    )
    initial = [p.clone() for p in model.target.parameters()]
    runner.register_hook(MomentumUpdateHook(end_momentum=1.0))
    run(runner)
    max_iters = runner.max_iters
    assert recorder.iters == list(range(max_iters))
    assert recorder.momenta == [
        reference_momentum(k, max_iters, BASE) for k in range(max_iters)
    ]
    assert_target_equal(model, reference(initial, recorder, max_iters))
    # The target moved towards the online network: the EMA really ran.
    assert not torch.equal(model.target.weight, initial[0])


def test_ema_sees_the_weights_after_the_optimizer_step(tmp_path):
    runner, model, recorder = make_runner(tmp_path, length=2)
    initial = [p.clone() for p in model.target.parameters()]
    runner.register_hook(MomentumUpdateHook(end_momentum=0.0))
    run(runner)
    # k = 1 of 2 with end momentum 0: m = BASE / 2, a large step, so an EMA
    # of the weights before the step would differ from the replay.
    assert model.momentum == pytest.approx(BASE / 2)
    assert_target_equal(model, reference(initial, recorder, 2, end=0.0))


def test_momentum_hook_before_the_optimizer_hook_is_refused(tmp_path):
    runner, model, _ = make_runner(tmp_path)
    runner.register_hook(MomentumUpdateHook(), priority='HIGHEST')
    with pytest.raises(ValueError, match='before OptimizerHook'):
        run(runner)
    assert model.forward_calls == 0


def test_update_interval_follows_gradient_accumulation(tmp_path):
    runner, model, recorder = make_runner(
        tmp_path,
        length=8,
        optimizer_config=dict(
            type='GradientCumulativeOptimizerHook', cumulative_iters=2
        ),
    )
    assert any(
        isinstance(h, GradientCumulativeOptimizerHook) for h in runner.hooks
    )
    initial = [p.clone() for p in model.target.parameters()]
    runner.register_hook(MomentumUpdateHook(update_interval=2))
    run(runner)
    expected_momenta, m = [], BASE
    for k in range(8):
        if (k + 1) % 2 == 0:
            m = reference_momentum(k, 8, BASE)
        expected_momenta.append(m)
    assert recorder.momenta == expected_momenta
    assert_target_equal(model, reference(initial, recorder, 8, interval=2))


def test_update_interval_off_the_accumulation_is_refused(tmp_path):
    runner, model, _ = make_runner(
        tmp_path,
        optimizer_config=dict(
            type='GradientCumulativeOptimizerHook', cumulative_iters=4
        ),
    )
    runner.register_hook(MomentumUpdateHook(update_interval=2))
    with pytest.raises(ValueError, match='update_interval=2 .* every 4 '):
        run(runner)
    assert model.forward_calls == 0


def test_reach_end_momentum_opt_in(tmp_path):
    runner, model, recorder = make_runner(tmp_path, length=5)
    runner.register_hook(
        MomentumUpdateHook(end_momentum=1.0, reach_end_momentum=True)
    )
    run(runner)
    assert recorder.momenta[0] == BASE
    assert recorder.momenta[-1] == 1.0
    assert recorder.momenta == sorted(recorder.momenta)


def test_momentum_is_logged_apart_from_the_optimizer_momentum(tmp_path):
    runner, _, recorder = make_runner(tmp_path, length=4)
    runner.register_hook(MomentumUpdateHook())
    runner.register_timer_hook(dict(type='IterTimerHook'))
    runner.register_logger_hooks(
        dict(interval=1, hooks=[dict(type='TextLoggerHook', by_epoch=False)])
    )
    run(runner)
    (json_log,) = glob.glob(osp.join(str(tmp_path), '*.log.json'))
    with open(json_log) as f:
        records = [json.loads(line) for line in f if '"mode"' in line]
    logged = [r['target_momentum'] for r in records if r['mode'] == 'train']
    assert logged == pytest.approx(recorder.momenta, abs=1e-4)
    # mmcv logs `momentum` only for a momentum scheduler, absent here: the
    # hook must not write that key.
    assert not any('momentum' in r for r in records)
    with open(tmp_path / 'run.log') as f:
        assert 'target_momentum: ' in f.read()


def test_the_log_says_which_hook_was_built_before_iteration_one(tmp_path):
    runner, _, _ = make_runner(tmp_path, length=4)
    runner.register_hook(
        build_from_cfg(
            dict(
                type='momentum_hook.BYOLHook',
                end_momentum=0.999,
                update_interval=2,
            ),
            HOOKS,
        )
    )
    runner.register_hook(InterruptBefore(0), priority='LOWEST')
    with pytest.raises(Interrupt):
        run(runner)
    log = (tmp_path / 'run.log').read_text()
    assert (
        'momentum_hook.mmcv_hook.MomentumUpdateHook(end_momentum=0.999, '
        'update_interval=2, reach_end_momentum=False)'
    ) in log
    assert f'ToyBYOL from base_momentum={BASE} over 4 iterations' in log


@pytest.mark.parametrize('base_batch_size', [None, 8])
@pytest.mark.parametrize('kind', ['iter', 'epoch'])
def test_resume_gives_the_uninterrupted_run(tmp_path, kind, base_batch_size):
    """Interrupt at iteration ``stop``, resume a fresh model, compare.

    The epoch runner's CheckpointHook writes ``epoch_2.pth``. The iter
    runner's CheckpointHook cannot serve: mmcv 1.7.2 saves from
    ``after_train_iter`` with ``meta['iter']`` one less than the iterations
    done, so a resume repeats one iteration (an mmcv quirk, see
    docs/semantics.md, "Resume").
    There the checkpoint is taken with ``runner.save_checkpoint`` once the
    interrupted runner has counted its iterations. With ``base_batch_size``
    the resumed run keeps the scaled momenta.
    """
    length, stop = (6, 3) if kind == 'iter' else (3, 8)
    # Every iteration sees the whole data set, so data order cannot matter.
    data = (
        loader(samples=4, batch_size=4)
        if kind == 'iter'
        else loader(samples=8, batch_size=2)
    )

    straight, model_a, rec_a = make_runner(tmp_path / 'a', kind, length=length)
    straight.register_hook(MomentumUpdateHook(base_batch_size=base_batch_size))
    run(straight, data)

    first, _, rec_b = make_runner(tmp_path / 'b', kind, length=length)
    first.register_hook(MomentumUpdateHook(base_batch_size=base_batch_size))
    if kind == 'epoch':
        first.register_checkpoint_hook(dict(interval=1))
    first.register_hook(InterruptBefore(stop), priority='LOWEST')
    with pytest.raises(Interrupt):
        run(first, data)
    if kind == 'iter':
        first.save_checkpoint(str(tmp_path / 'b'), 'iter_{}.pth')

    torch.manual_seed(123)  # a fresh model with other weights
    fresh = ToyBYOL()
    nn.init.normal_(fresh.target.weight)
    resumed, model_c, rec_c = make_runner(
        tmp_path / 'c', kind, model=fresh, length=length
    )
    resumed.register_hook(MomentumUpdateHook(base_batch_size=base_batch_size))
    name = 'epoch_2.pth' if kind == 'epoch' else f'iter_{stop + 1}.pth'
    resumed.resume(str(tmp_path / 'b' / name), map_location='cpu')
    run(resumed, data)

    assert rec_c.iters[0] == stop
    assert rec_b.momenta[:stop] + rec_c.momenta == rec_a.momenta
    max_iters = straight.max_iters
    kappa = data.batch_size / base_batch_size if base_batch_size else 1
    assert rec_a.momenta == pytest.approx(
        [
            reference_momentum(k, max_iters, BASE) ** kappa
            for k in range(max_iters)
        ],
        rel=0,
        abs=1e-15,
    )
    assert_target_equal(model_c, list(model_a.target.parameters()))


@pytest.mark.parametrize(
    'name', ['momentum_hook.MomentumUpdateHook', 'momentum_hook.BYOLHook']
)
def test_config_names_build_our_hook(name):
    hook = build_from_cfg(
        dict(type=name, end_momentum=0.999, update_interval=4), HOOKS
    )
    assert type(hook) is MomentumUpdateHook
    assert (hook.end_momentum, hook.update_interval) == (0.999, 4)


@pytest.mark.parametrize(
    'cfg, error, match',
    [
        (dict(end_momentum=1.5), ValueError, 'end_momentum .* got 1.5'),
        (dict(end_momentum=float('nan')), ValueError, 'got nan'),
        (dict(end_momentum='1'), TypeError, "got '1'"),
        (dict(end_momentum=False), TypeError, 'got False'),
        (dict(update_interval=0), ValueError, 'update_interval .* got 0'),
        (dict(update_interval=1.5), TypeError, 'update_interval .* got 1.5'),
        (dict(end_momentun=1.0), TypeError, 'end_momentun'),
    ],
)
def test_bad_config_is_refused_when_built(cfg, error, match):
    with pytest.raises(error, match=match):
        build_from_cfg(dict(type='momentum_hook.BYOLHook', **cfg), HOOKS)


class NoUpdate(ToyBYOL):
    momentum_update = None


@pytest.mark.parametrize(
    'broken, match',
    [
        ('base_momentum', "ToyBYOL lacks 'base_momentum'"),
        ('momentum', "ToyBYOL lacks 'momentum'"),
        ('momentum_update', 'NoUpdate.momentum_update must be callable'),
        ('bad_base', r'ToyBYOL.base_momentum must be .* got 2.0'),
    ],
)
@pytest.mark.parametrize('wrap', [False, True])
def test_model_contract_is_checked_before_iteration_one(
    tmp_path, broken, match, wrap
):
    model = NoUpdate() if broken == 'momentum_update' else ToyBYOL()
    if broken == 'bad_base':
        model.base_momentum = 2.0
    elif broken != 'momentum_update':
        delattr(model, broken)
    runner, _, _ = make_runner(tmp_path, model=model, wrap=wrap)
    runner.register_hook(MomentumUpdateHook())
    with pytest.raises(
        TypeError if broken != 'bad_base' else ValueError, match=match
    ):
        run(runner)
    assert model.forward_calls == 0


def test_runner_without_run_length_is_refused(tmp_path):
    runner = EpochBasedRunner(
        ToyBYOL(),
        work_dir=str(tmp_path),
        logger=get_logger('momentum_hook_plain_test'),
    )
    hook = MomentumUpdateHook()
    runner.register_hook(hook)
    with pytest.raises(ValueError, match='max_iters=None'):
        hook.before_run(runner)


def test_runner_built_from_a_config_dict(tmp_path):
    model = ToyBYOL()
    runner = build_runner(
        dict(type='IterBasedRunner', max_iters=3),
        default_args=dict(
            model=model,
            work_dir=str(tmp_path),
            optimizer=torch.optim.SGD(model.online.parameters(), lr=0.1),
            logger=get_logger('momentum_hook_plain_test'),
        ),
    )
    runner.register_training_hooks(
        lr_config=None,
        optimizer_config=dict(grad_clip=None),
        custom_hooks_config=[
            dict(type='momentum_hook.BYOLHook', end_momentum=1.0)
        ],
    )
    run(runner)
    assert model.momentum == reference_momentum(2, 3, BASE)


CONFIGS = osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))), 'configs')


@pytest.mark.parametrize(
    'name', ['mmcv_momentum_hook.py', 'mmcv_byol_fragment.py']
)
def test_shipped_configs_train(tmp_path, name):
    cfg = Config.fromfile(osp.join(CONFIGS, name))
    assert cfg.custom_imports['imports'] == ['momentum_hook']
    assert all(
        hook['type'].startswith('momentum_hook.') for hook in cfg.custom_hooks
    )
    interval = cfg.update_interval
    runner, model, recorder = make_runner(
        tmp_path,
        length=2 * interval,
        optimizer_config=cfg.get('optimizer_config'),
    )
    initial = [p.clone() for p in model.target.parameters()]
    runner.register_training_hooks(
        lr_config=None, custom_hooks_config=cfg.custom_hooks
    )
    run(runner)
    updates = [k for k in range(2 * interval) if (k + 1) % interval == 0]
    assert sorted(set(recorder.momenta) - {BASE}) == [
        reference_momentum(k, 2 * interval, BASE) for k in updates if k > 0
    ]
    assert_target_equal(
        model, reference(initial, recorder, 2 * interval, interval=interval)
    )


@pytest.mark.parametrize('wrapper', [nn.DataParallel, MMDataParallel])
def test_wrappers_are_unwrapped(wrapper):
    model = ToyBYOL()
    assert unwrap(wrapper(model)) is model
    assert unwrap(model) is model
