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
from momentum_testing import (
    TinyBYOL,
    ema_step,
    float64_copy,
    params,
    reference_momentum,
    run_doc_example,
)
from torch.utils.data import DataLoader

import momentum_hook
from momentum_hook import mmcv_hook, scaled_momentum

DOCS = Path(__file__).resolve().parents[1] / 'docs' / 'scaling.md'


# -- the rule itself ---------------------------------------------------------


@pytest.mark.parametrize('n', [1, 2, 3, 8, 32])
@pytest.mark.parametrize('momentum', [0.0, 0.5, 0.9, 0.99, 0.996, 1.0])
def test_one_update_at_kappa_n_is_n_updates_on_a_frozen_online_network(
    momentum, n
):
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
    for m in (0.0, 0.9, 0.99, 0.996, 1.0):
        assert scaled_momentum(m, 1) == m
    assert scaled_momentum(0.99, 2) == 0.99 * 0.99


@pytest.mark.parametrize(
    'kwargs, error, words',
    [
        (dict(momentum=0.99, kappa=0), ValueError, ['kappa', 'got 0.0']),
        (dict(momentum=0.99, kappa=-2), ValueError, ['kappa', 'got -2.0']),
        (dict(momentum=0.99, kappa=float('nan')), ValueError, ['got nan']),
        (dict(momentum=0.99, kappa=float('inf')), ValueError, ['got inf']),
        (dict(momentum=0.99, kappa='2'), TypeError, ["got '2'"]),
        (dict(momentum=0.99, kappa=True), TypeError, ['got True']),
        (dict(momentum=0.99, kappa=None), TypeError, ['got None']),
        (dict(momentum=1.5, kappa=2), ValueError, ['momentum', 'got 1.5']),
        (
            dict(momentum=float('nan'), kappa=2),
            ValueError,
            ['momentum', 'nan'],
        ),
    ],
    ids=lambda value: repr(value),
)
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
            target = [t * m + o * (1.0 - m) for t, o in zip(target, online)]
    return target


def scaled_reference(max_iters, kappa, update_interval=1, base=BASE):
    """``{k: m_k ** kappa}`` for the update iterations."""
    return {
        k: reference_momentum(k, max_iters, base) ** kappa
        for k in range(max_iters)
        if (k + 1) % update_interval == 0
    }


@pytest.mark.parametrize(
    'base_batch_size, kappa', [(8, 0.25), (1, 2.0), (2, 1.0)]
)
@pytest.mark.parametrize('kind', ['iter', 'epoch'])
def test_mmcv_runners_use_the_scaled_momenta(
    tmp_path, kind, base_batch_size, kappa
):
    """Batch 2 on one process: S = 2, kappa = 2 / base_batch_size."""
    runner, model, recorder = mmcv_case.make_runner(
        tmp_path, kind, length=3 if kind == 'epoch' else 7
    )
    initial = [p.clone() for p in model.target.parameters()]
    runner.register_hook(
        build_from_cfg(
            dict(
                type='momentum_hook.MomentumUpdateHook',
                base_batch_size=base_batch_size,
            ),
            MMCV_HOOKS,
        )
    )
    runner.register_timer_hook(dict(type='IterTimerHook'))
    runner.register_logger_hooks(
        dict(interval=1, hooks=[dict(type='TextLoggerHook', by_epoch=False)])
    )
    mmcv_case.run(runner)

    max_iters = runner.max_iters
    expected = scaled_reference(max_iters, kappa)
    assert recorder.momenta == pytest.approx(
        list(expected.values()), rel=0, abs=1e-15
    )
    if kappa == 1:  # S == base_batch_size: the unscaled momenta, bit for bit
        assert recorder.momenta == [
            reference_momentum(k, max_iters, BASE) for k in range(max_iters)
        ]
    mmcv_case.assert_target_equal(
        model, replay(initial, recorder, dict(enumerate(recorder.momenta)))
    )
    # The logged target_momentum is the value used.
    (json_log,) = glob.glob(osp.join(str(tmp_path), '*.log.json'))
    with open(json_log) as f:
        logged = [
            json.loads(line)['target_momentum']
            for line in f
            if '"mode": "train"' in line
        ]
    assert logged == pytest.approx(recorder.momenta, abs=1e-4)
    log = (tmp_path / 'run.log').read_text()
    assert (
        f'reach_end_momentum=False, base_batch_size={base_batch_size}) '
        'schedules'
    ) in log
    assert (
        'S = 2 per process x 1 processes x update_interval 1 = 2 '
        f'samples per update, so kappa = S / base_batch_size = '
        f'{kappa:.6g}'
    ) in log
    assert f'(base_momentum {BASE} -> {BASE**kappa!r})' in log
    assert log.index('base_batch_size=') < log.index('target_momentum: ')


