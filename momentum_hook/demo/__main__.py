"""``python -m momentum_hook.demo``: BYOL on the digits, with the momentum
hook.

Trains the config's BYOL with a real mmcv 1.x ``EpochBasedRunner`` whose
``custom_hooks`` hold ``momentum_hook.MomentumUpdateHook``, then compares the
features of the trained encoder with two baselines on held-out images and
writes ``results.json``, a plot of the momentum and the loss, the text and
JSON logs and the checkpoints to the work dir. Under ``torchrun ...
--launcher pytorch`` every process trains on its share of each batch; rank 0
evaluates and writes. A config whose ``runner`` is a ``FlexibleRunner``
(``configs/byol_digits_fsdp.py``, ``configs/byol_digits_deepspeed.py``)
trains in MMEngine's ``FlexibleRunner`` with its ``strategy`` (FSDP,
DeepSpeed ZeRO-3) instead; see :mod:`.flexible`.

Mistakes in the input end the program with one line on stderr and exit
status 2.
"""

import argparse
import importlib
import os.path as osp
import sys

import torch
import torch.distributed as dist

from ..mmcv_hook import unwrap
from .plot import momentum_schedule, plot_training, read_train_log
from .report import compare_features, format_table, write_results
from .train import (
    CfgOptionsAction,
    DemoError,
    default_config_path,
    init_distributed,
    is_flexible,
    load_config,
    prepare_work_dir,
    train,
)

__all__ = ['main', 'parse_args', 'run']

