"""What the hook does, free of any runner framework: the adapters translate.

:class:`MomentumUpdater` holds the hook's options, checks the model's
contract and, given the unwrapped model, the 0-based iteration ``k`` and the
run length ``K``, writes the scheduled momentum and calls the model's
``momentum_update()``. Each hook in :mod:`momentum_hook.mmcv_hook` and
:mod:`momentum_hook.mmengine_hook` holds one as ``hook.updater`` and adds
only its runner's part: how it unwraps a model, reads the train data loader,
logs a value and accumulates gradients.

The contract with the model (the same as MMSelfSup 0.x):

- ``base_momentum`` (float in [0, 1]): the momentum at iteration 0;
- ``momentum`` (float): written by the hook before each update iteration;
- ``momentum_update()``: ``target = m * target + (1 - m) * online`` with
  ``m = self.momentum``, called after the iteration's optimizer step;
- optionally ``schedule_offset`` (int): added to ``k`` in the schedule (1 for
  an mmpretrain teacher, :class:`~momentum_hook.mmpretrain.AveragedTeacher`).
"""

import numbers
from collections.abc import Callable
from typing import Any, cast

from .ledger import SKIPPED_STEP_POLICIES, Ledger
from .ranks import world_size
from .schedule import (
    cosine_momentum,
    is_update_iter,
    last_update_iter,
    scaled_momentum,
)
from .validation import check_momentum, check_positive_int

__all__ = ['MomentumUpdater', 'check_momentum_contract', 'LOG_KEY']

#: The log key of the target momentum. The runners' loggers already report
#: the optimizer's momentum as ``momentum``.
LOG_KEY = 'target_momentum'

#: The attributes the hook needs on the (unwrapped) model.
CONTRACT = ('base_momentum', 'momentum', 'momentum_update')


def check_momentum_contract(model: Any) -> None:
    """Check that ``model`` has the attributes the hook relies on.

    Args:
        model: The unwrapped model (``runner.model.module`` for wrappers).

    Raises:
        TypeError: Naming the model class and the missing or unusable
            attribute, and what it should be.
    """
    cls = type(model).__name__
    missing = [name for name in CONTRACT if not hasattr(model, name)]
    if missing:
        raise TypeError(
            f'{cls} lacks {", ".join(repr(n) for n in missing)}: the momentum '
            'hook needs a model with `base_momentum` (float in [0, 1]), '
            '`momentum` (float, written by the hook) and a callable '
            '`momentum_update()`; momentum_hook.MomentumTargetMixin '
            'provides all three'
        )
    if not callable(model.momentum_update):
        raise TypeError(
            f'{cls}.momentum_update must be callable, got '
            f'{type(model.momentum_update).__name__}'
        )
    check_momentum(model.base_momentum, f'{cls}.base_momentum')


def loader_batch_size(loader):
    """The fixed batch size of each process's training data loader.

    Args:
        loader: A torch ``DataLoader`` (its ``batch_size``, or its batch
            sampler's ``batch_size`` when it was given a ``batch_sampler``).

    Returns:
        int: The samples of one batch on one process.

    Raises:
        ValueError: If the loader has no fixed, positive batch size.
    """
    size = getattr(loader, 'batch_size', None)
    if size is None:
        size = getattr(
            getattr(loader, 'batch_sampler', None), 'batch_size', None
        )
    if (
        isinstance(size, bool)
        or not isinstance(size, numbers.Integral)
        or size < 1
    ):
        raise ValueError(
            'base_batch_size needs the samples per target update, but the '
            f"runner's train data loader ({type(loader).__name__}) has no "
            f'fixed batch size (batch_size={size!r}): give it a batch_size '
            '(a DataLoader argument, or batch_size of the batch sampler), or '
            'set base_batch_size=None and pass momenta scaled with '
            'momentum_hook.scaled_momentum yourself'
        )
    return int(size)


