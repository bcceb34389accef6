"""The momentum (EMA) update of a target network, free of any framework.

``target = m * target + (1 - m) * online``, computed in place as
``target.lerp_(online, 1 - m)``: one read of each network and one write of
the target, the least memory traffic the update allows.

The tensors are each rank's local shards (:mod:`~momentum_hook.local_shards`),
grouped by device and dtype; each group is updated by one
``torch._foreach_lerp_``, a few kernel launches for the whole group. The
user's tensors are never moved, re-laid out or re-allocated. Nothing here
synchronises host and device in a regular update: the momentum is a Python
float.

A float16/bfloat16 target tensor is updated through a float32 master of it
(:class:`TargetMasters`, kept by :class:`ModuleUpdatePlan` and
:class:`~momentum_hook.MomentumTargetMixin`): the lerp runs in float32 and
the target receives the rounded result. The stateless
:func:`momentum_update_` refuses such a target. Only after the target was
written elsewhere (a load) are masters and targets compared, on the host.
"""
import weakref
from operator import attrgetter, getitem

import torch
from torch import nn

from .local_shards import (agree_across_ranks, available_copies, check_alike,
                           drop_secondary_partitions, gathered_copies,
                           local_shards, secondary_partitions, tensor_shard)
from .validation import check_momentum

__all__ = ['BUFFER_POLICIES', 'momentum_update_', 'ModuleUpdatePlan',
           'TargetMasters']

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
#: The elements of one block of a master update: the online block is cast
#: into a float32 scratch buffer of this size, lerped into the master and the
#: master block rounded into the target while the block is still in cache.
_BLOCK = 1 << 16


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


def _grouped(targets, onlines, masters):
    groups = {}
    for target, online, master in zip(targets, onlines, masters):
        key = (target.device, target.dtype, online.device, online.dtype)
        group = groups.setdefault(key, ([], [], []))
        group[0].append(target)
        group[1].append(online)
        group[2].append(master)
    return groups


def _blocks(target, online, master):
    """The three as pieces of at most ``_BLOCK`` elements (flat views), or
    whole when small or when one of them cannot be viewed flat."""
    triple = (target, online, master)
    if target.numel() <= _BLOCK or not all(
            tensor.is_contiguous() for tensor in triple):
        return [triple]
    return list(zip(*(tensor.view(-1).split(_BLOCK) for tensor in triple)))


def _chunks(targets, onlines, masters):
    """The master update of one device/dtype group, in cache-sized blocks.

    Returns:
        list[tuple]: ``(targets, onlines, masters, scratch)`` lists of
        views of at most ``_BLOCK`` elements in all (a tensor that cannot be
        split, alone), ``scratch`` the views of one float32 buffer, shaped
        like the online views, that the cast writes into.
    """
    pieces = [piece for triple in zip(targets, onlines, masters)
              for piece in _blocks(*triple)]
    buffer = torch.empty(max(_BLOCK, *(p[0].numel() for p in pieces)),
                         dtype=torch.float32, device=masters[0].device)
    chunks, current, size = [], [], 0
    for piece in pieces + [None]:
        if current and (piece is None or size + piece[0].numel() > _BLOCK):
            group_t, group_o, group_m = map(list, zip(*current))
            offsets = [0]
            for tensor in group_o:
                offsets.append(offsets[-1] + tensor.numel())
            scratch = [buffer[a:b].view(tensor.shape) for a, b, tensor in
                       zip(offsets, offsets[1:], group_o)]
            chunks.append((group_t, group_o, group_m, scratch))
            current, size = [], 0
        if piece is not None:
            current.append(piece)
            size += piece[0].numel()
    return chunks


