"""The momentum hook for mmcv 1.x runners (``mmcv.runner``).

A thin adapter: it reads the model, ``runner.iter`` and ``runner.max_iters``
from the runner, lets the :class:`~momentum_hook.updater.MomentumUpdater` it
holds do the work and writes the momentum to ``runner.log_buffer``.
"""

from mmcv.parallel import is_module_wrapper
from mmcv.runner import HOOKS, Hook, OptimizerHook

from . import wrappers
from ._compat.mmcv import train_loader
from .ledger import RECORD_KEY, OptimizerSteps, check_one_momentum_hook
from .registration import register_hook_class
from .updater import LOG_KEY, HookOptions

__all__ = ['MomentumUpdateHook', 'BYOLHook', 'unwrap']


def unwrap(model):
    """The model inside mmcv's and torch's data-parallel wrappers."""
    return wrappers.unwrap(model, is_module_wrapper)


class MomentumUpdateHook(HookOptions, Hook):
    """Cosine-scheduled momentum (EMA) update of a BYOL / MoCo v3 target.

    A drop-in for MMSelfSup 0.x's ``MomentumUpdateHook`` / ``BYOLHook``: the
    same arguments give the same momenta and target weights, on plain and
    wrapped models (``MMDataParallel``, ``MMDistributedDataParallel``, torch's
    ``DataParallel`` and ``DistributedDataParallel``). Configs name it
    ``'momentum_hook.MomentumUpdateHook'``; their plain names build it after
    ``momentum_hook_dropin`` is imported (see
    :mod:`momentum_hook.registration`). The schedule, the arguments and the
    model contract are those of
    :class:`~momentum_hook.updater.MomentumUpdater`, which the hook holds as
    ``updater``; the momentum is logged as ``target_momentum`` on the
    iterations that set it.

    Before the run it also checks that every ``OptimizerHook`` runs before
    this hook (so the EMA sees the weights after the optimizer step) and that
    ``update_interval`` is a multiple of the optimizer hook's accumulation
    (``cumulative_iters`` of ``GradientCumulativeOptimizerHook``,
    ``update_interval`` of MMSelfSup's ``DistOptimizerHook``), and has a
    model that can check its target
    (``MomentumTargetMixin.check_momentum_target``) plan its update, so that
    an unusable target stops the run before iteration 1 and a target that
    does not start as a copy of the online network becomes one.

    It takes :class:`~momentum_hook.updater.MomentumUpdater`'s arguments:
    ``end_momentum=1.``, ``update_interval=1``, ``reach_end_momentum=False``,
    ``base_batch_size=None``. With ``base_batch_size`` the batch is read from
    ``runner.data_loader``, which mmcv sets just before the first iteration:
    the hook logs its line and refuses a loader without a fixed batch size
    then, before the first forward pass. ``base_batch_size='auto'`` is
    MMEngine's (mmcv 1.x runners have no ``auto_scale_lr``) and is refused.

    ``on_skipped_step`` defaults to ``'update'``: like MMSelfSup 0.x, the
    target is updated on every scheduled iteration, also when
    ``Fp16OptimizerHook``'s loss scaler skipped the optimizer step; with
    ``'hold'`` it is updated only after iterations whose optimizer stepped.
    Either way the run's last log line counts the skipped steps. A second
    momentum hook on the runner is refused before the run, and a resumed
    run's log warns when the schedule changed (the run length is kept in
    ``runner.meta['hook_msgs']``, which mmcv saves and resumes).
    """

    _default_on_skipped_step = 'update'

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.base_batch_size == 'auto':
            raise ValueError(
                "base_batch_size='auto' follows MMEngine's auto_scale_lr, "
                'which mmcv 1.x runners do not have: give the hook '
                'base_batch_size=N, the samples per target update its '
                'momenta were tuned for (e.g. 4096), or None not to scale'
            )

    def before_run(self, runner):
        check_one_momentum_hook(runner.hooks, MomentumUpdateHook)
        model = unwrap(runner.model)
        self.updater.check_run(model, getattr(runner, 'max_iters', None))
        self._check_optimizer(runner)
        self._resume(runner, model)
        optimizers = runner.optimizer
        self._steps = OptimizerSteps.watch(
            optimizers.values()
            if isinstance(optimizers, dict)
            else [optimizers]
            if optimizers is not None
            else []
        )
        self.updater.check_target(model)
        # With base_batch_size the hook starts at the first iteration, once
        # mmcv has set runner.data_loader.
        if self.updater.base_batch_size is None:
            self._start(runner)

    def before_train_iter(self, runner):
        if not self.updater.started:
            self._start(runner)
        self.updater.write_momentum(
            unwrap(runner.model), runner.iter, runner.max_iters
        )
        if self._steps is not None:
            self._steps.begin()

    def after_train_iter(self, runner):
        momentum = self.updater.update_target(
            unwrap(runner.model),
            runner.iter,
            runner.max_iters,
            None if self._steps is None else self._steps.end(),
        )
        if momentum is not None:
            runner.log_buffer.update({LOG_KEY: momentum})

    def after_run(self, runner):
        runner.logger.info(self.updater.ledger.summary())
        if self._steps is not None:
            self._steps.close()
        self._steps = None

    def _resume(self, runner, model):
        """Warn about a resumed run's schedule; keep this run's length where
        mmcv saves hook messages and restores them on ``runner.resume``."""
        if runner.meta is None:
            runner.meta = {}
        messages = runner.meta.setdefault('hook_msgs', {})
        if runner.iter > 0:
            for message in self.updater.resume_messages(
                messages.get(RECORD_KEY), model, runner.iter, runner.max_iters
            ):
                runner.logger.warning(message)
        messages[RECORD_KEY] = self.updater.ledger.record(runner.max_iters)

    def _start(self, runner):
        runner.logger.info(
            self.updater.start(
                unwrap(runner.model),
                runner.max_iters,
                lambda: _train_loader(runner),
                owner=self,
            )
        )

    def _check_optimizer(self, runner):
        mine = next(i for i, hook in enumerate(runner.hooks) if hook is self)
        for index, hook in enumerate(runner.hooks):
            if not isinstance(hook, OptimizerHook):
                continue
            name = type(hook).__name__
            if index > mine:
                raise ValueError(
                    f'MomentumUpdateHook (priority {self.priority}) runs '
                    f'before {name} (priority {hook.priority}), so the EMA '
                    'would see the weights before the optimizer step: give '
                    'the momentum hook a lower priority, e.g. NORMAL'
                )
            steps = (
                getattr(hook, 'cumulative_iters', None)
                or getattr(hook, 'update_interval', None)
                or 1
            )
            self.updater.check_accumulation(
                steps, f'{name} accumulates over {steps}'
            )


def _train_loader(runner):
    """The runner's DataLoader; IterBasedRunner trains from an IterLoader
    around it."""
    return train_loader(getattr(runner, 'data_loader', None))


#: MMSelfSup 0.x's second name for the same hook.
BYOLHook = MomentumUpdateHook

register_hook_class(HOOKS, MomentumUpdateHook)
