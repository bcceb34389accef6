"""The momentum hook on a real MMEngine ``Runner``.

Every run trains a model of three parameters (``online = nn.Linear(2, 1)``
and its momentum target) on a handful of fixed samples, records what the
model saw, and checks it against references written out here: the cosine
formula and a step-by-step EMA of the recorded online weights.
"""

import itertools
import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.mmengine
pytest.importorskip('mmengine')
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.model import (
    BaseModel,
    MMDistributedDataParallel,
    is_model_wrapper,
)
from mmengine.registry import DATASETS, HOOKS, MODELS
from mmengine.runner import Runner
from momentum_testing import reference_momentum
from torch import nn
from torch.utils.data import Dataset

from momentum_hook import MomentumTargetMixin, mmengine_hook

CONFIGS = Path(__file__).resolve().parents[1] / 'configs'
HOOK_NAMES = ('momentum_hook.MomentumUpdateHook', 'momentum_hook.BYOLHook')
HOOK = HOOK_NAMES[0]
LOG_KEY = 'train/target_momentum'
_MISSING = object()
_run_ids = itertools.count()


@MODELS.register_module(name='MomentumHookTestModel', force=True)
class TinyMomentumModel(MomentumTargetMixin, BaseModel):
    """A linear regression with a momentum target; remembers the momenta.

    ``seen[i]`` is ``self.momentum`` during the forward pass of the i-th
    iteration this model trained.
    """

    def __init__(self, base_momentum=0.5):
        super().__init__()
        self.online = nn.Linear(2, 1)
        self.target = self.init_momentum_target(
            self.online, base_momentum=base_momentum
        )
        self.seen = []

    def forward(self, inputs, data_samples=None, mode='tensor'):
        output = self.online(inputs)
        if mode != 'loss':
            return output
        self.seen.append(self.momentum)
        goal = 3 * inputs[:, :1] - inputs[:, 1:]
        return dict(loss=(output - goal).pow(2).mean())


class PartialContractModel(BaseModel):
    """A model with the hook's contract except what is overridden.

    Pass ``name=_MISSING`` to leave an attribute out, any other value to
    replace it. ``forward_calls`` counts the forward passes.
    """

    def __init__(self, **overrides):
        super().__init__()
        self.online = nn.Linear(2, 1)
        self.forward_calls = 0
        contract = dict(
            base_momentum=0.99, momentum=0.99, momentum_update=lambda: None
        )
        contract.update(overrides)
        for name, value in contract.items():
            if value is not _MISSING:
                setattr(self, name, value)

    def forward(self, inputs, data_samples=None, mode='tensor'):
        self.forward_calls += 1
        return dict(loss=self.online(inputs).sum())


@DATASETS.register_module(name='MomentumHookTestSamples', force=True)
class TinySamples(Dataset):
    """``num_samples`` fixed random 2-vectors, as ``dict(inputs=...)``."""

    def __init__(self, num_samples, seed=0):
        generator = torch.Generator().manual_seed(seed)
        self.inputs = torch.randn(num_samples, 2, generator=generator)

    def __len__(self):
        return len(self.inputs)

    def __getitem__(self, index):
        return dict(inputs=self.inputs[index])


def _unwrap(model):
    return model.module if is_model_wrapper(model) else model


def _flat(module):
    return torch.nn.utils.parameters_to_vector(module.parameters()).detach()


class OnlineRecorder(Hook):
    """Records the online weights at the start and after every iteration."""

    def __init__(self):
        self.initial = None
        self.after_iter = {}

    def before_train(self, runner):
        self.initial = _flat(_unwrap(runner.model).online).clone()

    def after_train_iter(
        self, runner, batch_idx, data_batch=None, outputs=None
    ):
        self.after_iter[runner.iter] = _flat(
            _unwrap(runner.model).online
        ).clone()


def reference_momenta(
    base, end, max_iters, update_interval=1, reach_end=False
):
    """``{k: m_k}`` for the iterations that update the target.

    ``m_k = end - (end - base) * (cos(pi * k / K) + 1) / 2``, K = the run
    length, or with ``reach_end`` the index of the run's last update.
    """
    updates = [k for k in range(max_iters) if (k + 1) % update_interval == 0]
    horizon = updates[-1] if reach_end else max_iters
    return {k: reference_momentum(k, horizon, base, end) for k in updates}


