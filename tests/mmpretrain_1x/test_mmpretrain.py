"""The hook on mmpretrain 1.x's own configs, in .venv-mmpretrain.

``make test-mmpretrain`` runs these; the main venv (mmcv 1.x) skips them.
Each test loads an mmpretrain config file from the installed package with
``mmengine.Config.fromfile`` and shrinks it only in size (image size, depth,
widths, batch, epochs, a folder of random images), then trains it with
MMEngine's ``Runner``. The teacher is checked against a float64 replay of
mmpretrain's update, once per optimizer step, and against mmpretrain alone.
"""

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

mmpretrain = pytest.importorskip('mmpretrain')

from doc_snippets import code_block  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.hooks import Hook  # noqa: E402
from mmengine.runner import Runner  # noqa: E402
from momentum_testing import (
    ZERO3_ON_GLOO,
    free_port,  # noqa: E402
    gather_zero3,
    init_deepspeed_rank,
    launch_ranks,
    set_rank_environment,
)

from momentum_hook.mmpretrain import MASTERS_KEY, SkippedUpdate  # noqa: E402

CONFIGS = Path(mmpretrain.__file__).parent / '.mim' / 'configs'

#: The config files, the teacher's attribute and how to shrink the model.
MODELS = {
    'byol': ('byol/byol_resnet50_16xb256-coslr-200e_in1k.py', 'target_net'),
    'mocov3_vit': (
        'mocov3/mocov3_vit-small-p16_16xb256-amp-coslr-300e_in1k.py',
        'momentum_encoder',
    ),
    'mocov2': ('mocov2/mocov2_resnet50_8xb32-coslr-200e_in1k.py', 'encoder_k'),
    'densecl': (
        'densecl/densecl_resnet50_8xb32-coslr-200e_in1k.py',
        'encoder_k',
    ),
}
#: The models whose teacher is an ExponentialMovingAverage of a constant
#: momentum, a queue of negative keys and no predictor.
QUEUED = ('mocov2', 'densecl')
IMAGE = 32  # pixels, RandomResizedCrop's scale (224 in the configs)
WIDTH = 16  # the necks' and heads' widths (256 to 4096 in the configs)


def config_lines(page, heading):
    """``custom_imports`` and ``custom_hooks`` of the config snippet under
    ``heading`` in ``page``."""
    namespace = {}
    exec(compile(code_block(page, heading), page, 'exec'), namespace)
    return namespace['custom_imports'], namespace['custom_hooks']


#: The README's two lines, which every test with the hook trains with.
IMPORTS, HOOK = config_lines('README.md', 'mmpretrain 1.x: the same two lines')


def _shrink_views(node):
    """The config's pipelines, with crops of IMAGE pixels."""
    if isinstance(node, dict):
        if node.get('type') == 'RandomResizedCrop':
            node['scale'] = IMAGE
        for value in node.values():
            _shrink_views(value)
    elif isinstance(node, list):
        for value in node:
            _shrink_views(value)


def _shrink_model(name, model):
    if name == 'mocov3_vit':
        model.backbone.update(
            arch=dict(
                embed_dims=WIDTH,
                num_layers=2,
                num_heads=2,
                feedforward_channels=2 * WIDTH,
            ),
            img_size=IMAGE,
        )
        in_channels = WIDTH
    else:
        model.backbone.update(
            depth=18, stem_channels=WIDTH // 2, base_channels=WIDTH // 2
        )
        in_channels = 4 * WIDTH  # the last stage: 8 x base_channels
    model.neck.update(
        in_channels=in_channels, hid_channels=WIDTH, out_channels=WIDTH
    )
    if name in QUEUED:
        model.update(queue_len=16, feat_dim=WIDTH)
    else:
        model.head.predictor.update(
            in_channels=WIDTH, hid_channels=WIDTH, out_channels=WIDTH
        )


def random_images(folder, count=8, seed=0):
    """``count`` random RGB PNG images of 40x40 pixels in ``folder`` (kept
    if it exists)."""
    from PIL import Image

    if folder.exists():
        return folder
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        pixels = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f'{index}.png')
    return folder


def shrunk_config(
    name,
    tmp_path,
    work,
    hooks=(),
    epochs=2,
    batch=4,
    accumulation=1,
    seed=0,
    workers=0,
):
    """mmpretrain's config ``name`` shrunk in size, as a ``Config``.

    With ``workers`` > 0 the augmentations are seeded per epoch (MMEngine's
    ``worker_init_fn``), the same in a resumed run; with 0 they draw from
    the main process's random state.
    """
    cfg = Config.fromfile(CONFIGS / MODELS[name][0])
    _shrink_model(name, cfg.model)
    pipeline = cfg.train_dataloader.dataset.pipeline
    _shrink_views(pipeline)
    cfg.train_dataloader.update(
        batch_size=batch, num_workers=workers, persistent_workers=False
    )
    cfg.train_dataloader['dataset'] = dict(
        type='CustomDataset',
        with_label=False,
        pipeline=pipeline,
        data_root=str(random_images(tmp_path / 'images')),
    )
    cfg.train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=epochs)
    # mmpretrain's AmpOptimWrapper needs a GPU; the CPU tests use fp32.
    cfg.optim_wrapper.type = 'OptimWrapper'
    cfg.optim_wrapper.pop('loss_scale', None)
    cfg.optim_wrapper.accumulative_counts = accumulation
    cfg.default_hooks.logger.interval = 1
    cfg.default_hooks.checkpoint.update(interval=1, by_epoch=True)
    cfg.randomness = dict(seed=seed)
    cfg.work_dir = str(tmp_path / work)
    cfg.experiment_name = work
    if hooks:
        cfg.custom_imports = IMPORTS
        cfg.custom_hooks = list(hooks)
    return cfg


