"""mmpretrain 1.x teachers, updated by the momentum hook.

mmpretrain's BYOL and MoCo v3 keep their teacher (``target_net``,
``momentum_encoder``) in a ``CosineEMA``, MoCo v2 and DenseCL (``encoder_k``)
in MMEngine's ``ExponentialMovingAverage``, an averaged copy of
``nn.Sequential(model.backbone, model.neck)`` that ``loss()`` updates on
every call through ``update_parameters``. :func:`find_teacher` recognises
such a model, and :class:`AveragedTeacher` gives it the hook's contract
(``base_momentum``, ``momentum``, ``momentum_update()``) from the teacher's
own arguments. While the hook trains the model, ``update_parameters`` of
that one averaged model is an instance attribute that only counts its calls
(:class:`SkippedUpdate`); nothing else, no class, is changed, and the
method is back when training ends. :func:`wrap_policy` is an FSDP1
``auto_wrap_policy`` that keeps such a teacher and its online network in
units of their own.

Conventions. MMEngine's ``momentum`` :math:`\\mu` is the weight of the
online network; here :math:`m = 1 - \\mu` weighs the old teacher.
``CosineEMA(momentum, end_momentum)`` applies, at its call number
:math:`s` of a run of :math:`K` iterations,

.. math::

    \\mu_s = \\mu_{end} - (\\mu_{end} - \\mu) \\cdot
        \\frac{\\cos(\\pi s / K) + 1}{2},

which is :func:`~momentum_hook.cosine_momentum` at ``cur_iter=s`` with
``base_momentum = 1 - momentum`` and ``end_momentum = 1 - end_momentum``;
``ExponentialMovingAverage(momentum)`` is the constant :math:`m = 1 - \\mu`.
mmpretrain's call :math:`s` happens at the start of iteration :math:`s`,
with the online weights after :math:`s` optimizer steps, the first call
(:math:`s = 0`) copies the online network into the teacher, and an
``interval`` :math:`i` skips the calls with :math:`s \\bmod i \\ne 0`. The
hook makes the same update after iteration :math:`k = s - 1`, once the
optimizer stepped (:attr:`AveragedTeacher.schedule_offset`: the schedule
reads :math:`k + 1`), and the copy before iteration 0.

Checkpoints. The teacher's parameters, buffers and ``steps`` travel in the
model's state dict, as without the hook. The float32 masters of a
float16/bfloat16 teacher (a DeepSpeed ``bf16``/``fp16`` engine) travel in
the run's ``MessageHub``, as runtime info :data:`MASTERS_KEY` that MMEngine
saves in every checkpoint and restores on resume: each rank's own
(:func:`~momentum_hook.master_state.local_masters`, buffers averaged with
``update_buffers=True`` included), in each rank's own file where each rank
writes one (DeepSpeed ZeRO-3, FSDP with ``state_dict_cfg='local'``), else
rank 0's in the one file every rank reads: right for a teacher whole on
every rank (DDP, ZeRO-1/2), not for another rank's shards. A resumed
teacher takes back every master that rounds to it; the others restart from
the teacher's values, with a warning that says why.

This module imports neither mmengine nor mmpretrain: it recognises their
classes by qualified name.
"""

import math
import operator
import weakref

from torch import nn

from .master_state import load_local_masters, local_masters
from .masters import TargetMasters
from .plan import ModuleUpdatePlan
from .ranks import rank
from .registration import qualified_name
from .updater import CONTRACT
from .validation import check_momentum, check_positive_int

__all__ = [
    'teacher_of',
    'find_teacher',
    'AveragedTeacher',
    'SkippedUpdate',
    'TEACHER_CLASSES',
    'ONLINE',
    'wrap_policy',
    'MASTERS_KEY',
    'MasterSnapshot',
    'release',
]

#: The ``MessageHub`` runtime info that carries the float32 masters of a
#: low-precision teacher through MMEngine's checkpoints.
MASTERS_KEY = 'momentum_hook.teacher_masters'

_EMA = 'mmengine.model.averaged_model.ExponentialMovingAverage'
_COSINE = 'mmpretrain.models.utils.ema.CosineEMA'
_BASE = 'mmengine.model.averaged_model.BaseAveragedModel'
_BACKBONE = 'mmpretrain.models.backbones.base_backbone.BaseBackbone'
_NECKS = 'mmpretrain.models.necks.'

