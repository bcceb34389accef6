"""The momentum (EMA) update of a target network, free of any framework.

``target = m * target + (1 - m) * online``, computed in place as
``target.lerp_(online, 1 - m)``: one read of each network and one write of
the target, the least memory traffic the update allows.

The tensors are each rank's local shards (:mod:`~momentum_hook.local_shards`),
grouped by device and dtype; each group is updated by one
``torch._foreach_lerp_``, a few kernel launches for the whole group. The
user's tensors are never moved, re-laid out or re-allocated. Nothing here
synchronises host and device: the momentum is a Python float.
"""
import warnings
import weakref
from operator import attrgetter, getitem

import torch
from torch import nn

from .local_shards import (agree_across_ranks, available_copies, check_alike,
                           drop_secondary_partitions, gathered_copies,
                           local_shards, secondary_partitions, tensor_shard)
from .validation import check_momentum

__all__ = ['BUFFER_POLICIES', 'momentum_update_', 'ModuleUpdatePlan']

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

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_REQUIRES_GRAD = attrgetter('requires_grad')
_warned_dtypes = set()


def _as_tensor_list(tensors, name):
    if isinstance(tensors, torch.Tensor) or not hasattr(tensors, '__iter__'):
        raise TypeError(f'{name} must be an nn.Module or a sequence of '
                        f'tensors, got {type(tensors).__name__}')
    tensors = list(tensors)
    for index, tensor in enumerate(tensors):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f'{name}[{index}] must be a tensor, got '
                            f'{type(tensor).__name__}')
    return tensors


def _warn_if_lost(dtype, weight):
    """Warn once per dtype when ``weight`` steps round to nothing in it."""
    eps = torch.finfo(dtype).eps
    if 0.0 < weight < eps and dtype not in _warned_dtypes:
        _warned_dtypes.add(dtype)
        warnings.warn(
            f'1 - momentum = {weight:.3g} is below the {dtype} machine epsilon '
            f'{eps:.3g}: most target updates in {dtype} round to no change. '
            'Keep the target network in float32 (autocast still computes in '
            'low precision).', RuntimeWarning, stacklevel=3)


def _trainable(shard):
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
    trained = [name for name, tensor in zip(names, trainables)
               if tensor.requires_grad]
    if trained:
        more = f' and {len(trained) - 1} more' if len(trained) > 1 else ''
        raise ValueError(
            f"the target's parameters require grad ({trained[0]!r}{more}), "
            'so the update would overwrite weights that an optimizer '
            'trains. Either the arguments are swapped: the target comes '
            'first, momentum_update_(target, online, momentum) (lightly\'s '
            'update_momentum and fully_shard_pair take the online network '
            'first); or the target was never frozen: call '
            'target.requires_grad_(False) once after copying it '
            '(MomentumTargetMixin.init_momentum_target does). Nothing was '
            'updated')


def _grouped(targets, onlines):
    groups = {}
    for target, online in zip(targets, onlines):
        key = (target.device, target.dtype, online.device, online.dtype)
        pair = groups.setdefault(key, ([], []))
        pair[0].append(target)
        pair[1].append(online)
    return groups


def _plan_lerp(targets, onlines):
    """The kernels that lerp ``targets`` towards ``onlines``, as a list.

    One entry per device/dtype group: ``(kind, targets, onlines, dtype)``
    with kind ``'foreach'`` (one ``torch._foreach_lerp_``) or ``'cast'``
    (online tensors on another device or dtype, converted one by one).
    """
    steps = []
    for (device, dtype, online_device, online_dtype), (group_t, group_o) in \
            _grouped(targets, onlines).items():
        same = (device, dtype) == (online_device, online_dtype)
        steps.append(('foreach' if same else 'cast', group_t, group_o, dtype))
    return steps


def _run_lerp(steps, weight):
    for kind, target, online, dtype in steps:
        if dtype in _LOW_PRECISION:
            _warn_if_lost(dtype, weight)
        if kind == 'foreach':
            torch._foreach_lerp_(target, online, weight)
        else:
            for target_tensor, online_tensor in zip(target, online):
                target_tensor.lerp_(
                    online_tensor.to(device=target_tensor.device, dtype=dtype),
                    weight)