class MomentumUpdater:
    """Schedules the target momentum and triggers the model's EMA update.

    Before iteration ``k`` of a run of ``K`` iterations, when
    ``(k + 1) % update_interval == 0``, the model's momentum is set to

    .. math::

        m = m_{end} - (m_{end} - m_{base}) \\cdot
            \\frac{\\cos(\\pi k / K') + 1}{2}

    where :math:`m_{base}` is ``model.base_momentum`` and :math:`K' = K`
    (MMSelfSup 0.x, the default: the last update uses ``k = K - 1`` and stays
    just below :math:`m_{end}`), or, with ``reach_end_momentum=True``,
    :math:`K'` is the iteration of the run's last update, which then uses
    exactly :math:`m_{end}`. After that iteration the model's
    ``momentum_update()`` is called.

    With ``base_batch_size`` set, every update uses :math:`m^{\\kappa}`
    instead of :math:`m` (:func:`~momentum_hook.schedule.scaled_momentum`),
    with :math:`\\kappa = S / B_{base}` and :math:`S` the samples per
    update: the batch of each process (the runner's train data loader) times
    the processes of the default process group times ``update_interval``.

    Args:
        end_momentum (float): The momentum the schedule rises to, in [0, 1].
            Defaults to 1.
        update_interval (int): Iterations per target update; set it to the
            gradient-accumulation interval so that the target follows the
            optimizer steps. Defaults to 1.
        reach_end_momentum (bool): Make the run's last update use exactly
            ``end_momentum``. Defaults to False (MMSelfSup 0.x's sequence).
        base_batch_size (int | str, optional): The samples per target update
            for which ``model.base_momentum`` and ``end_momentum`` were tuned
            (4096 for MMSelfSup's ``byol_resnet50_8xb32-accum16``), or
            ``'auto'`` (MMEngine only): the ``base_batch_size`` of the
            config's ``auto_scale_lr``, which the hook hands to
            :meth:`use_auto_scale_lr` before the run. Defaults to None: the
            momenta are used as scheduled, whatever the batch.
        on_skipped_step (str): What follows an optimizer step that did not
            happen (a loss scaler skipped it on inf gradients) where the
            runner reports its steps: ``'hold'`` (the target is updated
            exactly after the optimizer's real steps, see
            :class:`~momentum_hook.ledger.Ledger`) or ``'update'`` (on every
            scheduled iteration, MMSelfSup 0.x). Defaults to ``'hold'``.

    Raises:
        TypeError, ValueError: For an argument of the wrong type or range.
    """

    def __init__(
        self,
        end_momentum: float = 1.0,
        update_interval: int = 1,
        reach_end_momentum: bool = False,
        base_batch_size: int | str | None = None,
        on_skipped_step: str = 'hold',
    ) -> None:
        self.end_momentum = check_momentum(end_momentum, 'end_momentum')
        interval = check_positive_int(update_interval, 'update_interval')
        if not isinstance(reach_end_momentum, bool):
            raise TypeError(
                'reach_end_momentum must be a bool, got '
                f'{reach_end_momentum!r}'
            )
        self.reach_end_momentum = reach_end_momentum
        if base_batch_size is not None and base_batch_size != 'auto':
            base_batch_size = check_positive_int(
                base_batch_size,
                'base_batch_size',
                hint='the samples per target update that base_momentum and '
                'end_momentum were tuned for, e.g. 4096 for 8 GPUs x 32 '
                "images x 16 accumulation steps; 'auto' (MMEngine) to take "
                'it from auto_scale_lr; or None not to scale',
            )
        self.base_batch_size = base_batch_size
        #: The ``base_batch_size`` of this run: that of ``auto_scale_lr``
        #: for ``'auto'`` (set by :meth:`use_auto_scale_lr`).
        self.run_base_batch_size = (
            None if base_batch_size == 'auto' else base_batch_size
        )
        if not isinstance(on_skipped_step, str):
            raise TypeError(
                'on_skipped_step must be a str, one of '
                f'{SKIPPED_STEP_POLICIES}, got '
                f'{on_skipped_step!r}'
            )
        if on_skipped_step not in SKIPPED_STEP_POLICIES:
            raise ValueError(
                f'on_skipped_step must be one of {SKIPPED_STEP_POLICIES}, '
                f'got {on_skipped_step!r}'
            )
        #: Which iterations update the target, and the run's counts; it
        #: keeps ``update_interval`` and ``on_skipped_step`` for both.
        self.ledger = Ledger(interval, on_skipped_step)
        #: The run's samples per update and S / base_batch_size, known from
        #: the start of the run on (None without base_batch_size).
        self.samples_per_update: int | None = None
        self.kappa: float | None = None
        self._batch: tuple[int, int] | None = None
        #: Whether :meth:`start` ran since the last :meth:`check_run`.
        self.started = False
        #: Iterations added to ``k`` in the schedule: 1 for a model that
        #: declares ``schedule_offset = 1`` (an mmpretrain teacher, see
        #: :mod:`momentum_hook.mmpretrain`), read at :meth:`check_run`.
        self.schedule_offset = 0

    @property
    def update_interval(self) -> int:
        """Iterations per target update (the ledger's)."""
        return self.ledger.update_interval

    @update_interval.setter
    def update_interval(self, value: int) -> None:
        self.ledger.update_interval = check_positive_int(
            value, 'update_interval'
        )

    @property
    def on_skipped_step(self) -> str:
        """What follows a skipped optimizer step (the ledger's)."""
        return self.ledger.on_skipped_step

    def check_run(self, model: Any, max_iters: int | None) -> None:
        """Check the model's contract and the run length once, before a run,
        and forget the batch scaling of any earlier run.

        Raises:
            TypeError: If the model breaks the contract or ``max_iters`` is
                not an int.
            ValueError: If ``max_iters`` is missing or not positive.
        """
        check_momentum_contract(model)
        self.schedule_offset = getattr(model, 'schedule_offset', 0)
        if max_iters is None:
            raise ValueError(
                'the momentum hook needs the run length, but the runner has '
                'max_iters=None: give the runner max_epochs or max_iters'
            )
        check_positive_int(max_iters, 'runner.max_iters')
        self.samples_per_update = self.kappa = None
        self.started = False
        self.ledger.start(accumulation=1)

    @staticmethod
    def check_target(model):
        """Have the model plan its update now, where it can
        (``MomentumTargetMixin.check_momentum_target``): before iteration 1,
        after any wrapping and any resume, on every rank at once.

        Raises:
            ValueError: The model's refusal of its target.
        """
        check = getattr(model, 'check_momentum_target', None)
        if check is not None:
            check()

    def check_accumulation(self, accumulation_steps: int, source: str) -> None:
        """Check that target updates fall on real optimizer steps.

        With gradients accumulated over ``accumulation_steps`` iterations the
        optimizer steps after iterations ``k`` with ``(k + 1) %
        accumulation_steps == 0``; an EMA on the iterations in between would
        average weights that did not change. Updates land on optimizer steps
        exactly when ``update_interval`` is a multiple of
        ``accumulation_steps``.

        Args:
            accumulation_steps (int): Iterations per optimizer step.
            source (str): Where the count comes from, for the message.

        Raises:
            ValueError: If ``update_interval`` is not a multiple of
                ``accumulation_steps``.
        """
        if self.update_interval % accumulation_steps:
            raise ValueError(
                f'update_interval={self.update_interval} does not follow the '
                f'optimizer, which steps every {accumulation_steps} '
                f'iterations ({source}): set update_interval='
                f'{accumulation_steps} (or a multiple of it) in the momentum '
                'hook so that the target is updated after optimizer steps '
                'only'
            )
        self.ledger.start(accumulation=accumulation_steps)

    def is_update_iter(self, cur_iter: int) -> bool:
        """Whether the target is updated after 0-based iteration
        ``cur_iter``."""
        return is_update_iter(cur_iter, self.update_interval)

    def momentum_at(
        self, cur_iter: int, max_iters: int, base_momentum: float
    ) -> float:
        """The momentum for the update after iteration ``cur_iter``: the
        schedule at ``cur_iter + schedule_offset``."""
        cur_iter += self.schedule_offset
        horizon = max_iters
        if self.reach_end_momentum:
            horizon = last_update_iter(max_iters, self.update_interval)
            if horizon <= 0:  # a single update: it is the last one
                return self.end_momentum
        momentum = cosine_momentum(
            cur_iter=cur_iter,
            max_iters=horizon,
            base_momentum=base_momentum,
            end_momentum=self.end_momentum,
        )
        if self.kappa is None:
            return momentum
        return scaled_momentum(momentum, self.kappa)

    def scale_to(self, batch_size: int, processes: int) -> float:
        """Set :attr:`kappa` for ``batch_size`` samples on each of
        ``processes`` processes per iteration.

        Returns:
            float: ``kappa = batch_size * processes * update_interval /
            base_batch_size``.
        """
        self._batch = (batch_size, processes)
        samples = batch_size * processes * self.update_interval
        self.samples_per_update = samples
        kappa = samples / cast(int, self.run_base_batch_size)  # see start()
        self.kappa = kappa
        return kappa

    def use_auto_scale_lr(self, auto_scale_lr: dict | None) -> None:
        """Take this run's ``base_batch_size`` from MMEngine's
        ``auto_scale_lr`` config, for ``base_batch_size='auto'``.

        Args:
            auto_scale_lr (dict, optional): The runner's ``auto_scale_lr``,
                e.g. ``dict(enable=True, base_batch_size=4096)``.

        Raises:
            ValueError: If it is missing or disabled, naming which.
            TypeError, ValueError: If its ``base_batch_size`` is not a
                positive int.
        """
        explicit = (
            'or give the momentum hook base_batch_size=N, the '
            'samples per target update its momenta were tuned for'
        )
        if not auto_scale_lr:
            raise ValueError(
                "base_batch_size='auto' follows the config's auto_scale_lr, "
                f'but the runner has auto_scale_lr={auto_scale_lr!r}: add '
                'auto_scale_lr=dict(enable=True, base_batch_size=N) to the '
                f'config, {explicit}'
            )
        if not auto_scale_lr.get('enable', False):
            raise ValueError(
                "base_batch_size='auto' follows the config's auto_scale_lr, "
                f'but it is disabled ({auto_scale_lr!r}), so the learning '
                'rate is not scaled either: set enable=True in it, '
                f'{explicit}'
            )
        self.run_base_batch_size = check_positive_int(
            auto_scale_lr.get('base_batch_size'),
            'auto_scale_lr.base_batch_size',
        )

    def write_momentum(
        self, model: Any, cur_iter: int, max_iters: int
    ) -> float | None:
        """Write the scheduled momentum into ``model`` on update iterations.

        Returns:
            float or None: The momentum written, or None when this iteration
            does not update the target.
        """
        if not self.is_update_iter(cur_iter):
            return None
        momentum = self.momentum_at(cur_iter, max_iters, model.base_momentum)
        model.momentum = momentum
        return momentum

    def describe(self, model: Any, max_iters: int, owner: Any = None) -> str:
        """One line for the run's log: which hook (the class of ``owner``,
        this updater by default), with which arguments, on which model and
        run."""
        cls = type(self if owner is None else owner)
        arguments = (
            f'end_momentum={self.end_momentum!r}, update_interval='
            f'{self.update_interval!r}, reach_end_momentum='
            f'{self.reach_end_momentum!r}'
        )
        scaling = ''
        if self.kappa is not None:
            arguments += f', base_batch_size={self.base_batch_size!r}'
            if self.base_batch_size == 'auto':
                arguments += (
                    ' (auto_scale_lr.base_batch_size='
                    f'{self.run_base_batch_size})'
                )
            batch, processes = cast(tuple[int, int], self._batch)
            scaling = (
                f'; S = {batch} per process x {processes} processes x '
                f'update_interval {self.update_interval} = '
                f'{self.samples_per_update} samples per update, so kappa = '
                f'S / base_batch_size = {self.kappa:.6g} and every scheduled '
                f'momentum m is used as m ** kappa (base_momentum '
                f'{model.base_momentum!r} -> '
                f'{scaled_momentum(model.base_momentum, self.kappa)!r})'
            )
            if self.base_batch_size == 'auto' and self.update_interval > 1:
                scaling += (
                    '; auto_scale_lr scales the learning rate by the samples '
                    f'per iteration, {self.update_interval} times fewer: see '
                    "docs/scaling.md, MMEngine's auto_scale_lr"
                )
        return (
            f'{cls.__module__}.{cls.__qualname__}({arguments}) schedules '
            f'the target momentum of '
            f'{getattr(model, "log_name", type(model).__name__)} from '
            f'base_momentum={model.base_momentum!r} over {max_iters} '
            'iterations, with an update after every iteration k with '
            f'(k + 1) % {self.update_interval} == 0{scaling}'
        )

    def start(
        self,
        model: Any,
        max_iters: int,
        train_loader: Callable[[], Any],
        owner: Any = None,
    ) -> str:
        """Start the run: with ``base_batch_size``, find the batch scaling
        from the train data loader and the default process group.

        Args:
            model: The unwrapped model.
            max_iters (int): The run length ``K``.
            train_loader (Callable[[], DataLoader]): Returns the training
                data loader; called only with ``base_batch_size`` set.
            owner (optional): The hook, whose class :meth:`describe` names.

        Returns:
            str: The run's log line, from :meth:`describe`.

        Raises:
            ValueError: If ``base_batch_size`` is set and the loader has no
                fixed batch size.
        """
        if self.base_batch_size is not None:
            if self.run_base_batch_size is None:
                raise ValueError(
                    "base_batch_size='auto' takes the base_batch_size of "
                    "MMEngine's auto_scale_lr, which this runner does not "
                    'have: give the hook base_batch_size=N, the samples per '
                    'target update its momenta were tuned for'
                )
            self.scale_to(loader_batch_size(train_loader()), world_size())
        self.started = True
        return self.describe(model, max_iters, owner)

    def update_target(
        self, model: Any, cur_iter: int, max_iters: int, step: Any = None
    ) -> float | None:
        """After iteration ``cur_iter``: if the :attr:`ledger` says so, write
        the scheduled momentum into ``model`` and call its
        ``momentum_update()``.

        Args:
            model: The unwrapped model.
            cur_iter (int): The 0-based iteration that just ended.
            max_iters (int): The run length ``K``.
            step (~momentum_hook.ledger.Step, optional): What the iteration
                did to the optimizer; None if the runner cannot tell.

        Returns:
            float or None: The momentum of the update, or None when the
            target was not updated.
        """
        if not self.ledger.should_update(cur_iter, step):
            return None
        momentum = self.momentum_at(cur_iter, max_iters, model.base_momentum)
        model.momentum = momentum
        model.momentum_update()
        return momentum

    def resume_messages(
        self, record, model, cur_iter, max_iters, window_restarts=False
    ):
        """The warnings of a run resumed at ``cur_iter`` from a checkpoint
        whose run kept ``record`` (see
        :meth:`~momentum_hook.ledger.Ledger.resume_messages`)."""
        return self.ledger.resume_messages(
            record,
            cur_iter,
            max_iters,
            lambda k, length: self.momentum_at(k, length, model.base_momentum),
            window_restarts,
        )