def online_of(model):
    """The parameters and buffers of ``nn.Sequential(backbone, neck)``,
    by the teacher's names, as float64 copies."""
    return {
        f'{index}.{key}': value.detach().to(torch.float64, copy=True)
        for index, part in enumerate((model.backbone, model.neck))
        for key, value in part.state_dict().items()
    }


def teacher_of(model, attribute):
    return {
        key: value.detach().to(torch.float64, copy=True)
        for key, value in getattr(model, attribute).module.state_dict().items()
    }


class Recorder(Hook):
    """Records, after every iteration (after the momentum hook), the online
    network, the teacher and the loss; and both networks before iteration
    0."""

    priority = 'LOWEST'

    def __init__(self, attribute):
        self.attribute = attribute
        self.online, self.teacher, self.losses = [], [], []
        self.start = None

    def before_train(self, runner):
        model = unwrapped(runner)
        self.start = (online_of(model), teacher_of(model, self.attribute))

    def after_train_iter(
        self, runner, batch_idx, data_batch=None, outputs=None
    ):
        model = unwrapped(runner)
        self.online.append(online_of(model))
        self.teacher.append(teacher_of(model, self.attribute))
        self.losses.append(float(outputs['loss']))


def unwrapped(runner):
    """The model inside ``MMDistributedDataParallel``, if any."""
    return getattr(runner.model, 'module', runner.model)


def train(
    cfg, attribute, runner_type=Runner, recorder_type=Recorder, hooks=()
):
    """Build ``runner_type`` from ``cfg`` with a ``recorder_type`` of the
    teacher ``attribute`` and ``hooks``, and train it; the runner and the
    recorder."""
    runner = runner_type.from_cfg(cfg)
    recorder = recorder_type(attribute)
    for hook in (recorder, *hooks):
        runner.register_hook(hook)
    runner.train()
    return runner, recorder


def reference_momentum(step, max_iters, mu, mu_end):
    """mmpretrain's cosine in its own convention (the weight of the online
    network) at call ``step``, as 1 - that: the weight of the old teacher."""
    cosine = (math.cos(math.pi * step / float(max_iters)) + 1) / 2
    return 1.0 - (mu_end - (mu_end - mu) * cosine)


def replay(recorder, params, max_iters, mu, mu_end, interval=1, kappa=1):
    """The teacher after each iteration, in float64: the online network's
    start, then ``m * teacher + (1 - m) * online`` after every optimizer
    step (every ``interval`` iterations) with the cosine at ``(k + 1) / K``
    (raised to ``kappa``); buffers copied from the online network at each
    update."""
    online_start = recorder.start[0]
    teacher = dict(online_start)
    replayed = []
    for k in range(max_iters):
        if (k + 1) % interval == 0:
            m = reference_momentum(k + 1, max_iters, mu, mu_end) ** kappa
            online = recorder.online[k]
            teacher = {
                key: (
                    m * teacher[key] + (1 - m) * online[key]
                    if key in params
                    else online[key].clone()
                )
                for key in teacher
            }
        replayed.append(teacher)
    return replayed


def assert_close(actual, expected, keys=None):
    for key in keys or expected:
        torch.testing.assert_close(
            actual[key],
            expected[key],
            rtol=1e-6,
            atol=1e-8,
            msg=lambda m, key=key: f'{key}: {m}',
        )


def _momenta(name, model_cfg):
    if name in QUEUED:
        return model_cfg.momentum, model_cfg.momentum
    return model_cfg.base_momentum, 0.0


def test_the_docs_show_the_lines_the_tests_train_with():
    assert config_lines('docs/migrating.md', 'mmpretrain 1.x') == (
        IMPORTS,
        HOOK,
    )
    assert HOOK == [dict(type='momentum_hook.MomentumUpdateHook')]


@pytest.mark.parametrize('name', list(MODELS))
def test_teacher_follows_float64_replay(name, tmp_path):
    cfg = shrunk_config(name, tmp_path, 'hook', hooks=HOOK)
    attribute = MODELS[name][1]
    mu, mu_end = _momenta(name, cfg.model)
    runner, recorder = train(cfg, attribute)
    averaged = getattr(runner.model, attribute)
    params = [key for key, _ in averaged.module.named_parameters()]
    max_iters = runner.max_iters
    assert max_iters == 4
    # The teacher starts as the online network's initial weights.
    assert_close(recorder.start[1], recorder.start[0])
    for k, expected in enumerate(
        replay(recorder, params, max_iters, mu, mu_end)
    ):
        assert_close(recorder.teacher[k], expected)
    # The model's own update ran on no call; its method is back.
    assert 'update_parameters' not in vars(averaged)
    assert int(averaged.steps) == 1 + max_iters
    # The message hub (a global instance) keeps the masters, a float32
    # teacher's none, not a view of the model.
    assert runner.message_hub.get_info(MASTERS_KEY) == {
        'teacher': f'{type(runner.model).__name__}.{attribute}',
        'rank': 0,
        'masters': {},
    }


