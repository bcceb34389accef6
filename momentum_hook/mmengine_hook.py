"""The momentum hook for MMEngine's ``Runner`` and ``FlexibleRunner``.

A thin adapter: it reads the model, ``runner.iter`` and ``runner.max_iters``
from the runner, lets the :class:`~momentum_hook.updater.MomentumUpdater` it
holds do the work and publishes the momentum through ``runner.message_hub``.
Under ``FlexibleRunner`` it also finds the model inside the strategy's wrapper
(``MMFullyShardedDataParallel``, DeepSpeed's engine) and DeepSpeed's
gradient accumulation; it imports neither FSDP nor DeepSpeed, it only
recognises their objects once the strategy has imported them.
"""

from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS

from ._compat.mmengine import accumulative_counts, auto_scale_lr
from .ledger import (
    RECORD_KEY,
    EngineSteps,
    OptimizerSteps,
    check_one_momentum_hook,
)
from .mmpretrain import MASTERS_KEY, MasterSnapshot, teacher_of
from .ranks import agree_across_ranks
from .registration import register_hook_class
from .updater import LOG_KEY, HookOptions
from .wrappers import loaded, unwrap, wrapper_chain
from .zero import check_zero3_gathers, check_zero_config

__all__ = ['MomentumUpdateHook', 'BYOLHook']

#: What to set in a FlexibleRunner config when the strategy wrapped the
#: target unlike the online network, by strategy class name.
_WRAP_FIX = {
    'FSDPStrategy': (
        "strategy=dict(type='FSDPStrategy', model_wrapper=dict("
        "type='MMFullyShardedDataParallel', auto_wrap_policy="
        'ModuleWrapPolicy({type(model.online_net)}))), so that the online '
        'and the target network are separate FSDP units'
    ),
    'DeepSpeedStrategy': (
        "strategy=dict(type='DeepSpeedStrategy', zero_optimization=dict("
        'stage=..., stage3_param_persistence_threshold=...)) alike for both '
        'networks, and build the target inside the model (MomentumTarget'
        'Mixin.init_momentum_target) so that DeepSpeed partitions it'
    ),
}


def _wrapper_chain(model):
    """``model`` and every wrapper inside it, outermost first: MMEngine's
    wrappers (``is_model_wrapper``: DDP, ``MMFullyShardedDataParallel``, ...)
    and DeepSpeed's (see :func:`~momentum_hook.wrappers.wrapper_chain`)."""
    return wrapper_chain(model, is_model_wrapper)


def _unwrap(model):
    """The user's model inside every wrapper of :func:`_wrapper_chain`."""
    return unwrap(model, is_model_wrapper)


def _engines(runner):
    """The DeepSpeed engines among the runner's model wrappers."""
    engine = loaded('deepspeed', 'DeepSpeedEngine')
    return [
        model
        for model in _wrapper_chain(runner.model)
        if engine is not None and isinstance(model, engine)
    ]


def _optim_wrappers(optim_wrapper):
    """``{name: wrapper}`` of an optimizer wrapper (or dict)."""
    return (
        dict(optim_wrapper.items())
        if hasattr(optim_wrapper, 'items')
        else {'optim_wrapper': optim_wrapper}
    )


def _accumulative_counts(optim_wrapper):
    """``{name: accumulative_counts}`` of an optimizer wrapper (or dict)."""
    return {
        name: accumulative_counts(wrapper)
        for name, wrapper in _optim_wrappers(optim_wrapper).items()
    }


