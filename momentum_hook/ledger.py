"""Which iterations update the target, and what a resume changed, free of
any runner framework: the adapters translate.

- :class:`OptimizerSteps` and :class:`EngineSteps` report, after each
  iteration, whether the optimizer really stepped (a :class:`Step`): the
  first through each torch optimizer's own step post hook
  (``Optimizer.register_step_post_hook``, local to that optimizer and removed
  after the run), the second from a DeepSpeed engine's public counters
  (``global_steps``, ``skipped_steps``), both read, never patched.
- :class:`Ledger` decides from them whether the target is updated, counts
  the updates and the skipped optimizer steps, and words what the run's log
  must say: a second momentum hook, a resume that changes the schedule, one
  inside an accumulation window, iterations past the schedule's end.
"""

import collections

from .registration import HOOK_NAMES
from .schedule import is_update_iter

__all__ = [
    'SKIPPED_STEP_POLICIES',
    'Step',
    'OptimizerSteps',
    'EngineSteps',
    'Ledger',
    'check_one_momentum_hook',
    'RECORD_KEY',
]

#: ``on_skipped_step``: ``'hold'`` keeps the target when the optimizer did
#: not step; ``'update'`` updates it on schedule anyway (MMSelfSup 0.x).
SKIPPED_STEP_POLICIES = ('hold', 'update')

#: Where a run keeps its schedule for a resume to compare: a key of MMEngine's
#: ``message_hub`` runtime info, of mmcv's ``runner.meta['hook_msgs']``.
RECORD_KEY = 'momentum_hook'

#: What an iteration did to the optimizer. ``stepped``: an optimizer step
#: happened. ``boundary``: the iteration ended an accumulation window (a step
#: was due; it was skipped if it did not happen), None if unknown. ``index``:
#: the 1-based number of the optimizer step that was due, over the whole
#: training, or None if the runner does not say.
Step = collections.namedtuple('Step', 'stepped boundary index')