def test_replay_is_mmpretrain_alone(tmp_path):
    """The replay the tests hold the hook to is mmpretrain's own update:
    without the hook, the teacher after iteration k (updated at its start)
    is the replay's after iteration k - 1 on the same online weights, and
    the first iterations' losses are the hooked run's. (Later losses part
    by the float32 rounding of the two EMA formulas, grown by LARS at the
    config's learning rate 4.8.)"""
    attribute = MODELS['byol'][1]
    runner, alone = train(shrunk_config('byol', tmp_path, 'alone'), attribute)
    averaged = getattr(runner.model, attribute)
    params = [key for key, _ in averaged.module.named_parameters()]
    mu, mu_end = _momenta('byol', shrunk_config('byol', tmp_path, 'x').model)
    replayed = replay(alone, params, runner.max_iters, mu, mu_end)
    assert_close(alone.teacher[0], alone.start[0], params)
    for k in range(1, runner.max_iters):
        assert_close(alone.teacher[k], replayed[k - 1], params)
    _, hooked = train(
        shrunk_config('byol', tmp_path, 'hook', hooks=HOOK), attribute
    )
    np.testing.assert_allclose(hooked.losses[:2], alone.losses[:2], rtol=1e-5)


def test_accumulation_updates_once_per_optimizer_step(tmp_path):
    """With accumulative_counts=4 the teacher moves after every 4th
    iteration, by the replay; the model's own calls are counted, not
    applied."""
    cfg = shrunk_config(
        'byol', tmp_path, 'hook', hooks=HOOK, epochs=4, accumulation=4
    )
    attribute = MODELS['byol'][1]
    calls = []

    class CountCalls(Hook):
        priority = 'LOWEST'

        def after_train_iter(
            self, runner, batch_idx, data_batch=None, outputs=None
        ):
            skipped = vars(getattr(runner.model, attribute)).get(
                'update_parameters'
            )
            calls.append(
                skipped.calls if isinstance(skipped, SkippedUpdate) else None
            )

    runner, recorder = train(cfg, attribute, hooks=[CountCalls()])
    averaged = getattr(runner.model, attribute)
    params = [key for key, _ in averaged.module.named_parameters()]
    assert runner.max_iters == 8
    assert calls == list(range(1, 9))
    assert int(averaged.steps) == 1 + 2  # the copy, two optimizer steps
    mu, mu_end = _momenta('byol', cfg.model)
    # Between updates the teacher's forward moves its own BatchNorm
    # statistics (train mode), as in mmpretrain: buffers are checked after
    # updates only.
    for k, expected in enumerate(replay(recorder, params, 8, mu, mu_end, 4)):
        assert_close(
            recorder.teacher[k], expected, None if (k + 1) % 4 == 0 else params
        )
    # Between optimizer steps the teacher does not move.
    assert_close(recorder.teacher[1], recorder.teacher[0], params)
    assert_close(recorder.teacher[4], recorder.teacher[3], params)


def test_base_batch_size_scales_the_teacher_s_momenta(tmp_path):
    """base_batch_size=8 at 4 samples per update: every momentum of the
    teacher's cosine is used as m ** 0.5; the log names the teacher and
    its schedule."""
    cfg = shrunk_config(
        'byol', tmp_path, 'hook', hooks=[dict(HOOK[0], base_batch_size=8)]
    )
    runner, recorder = train(cfg, 'target_net')
    params = [
        key for key, _ in runner.model.target_net.module.named_parameters()
    ]
    mu, mu_end = _momenta('byol', cfg.model)
    for k, expected in enumerate(
        replay(recorder, params, 4, mu, mu_end, kappa=0.5)
    ):
        assert_close(recorder.teacher[k], expected)
    log = next(Path(cfg.work_dir).glob('*/*.log')).read_text()
    assert (
        'momentum_hook takes over BYOL.target_net: CosineEMA('
        'momentum=0.01, end_momentum=0.0, interval=1, update_buffers='
        'False), a cosine momentum m = 1 - momentum from 0.99 to 1.0, '
        "buffers 'copy'"
    ) in log
    assert 'kappa = S / base_batch_size = 0.5' in log


def test_the_teacher_s_interval_is_honoured(tmp_path):
    """A teacher with interval=2 (mmpretrain: an update on every second
    call) is updated after every second iteration; an update_interval that
    is no multiple of it is refused, naming both."""
    cfg = shrunk_config('byol', tmp_path, 'hook', hooks=HOOK)
    runner = Runner.from_cfg(cfg)
    runner.model.target_net.interval = 2
    recorder = Recorder('target_net')
    runner.register_hook(recorder)
    runner.train()
    params = [
        key for key, _ in runner.model.target_net.module.named_parameters()
    ]
    mu, mu_end = _momenta('byol', cfg.model)
    for k, expected in enumerate(replay(recorder, params, 4, mu, mu_end, 2)):
        assert_close(
            recorder.teacher[k], expected, None if (k + 1) % 2 == 0 else params
        )
    cfg = shrunk_config(
        'byol', tmp_path, 'refused', hooks=[dict(HOOK[0], update_interval=3)]
    )
    runner = Runner.from_cfg(cfg)
    runner.model.target_net.interval = 2
    with pytest.raises(
        ValueError,
        match=r'update_interval=3 in the momentum '
        'hook contradicts BYOL.target_net, a CosineEMA with '
        'interval=2',
    ):
        runner.train()