def _plan_lerp(targets, onlines, masters=None):
    """The kernels that lerp ``targets`` towards ``onlines``, as a list.

    One entry per device/dtype group: ``(kind, targets, onlines, extra)``
    with kind ``'foreach'`` (one ``torch._foreach_lerp_``), ``'cast'``
    (online tensors on another device or dtype, converted one by one; extra
    is the target dtype) or ``'master'`` (a float16/bfloat16 target with
    float32 ``masters``, a list parallel to ``targets``; extra is the group
    in chunks, see :func:`_lerp_masters`).
    """
    masters = [None] * len(targets) if masters is None else masters
    steps = []
    for (device, dtype, online_device, online_dtype), group in \
            _grouped(targets, onlines, masters).items():
        if dtype in _LOW_PRECISION and group[2][0] is not None:
            steps.append(('master', *group[:2], _chunks(*group)))
            continue
        same = (device, dtype) == (online_device, online_dtype)
        steps.append(('foreach' if same else 'cast', *group[:2], dtype))
    return steps


def _lerp_masters(chunks, weight):
    """Lerp float32 masters, then round them into their targets.

    ``master = lerp(master, float32(online), weight)``, ``target = master``
    (rounded to the target's dtype), block by block (:func:`_chunks`): the
    online block is cast into a float32 scratch buffer, lerped into the
    master and the master copied into the target while the block is in
    cache, so that memory traffic stays close to one lerp. No allocation.
    """
    for targets, onlines, masters, scratch in chunks:
        if len(targets) == 1:
            scratch[0].copy_(onlines[0])
            masters[0].lerp_(scratch[0], weight)
            targets[0].copy_(masters[0])
        else:
            torch._foreach_copy_(scratch, onlines)
            torch._foreach_lerp_(masters, scratch, weight)
            torch._foreach_copy_(targets, masters)


def _run_lerp(steps, weight):
    for kind, target, online, extra in steps:
        if kind == 'foreach':
            torch._foreach_lerp_(target, online, weight)
        elif kind == 'master':
            _lerp_masters(extra, weight)
        else:
            for target_tensor, online_tensor in zip(target, online):
                target_tensor.lerp_(
                    online_tensor.to(device=target_tensor.device, dtype=extra),
                    weight)


def _lerp_gathered(pairs, weight, masters=None):
    """Lerp the gathered copies of persistent ZeRO-3 pairs, when there.

    Low-precision copies go through their float32 masters in ``masters``
    (a :class:`TargetMasters`).
    """
    targets, onlines = available_copies(pairs)
    if targets:
        copies = None if masters is None else masters.for_copies(targets)
        _run_lerp(_plan_lerp(targets, onlines, copies), weight)


def _version(tensor):
    return tensor._version


def _is_low_precision(tensor):
    return tensor.dtype in _LOW_PRECISION


def _rounds_to(master, target):
    """Whether ``target`` holds ``master`` rounded to its dtype."""
    return (master.shape == target.shape and
            torch.equal(master.to(target.device, target.dtype), target))