def _lerp_gathered(pairs, weight):
    """Lerp the gathered copies of persistent ZeRO-3 pairs, when there."""
    targets, onlines = available_copies(pairs)
    if targets:
        _run_lerp(_plan_lerp(targets, onlines), weight)


def _update_buffers(targets, onlines, momentum, policy):
    averaged, copied = [], []
    for pair in zip(targets, onlines):
        floating = pair[0].is_floating_point() and pair[1].is_floating_point()
        (averaged if floating and policy == 'average' else copied).append(pair)
    if averaged:
        _run_lerp(_plan_lerp(*zip(*averaged)), 1.0 - momentum)
    for target_buffer, online_buffer in copied:
        target_buffer.copy_(online_buffer)


def check_buffer_policy(buffers):
    """Raise ``ValueError`` unless ``buffers`` is in :data:`BUFFER_POLICIES`."""
    if buffers not in BUFFER_POLICIES:
        raise ValueError(f'buffers must be one of {BUFFER_POLICIES}, got '
                         f'{buffers!r}')


def _structure(modules, buffers):
    """Each module's parameter, submodule (and buffer) slots, as parallel
    lists ``(containers, keys, ids of the values)``."""
    containers, keys, ids = [], [], []
    for module in modules:
        slots = [module._parameters, module._modules]
        if buffers:
            slots.append(module._buffers)
        for slot in slots:
            for key, value in slot.items():
                containers.append(slot)
                keys.append(key)
                ids.append(id(value))
    return containers, keys, ids