@pytest.mark.parametrize(
    'hook, match',
    [
        (
            dict(end_momentum=0.999),
            r'end_momentum=0.999 in the momentum hook contradicts '
            r'BYOL.target_net, '
            r'a CosineEMA with end_momentum=0.0, i.e. end_momentum=1.0',
        ),
        (dict(reach_end_momentum=True), 'reach_end_momentum=True'),
    ],
)
def test_contradicting_hook_arguments_are_refused(hook, match, tmp_path):
    cfg = shrunk_config(
        'byol', tmp_path, 'hook', hooks=[dict(HOOK[0], **hook)]
    )
    runner = Runner.from_cfg(cfg)
    recorder = Recorder(MODELS['byol'][1])
    runner.register_hook(recorder)
    with pytest.raises(ValueError, match=match):
        runner.train()
    assert recorder.online == []  # before iteration 1
    assert 'update_parameters' not in vars(runner.model.target_net)


def distributed_byol(tmp_path, work, hooks, workers=0):
    """BYOL's config shrunk for 2 ranks on the CPU (2 images per rank and
    batch), launched by ``pytorch`` in the gloo group the test joined
    (``workers``: see :func:`shrunk_config`)."""
    cfg = shrunk_config(
        'byol', tmp_path, work, hooks=hooks, batch=2, workers=workers
    )
    # SyncBN (BYOL's backbone, and its necks' default) needs CUDA when
    # distributed; BatchNorm is what Runner turns it into in one process.
    cfg.model.backbone.norm_cfg = dict(type='BN')
    for neck in (cfg.model.neck, cfg.model.head.predictor):
        neck.norm_cfg = dict(type='BN1d')
    cfg.launcher = 'pytorch'
    return cfg


def deepspeed_byol(
    tmp_path, work, hooks, zero_optimization, workers=0, config=(), **strategy
):
    """:func:`distributed_byol` for ``FlexibleRunner`` with
    ``DeepSpeedStrategy``: its optimizer wrapper, 2 images per rank and
    step, ``zero_optimization`` (with what ZeRO-3 needs on gloo); ``config``
    adds to DeepSpeed's config, ``strategy`` to the strategy's
    arguments."""
    cfg = distributed_byol(tmp_path, work, hooks, workers=workers)
    cfg.optim_wrapper.type = 'DeepSpeedOptimWrapper'
    cfg.optim_wrapper.pop('accumulative_counts')
    cfg.strategy = dict(
        type='DeepSpeedStrategy',
        config=dict(zero_allow_untested_optimizer=True, **dict(config)),
        zero_optimization=dict(ZERO3_ON_GLOO, **zero_optimization),
        gradient_accumulation_steps=1,
        train_micro_batch_size_per_gpu=2,
        **strategy,
    )
    return cfg


def launch_byol(rank_function, tmp_path, *args, out=None):
    """``rank_function(rank, port, tmp_path, out_dir, *args)`` on 2 spawned
    ranks; what each saved (in ``out``, by default ``tmp_path / 'out'``)."""
    random_images(tmp_path / 'images')
    out_dir = out or tmp_path / 'out'
    out_dir.mkdir()
    return launch_ranks(
        rank_function,
        (free_port(), tmp_path, out_dir, *args),
        out_dir,
        'spawn',
    )


def assert_ranks_follow_replay(ranks, tmp_path):
    """On each rank the teacher after every iteration is the float64 replay
    of that rank's online network (identical parameters across ranks, the
    ranks' own BatchNorm statistics), and its ``steps`` counts the copy and
    the 4 updates."""
    mu, mu_end = _momenta('byol', shrunk_config('byol', tmp_path, 'x').model)
    for result in ranks:
        assert result['max_iters'] == 4  # 8 images, 2 per rank and batch
        recorder = SimpleNamespace(**result)
        for k, expected in enumerate(
            replay(recorder, result['params'], 4, mu, mu_end)
        ):
            assert_close(recorder.teacher[k], expected)
        assert result['steps'] == 5
    for key in ranks[0]['params']:
        torch.testing.assert_close(
            ranks[0]['teacher'][-1][key], ranks[1]['teacher'][-1][key]
        )


def save_record(runner, recorder, averaged, path, **extra):
    """Save what ``recorder`` saw in ``runner`` and the teacher's parameter
    names (without FSDP's ``_fsdp_wrapped_module.``) and ``steps``."""
    torch.save(
        dict(
            wrapper=type(runner.model).__name__,
            max_iters=runner.max_iters,
            start=recorder.start,
            online=recorder.online,
            teacher=recorder.teacher,
            params=[
                key.replace('_fsdp_wrapped_module.', '')
                for key, _ in averaged.module.named_parameters()
            ],
            steps=int(averaged.steps),
            **extra,
        ),
        path,
    )