def momenta_in_forward(momenta, base, max_iters):
    """What ``model.momentum`` holds in each forward: the last one written."""
    current, seen = base, []
    for k in range(max_iters):
        current = momenta.get(k, current)
        seen.append(current)
    return seen


def reference_target(initial, online_after_iter, momenta):
    """The target EMA, in float64, of the online weights after each update."""
    target = initial.double()
    for k, m in momenta.items():
        target = m * target + (1 - m) * online_after_iter[k].double()
    return target


def assert_follows_reference(model, recorder, expected, base, max_iters):
    """``model`` saw the ``expected`` momenta; its target is their EMA."""
    assert model.seen == pytest.approx(
        momenta_in_forward(expected, base, max_iters), rel=0, abs=1e-12
    )
    torch.testing.assert_close(
        _flat(model.target).double(),
        reference_target(recorder.initial, recorder.after_iter, expected),
        rtol=1e-6,
        atol=1e-6,
    )


def build_runner(
    work_dir,
    model,
    custom_hooks,
    by_epoch=False,
    iters=6,
    accumulative_counts=1,
    checkpoint_interval=None,
    **kwargs,
):
    """A real Runner that trains ``model`` for ``iters`` batches of 2.

    By epoch, the run is 2 epochs of ``iters // 2`` batches. By iteration,
    the dataset holds exactly ``iters`` batches: MMEngine sleeps 2 s each
    time its infinite iterator restarts the dataloader.
    """
    if by_epoch:
        train_cfg = dict(by_epoch=True, max_epochs=2)
        num_samples = iters
    else:
        train_cfg = dict(by_epoch=False, max_iters=iters)
        num_samples = 2 * iters
    checkpoint = None
    if checkpoint_interval:
        checkpoint = dict(
            type='CheckpointHook',
            interval=checkpoint_interval,
            by_epoch=by_epoch,
        )
    options = dict(
        model=model,
        work_dir=str(work_dir),
        experiment_name=f'momentum_hook_{next(_run_ids)}',
        train_dataloader=dict(
            dataset=TinySamples(num_samples),
            sampler=dict(type='DefaultSampler', shuffle=False),
            batch_size=2,
            collate_fn=dict(type='default_collate'),
        ),
        optim_wrapper=dict(
            optimizer=dict(type='SGD', lr=0.1, momentum=0.5),
            accumulative_counts=accumulative_counts,
        ),
        train_cfg=train_cfg,
        default_hooks=dict(
            logger=dict(type='LoggerHook', interval=1), checkpoint=checkpoint
        ),
        log_processor=dict(by_epoch=by_epoch),
        custom_hooks=custom_hooks,
        env_cfg=dict(dist_cfg=dict(backend='gloo')),
    )
    options.update(kwargs)
    return Runner(**options)


def logged_momenta(runner):
    """The ``train/target_momentum`` history of the runner's message hub."""
    return runner.message_hub.get_scalar(LOG_KEY).data[0].tolist()


@pytest.mark.parametrize('name', HOOK_NAMES)
def test_every_name_builds_the_mmengine_hook(name):
    hook = HOOKS.build(dict(type=name, end_momentum=0.999, update_interval=2))
    assert type(hook) is mmengine_hook.MomentumUpdateHook
    assert (hook.end_momentum, hook.update_interval) == (0.999, 2)


@pytest.mark.parametrize('name', HOOK_NAMES)
def test_runner_from_cfg_trains_with_the_hook_by_name(tmp_path, name):
    cfg = Config(
        dict(
            model=dict(type='MomentumHookTestModel', base_momentum=0.9),
            work_dir=str(tmp_path),
            experiment_name=f'momentum_hook_cfg_{next(_run_ids)}',
            train_dataloader=dict(
                dataset=dict(type='MomentumHookTestSamples', num_samples=8),
                sampler=dict(type='DefaultSampler', shuffle=False),
                batch_size=2,
                collate_fn=dict(type='default_collate'),
            ),
            optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.1)),
            train_cfg=dict(by_epoch=False, max_iters=4),
            default_hooks=dict(checkpoint=None),
            custom_imports=dict(imports=['momentum_hook']),
            custom_hooks=[dict(type=name, end_momentum=0.99)],
        )
    )
    runner = Runner.from_cfg(cfg)
    hooks = [
        h
        for h in runner.hooks
        if isinstance(h, mmengine_hook.MomentumUpdateHook)
    ]
    assert len(hooks) == 1
    runner.train()
    expected = reference_momenta(0.9, 0.99, max_iters=4)
    assert runner.model.seen == pytest.approx(
        list(expected.values()), rel=0, abs=1e-12
    )