def test_mmcv_gradient_accumulation_counts_in_the_samples(tmp_path):
    """Batch 2 x 2 accumulated iterations = 4 samples per update."""
    runner, model, recorder = mmcv_case.make_runner(
        tmp_path,
        length=8,
        optimizer_config=dict(
            type='GradientCumulativeOptimizerHook', cumulative_iters=2
        ),
    )
    initial = [p.clone() for p in model.target.parameters()]
    runner.register_hook(
        mmcv_hook.MomentumUpdateHook(update_interval=2, base_batch_size=2)
    )
    mmcv_case.run(runner)
    expected = scaled_reference(8, 2.0, update_interval=2)
    assert list(expected) == [1, 3, 5, 7]
    assert [recorder.momenta[k] for k in expected] == pytest.approx(
        list(expected.values()), rel=0, abs=1e-15
    )
    mmcv_case.assert_target_equal(
        model,
        replay(initial, recorder, {k: recorder.momenta[k] for k in expected}),
    )


# -- MMEngine Runner -----------------------------------------------------


@pytest.mark.parametrize(
    'by_epoch', [False, True], ids=['by_iter', 'by_epoch']
)
def test_mmengine_runner_uses_the_scaled_momenta(tmp_path, by_epoch):
    """Batch 2 x accumulative_counts 2 = 4 samples per update; 8 / 4."""
    torch.manual_seed(0)
    model = engine_case.TinyMomentumModel(base_momentum=0.5)
    recorder = engine_case.OnlineRecorder()
    runner = engine_case.build_runner(
        tmp_path,
        model,
        [
            dict(type=engine_case.HOOK, update_interval=2, base_batch_size=8),
            recorder,
        ],
        by_epoch=by_epoch,
        iters=8,
        accumulative_counts=2,
    )
    runner.train()

    expected = {
        k: m**0.5
        for k, m in engine_case.reference_momenta(
            0.5, 1.0, max_iters=8, update_interval=2
        ).items()
    }
    assert engine_case.logged_momenta(runner) == pytest.approx(
        list(expected.values()), rel=0, abs=1e-15
    )
    engine_case.assert_follows_reference(
        model, recorder, expected, 0.5, max_iters=8
    )
    (log,) = tmp_path.glob('*/*.log')
    text = log.read_text()
    assert (
        'S = 2 per process x 1 processes x update_interval 2 = 4 '
        'samples per update, so kappa = S / base_batch_size = 0.5'
    ) in text
    assert f'(base_momentum 0.5 -> {0.5**0.5!r})' in text