def _ddp_rank(rank, port, tmp_path, out_dir):
    import torch.distributed as dist

    set_rank_environment(rank, port)
    dist.init_process_group('gloo', rank=rank, world_size=2)
    try:
        cfg = distributed_byol(tmp_path, 'ddp', HOOK)
        # Runner's default wrapper asks for device_ids=[LOCAL_RANK], a GPU.
        cfg.model_wrapper_cfg = dict(
            type='MMDistributedDataParallel',
            device_ids=None,
            broadcast_buffers=False,
        )
        runner, recorder = train(cfg, MODELS['byol'][1])
        save_record(
            runner,
            recorder,
            unwrapped(runner).target_net,
            out_dir / f'rank{rank}.pth',
        )
    finally:
        dist.destroy_process_group()


def test_byol_on_two_ddp_ranks(tmp_path):
    """MMDistributedDataParallel on 2 gloo ranks: on each rank the teacher
    is the replay of that rank's online network (identical parameters
    across ranks, the ranks' own BatchNorm statistics)."""
    ranks = launch_byol(_ddp_rank, tmp_path)
    assert {result['wrapper'] for result in ranks} == {
        'MMDistributedDataParallel'
    }
    assert_ranks_follow_replay(ranks, tmp_path)


class Interrupt(Exception):
    pass


class StopAfterFirstEpoch(Hook):
    """Stops the run after epoch 1, once its checkpoint is saved."""

    priority = 'LOWEST'

    def after_train_epoch(self, runner):
        raise Interrupt


def test_resume_is_bit_for_bit(tmp_path, monkeypatch):
    """A run stopped after epoch 1 and resumed ends with the teacher, its
    ``steps``, the online network and the optimizer state of the run that
    was not stopped, bit for bit."""
    monkeypatch.setenv('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD', '1')
    whole = Runner.from_cfg(
        shrunk_config('byol', tmp_path, 'whole', hooks=HOOK, workers=1)
    )
    whole.train()
    stopped = Runner.from_cfg(
        shrunk_config('byol', tmp_path, 'stopped', hooks=HOOK, workers=1)
    )
    stopped.register_hook(StopAfterFirstEpoch())
    with pytest.raises(Interrupt):
        stopped.train()
    cfg = shrunk_config('byol', tmp_path, 'stopped', hooks=HOOK, workers=1)
    cfg.resume = True
    resumed = Runner.from_cfg(cfg)
    resumed.train()
    assert resumed.iter == whole.iter == 4
    for key, value in whole.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key
    assert int(resumed.model.target_net.steps) == 5
    expected = whole.optim_wrapper.optimizer.state_dict()['state']
    actual = resumed.optim_wrapper.optimizer.state_dict()['state']
    assert expected.keys() == actual.keys() and expected
    for index in expected:
        for name, value in expected[index].items():
            assert torch.equal(actual[index][name], value), (index, name)


def _named_tensors(module):
    """The parameters and buffers of ``module`` by their names without
    FSDP's ``_fsdp_wrapped_module.``, as float64 copies."""
    tensors = [*module.named_parameters(), *module.named_buffers()]
    return {
        name.replace('_fsdp_wrapped_module.', ''): value.detach().to(
            torch.float64, copy=True
        )
        for name, value in tensors
    }


class FSDPRecorder(Recorder):
    """:class:`Recorder` under FSDP1: the networks' whole parameters,
    gathered by ``summon_full_params`` (the BatchNorm buffers are
    per rank)."""

    def _networks(self, runner):
        from torch import nn
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        model = unwrapped(runner)
        with FSDP.summon_full_params(runner.model, writeback=False):
            return (
                _named_tensors(nn.Sequential(model.backbone, model.neck)),
                _named_tensors(getattr(model, self.attribute).module),
            )

    def before_train(self, runner):
        self.start = self._networks(runner)

    def after_train_iter(
        self, runner, batch_idx, data_batch=None, outputs=None
    ):
        online, teacher = self._networks(runner)
        self.online.append(online)
        self.teacher.append(teacher)


def _fsdp_rank(rank, port, tmp_path, out_dir):
    import torch.distributed as dist
    from mmengine.runner._flexible_runner import FlexibleRunner

    set_rank_environment(rank, port)
    # Before MMEngine's init_dist, which asks for a GPU.
    dist.init_process_group('gloo', rank=rank, world_size=2)
    cfg = distributed_byol(tmp_path, 'fsdp', HOOK)
    wrapper = dict(type='MMFullyShardedDataParallel', device_id='cpu')
    try:
        # Without a policy, one unit for the whole model: refused.
        cfg.strategy = dict(type='FSDPStrategy', model_wrapper=wrapper)
        runner = FlexibleRunner.from_cfg(cfg.copy())
        recorder = FSDPRecorder(MODELS['byol'][1])
        runner.register_hook(recorder)
        try:
            runner.train()
            refusal = None
        except ValueError as error:
            refusal = (str(error), len(recorder.online))
        # The online backbone and neck and the teacher's copies of them are
        # FSDP1 units of their own.
        cfg.strategy = dict(
            type='FSDPStrategy',
            model_wrapper=dict(
                wrapper,
                auto_wrap_policy='momentum_hook.mmpretrain.wrap_policy',
            ),
        )
        runner, recorder = train(
            cfg, MODELS['byol'][1], FlexibleRunner, FSDPRecorder
        )
        save_record(
            runner,
            recorder,
            unwrapped(runner).target_net,
            out_dir / f'rank{rank}.pth',
            refusal=refusal,
        )
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_byol_in_flexible_runner_with_fsdp(tmp_path):
    """FlexibleRunner with FSDPStrategy on 2 gloo ranks, the online backbone
    and neck and the teacher's copies in FSDP1 units of their own
    (``momentum_hook.mmpretrain.wrap_policy``): the teacher, gathered, is
    the replay of the online network once per optimizer step. Without a
    policy, the run is refused before iteration 1, naming that policy."""
    ranks = launch_byol(_fsdp_rank, tmp_path)
    for result in ranks:
        assert result['wrapper'] == 'MMFullyShardedDataParallel'
        message, iterations = result['refusal']
        assert iterations == 0  # before iteration 1
        assert "'0.conv1.weight' is flattened into an FSDP1 unit" in message
        assert message.endswith(
            'In this FlexibleRunner with FSDPStrategy, set strategy=dict('
            "type='FSDPStrategy', model_wrapper=dict(type='MMFullyShardedData"
            "Parallel', auto_wrap_policy='momentum_hook.mmpretrain.wrap_"
            "policy')), so that the online backbone and neck and the "
            "teacher's copies of them are separate FSDP units"
        )
    assert_ranks_follow_replay(ranks, tmp_path)