@pytest.mark.parametrize('wrapped', [False, True], ids=['plain', 'ddp'])
@pytest.mark.parametrize(
    'by_epoch', [False, True], ids=['by_iter', 'by_epoch']
)
def test_schedule_and_target_follow_the_reference(
    tmp_path, request, by_epoch, wrapped
):
    torch.manual_seed(0)
    model = TinyMomentumModel(base_momentum=0.5)
    if wrapped:
        request.getfixturevalue('single_rank_group')
        model = MMDistributedDataParallel(module=model)
    recorder = OnlineRecorder()
    runner = build_runner(
        tmp_path,
        model,
        [dict(type=HOOK, end_momentum=1.0), recorder],
        by_epoch=by_epoch,
        iters=6,
    )
    runner.train()

    assert is_model_wrapper(runner.model) == wrapped
    inner = _unwrap(runner.model)
    assert runner.max_iters == 6
    expected = reference_momenta(0.5, 1.0, max_iters=6)
    assert logged_momenta(runner) == pytest.approx(
        list(expected.values()), rel=0, abs=1e-12
    )
    assert_follows_reference(inner, recorder, expected, 0.5, max_iters=6)
    # The target lags the online network: the run is not trivial.
    assert not torch.allclose(
        _flat(inner.target), _flat(inner.online), atol=1e-3
    )


def test_reach_end_momentum_ends_exactly_on_the_last_update(tmp_path):
    torch.manual_seed(0)
    model = TinyMomentumModel(base_momentum=0.5)
    recorder = OnlineRecorder()
    runner = build_runner(
        tmp_path,
        model,
        [
            dict(
                type='momentum_hook.BYOLHook',
                end_momentum=0.9,
                update_interval=3,
                reach_end_momentum=True,
            ),
            recorder,
        ],
        iters=7,
    )
    runner.train()

    expected = reference_momenta(
        0.5, 0.9, max_iters=7, update_interval=3, reach_end=True
    )
    assert list(expected) == [2, 5]
    history = logged_momenta(runner)
    assert history[-1] == 0.9
    assert history == pytest.approx(list(expected.values()), rel=0, abs=1e-12)
    assert_follows_reference(model, recorder, expected, 0.5, max_iters=7)


@pytest.mark.parametrize('update_interval', [2, 4])
def test_accumulation_updates_the_target_after_optimizer_steps(
    tmp_path, update_interval
):
    torch.manual_seed(0)
    model = TinyMomentumModel(base_momentum=0.5)
    recorder = OnlineRecorder()
    runner = build_runner(
        tmp_path,
        model,
        [
            dict(type=HOOK, end_momentum=1.0, update_interval=update_interval),
            recorder,
        ],
        iters=8,
        accumulative_counts=2,
    )
    runner.train()

    # The optimizer steps after every second iteration only.
    onlines = [recorder.initial] + [recorder.after_iter[k] for k in range(8)]
    moved = [not torch.equal(a, b) for a, b in zip(onlines, onlines[1:])]
    assert moved == [False, True] * 4
    expected = reference_momenta(
        0.5, 1.0, max_iters=8, update_interval=update_interval
    )
    assert len(logged_momenta(runner)) == 8 // update_interval
    assert logged_momenta(runner) == pytest.approx(
        list(expected.values()), rel=0, abs=1e-12
    )
    assert_follows_reference(model, recorder, expected, 0.5, max_iters=8)


@pytest.mark.parametrize('update_interval', [1, 3])
def test_update_interval_off_the_optimizer_steps_fails_at_start(
    tmp_path, update_interval
):
    model = TinyMomentumModel()
    runner = build_runner(
        tmp_path,
        model,
        [dict(type=HOOK, update_interval=update_interval)],
        iters=6,
        accumulative_counts=2,
    )
    with pytest.raises(ValueError) as error:
        runner.train()
    assert f'update_interval={update_interval}' in str(error.value)
    assert 'accumulative_counts=2' in str(error.value)
    assert model.seen == []


