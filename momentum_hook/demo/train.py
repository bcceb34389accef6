"""From an MMCV-style config to a trained mmcv 1.x ``EpochBasedRunner``.

The steps are those of an OpenMMLab ``tools/train.py``: read the config,
apply ``--cfg-options``, import ``custom_imports``, start the process group
under a launcher, build the model, the data loader and the optimizer, build
the runner from ``cfg.runner``, register the training hooks (the momentum
hook arrives through ``custom_hooks``), resume if asked, and run.

Mistakes in what a user gives (a config that does not exist or does not
build, an option that does not parse, a work dir that cannot be written)
raise :class:`DemoError` with a one-line message.
"""

import argparse
import copy
import os
import os.path as osp
import time
from collections.abc import Mapping
from importlib import resources

import mmcv
import torch
import torch.distributed as dist
from mmcv.cnn import MODELS
from mmcv.parallel import MMDataParallel, MMDistributedDataParallel
from mmcv.runner import (
    DistSamplerSeedHook,
    build_optimizer,
    build_runner,
    get_dist_info,
    init_dist,
    set_random_seed,
)
from mmcv.utils import build_from_cfg, get_logger, import_modules_from_strings
from torch.utils.data import DataLoader, DistributedSampler

from . import image_folder  # noqa: F401, registers ImageFolderTwoViews
from .data import DATASETS
from .model import DigitsBYOL  # noqa: F401, as 'momentum_hook.DigitsBYOL'

__all__ = [
    'DemoError',
    'DEFAULT_CONFIG',
    'CfgOptionsAction',
    'parse_cfg_options',
    'is_flexible',
    'default_config_path',
    'load_config',
    'prepare_work_dir',
    'init_distributed',
    'build_model',
    'build_dataset',
    'build_train_loader',
    'build_demo_runner',
    'train',
]

#: The default config's file name, in ``configs/`` of a checkout and in the
#: installed package ``momentum_hook.configs``.
DEFAULT_CONFIG = 'byol_digits.py'


class DemoError(Exception):
    """A mistake in the demo's input, reported as one line without a trace."""


def default_config_path():
    """The path of ``byol_digits.py``, installed or in a checkout."""
    try:
        path = resources.files('momentum_hook.configs') / DEFAULT_CONFIG
        if path.is_file():
            return str(path)
    except ModuleNotFoundError:
        pass
    path = osp.join(
        osp.dirname(__file__), '..', '..', 'configs', DEFAULT_CONFIG
    )
    if not osp.isfile(path):
        raise DemoError(
            f'the default config {DEFAULT_CONFIG} is neither in '
            'the package momentum_hook.configs nor in the '
            'checkout: reinstall momentum_hook or give a config'
        )
    return osp.normpath(path)


class CfgOptionsAction(mmcv.DictAction):
    """``--cfg-options key=value ...`` as OpenMMLab tools parse it (mmcv's
    ``DictAction``), with an argparse error instead of a traceback for an
    item that is no ``key=value`` or whose brackets do not match."""

    def __call__(self, parser, namespace, values, option_string=None):
        for item in values:
            key, sep, _ = item.partition('=')
            if not sep or not key or key != key.strip():
                raise argparse.ArgumentError(
                    self,
                    f'bad item {item!r}: expected key=value, e.g. '
                    'runner.max_epochs=2',
                )
        try:
            super().__call__(parser, namespace, values, option_string)
        except AssertionError as error:  # DictAction's bracket check
            raise argparse.ArgumentError(self, str(error)) from None


def parse_cfg_options(items):
    """``['a.b=1', 'c=[1,2]']`` to ``{'a.b': 1, 'c': [1, 2]}``, parsed as
    the command line's ``--cfg-options``.

    Raises:
        DemoError: For an item that does not parse.
    """
    parser = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    parser.add_argument('--cfg-options', nargs='+', action=CfgOptionsAction)
    try:
        return parser.parse_args(['--cfg-options', *items]).cfg_options
    except argparse.ArgumentError as error:
        raise DemoError(str(error)) from None


def load_config(path, options=None):
    """Read an MMCV config, merge ``key=value`` options into it, import
    its ``custom_imports``.

    Args:
        path (str): The config file (``.py``, ``.json`` or ``.yaml``).
        options (dict | Sequence[str], optional): What ``--cfg-options``
            gives (:class:`CfgOptionsAction`), or its ``key=value`` items.

    Returns:
        mmcv.Config: The config.

    Raises:
        DemoError: If the file is missing or unreadable, an option does not
            parse or address the config, or an import fails.
    """
    if not osp.isfile(path):
        raise DemoError(f'config file not found: {path}')
    try:
        cfg = mmcv.Config.fromfile(path)
    except Exception as error:  # a user's file: any error is theirs
        raise DemoError(
            f'cannot read config {path}: {type(error).__name__}: {error}'
        ) from None
    if options and not isinstance(options, Mapping):
        options = parse_cfg_options(options)
    try:
        cfg.merge_from_dict(options or {})
    except (KeyError, TypeError, AttributeError) as error:
        raise DemoError(f'bad --cfg-options: {error}') from None
    if cfg.get('custom_imports'):
        try:
            import_modules_from_strings(**cfg.custom_imports)
        except ImportError as error:
            raise DemoError(f'custom_imports of {path}: {error}') from None
    return cfg