@pytest.mark.filterwarnings(
    'ignore:Environment variable TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD:UserWarning'
)
def test_mmengine_resume_keeps_the_scaled_momenta(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD', '1')
    hook = dict(type=engine_case.HOOK, base_batch_size=8)
    torch.manual_seed(0)
    full = engine_case.build_runner(
        tmp_path / 'full',
        engine_case.TinyMomentumModel(0.5),
        [hook],
        iters=8,
        checkpoint_interval=4,
    )
    full.train()
    torch.manual_seed(1)
    resumed = engine_case.build_runner(
        tmp_path / 'resumed',
        engine_case.TinyMomentumModel(0.5),
        [hook],
        iters=8,
        load_from=str(tmp_path / 'full' / 'iter_4.pth'),
        resume=True,
    )
    resumed.train()

    expected = [reference_momentum(k, 8, 0.5) ** 0.25 for k in range(8)]
    assert full.model.seen == pytest.approx(expected, rel=0, abs=1e-15)
    assert resumed.model.seen == pytest.approx(expected[4:], rel=0, abs=1e-15)
    for name in ('online', 'target'):
        for mine, theirs in zip(
            getattr(resumed.model, name).parameters(),
            getattr(full.model, name).parameters(),
        ):
            assert torch.equal(mine, theirs)


# -- refusals ------------------------------------------------------------

BAD_BASE_BATCH_SIZES = [
    (0, ValueError),
    (-4096, ValueError),
    (2.5, TypeError),
    (4096.0, TypeError),
    ('4096', TypeError),
    (float('nan'), TypeError),
    (True, TypeError),
    (float('inf'), TypeError),
]


@pytest.mark.parametrize(
    'value, error', BAD_BASE_BATCH_SIZES, ids=lambda value: repr(value)
)
@pytest.mark.parametrize('framework', ['mmcv', 'mmengine'])
def test_bad_base_batch_size_is_refused_when_the_hook_is_built(
    tmp_path, framework, value, error
):
    with pytest.raises(error) as raised:
        if framework == 'mmcv':
            build_from_cfg(
                dict(type='momentum_hook.BYOLHook', base_batch_size=value),
                MMCV_HOOKS,
            )
        else:
            engine_case.build_runner(
                tmp_path,
                engine_case.TinyMomentumModel(),
                [dict(type=engine_case.HOOK, base_batch_size=value)],
            )
    message = str(raised.value)
    assert 'base_batch_size must be a positive int' in message
    assert f'got {value!r}' in message
    # What to pass: the meaning, an example, and the way out.
    assert 'samples per target update' in message and '4096' in message
    assert 'None' in message


@pytest.mark.parametrize('kind', ['iter', 'epoch'])
def test_mmcv_loader_without_a_batch_size_is_refused_before_iteration_one(
    tmp_path, kind
):
    runner, model, _ = mmcv_case.make_runner(tmp_path, kind)
    runner.register_hook(mmcv_hook.MomentumUpdateHook(base_batch_size=8))
    unbatched = DataLoader(
        torch.linspace(-1, 1, 8).unsqueeze(1), batch_size=None
    )
    with pytest.raises(
        ValueError,
        match='no fixed batch size '
        r'\(batch_size=None\): give it a batch_size',
    ):
        mmcv_case.run(runner, unbatched)
    assert model.forward_calls == 0


def test_mmengine_loader_without_a_batch_size_is_refused_before_iteration_one(
    tmp_path,
):
    model = engine_case.TinyMomentumModel()
    runner = engine_case.build_runner(
        tmp_path,
        model,
        [dict(type=engine_case.HOOK, base_batch_size=8)],
        iters=2,
        train_dataloader=DataLoader(
            engine_case.TinySamples(4), batch_size=None
        ),
    )
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
        reference_momentum(99, 100, 0.99) ** kappa, rel=0, abs=1e-15
    )
    assert namespace['m'] > reference_momentum(99, 100, 0.99)  # kappa < 1
    for t, o in zip(
        namespace['target'].parameters(), namespace['online'].parameters()
    ):
        assert not torch.equal(t, o)


# -- the experiment's grid -------------------------------------------------