def _fsdp_resume_rank(rank, port, tmp_path, out_dir, resume):
    """One rank of BYOL under FSDPResumeStrategy with the wrap policy: the
    whole run (checkpoints after each epoch), or a new run resumed from its
    checkpoint of epoch 1. Saves the final networks, gathered, and this
    rank's flat shards and optimizer state."""
    import torch.distributed as dist
    from mmengine.runner._flexible_runner import FlexibleRunner

    # What custom_imports of a config file would import (Config.fromfile
    # imports them; this config is changed in code after loading).
    import momentum_hook.mmengine_strategies  # noqa: F401

    set_rank_environment(rank, port, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD='1')
    dist.init_process_group('gloo', rank=rank, world_size=2)
    try:
        # A data worker: augmentations seeded per epoch, the same on resume.
        cfg = distributed_byol(tmp_path, 'fsdp_resume', HOOK, workers=1)
        cfg.strategy = dict(
            type='momentum_hook.FSDPResumeStrategy',
            model_wrapper=dict(
                type='MMFullyShardedDataParallel',
                device_id='cpu',
                auto_wrap_policy='momentum_hook.mmpretrain.wrap_policy',
            ),
        )
        if resume:
            cfg.work_dir = str(tmp_path / 'fsdp_resumed')
            cfg.resume = True
            cfg.load_from = str(tmp_path / 'fsdp_resume' / 'epoch_1.pth')
        runner, recorder = train(
            cfg, MODELS['byol'][1], FlexibleRunner, FSDPRecorder
        )
        torch.save(
            dict(
                iter=runner.iter,
                online=recorder.online[-1],
                teacher=recorder.teacher[-1],
                steps=int(unwrapped(runner).target_net.steps),
                flat={
                    name: param.detach().clone()
                    for name, param in runner.model.named_parameters()
                },
                optimizer=runner.optim_wrapper.optimizer.state_dict()['state'],
            ),
            out_dir / f'rank{rank}.pth',
        )
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_byol_fsdp_resume_is_bit_for_bit(tmp_path):
    """FlexibleRunner with FSDPResumeStrategy and the wrap policy on 2 gloo
    ranks: a run resumed from its checkpoint of epoch 1 ends with the
    teacher, its ``steps``, the online network, each rank's shards and
    optimizer state of the uninterrupted run, bit for bit."""
    whole = launch_byol(
        _fsdp_resume_rank, tmp_path, False, out=tmp_path / 'whole'
    )
    resumed = launch_byol(
        _fsdp_resume_rank, tmp_path, True, out=tmp_path / 'resumed'
    )
    for straight, again in zip(whole, resumed):
        assert straight['iter'] == again['iter'] == 4
        assert straight['steps'] == again['steps'] == 5
        for part in ('online', 'teacher', 'flat'):
            assert straight[part].keys() == again[part].keys()
            for key, value in straight[part].items():
                assert torch.equal(value, again[part][key]), (part, key)
        assert straight['optimizer'].keys() == again['optimizer'].keys()
        assert straight['optimizer']
        for index, state in straight['optimizer'].items():
            for name, value in state.items():
                assert torch.equal(again['optimizer'][index][name], value)


class ZeRO3Recorder(FSDPRecorder):
    """:class:`Recorder` under DeepSpeed ZeRO-3: each parameter gathered
    alone (``gather_zero3``), the buffers as they are (not partitioned)."""

    def _networks(self, runner):
        from torch import nn

        model = runner.model.model.module  # MMDeepSpeedEngineWrapper
        networks = []
        for network in (
            nn.Sequential(model.backbone, model.neck),
            getattr(model, self.attribute).module,
        ):
            names, params = zip(*network.named_parameters())
            tensors = dict(zip(names, gather_zero3(params)))
            tensors.update(network.named_buffers())
            networks.append(
                {
                    name: value.detach().to(torch.float64, copy=True)
                    for name, value in tensors.items()
                }
            )
        return tuple(networks)