def prepare_work_dir(work_dir):
    """Create ``work_dir`` and check that files can be written in it.

    Raises:
        DemoError: If it cannot be created or written.
    """
    try:
        os.makedirs(work_dir, exist_ok=True)
        probe = osp.join(work_dir, f'.write_test_{os.getpid()}')
        with open(probe, 'w'):
            pass
        os.remove(probe)
    except OSError as error:
        raise DemoError(
            f'cannot write to work dir {work_dir}: {error.strerror or error}'
        ) from None
    return osp.abspath(work_dir)


def is_flexible(cfg):
    """Whether ``cfg`` trains in MMEngine's ``FlexibleRunner`` (sharded,
    :mod:`.flexible`) rather than in an mmcv 1.x runner."""
    return cfg.runner.get('type') == 'FlexibleRunner'


def init_distributed(device, backend=None):
    """Join the process group that ``torchrun`` describes in the environment,
    with mmcv's ``init_dist('pytorch')`` on CUDA.

    Args:
        device (str): ``'cpu'`` or ``'cuda'``; each CUDA process takes the
            GPU ``RANK % torch.cuda.device_count()``, as mmcv's tools do.
        backend (str, optional): Defaults to ``'nccl'`` on CUDA and
            ``'gloo'`` on CPU.

    Returns:
        tuple[int, int]: ``(rank, world_size)``.
    """
    missing = [
        key
        for key in ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT')
        if key not in os.environ
    ]
    if missing:
        raise DemoError(
            f'--launcher pytorch needs {", ".join(missing)} in '
            'the environment: start the demo with torchrun'
        )
    if device == 'cuda':
        init_dist('pytorch', backend=backend or 'nccl')
    else:
        # mmcv 1.7's init_dist picks the GPU `rank % torch.cuda.device_count()`
        # before it joins the group: a ZeroDivisionError without a GPU. On
        # the CPU there is no GPU to pick, so join the group directly.
        dist.init_process_group(backend=backend or 'gloo')
    return get_dist_info()


def _build(cfg, registry, what):
    try:
        return build_from_cfg(cfg, registry)
    except (KeyError, TypeError, ValueError, OSError) as error:
        raise DemoError(
            f'cannot build the {what} from {dict(cfg)}: {error}'
        ) from None


def build_model(cfg):
    """The model of ``cfg.model`` from mmcv's root ``mmcv.cnn.MODELS``
    (the demo's own as ``'momentum_hook.DigitsBYOL'``)."""
    return _build(cfg.model, MODELS, 'model')


def build_dataset(cfg):
    """The training dataset of ``cfg.data.train`` from
    :data:`~.data.DATASETS`."""
    return _build(cfg.data.train, DATASETS, 'dataset')


def build_train_loader(dataset, cfg, seed, distributed):
    """A shuffling torch ``DataLoader``, with a ``DistributedSampler``
    (seeded with ``seed``) when ``distributed``.

    ``cfg.data.samples_per_gpu`` is the batch of each process and
    ``cfg.data.workers_per_gpu`` its loader workers, as in OpenMMLab
    configs. The last incomplete batch is dropped.
    """
    sampler = None
    if distributed:
        rank, world_size = get_dist_info()
        sampler = DistributedSampler(
            dataset,
            num_replicas=world_size,
            rank=rank,
            shuffle=True,
            seed=seed,
        )
    workers = cfg.data.get('workers_per_gpu', 0)
    loader = DataLoader(
        dataset,
        batch_size=cfg.data.samples_per_gpu,
        sampler=sampler,
        shuffle=sampler is None,
        num_workers=workers,
        persistent_workers=workers > 0,
        drop_last=True,
    )
    if len(loader) == 0:
        raise DemoError(
            f'the dataset has {len(dataset)} samples, fewer than one batch '
            f'of data.samples_per_gpu={cfg.data.samples_per_gpu} per '
            'process: lower samples_per_gpu or raise data.train.repeat'
        )
    return loader


def _wrap(model, device, distributed):
    if distributed:
        ids = [torch.cuda.current_device()] if device == 'cuda' else None
        return MMDistributedDataParallel(model.to(device), device_ids=ids)
    if device == 'cuda':
        return MMDataParallel(
            model.cuda(), device_ids=[torch.cuda.current_device()]
        )
    if torch.cuda.is_available():
        # torch's DataParallel cannot be kept on the CPU where a GPU exists.
        return model
    return MMDataParallel(model)