def test_adam_sde_rule_and_the_arms():
    """Malladi et al.'s rule written out for kappa = 4: lr x 2, 1 - beta
    x 4, eps / 2, weight decay x 2 (lr x wd per sample kept)."""
    from momentum_hook.demo.scaling import adam_sde, arms

    base = dict(lr=5e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
    rule = adam_sde(4, **base)
    assert rule['lr'] == pytest.approx(1e-2)
    assert rule['betas'] == pytest.approx((0.6, 0.996))
    assert rule['eps'] == pytest.approx(5e-9)
    assert rule['weight_decay'] == pytest.approx(2e-2)
    # decay per sample: lr * wd / batch is kept at 4x the batch
    assert rule['lr'] * rule['weight_decay'] / 4 == pytest.approx(
        base['lr'] * base['weight_decay']
    )
    assert adam_sde(1, **base) == dict(base)
    with pytest.raises(ValueError, match='kappa=20 is too large'):
        adam_sde(20, **base)
    one, scaled, plain = arms(64, 4, base)
    assert (one['batch'], one['momentum_kappa'], one['optimizer']) == (
        64,
        1,
        base,
    )
    assert (scaled['batch'], scaled['momentum_kappa']) == (256, 4)
    assert (plain['batch'], plain['momentum_kappa']) == (256, 1)
    assert scaled['optimizer'] == plain['optimizer'] == rule


def _trajectories(values):
    return {
        seed: [
            dict(
                samples=s,
                **{m: v for m in ('heldout loss', '1-shot', '5-shot', 'knn')},
            )
            for s, v in enumerate(points)
        ]
        for seed, points in enumerate(values)
    }


@pytest.mark.parametrize(
    'scaled, plain, word',
    [
        ([[0, 1.0, 1.0]] * 3, [[0, 2.0, 2.0]] * 3, 'rule supported'),
        (
            [[0, 1.0, 1.0]] * 3,
            [[0, 1.0, 1.01]] * 3,
            'no difference at this scale',
        ),
        ([[0, 2.0, 1.0]] * 3, [[0, 2.0, 2.0]] * 3, 'optimizer rule not met'),
        ([[0, 2.0, 2.0]] * 3, [[0, 1.0, 1.0]] * 3, 'rule contradicted'),
    ],
)
def test_the_pass_criterion(scaled, plain, word):
    """B: 0.9, 1.0, 1.1 at each point after the warm-up (band 1 +- 0.2);
    point 0 is the warm-up and is not judged."""
    from momentum_hook.demo.scaling import verdict

    results = {
        'B': _trajectories([[5, 0.9, 0.9], [5, 1.0, 1.0], [5, 1.1, 1.1]]),
        '4B scaled': _trajectories(scaled),
        '4B per update': _trajectories(plain),
    }
    for metric, (got, _) in verdict(results, warmup=0).items():
        assert got == word, metric


def test_the_seed_paired_gaps():
    from momentum_hook.demo.scaling import paired_gaps

    results = {
        'B': _trajectories([[5, 0.9, 0.9], [5, 1.0, 1.0], [5, 1.1, 1.1]]),
        '4B scaled': _trajectories([[0, 1.0, 1.0]] * 3),
        '4B per update': _trajectories([[0, 2.0, 1.0]] * 3),
    }
    gaps = paired_gaps(results, warmup=0)
    assert gaps['knn']['4B scaled'] == pytest.approx((0.0, 0.2 / 3))
    # per update: +1.1, +1, +0.9 at point 1; +0.1, 0, -0.1 at point 2
    assert gaps['knn']['4B per update'] == pytest.approx((0.5, 3.2 / 6))
    assert gaps['closer']['knn'] == (3, 6)  # point 2 is a tie


def test_mmengine_flexible_runner_uses_the_scaled_momenta(tmp_path):
    """MMEngine's FlexibleRunner (one process, its default strategy): batch
    2 on one process, base_batch_size 8, kappa 1/4."""
    torch.manual_seed(0)
    model = engine_case.TinyMomentumModel(base_momentum=0.5)
    runner = _flexible_runner(
        tmp_path, model, dict(type=engine_case.HOOK, base_batch_size=8)
    )
    runner.train()
    expected = [reference_momentum(k, 4, 0.5) ** 0.25 for k in range(4)]
    assert model.seen == pytest.approx(expected, rel=0, abs=1e-15)
    assert engine_case.logged_momenta(runner) == model.seen


# -- base_batch_size='auto': MMEngine's auto_scale_lr ------------------------


def _flexible_runner(work_dir, model, hook, **kwargs):
    from mmengine.runner._flexible_runner import FlexibleRunner

    return FlexibleRunner(
        model=model,
        work_dir=str(work_dir),
        experiment_name=f'flexible_{next(engine_case._run_ids)}',
        train_dataloader=dict(
            dataset=engine_case.TinySamples(8),
            batch_size=2,
            sampler=dict(type='DefaultSampler', shuffle=False),
            collate_fn=dict(type='default_collate'),
        ),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.1)),
        train_cfg=dict(by_epoch=False, max_iters=4),
        default_hooks=dict(checkpoint=None),
        custom_hooks=[hook],
        **kwargs,
    )


def _auto_runner(kind, work_dir, model, **kwargs):
    hook = dict(type=engine_case.HOOK, base_batch_size='auto')
    if kind == 'FlexibleRunner':
        return _flexible_runner(work_dir, model, hook, **kwargs)
    return engine_case.build_runner(work_dir, model, [hook], iters=4, **kwargs)