def _option(name):
    return property(
        lambda hook: getattr(hook.updater, name),
        doc=f'``updater.{name}``, read-only.',
    )


class HookOptions:
    """What the two runner hooks share: the arguments of
    :class:`MomentumUpdater`, which the hook holds as :attr:`updater`, and
    those options as read-only attributes.

    Args:
        end_momentum, update_interval, reach_end_momentum, base_batch_size:
            As for :class:`MomentumUpdater`; ``end_momentum`` and
            ``update_interval`` default to None: 1.0 and 1, or for an
            mmpretrain teacher (:mod:`momentum_hook.mmpretrain`) the
            teacher's own.
        on_skipped_step (str, optional): As for :class:`MomentumUpdater`;
            None (the default) takes the runner family's default:
            ``'update'`` on mmcv 1.x (MMSelfSup 0.x), ``'hold'`` on MMEngine.
    """

    end_momentum = _option('end_momentum')
    update_interval = _option('update_interval')
    reach_end_momentum = _option('reach_end_momentum')
    base_batch_size = _option('base_batch_size')
    on_skipped_step = _option('on_skipped_step')

    #: The runner family's default ``on_skipped_step``.
    _default_on_skipped_step = 'hold'
    #: The current run's step watch (:mod:`momentum_hook.ledger`), or None.
    _steps = None

    def __init__(
        self,
        end_momentum=None,
        update_interval=None,
        reach_end_momentum=False,
        base_batch_size=None,
        on_skipped_step=None,
    ):
        if on_skipped_step is None:
            on_skipped_step = self._default_on_skipped_step
        #: The arguments the user set (not None), by name.
        self._given = {
            name: value
            for name, value in (
                ('end_momentum', end_momentum),
                ('update_interval', update_interval),
                ('reach_end_momentum', reach_end_momentum),
            )
            if value is not None
        }
        #: The framework-free schedule: :class:`MomentumUpdater`.
        self.updater = MomentumUpdater(
            end_momentum=1.0 if end_momentum is None else end_momentum,
            update_interval=(
                1 if update_interval is None else update_interval
            ),
            reach_end_momentum=reach_end_momentum,
            base_batch_size=base_batch_size,
            on_skipped_step=on_skipped_step,
        )