class ModuleUpdatePlan:
    """:func:`momentum_update_` for one (target, online) module pair, planned.

    Planning walks both modules, finds each parameter's rank-local tensor
    (:mod:`~momentum_hook.local_shards`), checks that the two sides are
    sharded alike and groups the tensors by device and dtype; :meth:`update_`
    then only launches one ``torch._foreach_lerp_`` per group.

    :meth:`is_current` says whether the plan still describes the modules,
    with a check local to them: every parameter, submodule (and, for the
    ``'copy'``/``'average'`` policies, buffer) slot of both networks still
    holds the object it held when planned (and none was added), every
    sharded parameter still
    links to the same local tensor, and every planned tensor still has the
    storage address it was planned with, and no target parameter requires
    grad. That catches assignments (``module.x = ...``,
    ``load_state_dict(assign=True)``), ``.data`` swaps, device or dtype moves
    (``.to()``, ``.cuda()``, ``.half()``) and an unfrozen target. It costs a
    few C-level passes over lists, no walk of the modules.

    In a process group, building a plan is a collective of the default group
    (one small ``all_gather_object``): every rank must plan at the same
    point, as the mixin does in ``check_momentum_target()`` and its first
    ``momentum_update()``, and a refusal on any rank is raised on every rank
    (:func:`~momentum_hook.local_shards.agree_across_ranks`). :meth:`update_`
    communicates nothing.

    Args:
        target (nn.Module): The target network.
        online (nn.Module): The online network, the same architecture,
            sharded the same way.
        buffers (str): One of :data:`BUFFER_POLICIES`.

    Raises:
        ValueError: If the modules differ in parameter count, shape or
            sharding layout, share memory, hold meta tensors or ZeRO++
            quantized partitions, the target's parameters require grad, or
            (for ``'copy'`` and ``'average'``) differ in their buffers; on
            every rank, when one refuses.
    """

    def __init__(self, target, online, buffers='keep'):
        shards, buffer_tensors = agree_across_ranks(
            lambda: self._plan(target, online, buffers))
        self._track(target, online, shards, buffer_tensors)

    def _plan(self, target, online, buffers):
        """Find, check and group the local tensors of both networks.

        Returns:
            tuple[list[LocalShard], list[Tensor]]: The shards of both
            networks and the buffers that :meth:`_track` records.
        """
        check_buffer_policy(buffers)
        self.buffers = buffers
        targets, onlines = local_shards(target), local_shards(online)
        check_alike(targets, onlines)
        self._trainables = list(map(_trainable, targets))
        check_frozen(self._trainables, [shard.name for shard in targets])
        if not targets:
            raise ValueError(
                'the online network has no parameters, so the momentum '
                'update would do nothing: pass the networks themselves '
                '(e.g. a wrapped model\'s online and target submodules)')
        self.buffer_pairs = None
        buffer_tensors = []
        if buffers != 'keep':  # checked before anything is written
            buffer_shards = [[tensor_shard(name, tensor)
                              for name, tensor in module.named_buffers()]
                             for module in (target, online)]
            check_alike(*buffer_shards, what='buffers')
            self.buffer_pairs = [[shard.tensor for shard in side]
                                 for side in buffer_shards]
            buffer_tensors = self.buffer_pairs[0] + self.buffer_pairs[1]
        self.steps = _plan_lerp([shard.tensor for shard in targets],
                                [shard.tensor for shard in onlines])
        self.gathered = gathered_copies(targets, onlines)
        self.secondary = secondary_partitions(targets)
        return targets + onlines, buffer_tensors

    def _track(self, target, online, shards, buffer_tensors):
        """Record what :meth:`is_current` compares."""
        linked = [shard for shard in shards if shard.link is not None]
        self._owners = [shard.owner for shard in linked]
        self._links = [shard.link for shard in linked]
        self._linked_ids = [id(shard.base) for shard in linked]
        self._bases = [shard.base for shard in shards] + buffer_tensors
        self._pointers = [base.data_ptr() for base in self._bases]
        modules = dict.fromkeys([*target.modules(), *online.modules()])
        self._containers, self._keys, self._ids = _structure(
            modules, self.buffers != 'keep')
        self._slots = list({id(slot): slot for slot in self._containers}
                           .values())
        self._sizes = list(map(len, self._slots))

    def is_current(self):
        """Whether the plan still matches the modules (see the class doc)."""
        try:
            slots = list(map(id, map(getitem, self._containers, self._keys)))
        except KeyError:  # a parameter, buffer or submodule was deleted
            return False
        return (slots == self._ids and
                list(map(len, self._slots)) == self._sizes and list(
            map(id, map(getattr, self._owners, self._links))) ==
                self._linked_ids and
                list(map(torch.Tensor.data_ptr, self._bases)) ==
                self._pointers and
                not any(map(_REQUIRES_GRAD, self._trainables)))

    @torch.no_grad()
    def update_(self, momentum):
        """``target = momentum * target + (1 - momentum) * online``.

        Under DeepSpeed ZeRO-3 it also lerps the gathered copies of
        persistent parameters, releases a target copy whose online copy is
        not gathered, and drops the target's ZeRO++ hpZ secondary
        partitions (see :mod:`~momentum_hook.local_shards`), so that the
        target's next forward uses the update.
        """
        momentum = check_momentum(momentum)
        _run_lerp(self.steps, 1.0 - momentum)
        if self.gathered:
            _lerp_gathered(self.gathered, 1.0 - momentum)
        if self.secondary:  # after _lerp_gathered, which may release copies
            drop_secondary_partitions(self.secondary)
        if self.buffer_pairs is not None:
            _update_buffers(*self.buffer_pairs, momentum, self.buffers)


# --- The stateless call's plans ---------------------------------------------
#: The plan of the latest ``momentum_update_(target, online)`` on modules, by
#: target module: ``(weak reference to online, buffers, plan)``. A plan is
#: reused only while :meth:`ModuleUpdatePlan.is_current` holds, so every
#: check of a fresh plan still applies; an entry goes when either module is
#: collected, so it keeps no tensor of a dead network alive.
_STATELESS_PLANS = weakref.WeakKeyDictionary()


def _forget_on_collect(target):
    """A weakref callback: drop ``target``'s entry when its online dies."""
    target_ref = weakref.ref(target)

    def forget(online_ref):
        key = target_ref()
        entry = None if key is None else _STATELESS_PLANS.get(key)
        if entry is not None and entry[0] is online_ref:
            del _STATELESS_PLANS[key]
    return forget


def _local_plan(target, online, buffers):
    """A :class:`ModuleUpdatePlan` checked on this rank alone: unlike
    ``ModuleUpdatePlan(...)``, no verdict is shared across ranks, so the
    stateless call never communicates."""
    plan = ModuleUpdatePlan.__new__(ModuleUpdatePlan)
    plan._track(target, online, *plan._plan(target, online, buffers))
    return plan