def _check_epochs(cfg):
    epochs = cfg.runner.get('max_epochs')
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise DemoError(
            f'runner.max_epochs must be an int >= 1, got {epochs!r}'
        )


def build_demo_runner(cfg, model, work_dir, logger, timestamp):
    """The runner of ``cfg.runner`` with the config's training hooks.

    Args:
        cfg (mmcv.Config): The config.
        model (nn.Module): The (wrapped) model.
        work_dir (str): Where logs and checkpoints go.
        logger (logging.Logger): The text logger.
        timestamp (str): Names the log files, as in OpenMMLab tools.

    Returns:
        BaseRunner: The runner, hooks registered.
    """
    _check_epochs(cfg)
    try:
        optimizer = build_optimizer(model, cfg.optimizer)
        runner = build_runner(
            cfg.runner,
            default_args=dict(
                model=model,
                optimizer=optimizer,
                work_dir=work_dir,
                logger=logger,
                meta=dict(seed=cfg.seed),
            ),
        )
        runner.timestamp = timestamp
        runner.register_training_hooks(
            lr_config=cfg.get('lr_config'),
            optimizer_config=cfg.get('optimizer_config'),
            checkpoint_config=cfg.get('checkpoint_config'),
            log_config=cfg.get('log_config'),
            momentum_config=cfg.get('momentum_config'),
            custom_hooks_config=cfg.get('custom_hooks'),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise DemoError(
            f'cannot build the runner and its hooks: '
            f'{type(error).__name__}: {error}'
        ) from None
    runner.register_hook(DistSamplerSeedHook())
    return runner


def _set_threads(threads):
    """Use ``threads`` CPU threads per process unless OMP_NUM_THREADS is set
    (as mmdet's ``setup_multi_processes`` does with ``omp_num_threads``)."""
    if threads and 'OMP_NUM_THREADS' not in os.environ:
        torch.set_num_threads(threads)


def train(
    cfg, work_dir, device='cpu', distributed=False, resume_from=None, hooks=()
):
    """Train the config's model with an mmcv runner.

    ``cfg.seed`` seeds Python, NumPy and torch (the same seed on every
    process: the data differ through the sampler); ``cfg.omp_num_threads``,
    if set, is the number of CPU threads of each process.

    Args:
        cfg (mmcv.Config): The config, options merged.
        work_dir (str): An existing, writable directory.
        device (str): ``'cpu'`` or ``'cuda'``.
        distributed (bool): Whether the process group is initialised.
        resume_from (str, optional): A checkpoint to continue from: weights,
            optimizer state, epoch and iteration.
        hooks (Sequence[Hook]): Extra hooks, registered with priority
            ``LOWEST`` so that they see what the other hooks did (tests use
            them to observe the run).

    A config with ``runner = dict(type='FlexibleRunner', ...)`` trains in
    MMEngine's ``FlexibleRunner`` with the config's ``strategy`` instead
    (:mod:`.flexible`); ``hooks`` are then MMEngine hooks.

    Returns:
        tuple: ``(runner, initial_model)``: the trained runner and an
        untrained copy of the model (the same seed, the same weights as the
        run started from).
    """
    _set_threads(cfg.get('omp_num_threads'))
    set_random_seed(cfg.seed)
    dataset = build_dataset(cfg)
    model = build_model(cfg)
    initial_model = copy.deepcopy(model)
    if is_flexible(cfg):
        if not distributed:
            raise DemoError(
                'a FlexibleRunner config shards the model over processes: '
                'start it with torchrun --nproc_per_node=2 -m '
                'momentum_hook.demo CONFIG --launcher pytorch'
            )
        if resume_from:
            raise DemoError(
                'the FlexibleRunner configs do not resume from the command '
                'line; in runs of your own, FSDP resumes with strategy=dict('
                "type='momentum_hook.FSDPResumeStrategy', ...) and DeepSpeed "
                'with MMEngine\'s own (see docs/mmengine.md, "Resuming FSDP '
                'in FlexibleRunner")'
            )
        from .flexible import train_flexible

        runner = train_flexible(
            cfg, work_dir, model.to(device), dataset, distributed, hooks
        )
        return runner, initial_model.to(device)
    timestamp = time.strftime('%Y%m%d_%H%M%S', time.localtime())
    logger = get_logger(
        'momentum_hook.demo', log_file=osp.join(work_dir, f'{timestamp}.log')
    )
    loader = build_train_loader(dataset, cfg, cfg.seed, distributed)
    runner = build_demo_runner(
        cfg, _wrap(model, device, distributed), work_dir, logger, timestamp
    )
    for hook in hooks:
        runner.register_hook(hook, priority='LOWEST')
    if resume_from:
        runner.resume(resume_from, map_location=device)
    runner.run([loader], cfg.get('workflow', [('train', 1)]))
    return runner, initial_model.to(device)