@pytest.mark.parametrize('kind', ['Runner', 'FlexibleRunner'])
def test_mmengine_auto_takes_base_batch_size_from_auto_scale_lr(
    tmp_path, kind
):
    """auto_scale_lr base 8, batch 2 on one process: MMEngine scales the
    learning rate by 2 / 8 and the hook uses m ** (2 / 8)."""
    torch.manual_seed(0)
    model = engine_case.TinyMomentumModel(base_momentum=0.5)
    runner = _auto_runner(
        kind,
        tmp_path,
        model,
        auto_scale_lr=dict(enable=True, base_batch_size=8),
    )
    runner.train()
    expected = [reference_momentum(k, 4, 0.5) ** 0.25 for k in range(4)]
    assert model.seen == pytest.approx(expected, rel=0, abs=1e-15)
    assert engine_case.logged_momenta(runner) == model.seen
    lrs = [group['lr'] for group in runner.optim_wrapper.param_groups]
    assert lrs == [pytest.approx(0.1 * 2 / 8)]  # the LR followed it too
    (log,) = tmp_path.glob('*/*.log')
    assert (
        "base_batch_size='auto' (auto_scale_lr.base_batch_size=8)) schedules"
    ) in log.read_text()


@pytest.mark.parametrize('kind', ['Runner', 'FlexibleRunner'])
@pytest.mark.parametrize(
    'auto_scale_lr, words',
    [
        (
            None,
            'the runner has auto_scale_lr=None: add auto_scale_lr=dict('
            'enable=True, base_batch_size=N) to the config',
        ),
        (
            dict(enable=False, base_batch_size=8),
            "it is disabled ({'enable': "
            "False, 'base_batch_size': 8}), so the learning rate is not "
            'scaled '
            'either: set enable=True',
        ),
        (dict(base_batch_size=8), 'it is disabled'),
    ],
    ids=['missing', 'disabled', 'no_enable'],
)
def test_mmengine_auto_without_auto_scale_lr_is_refused_before_iteration_one(
    tmp_path, kind, auto_scale_lr, words
):
    model = engine_case.TinyMomentumModel(base_momentum=0.5)
    runner = _auto_runner(kind, tmp_path, model, auto_scale_lr=auto_scale_lr)
    with pytest.raises(ValueError) as raised:
        runner.train()
    assert words in str(raised.value)
    assert 'base_batch_size=N, the samples per target update' in str(
        raised.value
    )
    assert model.seen == []


def test_mmcv_hook_refuses_auto_when_built():
    with pytest.raises(
        ValueError,
        match="base_batch_size='auto' follows "
        "MMEngine's auto_scale_lr, which mmcv 1.x runners do "
        'not have: give the hook base_batch_size=N',
    ):
        build_from_cfg(
            dict(
                type='momentum_hook.MomentumUpdateHook', base_batch_size='auto'
            ),
            MMCV_HOOKS,
        )


# -- the EMA-only replay ---------------------------------------------------