#: The averaged models whose update the hook takes over: the schedule each
#: one follows.
TEACHER_CLASSES = {_COSINE: 'cosine', _EMA: 'constant'}

#: The submodules of the model that mmpretrain averages, in its order:
#: ``nn.Sequential(model.backbone, model.neck)``.
ONLINE = ('backbone', 'neck')


def find_teacher(model):
    """The ``(name, averaged model)`` of an mmpretrain teacher of ``model``.

    Args:
        model (nn.Module): The unwrapped model.

    Returns:
        tuple[str, nn.Module] or None: The child of ``model`` that is an
        MMEngine ``ExponentialMovingAverage`` or mmpretrain ``CosineEMA``,
        or None if it has no averaged child.

    Raises:
        TypeError: If ``model`` has an averaged child of another class (its
            own ``avg_func``, which the hook cannot follow), or several.
    """
    found, foreign = [], []
    for name, child in model.named_children():
        mro = [qualified_name(cls) for cls in type(child).__mro__]
        if mro[0] in TEACHER_CLASSES:
            found.append((name, child))
        elif _BASE in mro:
            foreign.append(f'{name} ({mro[0]})')
    cls = type(model).__name__
    if foreign:
        raise TypeError(
            f'{cls} keeps an averaged model the momentum hook cannot take '
            f'over: {", ".join(foreign)}. It takes over '
            'ExponentialMovingAverage and CosineEMA teachers, whose update '
            'it computes itself; for another averaging rule, remove the '
            'momentum hook and let the model update its teacher'
        )
    if len(found) > 1:
        raise TypeError(
            f'{cls} has {len(found)} averaged teachers '
            f'({", ".join(name for name, _ in found)}): the momentum hook '
            'takes over one'
        )
    return found[0] if found else None


def wrap_policy(module, recurse, nonwrapped_numel):
    """An FSDP1 ``auto_wrap_policy`` for mmpretrain models: every backbone
    (a subclass of mmpretrain's ``BaseBackbone``) and every neck (a class of
    ``mmpretrain.models.necks``) is a unit of its own.

    The online ``backbone`` and ``neck`` and the teacher's copies of them
    are then separate units laid out alike, as the shard-local update
    needs. A config names it by its path: ``strategy=dict(
    type='FSDPStrategy', model_wrapper=dict(type='MMFullyShardedDataParallel',
    auto_wrap_policy='momentum_hook.mmpretrain.wrap_policy'))``.

    Args:
        module (nn.Module): The module FSDP asks about.
        recurse (bool): True when FSDP asks whether to look inside it.
        nonwrapped_numel (int): Unused.

    Returns:
        bool: Whether to recurse into, or wrap, ``module``.
    """
    if recurse:
        return True
    mro = [qualified_name(cls) for cls in type(module).__mro__]
    return _BACKBONE in mro or mro[0].startswith(_NECKS)


class SkippedUpdate:
    """What ``update_parameters`` of a taken-over teacher is while the hook
    trains: a call does nothing but count (:attr:`calls`), since the hook
    updates the teacher once per optimizer step."""

    def __init__(self):
        #: How often the model called ``update_parameters``.
        self.calls = 0

    def __call__(self, model):
        self.calls += 1

    def __repr__(self):
        return (
            '<update_parameters taken over by momentum_hook (calls counted, '
            f'none applied: {self.calls}); momentum_hook.mmpretrain.release'
            '(model) gives it back>'
        )


def release(model):
    """Give every averaged teacher of ``model`` its own
    ``update_parameters`` back.

    The hook does so in ``after_train``; MMEngine calls no hook when
    training stops with an exception, so call this before using such a
    model without the hook.

    Args:
        model (nn.Module): The model, or a wrapper of it.

    Returns:
        list[str]: The names of the teachers given their method back.
    """
    released = []
    for name, module in model.named_modules():
        state = module.__dict__
        if isinstance(state.get('update_parameters'), SkippedUpdate):
            del state['update_parameters']
            released.append(name)
    return released