BAD_ARGUMENTS = [
    (dict(end_momentum=1.5), ValueError),
    (dict(end_momentum=float('nan')), ValueError),
    (dict(end_momentum='0.9'), TypeError),
    (dict(end_momentum=True), TypeError),
    (dict(update_interval=0), ValueError),
    (dict(update_interval=2.0), TypeError),
    (dict(update_interval=True), TypeError),
    (dict(reach_end_momentum=1), TypeError),
    (dict(on_skipped_step='skip'), ValueError),
    (dict(on_skipped_step=True), TypeError),
]


@pytest.mark.parametrize(
    'kwargs, error', BAD_ARGUMENTS, ids=lambda value: repr(value)
)
def test_bad_arguments_fail_when_the_config_is_built(tmp_path, kwargs, error):
    ((name, value),) = kwargs.items()
    with pytest.raises(error) as raised:
        build_runner(
            tmp_path, TinyMomentumModel(), [dict(type=HOOK, **kwargs)]
        )
    assert name in str(raised.value)
    assert repr(value) in str(raised.value)
    # The mmcv 1.x hook shares the checks: same error, same words.
    mmcv_hook = pytest.importorskip('momentum_hook.mmcv_hook')
    with pytest.raises(error) as raised_by_mmcv:
        mmcv_hook.MomentumUpdateHook(**kwargs)
    assert str(raised.value).endswith(str(raised_by_mmcv.value))


@pytest.mark.parametrize('adapter', ['mmengine_hook', 'mmcv_hook'])
def test_public_surface_is_what_the_runner_calls(adapter):
    """Beyond the framework's Hook: the held updater and the options,
    read-only; the schedule's own methods stay on ``hook.updater``."""
    module = pytest.importorskip(f'momentum_hook.{adapter}')
    base = module.Hook
    hook = module.MomentumUpdateHook(
        end_momentum=0.999, update_interval=2, base_batch_size=64
    )
    options = dict(
        end_momentum=0.999,
        update_interval=2,
        reach_end_momentum=False,
        base_batch_size=64,
        on_skipped_step=dict(mmengine_hook='hold', mmcv_hook='update')[
            adapter
        ],
    )
    public = {
        name
        for name in dir(hook)
        if not name.startswith('_') and name not in dir(base)
    }
    assert public == {'updater', *options}
    assert {name: getattr(hook, name) for name in options} == options
    for name, value in options.items():
        with pytest.raises(AttributeError):
            setattr(hook, name, value)
    assert hook.updater.momentum_at(1, 4, 0.9) == pytest.approx(
        reference_momentum(1, 4, 0.9, 0.999)
    )


@pytest.mark.parametrize(
    'overrides, error, words',
    [
        (dict(base_momentum=_MISSING), TypeError, ["lacks 'base_momentum'"]),
        (dict(momentum=_MISSING), TypeError, ["lacks 'momentum'"]),
        (
            dict(momentum_update=_MISSING),
            TypeError,
            ["lacks 'momentum_update'"],
        ),
        (
            dict(
                base_momentum=_MISSING,
                momentum=_MISSING,
                momentum_update=_MISSING,
            ),
            TypeError,
            ["'base_momentum'", "'momentum'", "'momentum_update'"],
        ),
        (
            dict(momentum_update=0.5),
            TypeError,
            ['momentum_update must be call'],
        ),
        (dict(base_momentum=1.5), ValueError, ['base_momentum', '1.5']),
    ],
    ids=[
        'no_base_momentum',
        'no_momentum',
        'no_momentum_update',
        'none',
        'update_not_callable',
        'base_momentum_out_of_range',
    ],
)
def test_model_breaking_the_contract_fails_before_the_first_iteration(
    tmp_path, overrides, error, words
):
    model = PartialContractModel(**overrides)
    runner = build_runner(tmp_path, model, [dict(type=HOOK)], iters=2)
    with pytest.raises(error) as raised:
        runner.train()
    message = str(raised.value)
    assert 'PartialContractModel' in message
    for word in words:
        assert word in message
    assert model.forward_calls == 0