def _zero3_rank(rank, port, tmp_path, out_dir, hook, threshold=0):
    from mmengine.runner._flexible_runner import FlexibleRunner

    init_deepspeed_rank(rank, port)
    # threshold=0: every parameter partitioned; None: DeepSpeed's default,
    # which keeps parameters below 1e5 elements whole on every rank.
    zero = dict(stage=3)
    if threshold is not None:
        zero['stage3_param_persistence_threshold'] = threshold
    cfg = deepspeed_byol(tmp_path, f'zero3_{hook}', HOOK if hook else (), zero)
    runner, recorder = train(
        cfg, MODELS['byol'][1], FlexibleRunner, ZeRO3Recorder
    )
    averaged = runner.model.model.module.target_net
    save_record(
        runner,
        recorder,
        averaged,
        out_dir / f'rank{rank}.pth',
        partitioned=all(
            param.numel() == 0 for param in averaged.module.parameters()
        ),
        persistent=all(
            param.ds_persist for param in averaged.module.parameters()
        ),
    )


@pytest.mark.parametrize('hook', [True, False], ids=['hook', 'alone'])
def test_byol_in_flexible_runner_with_zero3(hook, tmp_path):
    """FlexibleRunner with DeepSpeedStrategy, ZeRO-3, every parameter
    partitioned, 2 gloo ranks: with the hook the teacher, gathered, is the
    replay of the online network once per optimizer step; mmpretrain alone
    averages the 0-element placeholders of the partitioned parameters, and
    its teacher never moves from its own random start."""
    ranks = launch_byol(_zero3_rank, tmp_path, hook)
    assert all(result['partitioned'] for result in ranks)
    assert not any(result['persistent'] for result in ranks)
    if hook:
        assert_ranks_follow_replay(ranks, tmp_path)
        return
    for result in ranks:
        assert result['max_iters'] == 4
        # mmpretrain's first call copies 0-element placeholders: the
        # teacher keeps its own random start, never the online network's,
        # and its later averages leave it there.
        online_start, teacher_start = result['start']
        assert not torch.equal(
            teacher_start['0.conv1.weight'], online_start['0.conv1.weight']
        )
        for key in result['params']:
            for teacher in result['teacher']:
                assert torch.equal(teacher[key], teacher_start[key]), key
        assert result['steps'] == 4


@pytest.mark.parametrize('replaced', ['backbone', 'neck', 'teacher'])
def test_a_replaced_module_is_followed_not_its_ghost(replaced, tmp_path):
    """A module assigned in place of the online backbone or neck, or of the
    teacher's copy, between two updates: the next update averages what the
    model holds now (checked against a float64 replay), not the module it
    replaced."""
    import copy

    from mmpretrain.registry import MODELS as REGISTRY

    from momentum_hook.mmpretrain import AveragedTeacher, find_teacher

    model = REGISTRY.build(shrunk_config('byol', tmp_path, 'x').model)
    teacher = AveragedTeacher(model, *find_teacher(model))
    teacher.check_momentum_target()  # the copy
    teacher.momentum = 0.5
    teacher.momentum_update()  # planned, and kept
    averaged = model.target_net
    holder, attribute = (
        (averaged, 'module') if replaced == 'teacher' else (model, replaced)
    )
    new = copy.deepcopy(getattr(holder, attribute))
    with torch.no_grad():
        for param in new.parameters():
            param.add_(1.0)
    setattr(holder, attribute, new)
    before, online = teacher_of(model, 'target_net'), online_of(model)
    teacher.momentum_update()
    after = teacher_of(model, 'target_net')
    params = [key for key, _ in averaged.module.named_parameters()]
    assert_close(
        after, {key: 0.5 * before[key] + 0.5 * online[key] for key in params}
    )