class OptimizerSteps:
    """Counts the steps that torch optimizers really take.

    A step post hook on each optimizer (``register_step_post_hook``, which
    PyTorch runs only when ``optimizer.step()`` ran, so not when a
    ``GradScaler`` skipped it) counts them; :meth:`close` removes the hooks.

    Args:
        optimizers (Iterable[torch.optim.Optimizer]): The optimizers.
        boundary (Callable[[], bool], optional): Whether the iteration that
            just ended was due to step (e.g. ``OptimWrapper.should_update``).
        index (Callable[[], int], optional): The 1-based number of that step.
    """

    @classmethod
    def watch(cls, optimizers, boundary=None, index=None):
        """An :class:`OptimizerSteps`, or None if there is no optimizer or
        one is not a torch optimizer with step post hooks."""
        optimizers = list(optimizers)
        if not optimizers or not all(
            hasattr(optimizer, 'register_step_post_hook')
            for optimizer in optimizers
        ):
            return None
        return cls(optimizers, boundary, index)

    def __init__(self, optimizers, boundary=None, index=None):
        self.count = 0
        self._mark = 0
        self._boundary, self._index = boundary, index
        self._handles = [
            optimizer.register_step_post_hook(self._stepped)
            for optimizer in optimizers
        ]

    def _stepped(self, optimizer, args, kwargs):
        self.count += 1

    def begin(self):
        """Call before the iteration."""
        self._mark = self.count

    def end(self):
        """Call after the iteration.

        Returns:
            Step: What the iteration did.
        """
        stepped = self.count > self._mark
        boundary = stepped or (
            None if self._boundary is None else bool(self._boundary())
        )
        index = None if self._index is None else self._index()
        return Step(stepped, boundary, index)

    def close(self):
        """Remove the step post hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


class EngineSteps:
    """Reads a DeepSpeed engine's step counters around each iteration.

    ``engine.global_steps`` grows at every accumulation boundary,
    ``engine.skipped_steps`` when the fp16 loss scaler skipped that step;
    both are restored from DeepSpeed checkpoints (its micro-step counter is
    not).

    Args:
        engine: A ``deepspeed.DeepSpeedEngine``.
    """

    def __init__(self, engine):
        self.engine = engine
        self._mark = (0, 0)

    def _counts(self):
        return self.engine.global_steps, self.engine.skipped_steps

    def begin(self):
        """Call before the iteration."""
        self._mark = self._counts()

    def end(self):
        """Call after the iteration.

        Returns:
            Step: What the iteration did.
        """
        (steps, skipped), (steps0, skipped0) = self._counts(), self._mark
        boundary = steps > steps0
        return Step(boundary and skipped == skipped0, boundary, steps)

    def close(self):
        """Nothing to release."""


def _describe_hook(index, hook):
    cls = type(hook)
    arguments = ', '.join(
        f'{name}={getattr(hook, name)!r}'
        for name in ('end_momentum', 'update_interval')
        if hasattr(hook, name)
    )
    return (
        f'runner.hooks[{index}] {cls.__module__}.{cls.__qualname__}'
        f'({arguments})'
    )


def check_one_momentum_hook(hooks, own_class):
    """Refuse a runner with more than one momentum hook.

    A momentum hook is an instance of ``own_class`` (this package's hook, by
    whichever name it was built) or a hook class named ``MomentumUpdateHook``
    or ``BYOLHook`` (MMSelfSup 0.x's own). Two of them update the target
    twice per optimizer step.

    Args:
        hooks (Sequence): ``runner.hooks``.
        own_class (type): The adapter's hook class.

    Raises:
        ValueError: Naming every momentum hook and which one to keep.
    """
    found = [
        (index, hook)
        for index, hook in enumerate(hooks)
        if isinstance(hook, own_class) or type(hook).__name__ in HOOK_NAMES
    ]
    if len(found) < 2:
        return
    ours = [
        (index, hook) for index, hook in found if isinstance(hook, own_class)
    ]
    names = ' and '.join(_describe_hook(*entry) for entry in found)
    if len(ours) < len(found):
        keep = (
            f'keep {_describe_hook(*ours[0])} and delete the other '
            "package's hook from custom_hooks (an MMSelfSup config's "
            "type='BYOLHook' or type='MomentumUpdateHook' builds "
            "MMSelfSup's hook unless custom_imports imports "
            'momentum_hook_dropin)'
            if ours
            else 'keep one entry in custom_hooks'
        )
    else:
        keep = (
            "type='MomentumUpdateHook', type='BYOLHook' and their "
            "'momentum_hook.' names build the same hook, so delete all "
            'but one entry from custom_hooks (e.g. the line added beside '
            "an MMSelfSup config's own BYOLHook), say the one that built "
            f'{_describe_hook(*found[0])}'
        )
    raise ValueError(
        f'the runner has {len(found)} momentum hooks, {names}: each would '
        'update the target after every optimizer step, so it would move '
        f'{len(found)} times per step. Keep one: {keep}'
    )


class Ledger:
    """Decides and counts the target updates of one run.

    With ``on_skipped_step='hold'`` and a runner that reports its optimizer
    steps (:class:`Step`), the target is updated after an iteration exactly
    when its optimizer stepped and that step is due for an update: every
    ``update_interval / accumulation``-th step by the step's ``index``, or,
    when the runner gives no index, on the iterations with ``(k + 1) %
    update_interval == 0``. With ``'update'`` (MMSelfSup 0.x), or when the
    runner reports nothing, the iterations with ``(k + 1) % update_interval
    == 0`` update it, whether the optimizer stepped or not.

    Args:
        update_interval (int): Iterations per target update.
        on_skipped_step (str): One of :data:`SKIPPED_STEP_POLICIES`.
    """

    def __init__(self, update_interval, on_skipped_step):
        self.update_interval = update_interval
        self.on_skipped_step = on_skipped_step
        self.start(accumulation=1)

    def start(self, accumulation):
        """Forget the counts of any earlier run.

        Args:
            accumulation (int): Iterations per optimizer step
                (``update_interval`` is a multiple of it).
        """
        self.steps_per_update = self.update_interval // accumulation
        self.accumulation = accumulation
        #: Target updates, optimizer steps due but skipped, and of those the
        #: ones the target was updated after anyway.
        self.updates = self.skipped = self.updated_after_skip = 0
        self.past_end_warned = False

    def should_update(self, cur_iter, step):
        """Whether the target is updated after iteration ``cur_iter``.

        Args:
            cur_iter (int): The 0-based iteration.
            step (Step or None): What the iteration did to the optimizer;
                None if the runner cannot tell.

        Returns:
            bool: Update the target now. Counted in :attr:`updates`.
        """
        scheduled = is_update_iter(cur_iter, self.update_interval)
        if step is None:
            update = scheduled
        else:
            boundary = scheduled if step.boundary is None else step.boundary
            skipped = boundary and not step.stepped
            self.skipped += skipped
            if self.on_skipped_step == 'update':
                update = scheduled
                self.updated_after_skip += skipped and scheduled
            elif step.index is None:
                update = scheduled and step.stepped
            else:
                update = (
                    step.stepped and step.index % self.steps_per_update == 0
                )
        self.updates += update
        return update

    def summary(self):
        """The run's closing log line: updates and skipped steps."""
        line = (
            f'momentum_hook: {self.updates} target updates; '
            f'{self.skipped} optimizer steps were skipped'
        )
        if not self.skipped:
            return line
        if self.on_skipped_step == 'update':
            return (
                line + f' and the target was updated after '
                f'{self.updated_after_skip} of them (on_skipped_step='
                "'update', MMSelfSup 0.x)"
            )
        return line + " and the target was held (on_skipped_step='hold')"

    def record(self, max_iters):
        """What a checkpoint keeps for :meth:`resume_messages`."""
        return dict(max_iters=max_iters)

    def resume_messages(
        self, record, cur_iter, max_iters, momentum_at, window_restarts=False
    ):
        """What a run resumed at ``cur_iter`` must say about the schedule.

        Args:
            record (dict or None): :meth:`record` of the checkpoint's run.
            cur_iter (int): The iteration the run resumes at (> 0).
            max_iters (int): The resumed run's length.
            momentum_at (Callable[[int, int], float]): The scheduled momentum
                at iteration ``k`` of a run of ``K`` iterations.
            window_restarts (bool): The engine counts its accumulation window
                from the resume on (DeepSpeed does not restore its micro-step
                counter).

        Returns:
            list[str]: Warnings for the run's log, maybe none.
        """
        messages = []
        old = (record or {}).get('max_iters')
        if old is not None and old != max_iters:
            before, after = (
                momentum_at(cur_iter, old),
                momentum_at(cur_iter, max_iters),
            )
            direction = ' (backwards)' if after < before else ''
            messages.append(
                f'resumed at iteration {cur_iter} with max_iters={max_iters}, '
                f'but the checkpoint was written by a run of max_iters={old}:'
                f' the cosine schedule now spans {max_iters} iterations, so '
                f'the target momentum at iteration {cur_iter} changes from '
                f'{before:.6g} to {after:.6g}{direction}. Resume with the '
                'same max_iters (max_epochs) to keep the schedule'
            )
        if cur_iter >= max_iters:
            messages.append(
                f'resumed at iteration {cur_iter}, but max_iters={max_iters} '
                'is already reached: the runner trains no further iteration '
                'and the target is not updated again. Raise max_iters '
                '(max_epochs) to train on'
            )
        elif cur_iter % self.accumulation:
            start = cur_iter - cur_iter % self.accumulation
            messages.append(
                f'resumed at iteration {cur_iter}, inside a gradient-'
                f'accumulation window of {self.accumulation} iterations: the '
                f'gradients of iterations {start} to {cur_iter - 1} are not '
                'in the checkpoint, so the first optimizer step after the '
                'resume, and the target update after it, differ from the '
                'uninterrupted run. Resume from a checkpoint at a multiple of '
                f'{self.accumulation} iterations to continue exactly'
            )
            if window_restarts:
                messages[-1] += (
                    '. DeepSpeed does not restore its micro-step counter: its '
                    'optimizer now steps after iterations '
                    f'{cur_iter + self.accumulation - 1}, '
                    f'{cur_iter + 2 * self.accumulation - 1}, ... and the '
                    'target is updated after those steps'
                )
        return messages

    def past_end_message(self, cur_iter, max_iters, end_momentum):
        """A warning, once per run, for the first iteration ``cur_iter >=
        max_iters``; None otherwise."""
        if cur_iter < max_iters or self.past_end_warned:
            return None
        self.past_end_warned = True
        return (
            f'iteration {cur_iter} is past max_iters={max_iters}, the end '
            "of the momentum schedule (MMEngine's EpochBasedTrainLoop, "
            'resumed from a checkpoint inside an epoch, trains that epoch '
            'again from its first batch): the target is updated with '
            f'end_momentum={end_momentum!r} on the iterations past it'
        )