_PROG = 'python -m momentum_hook.demo'


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line."""

    def error(self, message):
        self.exit(2, f'{self.prog}: error: {message} (see --help)\n')


def parse_args(argv=None):
    """The command line; see ``python -m momentum_hook.demo --help``."""
    parser = _Parser(
        prog=_PROG,
        description='Train BYOL on the digits that ship with scikit-learn, '
        'with the momentum hook in a real mmcv EpochBasedRunner, and compare '
        'its features with two baselines on held-out images.',
    )
    parser.add_argument(
        'config',
        nargs='?',
        help='an MMCV-style config; defaults to configs/byol_digits.py',
    )
    parser.add_argument(
        '--work-dir',
        help='where logs, checkpoints, results.json and the '
        'plot go; defaults to ./work_dirs/<config name>',
    )
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=CfgOptionsAction,
        metavar='KEY=VALUE',
        help='override config entries, e.g. runner.max_epochs=2 '
        'optimizer.lr=0.001 data.train.repeat=1',
    )
    parser.add_argument(
        '--launcher',
        choices=['none', 'pytorch'],
        default='none',
        help="'pytorch' under torchrun (distributed)",
    )
    parser.add_argument(
        '--resume-from',
        metavar='CKPT',
        help='a checkpoint of this config to continue from',
    )
    parser.add_argument(
        '--device',
        choices=['cpu', 'cuda'],
        help='defaults to cuda when available, else cpu',
    )
    parser.add_argument(
        '--seed', type=int, help="overrides the config's seed (default 0)"
    )
    return parser.parse_args(argv)


def _check_requirements():
    missing = []
    for module, package in (
        ('sklearn', 'scikit-learn'),
        ('matplotlib', 'matplotlib'),
    ):
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(package)
    return missing


def _device(requested):
    if requested == 'cuda' and not torch.cuda.is_available():
        return None
    return requested or ('cuda' if torch.cuda.is_available() else 'cpu')


def _train_log(runner, flexible):
    """The training records of the run's JSON log and the log interval,
    or None without one."""
    if flexible:  # MMEngine's FlexibleRunner
        from .flexible import read_scalars

        logger = next(h for h in runner.hooks if hasattr(h, 'json_log_path'))
        return read_scalars(runner.log_dir), logger.interval
    logger = next(
        (h for h in runner.hooks if hasattr(h, 'json_log_path')), None
    )
    if logger is None or not osp.isfile(logger.json_log_path):
        return None
    return (
        read_train_log(logger.json_log_path, len(runner.data_loader)),
        logger.interval,
    )


def _plot(runner, model, work_dir, flexible):
    log = _train_log(runner, flexible)
    if log is None:
        return None
    records, interval = log
    out_file = osp.join(work_dir, 'momentum_and_loss.png')
    plot_training(
        records,
        out_file,
        interval=interval,
        schedule=momentum_schedule(runner.hooks, runner.max_iters, model),
        title='The momentum hook at work in BYOL',
    )
    return out_file


def _evaluate(cfg, dataset, model, initial_model, device, work_dir):
    heldout = getattr(dataset, 'heldout', None)
    heldout = heldout() if cfg.get('evaluation') and heldout else None
    if heldout is None:
        print(
            'No evaluation: the config has no `evaluation` or its dataset '
            'no held-out split.'
        )
        return
    images, labels = heldout
    from threadpoolctl import threadpool_limits  # scikit-learn's dependency

    try:
        # scikit-learn's OpenMP threads as many as torch's (the config's
        # omp_num_threads): two on two shared cores made the
        # nearest-centroid episodes ten times slower.
        with threadpool_limits(limits=torch.get_num_threads()):
            results = compare_features(
                model.encoder,
                initial_model.encoder,
                images,
                labels,
                device=device,
                **cfg.evaluation,
            )
    except (TypeError, ValueError) as error:
        raise DemoError(
            f'cannot evaluate (the checkpoints are saved): {error}'
        ) from None
    path = osp.join(work_dir, 'results.json')
    write_results(results, path)
    print(format_table(results))
    print(f'Results: {path}')


def run(args):
    """Train, evaluate and report as ``args`` say.

    Raises:
        DemoError: For a mistake in the input.
    """
    missing = _check_requirements()
    if missing:
        raise DemoError(
            f'the demo needs {" and ".join(missing)}, missing '
            'here: in a clone of momentum_hook, pip install '
            '--no-build-isolation -e ".[demo]"'
        )
    device = _device(args.device)
    if device is None:
        raise DemoError(
            '--device cuda, but torch sees no CUDA GPU: use --device cpu'
        )
    config = args.config or default_config_path()
    cfg = load_config(config, args.cfg_options)
    if args.seed is not None:
        cfg.seed = args.seed
    cfg.setdefault('seed', 0)
    work_dir = prepare_work_dir(
        args.work_dir
        or cfg.get('work_dir')
        or osp.join('work_dirs', osp.splitext(osp.basename(config))[0])
    )
    resume_from = args.resume_from or cfg.get('resume_from')
    if resume_from and not osp.isfile(resume_from):
        raise DemoError(f'checkpoint not found: {resume_from}')
    distributed = args.launcher == 'pytorch'
    rank = 0
    try:
        if distributed:
            rank, _ = init_distributed(
                device, cfg.get('dist_params', {}).get('backend')
            )
        runner, initial_model = train(
            cfg,
            work_dir,
            device=device,
            distributed=distributed,
            resume_from=resume_from,
        )
        flexible = is_flexible(cfg)
        if flexible:
            from .flexible import trained_copy

            model = trained_copy(runner, initial_model, work_dir)
            dataset = runner.train_dataloader.dataset
        else:
            model, dataset = unwrap(runner.model), runner.data_loader.dataset
        if rank == 0:
            _evaluate(cfg, dataset, model, initial_model, device, work_dir)
            plot = _plot(runner, model, work_dir, flexible)
            if plot:
                print(f'Plot: {plot}')
    finally:
        if distributed and dist.is_initialized():
            dist.destroy_process_group()
    return 0


def main(argv=None):
    """The entry point: 0 on success, 2 with one line on stderr for a
    mistake in the input."""
    args = parse_args(argv)
    try:
        return run(args)
    except DemoError as error:
        print(f'{_PROG}: error: {error}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