def _stateless_plan(target, online, buffers):
    """The cached plan of ``(target, online, buffers)``, or a new one."""
    entry = _STATELESS_PLANS.get(target)
    if entry is not None:
        online_ref, planned_buffers, plan = entry
        if online_ref() is online and planned_buffers == buffers and \
                plan.is_current():
            return plan
        del _STATELESS_PLANS[target]  # its tensors go before planning anew
    plan = _local_plan(target, online, buffers)  # raises before caching
    _STATELESS_PLANS[target] = (
        weakref.ref(online, _forget_on_collect(target)), buffers, plan)
    return plan


@torch.no_grad()
def momentum_update_(target, online, momentum, buffers='keep'):
    """In place, ``target = momentum * target + (1 - momentum) * online``.

    Each rank updates the elements it holds (see
    :mod:`~momentum_hook.local_shards`): plain, DDP and ZeRO-1/2 parameters
    whole, FSDP2 parameters through their local tensors, FSDP1 units through
    their flat shards, ZeRO-3 parameters through their partitions (and the
    gathered copy a persistent one keeps). Nothing is communicated, gathered
    or allocated in proportion to the model.

    For modules, the plan of the update (a :class:`ModuleUpdatePlan`: the
    local tensors, the checks, the groups) is kept from one call to the next
    for the same ``target`` and reused while it is current (see
    :meth:`ModuleUpdatePlan.is_current`), so a call in a training loop costs
    about what a hand-written ``torch._foreach_lerp_`` costs. The plan is
    dropped when either network is garbage collected. Each rank plans and
    checks alone, without communication; for a verdict shared by all ranks,
    keep a ``ModuleUpdatePlan`` or use the mixin.

    Args:
        target (nn.Module | Sequence[Tensor]): The target network, or its
            tensors; updated in place.
        online (nn.Module | Sequence[Tensor]): The online network, or its
            tensors, in the same order, shapes and sharding.
        momentum (float): The weight of the old target, in [0, 1]: 1 keeps the
            target, 0 copies the online network.
        buffers (str): For modules, what to do with the target's buffers, one
            of :data:`BUFFER_POLICIES`. Defaults to ``'keep'``.

    Raises:
        TypeError: If ``target``/``online`` are not both modules or both
            tensor sequences, or ``momentum`` is not a real number.
        ValueError: If the two differ in count, shape or sharding, share
            memory, hold meta tensors, the target's parameters require grad
            (the target is not frozen, or the two arguments are swapped),
            ``momentum`` is outside [0, 1] or ``buffers`` is unknown. Nothing
            is written then.

    Warns:
        UserWarning: Once per process, for a momentum in (0, 0.5): MMEngine's
            ``momentum=x`` is ``m = 1 - x`` here.
        RuntimeWarning: Once per dtype, when the target is float16/bfloat16
            and ``1 - momentum`` is below that dtype's epsilon, so that most
            updates round to no change.
    """
    momentum = check_momentum(momentum)
    check_buffer_policy(buffers)
    modules = isinstance(target, nn.Module), isinstance(online, nn.Module)
    if modules[0] != modules[1]:
        raise TypeError('target and online must both be nn.Modules or both '
                        f'tensor sequences, got {type(target).__name__} and '
                        f'{type(online).__name__}')
    if modules[0]:
        _stateless_plan(target, online, buffers).update_(momentum)
        return
    if buffers != 'keep':
        raise ValueError(f'buffers={buffers!r} needs nn.Modules, got tensor '
                         'sequences')
    targets, onlines = (
        [tensor_shard(f'{name}[{index}]', tensor)
         for index, tensor in enumerate(_as_tensor_list(tensors, name))]
        for name, tensors in (('target', target), ('online', online)))
    check_alike(targets, onlines, what='tensors')
    check_frozen(list(map(_trainable, targets)),
                 [shard.name for shard in targets])
    _run_lerp(_plan_lerp([shard.tensor for shard in targets],
                         [shard.tensor for shard in onlines]),
              1.0 - momentum)
    _lerp_gathered(gathered_copies(targets, onlines), 1.0 - momentum)
    drop_secondary_partitions(secondary_partitions(targets))