def _step_watch(runner, engine):
    """What reports the optimizer's real steps: DeepSpeed's engine, else the
    optimizers of the ``OptimWrapper`` s, their accumulation boundary
    (``should_update()``) and step number."""
    if engine is not None:
        return EngineSteps(engine)
    wrappers = list(_optim_wrappers(runner.optim_wrapper).values())
    return OptimizerSteps.watch(
        [getattr(wrapper, 'optimizer', None) for wrapper in wrappers],
        boundary=lambda: any(wrapper.should_update() for wrapper in wrappers),
        index=lambda: max(
            -(-wrapper.inner_count // accumulative_counts(wrapper))
            for wrapper in wrappers
        ),
    )


class MomentumUpdateHook(HookOptions, Hook):
    """Cosine-scheduled momentum (EMA) update of a BYOL / MoCo v3 target.

    The MMEngine counterpart of the mmcv 1.x hook: the same config line, the
    same schedule, arguments and model contract (see
    :class:`~momentum_hook.updater.MomentumUpdater`, which the hook holds as
    ``updater``), with ``k`` = ``runner.iter`` and ``K`` =
    ``runner.max_iters`` for by-epoch and by-iter training loops alike, in
    ``Runner`` and in ``FlexibleRunner`` (DDP, FSDP and DeepSpeed
    strategies). The momentum is published as the
    ``train/target_momentum`` scalar of ``runner.message_hub`` on the
    iterations that set it, so ``LoggerHook`` and the visualizer backends show
    it.

    The target follows the optimizer steps, not the micro-batches (MMEngine's
    ``EMAHook`` averages after every iteration unless its averaged model is
    given an ``interval``; mmpretrain's ``CosineEMA`` on every call of the
    model's loss): before training the hook checks that ``update_interval``
    is a multiple of the optimizer wrapper's ``accumulative_counts`` and of
    DeepSpeed's ``gradient_accumulation_steps``. If the model can check its
    target (``MomentumTargetMixin.check_momentum_target``), the hook has it
    plan the update once before training, after the strategy wrapped the
    model, so that a target sharded unlike the online network stops the run
    before iteration 1 with the config key to set; a ``DeepSpeedStrategy``
    config with ZeRO++ quantized weights (``zero_quantized_weights``,
    ``zero_quantized_nontrainable_weights``) is refused there too.

    An mmpretrain 1.x model without that contract whose teacher is an
    MMEngine ``ExponentialMovingAverage`` or a ``CosineEMA`` (BYOL, MoCo v3,
    MoCo v2, DenseCL) is taken over (:mod:`momentum_hook.mmpretrain`): the
    schedule comes from the teacher, ``end_momentum`` and
    ``update_interval`` default to the teacher's, and the model's own
    ``update_parameters`` calls do nothing until ``after_train`` (after an
    exception, :func:`momentum_hook.mmpretrain.release` gives the method
    back). The float32 masters of a bfloat16/float16 teacher travel in the
    checkpoint's ``MessageHub`` (:data:`momentum_hook.mmpretrain.MASTERS_KEY`).

    The target follows the optimizer's real steps (``on_skipped_step=
    'hold'``, see :class:`~momentum_hook.ledger.Ledger`), read from each
    ``OptimWrapper``'s optimizer and accumulation boundary or from
    DeepSpeed's step counters; a second momentum hook is refused before
    training. A resumed run (``resume=True``) takes ``k`` from the restored
    ``runner.iter`` and the target from the model's checkpoint; the hook
    keeps the run length in ``runner.message_hub`` so that the run's log
    warns about a resume with another length, inside an accumulation
    window, or running past ``max_iters``.
    With torch >= 2.6, MMEngine 0.10.7 cannot load its own checkpoints
    (numpy arrays, ``HistoryBuffer``) under ``torch.load``'s
    ``weights_only=True`` default; for checkpoints you trust, run with
    ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``.

    It takes :class:`~momentum_hook.updater.MomentumUpdater`'s arguments:
    ``end_momentum=1.``, ``update_interval=1``, ``reach_end_momentum=False``,
    ``base_batch_size=None``; with ``base_batch_size`` the batch is that of
    ``runner.train_dataloader``. ``base_batch_size='auto'`` takes the
    ``base_batch_size`` of the config's ``auto_scale_lr``, which must be
    enabled (checked before iteration 1), so that the momentum follows the
    batch the learning rate is scaled against.
    """

    #: The mmpretrain teacher this run updates, if any (see
    #: :mod:`momentum_hook.mmpretrain`).
    _teacher = None

    def _model(self, runner):
        """What the updater updates: the mmpretrain teacher the hook took
        over, or the unwrapped model."""
        return self._teacher or _unwrap(runner.model)

    def _take_over(self, runner):
        """Find an mmpretrain teacher and set the schedule from it."""
        counts = [
            *_accumulative_counts(runner.optim_wrapper).values(),
            *(
                model.gradient_accumulation_steps()
                for model in _engines(runner)
            ),
        ]
        self._teacher = teacher_of(
            _unwrap(runner.model), self.updater, self._given, counts
        )

    def _check_optimizer(self, runner):
        """Check the accumulation; return the DeepSpeed engine, if any."""
        for name, counts in _accumulative_counts(runner.optim_wrapper).items():
            self.updater.check_accumulation(
                counts, f'{name} has accumulative_counts={counts}'
            )
        for model in _engines(runner):
            check_zero3_gathers(model)
            steps = model.gradient_accumulation_steps()
            self.updater.check_accumulation(
                steps,
                f'DeepSpeed has gradient_accumulation_steps='
                f"{steps}: strategy=dict(type='DeepSpeedStrategy', "
                f'gradient_accumulation_steps={steps})',
            )
            return model
        return None

    def _check_target(self, runner):
        """Have the model plan its update now, after the strategy wrapped it.

        Raises:
            ValueError: The model's own, plus the strategy's config key.
        """
        try:
            self.updater.check_target(self._model(runner))
        except ValueError as error:
            strategy = type(getattr(runner, 'strategy', None)).__name__
            fix = getattr(self._teacher, 'wrap_fix', {}).get(
                strategy, _WRAP_FIX.get(strategy)
            )
            if fix is None:
                raise
            raise ValueError(
                f'{error}. In this FlexibleRunner with {strategy}, set {fix}'
            ) from error

    def _check_strategy(self, runner):
        """Refuse a ``DeepSpeedStrategy`` config with ZeRO++ quantized
        weights (see :func:`~momentum_hook.zero.check_zero_config`).

        Raises:
            ValueError: Naming the option and what to set.
        """
        strategy = getattr(runner, 'strategy', None)
        config = getattr(strategy, 'config', None)
        if type(strategy).__name__ == 'DeepSpeedStrategy' and isinstance(
            config, dict
        ):
            check_zero_config(config)

    def _resume_masters(self, runner):
        """Take back the teacher's masters from the resumed checkpoint's
        message hub, after the check (which plans on every rank at once)
        so that they follow the plan's own list; every rank's warning is
        logged on rank 0, whose log the run shows (a collective)."""
        teacher, state = (
            self._teacher,
            runner.message_hub.get_info(MASTERS_KEY),
        )
        _, messages = agree_across_ranks(
            lambda: None, lambda: teacher.load_master_state(state)
        )
        for index, message in enumerate(messages):
            if message:
                prefix = f'rank {index}: ' if len(messages) > 1 else ''
                runner.logger.warning(prefix + message)

    def before_train(self, runner):
        self._check_strategy(runner)
        check_one_momentum_hook(runner.hooks, MomentumUpdateHook)
        self._take_over(runner)
        model = self._model(runner)
        self.updater.check_run(model, getattr(runner, 'max_iters', None))
        engine = self._check_optimizer(runner)
        if self.base_batch_size == 'auto':
            self.updater.use_auto_scale_lr(auto_scale_lr(runner))
        runner.logger.info(
            self.updater.start(
                model,
                runner.max_iters,
                lambda: runner.train_dataloader,
                owner=self,
            )
        )
        self._check_target(runner)
        hub = runner.message_hub
        if self._teacher is not None and runner.iter:
            self._resume_masters(runner)
        for message in (
            self.updater.resume_messages(
                hub.get_info(RECORD_KEY),
                model,
                runner.iter,
                runner.max_iters,
                engine is not None,
            )
            if runner.iter
            else ()
        ):
            runner.logger.warning(message)
        # The message hub's runtime info is saved and resumed by MMEngine.
        hub.update_info(
            RECORD_KEY, self.updater.ledger.record(runner.max_iters)
        )
        self._steps = _step_watch(runner, engine)
        if self._teacher is not None:
            hub.update_info(MASTERS_KEY, MasterSnapshot(self._teacher))
            self._teacher.take_over()
            runner.logger.info(
                f'momentum_hook takes over {self._teacher.describe()}: the '
                "hook updates it, the model's loss() no longer does"
            )

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        self.updater.write_momentum(
            self._model(runner), runner.iter, runner.max_iters
        )
        if self._steps is not None:
            self._steps.begin()

    def after_train_iter(
        self, runner, batch_idx, data_batch=None, outputs=None
    ):
        message = self.updater.ledger.past_end_message(
            runner.iter, runner.max_iters, self.end_momentum
        )
        if message:
            runner.logger.warning(message)
        momentum = self.updater.update_target(
            self._model(runner),
            runner.iter,
            runner.max_iters,
            None if self._steps is None else self._steps.end(),
        )
        if momentum is not None:
            runner.message_hub.update_scalar(f'train/{LOG_KEY}', momentum)

    def after_train(self, runner):
        runner.logger.info(self.updater.ledger.summary())
        if self._steps is not None:
            self._steps.close()
        self._steps = None
        if self._teacher is not None:
            # A copy, not the live snapshot: MessageHub instances are global,
            # and the snapshot would keep the model alive with them.
            runner.message_hub.update_info(
                MASTERS_KEY, self._teacher.master_state()
            )
            self._teacher.release()


#: MMSelfSup 0.x's second name for the same hook.
BYOLHook = MomentumUpdateHook

register_hook_class(HOOKS, MomentumUpdateHook)