class TargetMasters:
    """The float32 masters of one target network's low-precision tensors.

    A target tensor stored in float16 or bfloat16 cannot take the small
    steps of an EMA: ``(1 - m) * (online - target)`` is mostly below half an
    ulp of the target, so ``target.lerp_`` rounds it to no change. Each such
    local tensor gets a float32 master here, on its device; the update lerps
    the master and copies it, rounded, into the target
    (:class:`ModuleUpdatePlan`). A target in float32 or float64 has none.

    Masters are kept by the name of the local tensor (the parameter's or
    buffer's name in the target, or the FSDP1 unit's), so that they survive
    a new plan. A master is used only while its target holds it rounded;
    when the target was written otherwise (``load_state_dict``, an in-place
    write, a reload of the same values under another name), the master
    restarts from the target's values, or from a master loaded with it
    (:meth:`load`) that rounds to the loaded values.
    """

    def __init__(self):
        self.tensors = {}  # name -> the float32 master
        self.loaded = {}  # name -> a master from a checkpoint, not bound yet
        self.stale = False  # the target was loaded: check the masters
        self._copies = {}  # data_ptr() of a gathered copy -> its master

    def bind(self, names, targets):
        """The masters of ``targets``, reused where they round to them."""
        masters, bound = [], {}
        for name, target in zip(names, targets):
            master = None
            for candidate in (self.loaded.get(name), self.tensors.get(name)):
                if candidate is not None and _rounds_to(candidate, target):
                    master = candidate.to(target.device)
                    break
            if master is None:
                master = target.to(torch.float32, copy=True)
            bound[name] = master
            masters.append(master)
        self.tensors, self.loaded, self.stale = bound, {}, False
        return masters

    def resync(self, names, targets):
        """Re-check bound masters in place after their targets changed."""
        for name, target in zip(names, targets):
            master, loaded = self.tensors[name], self.loaded.get(name)
            if loaded is not None and _rounds_to(loaded, target):
                master.copy_(loaded)
            elif not _rounds_to(master, target):
                master.copy_(target)
        self.loaded, self.stale = {}, False

    def for_copies(self, copies):
        """The masters of persistent ZeRO-3 gathered copies (whole tensors).

        Kept by the copy's address, and used only while the copy holds its
        master rounded: a copy DeepSpeed gathered anew starts a new master
        from its values, and so does a copy at an address that another
        parameter's copy had before (the allocator reuses addresses, and
        persistent parameters often share a shape). These tensors are small
        (below the persistence threshold), so the check is cheap.
        """
        masters, kept = [], {}
        for copy in copies:
            master = self._copies.get(copy.data_ptr())
            if master is not None and not _rounds_to(master, copy):
                master = None
            if master is None:
                master = copy.to(torch.float32, copy=True)
            kept[copy.data_ptr()] = master
            masters.append(master)
        self._copies = kept
        return masters

    def state(self):
        """The masters to save, by name (a loaded one not bound yet wins)."""
        return {**self.tensors, **self.loaded}

    def load(self, masters):
        """Keep ``masters`` (by name) from a checkpoint; check them at the
        next update against the loaded target."""
        self.loaded = {name: tensor.detach().to(torch.float32, copy=True)
                       for name, tensor in masters.items()}
        self.stale = True


