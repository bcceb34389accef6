"""The momentum hook for MMEngine's ``Runner`` (MMCV 2.x-era projects).

A thin adapter: it reads the model, ``runner.iter`` and ``runner.max_iters``
from the runner, lets :class:`~momentum_hook.updater.MomentumUpdater` do the
work and publishes the momentum through ``runner.message_hub``.
"""
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS

from .registration import register_hook_class
from .updater import LOG_KEY, MomentumUpdater

__all__ = ['MomentumUpdateHook', 'BYOLHook']


def _accumulative_counts(optim_wrapper):
    """``{name: accumulative_counts}`` of an optimizer wrapper (or dict)."""
    wrappers = (dict(optim_wrapper.items()) if hasattr(optim_wrapper, 'items')
                else {'optim_wrapper': optim_wrapper})
    return {name: getattr(wrapper, '_accumulative_counts', 1)
            for name, wrapper in wrappers.items()}


class MomentumUpdateHook(MomentumUpdater, Hook):
    """Cosine-scheduled momentum (EMA) update of a BYOL / MoCo v3 target.

    The MMEngine counterpart of the mmcv 1.x hook: the same config line, the
    same schedule, arguments and model contract (see
    :class:`~momentum_hook.updater.MomentumUpdater`), with ``k`` =
    ``runner.iter`` and ``K`` = ``runner.max_iters`` for by-epoch and by-iter
    training loops alike. The momentum is published as the
    ``train/target_momentum`` scalar of ``runner.message_hub`` on the
    iterations that set it, so ``LoggerHook`` and the visualizer backends show
    it.

    The target follows the optimizer steps, not the micro-batches (MMEngine's
    ``EMAHook`` averages after every iteration unless its averaged model is
    given an ``interval``; mmpretrain's ``CosineEMA`` on every call of the
    model's loss): before training the hook checks that ``update_interval``
    is a multiple of the optimizer wrapper's ``accumulative_counts``.

    The hook keeps no state: a resumed run (``resume=True``) takes ``k`` from
    the restored ``runner.iter`` and the target from the model's checkpoint.
    With torch >= 2.6, MMEngine 0.10.7 cannot load its own checkpoints
    (numpy arrays, ``HistoryBuffer``) under ``torch.load``'s
    ``weights_only=True`` default; for checkpoints you trust, run with
    ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``.

    It takes :class:`~momentum_hook.updater.MomentumUpdater`'s arguments:
    ``end_momentum=1.``, ``update_interval=1``, ``reach_end_momentum=False``.
    """

    def unwrap_model(self, model):
        return model.module if is_model_wrapper(model) else model

    def publish(self, runner, momentum):
        runner.message_hub.update_scalar(f'train/{LOG_KEY}', momentum)

    def check_optimizer(self, runner):
        for name, counts in _accumulative_counts(runner.optim_wrapper).items():
            self.check_accumulation(
                counts, f'{name} has accumulative_counts={counts}')

    def before_train(self, runner):
        self.check_runner(runner)

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        self.on_iter_start(runner)

    def after_train_iter(self, runner, batch_idx, data_batch=None,
                         outputs=None):
        self.on_iter_end(runner)


#: MMSelfSup 0.x's second name for the same hook.
BYOLHook = MomentumUpdateHook

register_hook_class(HOOKS, MomentumUpdateHook)
