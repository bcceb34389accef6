"""The demo on MMEngine's ``FlexibleRunner``: the same BYOL, sharded.

A config whose ``runner`` is ``dict(type='FlexibleRunner', max_epochs=N)``
and which has a ``strategy`` (``configs/byol_digits_fsdp.py``,
``configs/byol_digits_deepspeed.py``) trains here instead of in an mmcv
``EpochBasedRunner``: the same model, data, optimizer and ``custom_hooks``
line, with MMEngine's ``FSDPStrategy`` or ``DeepSpeedStrategy`` (ZeRO-3)
sharding the online and the target network alike. The model, the data, the
evaluation,
the plot and the report are the demo's own; this module only builds the
runner and, after training, gathers the sharded weights with
:func:`momentum_hook.export.full_state_dict`, so that rank 0 evaluates an
ordinary, unsharded copy and writes the target (the teacher) to
``target_net.pth`` with :func:`momentum_hook.export.export_target`.
"""

import copy
import glob
import json
import os.path as osp

from mmengine.model import BaseModel
from mmengine.runner import FlexibleRunner
from torch import nn

from ..export import export_target, full_state_dict
from .model import MODELS, DigitsBYOL

__all__ = [
    'FlexibleDigitsBYOL',
    'sequential_wrap_policy',
    'train_flexible',
    'trained_copy',
    'read_scalars',
    'TARGET_FILE',
]

#: Where rank 0 writes the full target network's state dict.
TARGET_FILE = 'target_net.pth'


@MODELS.register_module()
class FlexibleDigitsBYOL(DigitsBYOL, BaseModel):
    """:class:`~.model.DigitsBYOL` as MMEngine's wrappers call a model:
    ``forward(img1=..., img2=..., mode='loss')`` returns ``dict(loss=...)``;
    any other mode gives the encoder's features of ``img1``."""

    train_step = BaseModel.train_step

    def forward(self, img1, img2=None, data_samples=None, mode='tensor'):
        if mode == 'loss':
            return dict(loss=self.loss(img1, img2))
        return self.encoder(img1)


def sequential_wrap_policy(module, recurse, nonwrapped_numel):
    """An FSDP1 ``auto_wrap_policy``: every ``nn.Sequential`` is a unit.

    The online network, the target network (its copy) and their parts are
    ``nn.Sequential``s, so the two networks become separate units laid out
    alike, as the momentum update needs. A config names it by its path,
    ``auto_wrap_policy='momentum_hook.demo.flexible.sequential_wrap_policy'``.
    """
    return recurse or isinstance(module, nn.Sequential)


def read_scalars(log_dir):
    """The training records of MMEngine's ``vis_data/scalars.json``, with
    ``global_iter`` (1-based) from their ``step``, as the plot wants them."""
    (path,) = glob.glob(osp.join(log_dir, 'vis_data', 'scalars.json'))
    with open(path) as f:
        records = [json.loads(line) for line in f]
    return [
        dict(record, global_iter=record['step'])
        for record in records
        if 'loss' in record
    ]


def _strategy_and_optim_wrapper(cfg):
    """The runner's ``strategy`` and ``optim_wrapper`` from ``cfg``.

    Under ``DeepSpeedStrategy`` the optimizer goes in a
    ``DeepSpeedOptimWrapper``, and DeepSpeed's
    ``train_micro_batch_size_per_gpu`` defaults to the batch of each
    process, ``cfg.data.samples_per_gpu``.
    """
    strategy = (
        cfg.strategy.to_dict()
        if hasattr(cfg.strategy, 'to_dict')
        else dict(cfg.strategy)
    )
    optim_wrapper = dict(optimizer=dict(cfg.optimizer))
    if strategy.get('type') == 'DeepSpeedStrategy':
        optim_wrapper['type'] = 'DeepSpeedOptimWrapper'
        if 'train_micro_batch_size_per_gpu' not in (
            strategy.get('config') or {}
        ):
            strategy.setdefault(
                'train_micro_batch_size_per_gpu', cfg.data.samples_per_gpu
            )
    return strategy, optim_wrapper


def _runner(cfg, model, dataset, work_dir, distributed, hooks):
    log_interval = cfg.log_config.interval
    checkpoint = cfg.get('checkpoint_config') or {}
    strategy, optim_wrapper = _strategy_and_optim_wrapper(cfg)
    return FlexibleRunner(
        model=model,
        work_dir=work_dir,
        strategy=strategy,
        launcher='pytorch' if distributed else 'none',
        train_dataloader=dict(
            dataset=dataset,
            batch_size=cfg.data.samples_per_gpu,
            num_workers=cfg.data.get('workers_per_gpu', 0),
            drop_last=True,
            sampler=dict(type='DefaultSampler', shuffle=True, seed=cfg.seed),
            collate_fn=dict(type='default_collate'),
        ),
        optim_wrapper=optim_wrapper,
        train_cfg=dict(by_epoch=True, max_epochs=cfg.runner.max_epochs),
        default_hooks=dict(
            logger=dict(type='LoggerHook', interval=log_interval),
            checkpoint=dict(
                type='CheckpointHook', interval=checkpoint.get('interval', 1)
            ),
        ),
        custom_hooks=[*cfg.get('custom_hooks', []), *hooks],
        randomness=dict(seed=cfg.seed),
        # Both logged as means over the interval, as mmcv's logger does.
        log_processor=dict(
            window_size=log_interval,
            custom_cfg=[
                dict(
                    data_src='target_momentum',
                    method_name='mean',
                    window_size=log_interval,
                )
            ],
        ),
        env_cfg=dict(dist_cfg=dict(backend='gloo')),
    )


def train_flexible(cfg, work_dir, model, dataset, distributed, hooks=()):
    """Train ``model`` on ``dataset`` in a ``FlexibleRunner`` from ``cfg``.

    Args:
        cfg (mmcv.Config): The config, with ``runner.max_epochs`` and a
            ``strategy``.
        work_dir (str): Where the runner writes its logs and checkpoints.
        model (FlexibleDigitsBYOL): The model, not wrapped.
        dataset (Dataset): The training set.
        distributed (bool): Whether the process group is initialised.
        hooks (Sequence[Hook]): Extra MMEngine hooks.

    Returns:
        FlexibleRunner: The trained runner.
    """
    runner = _runner(cfg, model, dataset, work_dir, distributed, hooks)
    runner.train()
    return runner


def trained_copy(runner, initial_model, work_dir):
    """An unsharded copy of the trained model, on rank 0 (None elsewhere).

    A collective: every rank gathers the sharded weights; rank 0 loads them
    into a copy of ``initial_model`` and writes the target network, the
    teacher, to ``work_dir/target_net.pth``.
    """
    state = full_state_dict(runner.model)
    export_target(runner.model, osp.join(work_dir, TARGET_FILE))
    if runner.rank != 0:
        return None
    trained = copy.deepcopy(initial_model)
    trained.load_state_dict(state)
    return trained