def _small_replay(kappas):
    from momentum_hook.demo.data import load_digits_split
    from momentum_hook.demo.ema_replay import replay

    images = load_digits_split('train')[0][:256]
    settings = dict(
        batch=16,
        samples=16 * 240,
        warmup=16 * 24,
        images=images,
        model=dict(
            widths=(4, 8, 8), hidden_dim=16, proj_dim=8, base_momentum=0.98
        ),
        optimizer=dict(
            lr=5e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2
        ),
        augment=dict(
            degrees=15.0,
            scale=(0.85, 1.15),
            shear=10.0,
            shift=1.0,
            brightness=0.4,
            noise=0.1,
        ),
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: threads only wait on each other
    try:
        return replay(settings, kappas=kappas, seed=0)
    finally:
        torch.set_num_threads(threads)


def test_replay_shadows_at_kappa_one_are_the_target():
    """A shadow that sees every update is the target itself (float64
    replay of the same schedule): the replay pairs them correctly."""
    result = _small_replay(kappas=(1,))
    assert result['updates'] == 240 and result['total_move'] > 0
    for name in ('kappa=1, m ** kappa', 'kappa=1, m'):
        assert len(result['curves'][name]) == 240
        assert max(d for _, d in result['curves'][name]) < 1e-5


def test_replay_m_to_the_kappa_keeps_the_target_and_m_does_not():
    """The rule's property on a real BYOL run: a target that sees the
    online network every 4 or 8 updates stays within a few percent of the
    real target's total move with m ** kappa, and lags several times
    further with m."""
    result = _small_replay(kappas=(4, 8))
    for kappa in (4, 8):
        power = result['curves'][f'kappa={kappa}, m ** kappa']
        plain = result['curves'][f'kappa={kappa}, m']
        assert len(power) == len(plain) == 240 // kappa
        worst_power = max(d for _, d in power)
        worst_plain = max(d for _, d in plain)
        assert 0 < worst_power < 0.1
        assert worst_plain > 0.3
        assert worst_plain > 5 * worst_power


def test_the_accumulation_advice_makes_mmengines_lr_ratio_kappa(tmp_path):
    """docs/scaling.md's config for accumulation, on a real Runner (batch 2,
    one process): MMEngine's learning-rate ratio and the hook's kappa are
    both the samples per update over 4096."""
    from doc_snippets import code_block

    from momentum_hook.mmengine_hook import MomentumUpdateHook

    namespace = {}
    exec(
        code_block(
            'docs/scaling.md',
            "MMEngine's `auto_scale_lr`",
            containing='accumulative_counts = 32',
        ),
        namespace,
    )
    counts = namespace['accumulative_counts']
    hook = dict(namespace['custom_hooks'][0], type=engine_case.HOOK)
    runner = engine_case.build_runner(
        tmp_path,
        engine_case.TinyMomentumModel(base_momentum=0.5),
        [hook],
        iters=2 * counts,
        accumulative_counts=counts,
        auto_scale_lr=namespace['auto_scale_lr'],
    )
    runner.train()
    (kappa,) = [
        h.updater.kappa
        for h in runner.hooks
        if isinstance(h, MomentumUpdateHook)
    ]
    ratio = runner.optim_wrapper.param_groups[0]['lr'] / 0.1
    assert kappa == 2 * counts / 4096
    assert ratio == pytest.approx(kappa, rel=1e-12)


def test_mmengine_auto_with_accumulation_says_what_the_lr_counts(tmp_path):
    runner = engine_case.build_runner(
        tmp_path,
        engine_case.TinyMomentumModel(base_momentum=0.5),
        [
            dict(
                type=engine_case.HOOK,
                update_interval=2,
                base_batch_size='auto',
            )
        ],
        iters=4,
        accumulative_counts=2,
        auto_scale_lr=dict(enable=True, base_batch_size=8),
    )
    runner.train()
    (log,) = tmp_path.glob('*/*.log')
    assert (
        'auto_scale_lr scales the learning rate by the samples per '
        'iteration, 2 times fewer'
    ) in log.read_text()


@pytest.mark.parametrize(
    'kappa, half, three_quarters',
    [(2, 0.0016, 0.0039), (4, 0.0048, 0.0117), (8, 0.0111, 0.0276)],
)
def test_product_form_gap_is_the_table_of_the_docs(
    kappa, half, three_quarters
):
    """kappa updates at the cosine's values against one at the kappa-th
    power of the first: docs/scaling.md's table (rounded), zero for a
    constant momentum, and the first-order formula of the docs."""
    from momentum_hook.demo.ema_replay import product_form_gap

    gaps = dict(product_form_gap(0.99, 1.0, 980, kappa))
    at = {q: gaps[min(gaps, key=lambda f: abs(f - q))] for q in (0.5, 0.75)}
    assert at[0.5] == pytest.approx(half, abs=5e-5)
    assert at[0.75] == pytest.approx(three_quarters, abs=5e-5)
    assert all(
        abs(g) < 1e-12  # m ** k and k products of m: a few ulps
        for _, g in product_form_gap(0.99, 0.99, 980, kappa)
    )
    j = 980 // kappa // 2
    m = [reference_momentum(j * kappa + i, 980, 0.99) for i in range(kappa)]
    delta = m[1] - m[0]
    product = 1.0
    for value in m:
        product *= value
    first_order = kappa * (kappa - 1) / 2 * delta * m[0] ** (kappa - 1)
    assert product - m[0] ** kappa == pytest.approx(first_order, rel=1e-3)


def test_updater_with_auto_and_no_auto_scale_lr_refuses_to_start():
    """Without a runner nothing supplies auto_scale_lr: the updater says so
    instead of failing on None."""
    from momentum_hook.updater import MomentumUpdater

    updater = MomentumUpdater(base_batch_size='auto')
    model = engine_case.TinyMomentumModel()
    updater.check_run(model, 4)
    with pytest.raises(
        ValueError,
        match="base_batch_size='auto' takes the "
        "base_batch_size of MMEngine's auto_scale_lr",
    ):
        updater.start(model, 4, lambda: DataLoader(range(4), batch_size=2))
    updater.use_auto_scale_lr(dict(enable=True, base_batch_size=8))
    updater.start(model, 4, lambda: DataLoader(range(4), batch_size=2))
    assert updater.kappa == 0.25
