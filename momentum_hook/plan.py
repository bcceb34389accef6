"""What one update touches, planned once and checked for staleness.

A :class:`ModuleUpdatePlan` walks a (target, online) module pair once: it
finds each parameter's rank-local tensor (:mod:`.local_shards`), checks that
the two sides are sharded alike, and groups the tensors for the kernels
(:mod:`.kernels`). It is kept between updates while :meth:`ModuleUpdatePlan.
is_current` holds. The stateless :func:`~momentum_hook.momentum_update_`
keeps its plans here too (:func:`stateless_plan`).
"""

import weakref
from operator import attrgetter, getitem, is_

import torch

from ._compat.torch import module_slots, version_counter
from .kernels import lerp_gathered, plan_lerp, run_lerp
from .local_shards import FSDP_UNIT, buffer_shards, check_alike, local_shards
from .masters import TargetMasters, is_low_precision, refuse_low_precision
from .pairing import pair_by_name
from .ranks import agree_across_ranks
from .validation import check_momentum
from .zero import (
    drop_secondary_partitions,
    gathered_copies,
    secondary_partitions,
)

__all__ = [
    'BUFFER_POLICIES',
    'ModuleUpdatePlan',
    'check_buffer_policy',
    'check_frozen',
    'trainable',
    'stateless_plan',
]


#: What :func:`momentum_update_` does with the target module's buffers.
#:
#: - ``'keep'``: leave them (MMSelfSup 0.x's BYOL): a target BatchNorm keeps
#:   the running statistics it gathers in its own forward passes.
#: - ``'copy'``: copy every buffer from the online module: the target uses the
#:   online network's running statistics (for SyncBN, the synchronised ones).
#: - ``'average'``: EMA the floating-point buffers with the same momentum
#:   (running mean and variance follow the online network slowly).
#:
#: Integer buffers (``num_batches_tracked``) are copied under ``'copy'`` and
#: ``'average'``, never averaged.
BUFFER_POLICIES = ('keep', 'copy', 'average')


_REQUIRES_GRAD = attrgetter('requires_grad')


def trainable(shard):
    """The tensor whose ``requires_grad`` says whether an optimizer trains
    the elements of ``shard``: the parameter that owns a shard, or the
    tensor itself."""
    return shard.tensor if shard.owner is None else shard.owner


def check_frozen(trainables, names):
    """Refuse a target that an optimizer may train: most often the online
    network passed as the target.

    Args:
        trainables (list[Tensor]): The target's parameters (or tensors).
        names (list[str]): Their names, for the message.

    Raises:
        ValueError: If any of ``trainables`` requires grad, naming the first
            and both likely causes.
    """
    trained = [
        name for name, tensor in zip(names, trainables) if tensor.requires_grad
    ]
    if trained:
        more = f' and {len(trained) - 1} more' if len(trained) > 1 else ''
        raise ValueError(
            f"the target's parameters require grad ({trained[0]!r}{more}), "
            'so the update would overwrite weights that an optimizer '
            'trains. Either the arguments are swapped: the target comes '
            "first, momentum_update_(target, online, momentum) (lightly's "
            'update_momentum takes the online network first); or the '
            'target was never frozen: call '
            'target.requires_grad_(False) once after copying it '
            '(MomentumTargetMixin.init_momentum_target does). Nothing was '
            'updated'
        )


def check_buffer_policy(buffers):
    """Raise ``ValueError`` unless ``buffers`` is in
    :data:`BUFFER_POLICIES`."""
    if buffers not in BUFFER_POLICIES:
        raise ValueError(
            f'buffers must be one of {BUFFER_POLICIES}, got {buffers!r}'
        )


def _structure(modules, buffers):
    """Each module's parameter, submodule (and buffer) slots, as parallel
    lists ``(containers, keys, values)``."""
    containers, keys, values = [], [], []
    for module in modules:
        for slot in module_slots(module, buffers):
            for key, value in slot.items():
                containers.append(slot)
                keys.append(key)
                values.append(value)
    return containers, keys, values


_STORAGE = torch.Tensor.untyped_storage
_DEREFERENCE = weakref.ReferenceType.__call__