@pytest.mark.parametrize('update_buffers', [False, True])
def test_bf16_masters_are_taken_back_only_where_they_round_to_the_teacher(
    update_buffers, tmp_path
):
    """The float32 masters of a bfloat16 teacher (with ``update_buffers=
    True``, its averaged BatchNorm statistics' too), as a checkpoint's
    message hub keeps them (a deep copy or a pickle of ``MasterSnapshot``),
    are taken back by a copy of the model whose teacher they round to: it
    then updates as the original does, bit for bit. Without them (a
    checkpoint saved without the hook), from another rank, or for a
    teacher changed since, they restart from the teacher's values, with a
    warning that names them and why."""
    import copy
    import gc
    import pickle

    from mmpretrain.registry import MODELS as REGISTRY

    from momentum_hook.mmpretrain import (
        AveragedTeacher,
        MasterSnapshot,
        find_teacher,
    )

    model = REGISTRY.build(shrunk_config('byol', tmp_path, 'x').model)
    model.to(torch.bfloat16)
    model.target_net.update_buffers = update_buffers
    teacher = AveragedTeacher(model, *find_teacher(model))
    teacher.check_momentum_target()
    teacher.momentum = 0.99

    def step(model, teacher):
        with torch.no_grad():
            online = [*model.backbone.parameters(), *model.backbone.buffers()]
            for tensor in online:
                if tensor.is_floating_point():
                    tensor.add_(0.01 * torch.sin(tensor.float()).bfloat16())
        teacher.momentum_update()

    for _ in range(3):
        step(model, teacher)
    state = copy.deepcopy(MasterSnapshot(teacher))
    pickled = pickle.loads(pickle.dumps(MasterSnapshot(teacher)))
    assert pickled.keys() == state.keys()
    assert pickled['masters'].keys() == state['masters'].keys()
    for name, master in state['masters'].items():
        assert torch.equal(pickled['masters'][name], master), name
    saved_model = copy.deepcopy(model)
    assert state['teacher'] == 'BYOL.target_net' and state['rank'] == 0
    masters = state['masters']
    assert all(master.dtype == torch.float32 for master in masters.values())
    assert ('0.bn1.running_mean' in masters) == update_buffers
    copies = []
    for saved in (state, None):
        twin = copy.deepcopy(model)
        twin_teacher = AveragedTeacher(twin, *find_teacher(twin))
        # The hook's order: the plan (no copy: steps > 0), then the load.
        twin_teacher.check_momentum_target()
        message = twin_teacher.load_master_state(saved)
        copies.append((twin, twin_teacher, message))
    # A checkpoint saved before the next update holds the loaded masters.
    again = copies[0][1].master_state()['masters']
    assert again.keys() == masters.keys()
    for name, master in masters.items():
        assert torch.equal(again[name], master), name
    for _ in range(3):
        for twin, twin_teacher, _ in [(model, teacher, None), *copies]:
            step(twin, twin_teacher)
    expected = teacher_of(model, 'target_net')
    resumed, restarted = (
        teacher_of(twin, 'target_net') for twin, *_ in copies
    )
    assert copies[0][2] is None
    for key, value in expected.items():
        assert torch.equal(resumed[key], value), key
    assert any(not torch.equal(restarted[k], v) for k, v in expected.items())
    count = len(masters)
    assert copies[1][2] == (
        'momentum_hook: no float32 master in the resumed checkpoint rounds '
        f'to {count} of the {count} low-precision tensors of '
        "BYOL.target_net (first '0.conv1.weight'): it holds none (it was "
        'saved without the momentum hook). Their masters restart from the '
        "teacher's values, so the resumed teacher rounds differently from "
        'an uninterrupted run'
    )

    def load(state, write=None):
        twin = copy.deepcopy(saved_model)
        if write is not None:
            with torch.no_grad():
                twin.get_parameter(write).add_(1.0)
        twin_teacher = AveragedTeacher(twin, *find_teacher(twin))
        twin_teacher.check_momentum_target()
        return twin_teacher.load_master_state(state)

    assert load(state) is None
    # A teacher written since the save rounds none of them.
    assert (
        f'rounds to 1 of the {count} low-precision tensors of '
        "BYOL.target_net (first '0.conv1.weight'): it was saved on another "
        'number of ranks, or for another teacher.'
    ) in load(state, 'target_net.module.0.conv1.weight')
    # Another rank's (one file written for all ranks): named as such.
    assert (
        "it holds rank 1's masters, read on rank 0 (one file written for "
        'all ranks by one of them, e.g. by FSDPStrategy with state_dict_'
        "cfg='full': state_dict_cfg='local' keeps each rank's)."
    ) in load(dict(state, rank=1), 'target_net.module.0.conv1.weight')
    # The message hub's value holds the teacher weakly: once the teacher
    # is gone, it holds no masters (and keeps no model alive).
    snapshot = MasterSnapshot(AveragedTeacher(model, *find_teacher(model)))
    gc.collect()
    assert copy.deepcopy(snapshot) == {
        'teacher': 'BYOL.target_net',
        'rank': 0,
        'masters': {},
    }


def test_byol_in_flexible_runner_with_zero3_s_default_persistence(tmp_path):
    """ZeRO-3 with DeepSpeed's default stage3_param_persistence_threshold:
    the shrunk model's parameters are all below it, so DeepSpeed keeps
    each whole on every rank (persistent) and the hook updates those
    copies; the teacher is the replay once per optimizer step."""
    ranks = launch_byol(_zero3_rank, tmp_path, True, None)
    assert all(result['persistent'] for result in ranks)
    assert_ranks_follow_replay(ranks, tmp_path)


def test_release_gives_update_parameters_back_after_an_exception(tmp_path):
    """A run stopped by an exception leaves the model's update_parameters
    taken over (MMEngine calls no after_train); ``release`` gives it back,
    and the model's own call then updates the teacher again."""
    from momentum_hook.mmpretrain import release

    class Fail(Hook):
        priority = 'LOWEST'

        def after_train_iter(
            self, runner, batch_idx, data_batch=None, outputs=None
        ):
            raise Interrupt

    runner = Runner.from_cfg(shrunk_config('byol', tmp_path, 'x', hooks=HOOK))
    runner.register_hook(Fail())
    with pytest.raises(Interrupt):
        runner.train()
    model = runner.model
    skipped = vars(model.target_net)['update_parameters']
    assert repr(skipped).startswith(
        '<update_parameters taken over by momentum_hook (calls counted, none '
        'applied: 1)'
    )
    assert release(model) == ['target_net']
    assert 'update_parameters' not in vars(model.target_net)
    assert release(model) == []
    steps = int(model.target_net.steps)
    model.target_net.update_parameters(
        torch.nn.Sequential(model.backbone, model.neck)
    )
    assert int(model.target_net.steps) == steps + 1