def _refuse_low_precision(names, tensors):
    """Refuse a stateless update of a float16/bfloat16 target tensor."""
    for name, tensor in zip(names, tensors):
        if _is_low_precision(tensor):
            raise ValueError(
                f'target tensor {name!r} is {tensor.dtype}: momentum_update_ '
                'keeps no state, and an EMA stored in '
                f'{tensor.dtype} rounds most small steps (1 - momentum) * '
                '(online - target) to no change, so the target would stall. '
                'Keep a float32 master of it: use MomentumTargetMixin '
                '(model.momentum_update()) or a ModuleUpdatePlan(target, '
                'online) kept across updates (plan.update_(momentum)), which '
                'keep one for you; or update a float32 copy you own, '
                'momentum_update_(master, online, momentum), and copy it '
                'into the target (target.copy_(master))')


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
        masters (TargetMasters): Where the float32 masters of the target's
            float16/bfloat16 tensors are kept (4 bytes per local element of
            those, on their device); a new store by default. Pass the same
            store to a new plan of the same pair so that the masters
            survive it.

    Raises:
        ValueError: If the modules differ in parameter count, shape or
            sharding layout, share memory, hold meta tensors or ZeRO++
            quantized partitions, the target's parameters require grad, or
            (for ``'copy'`` and ``'average'``) differ in their buffers; on
            every rank, when one refuses.
    """

    def __init__(self, target, online, buffers='keep', masters=None):
        masters = TargetMasters() if masters is None else masters
        shards, buffer_tensors = agree_across_ranks(
            lambda: self._plan(target, online, buffers, masters))
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
        targets, onlines = local_shards(target), local_shards(online)
        check_alike(targets, onlines)
        self._trainables = list(map(_trainable, targets))
        check_frozen(self._trainables, [shard.name for shard in targets])
        if not targets:
            raise ValueError(
                'the online network has no parameters, so the momentum '
                'update would do nothing: pass the networks themselves '
                '(e.g. a wrapped model\'s online and target submodules)')
        lerped = [(t.name, t.tensor, o.tensor)
                  for t, o in zip(targets, onlines)]
        self.buffer_copies, buffer_tensors = [], []
        if buffers != 'keep':  # checked before anything is written
            buffer_shards = [[tensor_shard(name, tensor)
                              for name, tensor in module.named_buffers()]
                             for module in (target, online)]
            check_alike(*buffer_shards, what='buffers')
            for t, o in zip(*buffer_shards):
                buffer_tensors += [t.tensor, o.tensor]
                if buffers == 'average' and t.tensor.is_floating_point() \
                        and o.tensor.is_floating_point():
                    lerped.append((t.name, t.tensor, o.tensor))
                else:
                    self.buffer_copies.append((t.tensor, o.tensor))
        names, target_tensors, online_tensors = map(list, zip(*lerped))
        if masters is None:
            _refuse_low_precision(names, target_tensors)
        low = [index for index, tensor in enumerate(target_tensors)
               if _is_low_precision(tensor)]
        self.masters = masters
        self._master_names = [names[index] for index in low]
        self._master_targets = [target_tensors[index] for index in low]
        master_list = [None] * len(target_tensors)
        if low:
            for index, master in zip(low, masters.bind(
                    self._master_names, self._master_targets)):
                master_list[index] = master
        self.steps = _plan_lerp(target_tensors, online_tensors, master_list)
        self.gathered = gathered_copies(targets, onlines)
        self.secondary = secondary_partitions(targets)
        self._master_versions = self._versions()
        return targets + onlines, buffer_tensors

    def _versions(self):
        """The version counters of the targets with masters: an in-place
        write elsewhere (``load_state_dict``, ``copy_``) moves them."""
        return list(map(_version, self._master_targets))

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

        A float16/bfloat16 target tensor is updated through its float32
        master (:class:`TargetMasters`): ``master = momentum * master +
        (1 - momentum) * online`` in float32, then ``target = master``
        rounded. A target written since the last update (e.g. loaded)
        first restarts its master from its values.

        Under DeepSpeed ZeRO-3 it also lerps the gathered copies of
        persistent parameters, releases a target copy whose online copy is
        not gathered, and drops the target's ZeRO++ hpZ secondary
        partitions (see :mod:`~momentum_hook.local_shards`), so that the
        target's next forward uses the update.
        """
        momentum = check_momentum(momentum, warn_small=False)
        if self._master_targets and (
                self.masters.stale or
                self._versions() != self._master_versions):
            self.masters.resync(self._master_names, self._master_targets)
        _run_lerp(self.steps, 1.0 - momentum)
        if self.gathered:
            _lerp_gathered(self.gathered, 1.0 - momentum, self.masters)
        if self.secondary:  # after _lerp_gathered, which may release copies
            drop_secondary_partitions(self.secondary)
        for target_buffer, online_buffer in self.buffer_copies:
            target_buffer.copy_(online_buffer)
        if self._master_targets:
            self._master_versions = self._versions()


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
    plan._track(target, online, *plan._plan(target, online, buffers, None))
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
            ``momentum`` is outside [0, 1] or ``buffers`` is unknown; or if a
            target tensor that would be lerped (a parameter, or a
            floating-point buffer under ``'average'``) is float16/bfloat16,
            before anything is written.

    Warns:
        UserWarning: Once per process, for a momentum in (0, 0.5): MMEngine's
            ``momentum=x`` is ``m = 1 - x`` here.

    A float16/bfloat16 target needs a float32 master that outlives the call:
    an EMA stored in 16 bits rounds most steps ``(1 - m) * (online -
    target)`` to no change and stalls. This function keeps no masters, so it
    refuses such a target rather than update it badly. Use
    :class:`~momentum_hook.MomentumTargetMixin` or a :class:`ModuleUpdatePlan`
    kept across updates, which keep the masters for you, or own one::

        master = [t.float() for t in target_tensors]  # once
        momentum_update_(master, online_tensors, m)   # each update
        torch._foreach_copy_(target_tensors, master)
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
    _refuse_low_precision([shard.name for shard in targets],
                          [shard.tensor for shard in targets])
    _run_lerp(_plan_lerp([shard.tensor for shard in targets],
                         [shard.tensor for shard in onlines]),
              1.0 - momentum)
    _lerp_gathered(gathered_copies(targets, onlines), 1.0 - momentum)
    drop_secondary_partitions(secondary_partitions(targets))