def test_momentum_reaches_the_text_and_json_logs(tmp_path):
    torch.manual_seed(0)
    runner = build_runner(
        tmp_path,
        TinyMomentumModel(base_momentum=0.5),
        [
            mmengine_hook.MomentumUpdateHook(
                end_momentum=1.0, update_interval=2
            )
        ],
        iters=6,
    )
    runner.train()

    expected = reference_momenta(0.5, 1.0, max_iters=6, update_interval=2)
    (scalars,) = tmp_path.glob('*/vis_data/scalars.json')
    rows = [json.loads(line) for line in scalars.read_text().splitlines()]
    by_step = {
        row['step']: row['target_momentum']
        for row in rows
        if 'target_momentum' in row
    }
    # From the first update (iteration 1, step 2) on, LoggerHook logs the
    # latest momentum at every step.
    assert sorted(by_step) == list(range(2, 7))
    assert [by_step[step] for step in range(2, 7)] == pytest.approx(
        momenta_in_forward(expected, 0.5, max_iters=6)[1:], rel=0, abs=1e-12
    )
    (log,) = tmp_path.glob('*/*.log')
    text = log.read_text()
    assert f'target_momentum: {expected[5]:.4f}' in text
    # Before iteration 1: which hook, with which arguments.
    assert (
        'momentum_hook.mmengine_hook.MomentumUpdateHook(end_momentum=1.0,'
        ' update_interval=2, reach_end_momentum=False) schedules the '
        'target momentum of TinyMomentumModel from base_momentum=0.5 over '
        '6 iterations'
    ) in text
    assert text.index('MomentumUpdateHook(end_momentum') < text.index(
        'target_momentum: '
    )


@pytest.mark.filterwarnings(
    'ignore:Environment variable TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD:UserWarning'
)
def test_resume_repeats_the_uninterrupted_run(tmp_path, monkeypatch):
    # MMEngine 0.10.7 checkpoints hold numpy arrays and a HistoryBuffer,
    # which torch >= 2.6 refuses to load by default; the documented remedy
    # for trusted checkpoints, set for this test only:
    monkeypatch.setenv('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD', '1')
    hook = dict(type=HOOK, end_momentum=1.0)
    torch.manual_seed(0)
    full = build_runner(
        tmp_path / 'full',
        TinyMomentumModel(0.5),
        [hook],
        iters=8,
        checkpoint_interval=4,
    )
    full.train()
    torch.manual_seed(1)  # different initial weights, replaced on resume
    resumed = build_runner(
        tmp_path / 'resumed',
        TinyMomentumModel(0.5),
        [hook],
        iters=8,
        load_from=str(tmp_path / 'full' / 'iter_4.pth'),
        resume=True,
    )
    resumed.train()

    assert resumed.model.seen == full.model.seen[4:]
    assert logged_momenta(resumed) == logged_momenta(full)
    for name in ('online', 'target'):
        for mine, theirs in zip(
            getattr(resumed.model, name).parameters(),
            getattr(full.model, name).parameters(),
        ):
            assert torch.equal(mine, theirs)


@pytest.mark.parametrize(
    'config', ['mmengine_momentum_hook.py', 'mmengine_byol_fragment.py']
)
def test_shipped_configs_build_the_hook(config):
    cfg = Config.fromfile(CONFIGS / config)
    assert 'momentum_hook' in cfg.custom_imports['imports']
    hook = HOOKS.build(cfg.custom_hooks[0])
    assert type(hook) is mmengine_hook.MomentumUpdateHook
    if 'optim_wrapper' in cfg:
        assert hook.update_interval == cfg.optim_wrapper.accumulative_counts


def test_byol_fragment_trains_with_its_accumulation(tmp_path):
    fragment = Config.fromfile(CONFIGS / 'mmengine_byol_fragment.py')
    counts = fragment.optim_wrapper.accumulative_counts
    assert counts > 1
    torch.manual_seed(0)
    model = TinyMomentumModel(base_momentum=0.5)
    optim_wrapper = fragment.optim_wrapper.to_dict()
    optim_wrapper['optimizer'] = dict(type='SGD', lr=0.01)
    runner = build_runner(
        tmp_path,
        model,
        fragment.custom_hooks.copy(),
        iters=2 * counts,
        optim_wrapper=optim_wrapper,
    )
    runner.train()

    end = fragment.custom_hooks[0].get('end_momentum', 1.0)
    expected = reference_momenta(
        0.5, end, max_iters=2 * counts, update_interval=counts
    )
    assert list(expected) == [counts - 1, 2 * counts - 1]
    assert logged_momenta(runner) == pytest.approx(
        list(expected.values()), rel=0, abs=1e-12
    )