class MasterSnapshot:
    """The value of :data:`MASTERS_KEY` in the run's ``MessageHub`` while
    the hook trains: MMEngine deep-copies runtime info into each
    checkpoint, and a copy of this is the teacher's masters at that moment
    (:meth:`AveragedTeacher.master_state`), so that every checkpoint holds
    the masters of its own iteration.

    Args:
        teacher (AveragedTeacher): The teacher whose masters it copies.
    """

    def __init__(self, teacher):
        # A weak reference: MessageHub instances are global, and a run
        # stopped by an exception never replaces this value.
        self._teacher = weakref.ref(teacher)
        self._label = teacher.label

    def master_state(self):
        """The teacher's :meth:`AveragedTeacher.master_state`; without
        masters once the teacher is gone."""
        teacher = self._teacher()
        if teacher is None:
            return {'teacher': self._label, 'rank': rank(), 'masters': {}}
        return teacher.master_state()

    def __deepcopy__(self, memo):
        return self.master_state()

    def __reduce__(self):
        # Pickled as the masters, never as the model it refers to.
        return dict, (self.master_state(),)


class AveragedTeacher:
    """The hook's contract for a model with an mmpretrain teacher.

    ``target = m * target + (1 - m) * online`` on ``averaged.module`` (what
    the teacher's forward reads) and ``nn.Sequential(model.backbone,
    model.neck)``, through a :class:`~momentum_hook.ModuleUpdatePlan`
    (rank-local shards, ``torch._foreach_lerp_``, float32 masters for a
    float16/bfloat16 teacher). The buffers follow the averaged model's
    ``update_buffers``: False (mmpretrain's models) copies the online
    network's buffers at every update (buffer policy ``'copy'``), True
    averages the floating-point ones (``'average'``).

    Args:
        model (nn.Module): The unwrapped model.
        name (str): The attribute of ``model`` that holds the teacher.
        averaged (nn.Module): That teacher, an ``ExponentialMovingAverage``
            or ``CosineEMA``.

    Raises:
        TypeError, ValueError: If the teacher's momenta or interval are
            unusable, or ``model`` has no ``backbone`` and ``neck`` whose
            parameters are named like the teacher's.
    """

    #: The schedule of the update after iteration ``k`` reads ``k + 1``:
    #: mmpretrain's update at the start of the next iteration.
    schedule_offset = 1

    #: What to set, by FlexibleRunner strategy, when the update cannot be
    #: planned on the wrapped model.
    wrap_fix = {
        'FSDPStrategy': (
            "strategy=dict(type='FSDPStrategy', model_wrapper=dict("
            "type='MMFullyShardedDataParallel', auto_wrap_policy="
            "'momentum_hook.mmpretrain.wrap_policy')), so that the online "
            "backbone and neck and the teacher's copies of them are separate "
            'FSDP units'
        )
    }

    def __init__(self, model, name, averaged):
        self.model, self.name, self.averaged = model, name, averaged
        self.label = f'{type(model).__name__}.{name}'
        self.schedule = TEACHER_CLASSES[qualified_name(type(averaged))]
        # MMEngine's momenta are small (0.01): no warning for them here.
        mu = check_momentum(
            averaged.momentum, f'{self.label}.momentum', warn_small=False
        )
        mu_end = (
            mu
            if self.schedule == 'constant'
            else check_momentum(
                averaged.end_momentum,
                f'{self.label}.end_momentum',
                warn_small=False,
            )
        )
        #: The momentum at iteration 0 and the end, this package's
        #: convention (the weight of the old teacher).
        self.base_momentum = 1.0 - mu
        self.end_momentum = 1.0 - mu_end
        self.momentum = self.base_momentum
        self.interval = check_positive_int(
            averaged.interval, f'{self.label}.interval'
        )
        self.buffers = 'average' if averaged.update_buffers else 'copy'
        self.log_name = self.label
        self._masters = TargetMasters()
        self._plan = None
        self._planned_on = ()  # the modules the plan was made on
        self._online()  # refuse a model without the online network now

    def describe(self):
        """The teacher, as a line of the run's log."""
        averaged = self.averaged
        arguments = f'momentum={averaged.momentum!r}'
        if self.schedule == 'cosine':
            arguments += f', end_momentum={averaged.end_momentum!r}'
        return (
            f'{self.label}: {type(averaged).__name__}({arguments}, '
            f'interval={averaged.interval}, update_buffers='
            f'{averaged.update_buffers}), a {self.schedule} momentum m = '
            f'1 - momentum from {self.base_momentum!r} to '
            f'{self.end_momentum!r}, buffers {self.buffers!r}'
        )

    def _online(self):
        """``nn.Sequential(model.backbone, model.neck)`` as they are now
        (a wrapper may have replaced them), checked by name against the
        teacher's ``module``."""
        missing = [
            name
            for name in ONLINE
            if not isinstance(getattr(self.model, name, None), nn.Module)
        ]
        if missing:
            raise TypeError(
                f'{self.label} averages nn.Sequential(backbone, neck), but '
                f'{type(self.model).__name__} has no module '
                f'{", ".join(missing)}: the momentum hook takes over the '
                'teachers of mmpretrain models built that way (BYOL, MoCo, '
                'MoCoV3, DenseCL)'
            )
        online = nn.Sequential(*(getattr(self.model, name) for name in ONLINE))
        names = [
            [name for name, _ in module.named_parameters()]
            for module in (self.averaged.module, online)
        ]
        if names[0] != names[1]:
            index = next(
                (
                    index
                    for index, (target, source) in enumerate(zip(*names))
                    if target != source
                ),
                min(map(len, names)),
            )
            teacher, source = (
                side[index] if index < len(side) else None for side in names
            )
            raise ValueError(
                f'{self.label}.module and nn.Sequential(backbone, neck) of '
                f'{type(self.model).__name__} differ at parameter {index} '
                f'({teacher!r} in the teacher, {source!r} online), so they '
                'cannot be paired by name: wrap the teacher and the online '
                'network alike'
            )
        return online

    def _modules(self):
        """What ``averaged.module``, ``model.backbone`` and ``model.neck``
        hold now."""
        return (
            getattr(self.averaged, 'module', None),
            *(getattr(self.model, name, None) for name in ONLINE),
        )

    def _current_plan(self, collective=False):
        """The kept plan while it is current and made on the modules the
        model holds now (a module assigned in place of the backbone, the
        neck or the teacher's copy is planned anew), else a new one:
        checked with every rank before the run (``collective``), on this
        rank alone after the start, where the ranks need not be at the same
        point."""
        modules = self._modules()
        if (
            collective
            or self._plan is None
            or any(map(operator.is_not, modules, self._planned_on))
            or not self._plan.is_current()
        ):
            self._plan = ModuleUpdatePlan(
                self.averaged.module,
                self._online(),
                self.buffers,
                self._masters,
                collective=collective,
            )
            self._planned_on = modules
        return self._plan

    def master_state(self):
        """This rank's float32 masters of the teacher's low-precision
        tensors, as a checkpoint keeps them.

        Returns:
            dict: ``teacher`` (its label), ``rank`` (this process's rank in
            the default process group, 0 without one) and ``masters`` (the
            masters by name, float32 copies on the CPU; empty for a float32
            teacher, or before the update is planned).
        """
        # The plan as it is, not a new one: a checkpoint may be saved on
        # one rank alone, and the update after each optimizer step keeps
        # the plan current.
        plan = self._plan
        targets = [] if plan is None else plan.master_targets()
        return {
            'teacher': self.label,
            'rank': rank(),
            'masters': local_masters(targets, self._masters),
        }

    def load_master_state(self, state):
        """Take back, from a resumed checkpoint, the masters of
        :meth:`master_state` that round to the teacher now; the others
        restart from the teacher's values at the next update.

        Args:
            state (dict or None): What :meth:`master_state` returned when
                the checkpoint was saved; None if it holds nothing.

        Returns:
            str or None: A warning naming the masters that restart and why,
            or None if none does.
        """
        saved = state if isinstance(state, dict) else {}
        targets = self._current_plan().master_targets()
        restart = load_local_masters(
            targets, self._masters, saved.get('masters', {})
        )
        if not restart:
            return None
        saver, here = saved.get('rank', rank()), rank()
        if not saved:
            cause = 'it holds none (it was saved without the momentum hook)'
        elif saver != here:
            cause = (
                f"it holds rank {saver}'s masters, read on rank {here} (one "
                'file written for all ranks by one of them, e.g. by '
                "FSDPStrategy with state_dict_cfg='full': "
                "state_dict_cfg='local' keeps each rank's)"
            )
        else:
            cause = (
                'it was saved on another number of ranks, or for another '
                'teacher'
            )
        return (
            'momentum_hook: no float32 master in the resumed checkpoint '
            f'rounds to {len(restart)} of the {len(targets)} low-precision '
            f'tensors of {self.label} (first {restart[0]!r}): {cause}. '
            "Their masters restart from the teacher's values, so the "
            'resumed teacher rounds differently from an uninterrupted run'
        )

    def check_momentum_target(self):
        """Plan the update now; the first time in a run (the teacher's
        ``steps`` is 0), copy the online network into the teacher, as
        mmpretrain's first ``update_parameters`` call does.

        Raises:
            ValueError: As :class:`~momentum_hook.ModuleUpdatePlan`
                would, before anything is written.
        """
        plan = self._current_plan(collective=True)
        if int(self.averaged.steps) == 0:
            plan.update_(0.0)
            self.averaged.steps += 1

    def momentum_update(self):
        """``target = m * target + (1 - m) * online``, m = ``self.momentum``;
        the teacher's ``steps`` counts it."""
        self._current_plan().update_(self.momentum)
        self.averaged.steps += 1

    def take_over(self):
        """Make the model's own ``update_parameters`` calls count, not
        update (:class:`SkippedUpdate`), on this averaged model only."""
        self.averaged.__dict__['update_parameters'] = SkippedUpdate()

    def release(self):
        """Give the averaged model its ``update_parameters`` back."""
        self.averaged.__dict__.pop('update_parameters', None)

    def configure(self, updater, given, accumulation):
        """Set the hook's schedule from the teacher's arguments.

        Args:
            updater (MomentumUpdater): The hook's updater; its
                ``end_momentum`` and ``update_interval`` are set here.
            given (dict): The hook arguments the user set, by name.
            accumulation (Iterable[int]): The iterations per optimizer step
                of each optimizer (and DeepSpeed's).

        Raises:
            ValueError: For a hook argument that contradicts the teacher's,
                naming both values.
        """
        end = given.get('end_momentum')
        if end is not None and not math.isclose(
            end, self.end_momentum, rel_tol=1e-12, abs_tol=1e-15
        ):
            source = (
                f'end_momentum={self.averaged.end_momentum!r}'
                if self.schedule == 'cosine'
                else f'a constant momentum={self.averaged.momentum!r}'
            )
            raise ValueError(
                f'end_momentum={end!r} in the momentum hook contradicts '
                f'{self.label}, a {type(self.averaged).__name__} with '
                f'{source}, i.e. end_momentum={self.end_momentum!r} in the '
                "hook's convention (m = 1 - momentum weighs the old "
                'teacher): remove end_momentum from the hook, which takes '
                "the teacher's own, or change the model's"
            )
        if given.get('reach_end_momentum') and self.schedule == 'cosine':
            raise ValueError(
                f'reach_end_momentum=True in the momentum hook contradicts '
                f'{self.label}, a CosineEMA whose cosine runs over the '
                "run's max_iters: remove reach_end_momentum from the hook"
            )
        interval = given.get('update_interval')
        if interval is None:
            interval = self.interval
            for steps in accumulation:
                interval = interval * steps // math.gcd(interval, steps)
        elif interval % self.interval:
            raise ValueError(
                f'update_interval={interval} in the momentum hook '
                f'contradicts {self.label}, a {type(self.averaged).__name__}'
                f' with interval={self.interval}: set update_interval to a '
                f'multiple of {self.interval}, or remove it from the hook'
            )
        updater.end_momentum = self.end_momentum
        updater.update_interval = interval


def teacher_of(model, updater, given, accumulation):
    """The :class:`AveragedTeacher` the hook updates instead of ``model``.

    Args:
        model (nn.Module): The unwrapped model.
        updater (MomentumUpdater): The hook's; configured from the teacher
            (:meth:`AveragedTeacher.configure`).
        given (dict): The hook arguments the user set, by name.
        accumulation (Iterable[int]): Iterations per optimizer step.

    Returns:
        AveragedTeacher or None: None (and the updater's ``end_momentum``
        and ``update_interval`` as given, or 1.0 and 1) for a model with
        the hook's contract
        (an MMSelfSup 0.x or :class:`~momentum_hook.MomentumTargetMixin`
        model) or without an mmpretrain teacher.
    """
    # The user's values, whatever an earlier run's teacher set.
    updater.end_momentum = float(given.get('end_momentum', 1.0))
    updater.update_interval = given.get('update_interval', 1)
    if all(hasattr(model, name) for name in CONTRACT):
        return None
    found = find_teacher(model)
    if found is None:
        return None
    teacher = AveragedTeacher(model, *found)
    teacher.configure(updater, given, accumulation)
    return teacher
