"""The EMA scaling rule: ``scaled_momentum`` and ``base_batch_size``.

References: with ``kappa = S / base_batch_size`` every update must use the
cosine schedule's value (written out in ``momentum_testing``) raised to
``kappa``; the EMA is replayed step by step from the recorded online weights.
Runners are real (mmcv ``EpochBasedRunner``/``IterBasedRunner``, MMEngine
``Runner``) and train the tiny models of the hook tests.
"""
import glob
import json
import os.path as osp
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.mmcv, pytest.mark.mmengine]
pytest.importorskip('mmcv')
pytest.importorskip('mmengine')
import test_hook_mmcv as mmcv_case
import test_hook_mmengine as engine_case
from mmcv.runner import HOOKS as MMCV_HOOKS
from mmcv.utils import build_from_cfg
from momentum_testing import TinyBYOL, ema_step, float64_copy, params
from momentum_testing import reference_momentum, run_doc_example
from torch.utils.data import DataLoader

import momentum_hook
from momentum_hook import mmcv_hook, scaled_momentum

DOCS = Path(__file__).resolve().parents[1] / 'docs' / 'scaling.md'


# -- the rule itself ---------------------------------------------------------

@pytest.mark.parametrize('n', [1, 2, 3, 8, 32])
@pytest.mark.parametrize('momentum', [0., 0.5, 0.9, 0.99, 0.996, 1.])
def test_one_update_at_kappa_n_is_n_updates_on_a_frozen_online_network(
        momentum, n):
    """float64: the package's EMA once at ``scaled_momentum(m, n)`` equals
    the reference EMA ``n`` times at ``m``, with the online network fixed;
    and ``n`` updates at ``scaled_momentum(m, 1 / n)`` equal one at ``m``."""
    torch.manual_seed(n)
    model = TinyBYOL(base_momentum=momentum).double()
    with torch.no_grad():
        for param in params(model.target_net):
            param.normal_()  # a target away from the online network
    online = float64_copy(params(model.online_net))
    start = float64_copy(params(model.target_net))

    model.momentum = scaled_momentum(momentum, n)
    model.momentum_update()
    repeated = start
    for _ in range(n):
        repeated = ema_step(repeated, online, momentum)
    for got, want in zip(params(model.target_net), repeated):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)

    fine = start
    for _ in range(n):
        fine = ema_step(fine, online, scaled_momentum(momentum, 1 / n))
    for got, want in zip(fine, ema_step(start, online, momentum)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_scaled_momentum_is_exported_and_exact_at_kappa_one():
    assert momentum_hook.scaled_momentum is scaled_momentum
    assert 'scaled_momentum' in momentum_hook.__all__
    for m in (0., 0.9, 0.99, 0.996, 1.):
        assert scaled_momentum(m, 1) == m
    assert scaled_momentum(0.99, 2) == 0.99 * 0.99


@pytest.mark.parametrize('kwargs, error, words', [
    (dict(momentum=0.99, kappa=0), ValueError, ['kappa', 'got 0.0']),
    (dict(momentum=0.99, kappa=-2), ValueError, ['kappa', 'got -2.0']),
    (dict(momentum=0.99, kappa=float('nan')), ValueError, ['got nan']),
    (dict(momentum=0.99, kappa=float('inf')), ValueError, ['got inf']),
    (dict(momentum=0.99, kappa='2'), TypeError, ["got '2'"]),
    (dict(momentum=0.99, kappa=True), TypeError, ['got True']),
    (dict(momentum=0.99, kappa=None), TypeError, ['got None']),
    (dict(momentum=1.5, kappa=2), ValueError, ['momentum', 'got 1.5']),
    (dict(momentum=float('nan'), kappa=2), ValueError, ['momentum', 'nan']),
], ids=lambda value: repr(value))
def test_scaled_momentum_refuses_bad_values(kwargs, error, words):
    with pytest.raises(error) as raised:
        scaled_momentum(**kwargs)
    for word in words:
        assert word in str(raised.value)
    if 'kappa' in words:  # it says what kappa is
        assert 'samples per update' in str(raised.value)


# -- mmcv 1.x runners ----------------------------------------------------

BASE = mmcv_case.BASE


def replay(initial, recorder, momenta):
    """The ToyBYOL's own update loop, at ``momenta[k]`` after iteration k."""
    target = [p.clone() for p in initial]
    for k, online in zip(recorder.iters, recorder.online):
        if k in momenta:
            m = momenta[k]
            target = [t * m + o * (1. - m) for t, o in zip(target, online)]
    return target


def scaled_reference(max_iters, kappa, update_interval=1, base=BASE):
    """``{k: m_k ** kappa}`` for the update iterations."""
    return {k: reference_momentum(k, max_iters, base)**kappa
            for k in range(max_iters) if (k + 1) % update_interval == 0}


@pytest.mark.parametrize('base_batch_size, kappa', [(8, 0.25), (1, 2.),
                                                    (2, 1.)])
@pytest.mark.parametrize('kind', ['iter', 'epoch'])
def test_mmcv_runners_use_the_scaled_momenta(tmp_path, kind,
                                             base_batch_size, kappa):
    """Batch 2 on one process: S = 2, kappa = 2 / base_batch_size."""
    runner, model, recorder = mmcv_case.make_runner(
        tmp_path, kind, length=3 if kind == 'epoch' else 7)
    initial = [p.clone() for p in model.target.parameters()]
    runner.register_hook(build_from_cfg(
        dict(type='momentum_hook.MomentumUpdateHook',
             base_batch_size=base_batch_size), MMCV_HOOKS))
    runner.register_timer_hook(dict(type='IterTimerHook'))
    runner.register_logger_hooks(
        dict(interval=1, hooks=[dict(type='TextLoggerHook', by_epoch=False)]))
    mmcv_case.run(runner)

    max_iters = runner.max_iters
    expected = scaled_reference(max_iters, kappa)
    assert recorder.momenta == pytest.approx(list(expected.values()), rel=0,
                                             abs=1e-15)
    if kappa == 1:  # S == base_batch_size: the unscaled momenta, bit for bit
        assert recorder.momenta == [reference_momentum(k, max_iters, BASE)
                                    for k in range(max_iters)]
    mmcv_case.assert_target_equal(model, replay(initial, recorder,
                                                dict(enumerate(
                                                    recorder.momenta))))
    # The logged target_momentum is the value used.
    json_log, = glob.glob(osp.join(str(tmp_path), '*.log.json'))
    with open(json_log) as f:
        logged = [json.loads(line)['target_momentum'] for line in f
                  if '"mode": "train"' in line]
    assert logged == pytest.approx(recorder.momenta, abs=1e-4)
    log = (tmp_path / 'run.log').read_text()
    assert (f'reach_end_momentum=False, base_batch_size={base_batch_size}) '
            'schedules') in log
    assert ('S = 2 per process x 1 processes x update_interval 1 = 2 '
            f'samples per update, so kappa = S / base_batch_size = '
            f'{kappa:.6g}') in log
    assert f'(base_momentum {BASE} -> {BASE**kappa!r})' in log
    assert log.index('base_batch_size=') < log.index('target_momentum: ')


def test_mmcv_gradient_accumulation_counts_in_the_samples(tmp_path):
    """Batch 2 x 2 accumulated iterations = 4 samples per update."""
    runner, model, recorder = mmcv_case.make_runner(
        tmp_path, length=8, optimizer_config=dict(
            type='GradientCumulativeOptimizerHook', cumulative_iters=2))
    initial = [p.clone() for p in model.target.parameters()]
    runner.register_hook(mmcv_hook.MomentumUpdateHook(update_interval=2,
                                                      base_batch_size=2))
    mmcv_case.run(runner)
    expected = scaled_reference(8, 2., update_interval=2)
    assert list(expected) == [1, 3, 5, 7]
    assert [recorder.momenta[k] for k in expected] == pytest.approx(
        list(expected.values()), rel=0, abs=1e-15)
    mmcv_case.assert_target_equal(
        model, replay(initial, recorder,
                      {k: recorder.momenta[k] for k in expected}))


# -- MMEngine Runner -----------------------------------------------------

@pytest.mark.parametrize('by_epoch', [False, True],
                         ids=['by_iter', 'by_epoch'])
def test_mmengine_runner_uses_the_scaled_momenta(tmp_path, by_epoch):
    """Batch 2 x accumulative_counts 2 = 4 samples per update; 8 / 4."""
    torch.manual_seed(0)
    model = engine_case.TinyMomentumModel(base_momentum=0.5)
    recorder = engine_case.OnlineRecorder()
    runner = engine_case.build_runner(
        tmp_path, model,
        [dict(type=engine_case.HOOK, update_interval=2, base_batch_size=8),
         recorder], by_epoch=by_epoch, iters=8, accumulative_counts=2)
    runner.train()

    expected = {k: m**0.5 for k, m in engine_case.reference_momenta(
        0.5, 1., max_iters=8, update_interval=2).items()}
    assert engine_case.logged_momenta(runner) == pytest.approx(
        list(expected.values()), rel=0, abs=1e-15)
    engine_case.assert_follows_reference(model, recorder, expected, 0.5,
                                         max_iters=8)
    log, = tmp_path.glob('*/*.log')
    text = log.read_text()
    assert ('S = 2 per process x 1 processes x update_interval 2 = 4 '
            'samples per update, so kappa = S / base_batch_size = 0.5') in text
    assert f'(base_momentum 0.5 -> {0.5**0.5!r})' in text


@pytest.mark.filterwarnings(
    'ignore:Environment variable TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD:UserWarning')
def test_mmengine_resume_keeps_the_scaled_momenta(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD', '1')
    hook = dict(type=engine_case.HOOK, base_batch_size=8)
    torch.manual_seed(0)
    full = engine_case.build_runner(
        tmp_path / 'full', engine_case.TinyMomentumModel(0.5), [hook],
        iters=8, checkpoint_interval=4)
    full.train()
    torch.manual_seed(1)
    resumed = engine_case.build_runner(
        tmp_path / 'resumed', engine_case.TinyMomentumModel(0.5), [hook],
        iters=8, load_from=str(tmp_path / 'full' / 'iter_4.pth'),
        resume=True)
    resumed.train()

    expected = [reference_momentum(k, 8, 0.5)**0.25 for k in range(8)]
    assert full.model.seen == pytest.approx(expected, rel=0, abs=1e-15)
    assert resumed.model.seen == pytest.approx(expected[4:], rel=0,
                                               abs=1e-15)
    for name in ('online', 'target'):
        for mine, theirs in zip(getattr(resumed.model, name).parameters(),
                                getattr(full.model, name).parameters()):
            assert torch.equal(mine, theirs)


# -- refusals ------------------------------------------------------------

BAD_BASE_BATCH_SIZES = [
    (0, ValueError), (-4096, ValueError), (2.5, TypeError),
    (4096.0, TypeError), ('4096', TypeError), (float('nan'), TypeError),
    (True, TypeError), (float('inf'), TypeError)]


@pytest.mark.parametrize('value, error', BAD_BASE_BATCH_SIZES,
                         ids=lambda value: repr(value))
@pytest.mark.parametrize('framework', ['mmcv', 'mmengine'])
def test_bad_base_batch_size_is_refused_when_the_hook_is_built(
        tmp_path, framework, value, error):
    with pytest.raises(error) as raised:
        if framework == 'mmcv':
            build_from_cfg(dict(type='momentum_hook.BYOLHook',
                                base_batch_size=value), MMCV_HOOKS)
        else:
            engine_case.build_runner(
                tmp_path, engine_case.TinyMomentumModel(),
                [dict(type=engine_case.HOOK, base_batch_size=value)])
    message = str(raised.value)
    assert 'base_batch_size must be a positive int' in message
    assert f'got {value!r}' in message
    # What to pass: the meaning, an example, and the way out.
    assert 'samples per target update' in message and '4096' in message
    assert 'None' in message


@pytest.mark.parametrize('kind', ['iter', 'epoch'])
def test_mmcv_loader_without_a_batch_size_is_refused_before_iteration_one(
        tmp_path, kind):
    runner, model, _ = mmcv_case.make_runner(tmp_path, kind)
    runner.register_hook(mmcv_hook.MomentumUpdateHook(base_batch_size=8))
    unbatched = DataLoader(torch.linspace(-1, 1, 8).unsqueeze(1),
                           batch_size=None)
    with pytest.raises(ValueError, match='no fixed batch size '
                       r'\(batch_size=None\): give it a batch_size'):
        mmcv_case.run(runner, unbatched)
    assert model.forward_calls == 0


def test_mmengine_loader_without_a_batch_size_is_refused_before_iteration_one(
        tmp_path):
    model = engine_case.TinyMomentumModel()
    runner = engine_case.build_runner(
        tmp_path, model, [dict(type=engine_case.HOOK, base_batch_size=8)],
        iters=2, train_dataloader=DataLoader(engine_case.TinySamples(4),
                                             batch_size=None))
    with pytest.raises(ValueError, match='no fixed batch size'):
        runner.train()
    assert model.seen == []


# -- the docs ------------------------------------------------------------

@pytest.mark.slow
def test_the_plain_loop_example_uses_the_scaled_momenta():
    namespace = run_doc_example(DOCS, 'Without a runner')
    kappa = namespace['kappa']
    assert kappa == 256 / 4096
    assert namespace['m'] == pytest.approx(
        reference_momentum(99, 100, 0.99)**kappa, rel=0, abs=1e-15)
    assert namespace['m'] > reference_momentum(99, 100, 0.99)  # kappa < 1
    for t, o in zip(namespace['target'].parameters(),
                    namespace['online'].parameters()):
        assert not torch.equal(t, o)


# -- the experiment's grid -------------------------------------------------

def test_the_grid_scales_the_lr_in_both_arms_and_the_momentum_in_one():
    from momentum_hook.demo.scaling import arms, markdown_table
    grid = arms([1, 4], batch=128, lr=5e-3)
    assert [name for name, _, _ in grid] == [
        '1B per update', '4B per update', '4B scaled']
    (_, _, one), (_, _, plain), (_, _, scaled) = grid
    assert one == ['data.samples_per_gpu=128', 'optimizer.lr=0.005']
    assert plain == ['data.samples_per_gpu=512', 'optimizer.lr=0.01']
    assert scaled == plain + ['custom_hooks.0.base_batch_size=128']
    runs = [{'1-shot': 0.5, '5-shot': 0.6, 'knn': 0.7, 'seconds': 10.},
            {'1-shot': 0.7, '5-shot': 0.8, 'knn': 0.9, 'seconds': 12.}]
    table = markdown_table(dict(arms=[dict(name='4B scaled', multiplier=4,
                                           lr=0.01, runs=runs)]))
    assert table.splitlines()[-1] == (
        '| 4B scaled | m ** 4 | 0.01 | 2 | 0.600 ± 0.141 | 0.700 ± 0.141 | '
        '0.800 ± 0.141 | 11 ± 1 |')


def test_mmengine_flexible_runner_uses_the_scaled_momenta(tmp_path):
    """MMEngine's FlexibleRunner (one process, its default strategy): batch
    2 on one process, base_batch_size 8, kappa 1/4."""
    from mmengine.runner._flexible_runner import FlexibleRunner
    torch.manual_seed(0)
    model = engine_case.TinyMomentumModel(base_momentum=0.5)
    runner = FlexibleRunner(
        model=model, work_dir=str(tmp_path), experiment_name='flexible',
        train_dataloader=dict(
            dataset=engine_case.TinySamples(8), batch_size=2,
            sampler=dict(type='DefaultSampler', shuffle=False),
            collate_fn=dict(type='default_collate')),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.1)),
        train_cfg=dict(by_epoch=False, max_iters=4),
        default_hooks=dict(checkpoint=None),
        custom_hooks=[dict(type=engine_case.HOOK, base_batch_size=8)])
    runner.train()
    expected = [reference_momentum(k, 4, 0.5)**0.25 for k in range(4)]
    assert model.seen == pytest.approx(expected, rel=0, abs=1e-15)
    assert engine_case.logged_momenta(runner) == model.seen