def _pair(targets, onlines, what):
    """The online shards in the order of the targets, paired by name, and
    checked to hold the same elements."""
    onlines = pair_by_name(targets, onlines, what, FSDP_UNIT)
    check_alike(targets, onlines, what)
    return onlines


def _read(link, owner):
    """``link(owner)``: what an owner of a local tensor holds now."""
    return link(owner)


class ModuleUpdatePlan:
    """:func:`momentum_update_` for one (target, online) module pair, planned.

    Planning walks both modules, finds each parameter's rank-local tensor
    (:mod:`~momentum_hook.local_shards`), checks that the two sides are
    sharded alike and groups the tensors by device and dtype; :meth:`update_`
    then only makes a few ``torch._foreach`` calls per group
    (:mod:`~momentum_hook.kernels`), however many tensors it holds.

    Each target tensor is paired with the online tensor of the same name
    (:func:`~momentum_hook.pairing.pair_by_name`: names without the
    attributes of wrappers such as DDP, FSDP1, ``checkpoint_wrapper`` and
    ``torch.compile``), and a name in one network only is refused.

    :meth:`is_current` says whether the plan still describes the modules,
    with a check local to them: every parameter, submodule (and, for the
    ``'copy'``/``'average'`` policies, buffer) slot of both networks still
    holds the very object it held when planned (compared with ``is``, the
    plan keeping a reference to it, so that an object at a reused address
    is never taken for the old one) and none was added, every sharded
    parameter still links to the same local tensor, every planned tensor
    still has the storage it was planned with (a weak reference to it), and
    no target parameter requires grad. That catches assignments
    (``module.x = ...``, ``load_state_dict(assign=True)``), ``.data`` swaps,
    device or dtype moves (``.to()``, ``.cuda()``, ``.half()``) and an
    unfrozen target. It costs a few C-level passes over lists, no walk of
    the modules.

    In a process group, building a plan is a collective of the default group
    (one small ``all_gather_object``): every rank must plan at the same
    point, as the mixin does in ``check_momentum_target()`` and its first
    ``momentum_update()``, and a refusal on any rank is raised on every rank
    (:func:`~momentum_hook.ranks.agree_across_ranks`). :meth:`update_`
    communicates nothing.

    Args:
        target (nn.Module): The target network.
        online (nn.Module): The online network, the same architecture,
            sharded the same way.
        buffers (str): One of :data:`BUFFER_POLICIES`.
        masters (TargetMasters): Where the float32 masters of the target's
            float16/bfloat16 tensors are kept (4 bytes per local element of
            those, on their device); a new store by default. Pass the same
            store to a new plan of the same pair so that the masters
            survive it.
        collective (bool): Share the verdict of the checks with every rank
            of the default process group (see above). False checks on this
            rank alone and communicates nothing. Defaults to True.
        keep_masters (bool): Keep float32 masters of float16/bfloat16
            target tensors. False refuses such a target (the stateless
            :func:`~momentum_hook.momentum_update_` keeps no state between
            calls). Defaults to True.
        compare (bool): Also find whether any local target parameter
            differs from its online parameter, on any rank when
            ``collective`` (in the same exchange): :attr:`differs`.
            Defaults to False.
        loaded (bool): With ``compare``: this rank's target was loaded (a
            checkpoint), so no rank may take it for one that starts from
            scratch. Defaults to False.

    Attributes:
        differs (str | None): With ``compare``, the name of the first target
            parameter found different from its online parameter (on some
            rank), else None; None also when any rank's target was
            ``loaded``.

    Raises:
        ValueError: If the modules differ in parameter names, shape or
            sharding layout, share memory, hold meta tensors or ZeRO++
            quantized partitions, the target's parameters require grad, or
            (for ``'copy'`` and ``'average'``) differ in their buffers; on
            every rank, when one refuses.
    """

    def __init__(
        self,
        target,
        online,
        buffers='keep',
        masters=None,
        *,
        collective=True,
        keep_masters=True,
        compare=False,
        loaded=False,
    ):
        if keep_masters and masters is None:
            masters = TargetMasters()
        elif not keep_masters:
            masters = None

        def plan():
            return self._plan(target, online, buffers, masters)

        def ballot():
            return (loaded, None if loaded else self._first_difference())

        if collective:
            agreed = agree_across_ranks(plan, ballot if compare else None)
            (shards, buffer_tensors), votes = (
                agreed if compare else (agreed, [])
            )
        else:
            shards, buffer_tensors = plan()
            votes = [ballot()] if compare else []
        # A target loaded on any rank is kept on every rank (a load on rank
        # 0 alone that DDP then broadcasts, say).
        self.differs = (
            None
            if any(vote[0] for vote in votes)
            else next(filter(None, (vote[1] for vote in votes)), None)
        )
        self._track(target, online, shards, buffer_tensors)

    def _plan(self, target, online, buffers, masters):
        """Find, check and group the local tensors of both networks.

        Args:
            masters (TargetMasters): Where the float32 masters of
                low-precision target tensors are kept; None refuses them.

        Returns:
            tuple[list[LocalShard], list[Tensor]]: The shards of both
            networks and the buffers that :meth:`_track` records.
        """
        check_buffer_policy(buffers)
        self.buffers = buffers
        targets = local_shards(target)
        onlines = _pair(targets, local_shards(online), 'parameters')
        self._trainables = list(map(trainable, targets))
        check_frozen(self._trainables, [shard.name for shard in targets])
        if not targets:
            raise ValueError(
                'the online network has no parameters, so the momentum '
                'update would do nothing: pass the networks themselves '
                "(e.g. a wrapped model's online and target submodules)"
            )
        lerped = [
            (t.name, t.tensor, o.tensor) for t, o in zip(targets, onlines)
        ]
        self._lerped = lerped[:]  # the parameters, for _first_difference
        #: ``(targets, sources)`` of the buffers copied at each update.
        self.buffer_copies, buffer_tensors = ([], []), []
        if buffers != 'keep':  # checked before anything is written
            target_buffers = buffer_shards(target)
            online_buffers = _pair(
                target_buffers, buffer_shards(online), 'buffers'
            )
            for t, o in zip(target_buffers, online_buffers):
                buffer_tensors += [t.tensor, o.tensor]
                if (
                    buffers == 'average'
                    and t.tensor.is_floating_point()
                    and o.tensor.is_floating_point()
                ):
                    lerped.append((t.name, t.tensor, o.tensor))
                else:
                    self.buffer_copies[0].append(t.tensor)
                    self.buffer_copies[1].append(o.tensor)
        names, target_tensors, online_tensors = map(list, zip(*lerped))
        if masters is None:
            refuse_low_precision(names, target_tensors)
        low = [
            index
            for index, tensor in enumerate(target_tensors)
            if is_low_precision(tensor)
        ]
        self.masters = masters
        self._master_names = [names[index] for index in low]
        self._master_targets = [target_tensors[index] for index in low]
        master_list = [None] * len(target_tensors)
        if low:
            for index, master in zip(
                low, masters.bind(self._master_names, self._master_targets)
            ):
                master_list[index] = master
        self.steps = plan_lerp(target_tensors, online_tensors, master_list)
        self.gathered = gathered_copies(targets, onlines)
        self.secondary = secondary_partitions(targets)
        self._master_versions = self._versions()
        return targets + onlines, buffer_tensors

    def _first_difference(self):
        """The name of the first local target parameter that differs from
        its online parameter, or None."""
        return next(
            (
                name
                for name, target, online in self._lerped
                if not torch.equal(target, online.to(target))
            ),
            None,
        )

    def _versions(self):
        """The version counters of the targets with masters: an in-place
        write elsewhere (``load_state_dict``, ``copy_``) moves them."""
        return list(map(version_counter, self._master_targets))

    def _track(self, target, online, shards, buffer_tensors):
        """Record what :meth:`is_current` compares: the objects themselves
        (held, so that no other object can take their address) and weak
        references to the tensors' storages."""
        linked = [shard for shard in shards if shard.link is not None]
        self._owners = [shard.owner for shard in linked]
        self._links = [shard.link for shard in linked]
        self._linked = [shard.base for shard in linked]
        self._bases = [shard.base for shard in shards] + buffer_tensors
        self._storages = [
            weakref.ref(base.untyped_storage()) for base in self._bases
        ]
        modules = dict.fromkeys([*target.modules(), *online.modules()])
        self._containers, self._keys, self._values = _structure(
            modules, self.buffers != 'keep'
        )
        self._slots = list(
            {id(slot): slot for slot in self._containers}.values()
        )
        self._sizes = list(map(len, self._slots))

    def master_targets(self):
        """``(name, tensor)`` of each rank-local target tensor (parameter or
        averaged buffer) that the update keeps a float32 master of."""
        return list(zip(self._master_names, self._master_targets))

    def is_current(self):
        """Whether the plan still matches the modules (see the class doc)."""
        try:
            slots = all(
                map(
                    is_,
                    map(getitem, self._containers, self._keys),
                    self._values,
                )
            )
        except KeyError:  # a parameter, buffer or submodule was deleted
            return False
        return (
            slots
            and list(map(len, self._slots)) == self._sizes
            and all(
                map(is_, map(_read, self._links, self._owners), self._linked)
            )
            and all(
                map(
                    is_,
                    map(_STORAGE, self._bases),
                    map(_DEREFERENCE, self._storages),
                )
            )
            and not any(map(_REQUIRES_GRAD, self._trainables))
        )

    @torch.no_grad()
    def update_(self, momentum):
        """``target = momentum * target + (1 - momentum) * online``.

        A float16/bfloat16 target tensor is updated through its float32
        master (:class:`TargetMasters`): ``master = momentum * master +
        (1 - momentum) * online`` in float32, then ``target = master``
        rounded. A target written since the last update (e.g. loaded)
        first restarts its master from its values.

        Under DeepSpeed ZeRO-3 it also lerps the gathered copies of
        persistent parameters, releases a target copy whose online copy is
        not gathered, and drops the target's ZeRO++ hpZ secondary
        partitions (see :mod:`~momentum_hook.zero`), so that the
        target's next forward uses the update.
        """
        momentum = check_momentum(momentum, warn_small=False)
        if self._master_targets and (
            self.masters.stale or self._versions() != self._master_versions
        ):
            self.masters.resync(self._master_names, self._master_targets)
        run_lerp(self.steps, 1.0 - momentum)
        if self.gathered:
            lerp_gathered(self.gathered, 1.0 - momentum, self.masters)
        if self.secondary:  # after lerp_gathered, which may release copies
            drop_secondary_partitions(self.secondary)
        if self.buffer_copies[0]:  # one foreach copy, however many buffers
            torch._foreach_copy_(*self.buffer_copies)
        if self._master_targets:
            self._master_versions = self._versions()


