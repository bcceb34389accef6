"""What the hook does, free of any runner framework: the adapters translate.

:class:`MomentumUpdater` holds the hook's options, checks the model's
contract and, given the unwrapped model, the 0-based iteration ``k`` and the
run length ``K``, writes the scheduled momentum and calls the model's
``momentum_update()``. Its runner-facing steps read ``runner.model``,
``runner.iter`` and ``runner.max_iters``, which mmcv 1.x and MMEngine runners
share; the hooks in :mod:`momentum_hook.mmcv_hook` and
:mod:`momentum_hook.mmengine_hook` add only how their framework unwraps a
model, logs a value and accumulates gradients.

The contract with the model (the same as MMSelfSup 0.x):

- ``base_momentum`` (float in [0, 1]): the momentum at iteration 0;
- ``momentum`` (float): written by the hook before each update iteration;
- ``momentum_update()``: ``target = m * target + (1 - m) * online`` with
  ``m = self.momentum``, called after the iteration's optimizer step.
"""
from .schedule import cosine_momentum, is_update_iter, last_update_iter
from .validation import check_momentum, check_positive_int

__all__ = ['MomentumUpdater', 'check_momentum_contract', 'LOG_KEY']

#: The log key of the target momentum. The runners' loggers already report
#: the optimizer's momentum as ``momentum``.
LOG_KEY = 'target_momentum'

#: The attributes the hook needs on the (unwrapped) model.
CONTRACT = ('base_momentum', 'momentum', 'momentum_update')


def check_momentum_contract(model):
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
            'provides all three')
    if not callable(model.momentum_update):
        raise TypeError(f'{cls}.momentum_update must be callable, got '
                        f'{type(model.momentum_update).__name__}')
    check_momentum(model.base_momentum, f'{cls}.base_momentum')


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

    Args:
        end_momentum (float): The momentum the schedule rises to, in [0, 1].
            Defaults to 1.
        update_interval (int): Iterations per target update; set it to the
            gradient-accumulation interval so that the target follows the
            optimizer steps. Defaults to 1.
        reach_end_momentum (bool): Make the run's last update use exactly
            ``end_momentum``. Defaults to False (MMSelfSup 0.x's sequence).

    Raises:
        TypeError, ValueError: For an argument of the wrong type or range.
    """

    def __init__(self, end_momentum=1., update_interval=1,
                 reach_end_momentum=False):
        self.end_momentum = check_momentum(end_momentum, 'end_momentum')
        self.update_interval = check_positive_int(update_interval,
                                                  'update_interval')
        if not isinstance(reach_end_momentum, bool):
            raise TypeError('reach_end_momentum must be a bool, got '
                            f'{reach_end_momentum!r}')
        self.reach_end_momentum = reach_end_momentum

    def check_run(self, model, max_iters):
        """Check the model's contract and the run length once, before a run.

        Raises:
            TypeError: If the model breaks the contract or ``max_iters`` is
                not an int.
            ValueError: If ``max_iters`` is missing or not positive.
        """
        check_momentum_contract(model)
        if max_iters is None:
            raise ValueError(
                'the momentum hook needs the run length, but the runner has '
                'max_iters=None: give the runner max_epochs or max_iters')
        check_positive_int(max_iters, 'runner.max_iters')

    def check_accumulation(self, accumulation_steps, source):
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
                'only')

    def is_update_iter(self, cur_iter):
        """Whether the target is updated after 0-based iteration ``cur_iter``."""
        return is_update_iter(cur_iter, self.update_interval)

    def momentum_at(self, cur_iter, max_iters, base_momentum):
        """The momentum for the update after iteration ``cur_iter``."""
        horizon = max_iters
        if self.reach_end_momentum:
            horizon = last_update_iter(max_iters, self.update_interval)
            if horizon <= 0:  # a single update: it is the last one
                return self.end_momentum
        return cosine_momentum(cur_iter=cur_iter, max_iters=horizon,
                               base_momentum=base_momentum,
                               end_momentum=self.end_momentum)

    def write_momentum(self, model, cur_iter, max_iters):
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

    # The runner-facing steps. Adapters override the three framework hooks
    # below and call the three steps from their hook methods.

    def unwrap_model(self, model):
        """The model inside a data-parallel wrapper; the framework's rule."""
        return model

    def publish(self, runner, momentum):
        """Log ``momentum`` under :data:`LOG_KEY`, the framework's way."""

    def check_optimizer(self, runner):
        """Check the runner's optimizer set-up, e.g. with
        :meth:`check_accumulation`."""

    def describe(self, model, max_iters):
        """One line for the run's log: which hook, with which arguments, on
        which model and run."""
        cls = type(self)
        return (f'{cls.__module__}.{cls.__qualname__}(end_momentum='
                f'{self.end_momentum!r}, update_interval='
                f'{self.update_interval!r}, reach_end_momentum='
                f'{self.reach_end_momentum!r}) schedules the target momentum '
                f'of {type(model).__name__} from base_momentum='
                f'{model.base_momentum!r} over {max_iters} iterations, with '
                'an update after every iteration k with (k + 1) % '
                f'{self.update_interval} == 0')

    def check_runner(self, runner):
        """Before the run: the model contract, the run length, the optimizer;
        then say in ``runner.logger`` what the hook will do."""
        model = self.unwrap_model(runner.model)
        max_iters = getattr(runner, 'max_iters', None)
        self.check_run(model, max_iters)
        self.check_optimizer(runner)
        runner.logger.info(self.describe(model, max_iters))

    def on_iter_start(self, runner):
        """Before iteration ``runner.iter``: write and publish the momentum."""
        momentum = self.write_momentum(self.unwrap_model(runner.model),
                                       runner.iter, runner.max_iters)
        if momentum is not None:
            self.publish(runner, momentum)

    def on_iter_end(self, runner):
        """After iteration ``runner.iter`` and its optimizer step: the EMA."""
        self.update_target(self.unwrap_model(runner.model), runner.iter)

    def update_target(self, model, cur_iter):
        """Call ``model.momentum_update()`` on update iterations.

        Returns:
            bool: Whether the target was updated.
        """
        if not self.is_update_iter(cur_iter):
            return False
        model.momentum_update()
        return True