# --- The stateless call's plans ---------------------------------------------
#: The plan of the latest ``momentum_update_(target, online)`` on modules, by
#: target module: ``(weak reference to online, buffers, plan)``. A plan is
#: reused only while :meth:`ModuleUpdatePlan.is_current` holds, so every
#: check of a fresh plan still applies; an entry goes when either module is
#: collected, so it keeps no tensor of a dead network alive.
_STATELESS_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _forget_on_collect(target):
    """A weakref callback: drop ``target``'s entry when its online dies."""
    target_ref = weakref.ref(target)

    def forget(online_ref):
        key = target_ref()
        entry = None if key is None else _STATELESS_PLANS.get(key)
        if entry is not None and entry[0] is online_ref:
            del _STATELESS_PLANS[key]

    return forget


def stateless_plan(target, online, buffers):
    """The cached plan of ``(target, online, buffers)``, or a new one."""
    entry = _STATELESS_PLANS.get(target)
    if entry is not None:
        online_ref, planned_buffers, plan = entry
        if (
            online_ref() is online
            and planned_buffers == buffers
            and plan.is_current()
        ):
            return plan
        del _STATELESS_PLANS[target]  # its tensors go before planning anew
    # Checked on this rank alone, so that the stateless call never
    # communicates; no masters, so a low-precision target is refused.
    plan = ModuleUpdatePlan(
        target, online, buffers, collective=False, keep_masters=False
    )  # raises before caching
    _STATELESS_PLANS[target] = (
        weakref.ref(online, _forget_on_collect(target)),
        buffers,
        plan,
    )
    return plan
