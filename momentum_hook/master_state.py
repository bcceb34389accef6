"""The float32 masters in a state dict, in the layout of the target they
shadow.

:class:`~momentum_hook.masters.TargetMasters` keeps one float32 master per
rank-local float16/bfloat16 target tensor. A checkpoint holds them under
``momentum_target_master.<name>``, ``<name>`` the key of the target
parameter in the target network's own ``state_dict``, in that parameter's
layout:

==========================  ==============================================
the target parameter        its master in the state dict
==========================  ==============================================
a plain tensor (none, DDP,  a float32 tensor of the same shape
ZeRO-1/2)
FSDP2 (a DTensor)           a float32 DTensor on the same mesh with the same
                            placements and global shape, so that
                            ``torch.distributed.checkpoint`` saves, loads and
                            reshards it like the parameter, and a full state
                            dict holds it whole
FSDP1, full or sharded      the whole master of each original parameter,
state dict                  gathered from every rank of the unit (a
                            collective, like FSDP1's own), as FSDP1 gives
                            its own parameters in a full state dict
FSDP1, local state dict     the unit's rank-local flat master, under the
                            key of the unit's ``_flat_param``
DeepSpeed ZeRO-3            this rank's partition, in this rank's own file
==========================  ==============================================

:func:`local_masters` and :func:`load_local_masters` keep them instead as
each rank holds them, by the names in
:class:`~momentum_hook.masters.TargetMasters`, for a checkpoint that each
rank writes and reads for itself, outside the model's state dict (the
mmpretrain teachers': :mod:`momentum_hook.mmpretrain`).

Loading takes any of these back into the current layout: a whole master is
cut to this rank's part (as FSDP2 and FSDP1 shard a parameter), so that a
checkpoint saved on one world size loads on another. The state dict lists a
master for every float16/bfloat16 target tensor from the start: the master
bound by the last update where it still rounds to the target, else the
target's values in float32 (what the next update would start from), so that
a checkpointer that loads into a model's state dict in place (DCP) finds
every key.
"""

from typing import Any, NamedTuple

import torch

from ._compat import torch as torch_internals
from .local_shards import local_shards
from .masters import is_low_precision, rounds_to
from .wrappers import loaded as _loaded

__all__ = [
    'MASTER_KEY',
    'save_masters',
    'take_masters',
    'place_masters',
    'local_masters',
    'load_local_masters',
]

#: The state-dict key prefix, after the model's own, of the float32 masters
#: of a low-precision target: ``<prefix>momentum_target_master.<name>``.
MASTER_KEY = 'momentum_target_master.'

#: Name parts that wrappers add to parameter names and remove from their
#: state-dict keys (FSDP1, ``checkpoint_wrapper``).
_WRAPPER_PARTS = ('_fsdp_wrapped_module.', '_checkpoint_wrapped_module.')


def state_name(name):
    """``name`` as the target's ``state_dict`` spells it."""
    for part in _WRAPPER_PARTS:
        name = name.replace(part, '')
    return name


class _Slot(NamedTuple):
    """One rank-local low-precision target tensor with a master.

    Attributes:
        name (str): Its name in :class:`TargetMasters` (the plan's).
        local (Tensor): The rank-local target tensor.
        kind (str): ``'tensor'``, ``'DTensor'`` or ``'FSDP1 unit'``.
        owner (Any): The DTensor parameter, or the FSDP1 unit.
        key (str): The state-dict name (FSDP1: of the unit, with a trailing
            dot, or empty).
    """

    name: str
    local: torch.Tensor
    kind: str
    owner: Any
    key: str


def _slots(target):
    """The :class:`_Slot` of each low-precision tensor of ``target``.

    Raises:
        ValueError: If the update would refuse ``target`` now (e.g. meta
            tensors, an FSDP1 unit unsharded).
    """
    shards = local_shards(target)
    fsdp = _loaded('torch.distributed.fsdp', 'FullyShardedDataParallel')
    units = (
        {}
        if fsdp is None
        else {
            id(torch_internals.fsdp1_flat_param(module)): (path, module)
            for path, module in target.named_modules()
            if isinstance(module, fsdp)
        }
    )
    slots = []
    for shard in shards:
        if not is_low_precision(shard.tensor):
            continue
        kind = shard.layout[0]
        if kind == 'FSDP1 unit':
            path, unit = units[id(shard.tensor)]
            key = state_name(f'{path}.' if path else '')
            slots.append(_Slot(shard.name, shard.tensor, kind, unit, key))
        else:
            slots.append(
                _Slot(
                    shard.name,
                    shard.tensor,
                    'DTensor' if kind == 'DTensor' else 'tensor',
                    shard.owner,
                    state_name(shard.name),
                )
            )
    return slots


# --- FSDP1 -----------------------------------------------------------------


def _fsdp1_mode(unit):
    """``(type name, rank0_only, offload_to_cpu)`` of the unit's state dict
    type (``FULL_STATE_DICT``, ``SHARDED_STATE_DICT``,
    ``LOCAL_STATE_DICT``)."""
    fsdp = _loaded('torch.distributed.fsdp', 'FullyShardedDataParallel')
    settings = fsdp.get_state_dict_type(unit)
    config = settings.state_dict_config
    return (
        settings.state_dict_type.name,
        getattr(config, 'rank0_only', False),
        getattr(config, 'offload_to_cpu', False),
    )


def _fsdp1_group(unit):
    """``(rank, world size)`` of the unit's sharding; (0, 1) unsharded."""
    group = unit.process_group
    if unit.sharding_strategy.name == 'NO_SHARD' or group is None:
        return 0, 1
    distributed = torch.distributed
    return (distributed.get_rank(group), distributed.get_world_size(group))


def _fsdp1_members(unit):
    """``(name, shape, numel, is padding)`` of each piece of the unit's
    flat parameter, unsharded, in order."""
    flat = torch_internals.fsdp1_flat_param(unit)
    names, shapes, numels = torch_internals.flat_param_layout(flat)
    padding = torch_internals.flat_param_padding(flat)
    members, real = [], iter(zip(names, shapes))
    for numel, is_padding in zip(numels, padding):
        name, shape = (None, None) if is_padding else next(real)
        members.append((name and state_name(name), shape, numel, is_padding))
    return members


def _gather_fsdp1(slot, master):
    """The whole master of each parameter of an FSDP1 unit, by name."""
    world = _fsdp1_group(slot.owner)[1]
    if world > 1:
        pieces = [torch.empty_like(master) for _ in range(world)]
        torch.distributed.all_gather(
            pieces, master.contiguous(), group=slot.owner.process_group
        )
        flat = torch.cat(pieces)
    else:
        flat = master.reshape(-1)
    whole, offset = {}, 0
    for name, shape, numel, is_padding in _fsdp1_members(slot.owner):
        if not is_padding:
            whole[slot.key + name] = (
                flat[offset : offset + numel].view(shape).clone()
            )
        offset += numel
    return whole


def _scatter_fsdp1(slot, loaded):
    """This rank's flat master of an FSDP1 unit from the whole masters of
    its parameters in ``loaded`` (by name), or None if one is missing.

    The padding in the flat parameter (FSDP1 fills alignment padding with a
    constant, sharding padding with zeros) keeps the target's own values.
    """
    pieces, padding = [], []
    for name, shape, numel, is_padding in _fsdp1_members(slot.owner):
        padding.append(torch.full((numel,), is_padding))
        if is_padding:
            pieces.append(torch.zeros(numel, dtype=torch.float32))
            continue
        value = _whole(loaded.get(slot.key + name))
        if value is None or tuple(value.shape) != tuple(shape):
            return None
        pieces.append(value.detach().reshape(-1).float().cpu())
    rank, world = _fsdp1_group(slot.owner)
    size = slot.local.numel()
    flat, padding = torch.cat(pieces), torch.cat(padding)
    extra = size * world - flat.numel()
    part = slice(rank * size, (rank + 1) * size)
    flat = torch.nn.functional.pad(flat, [0, extra])[part]
    padding = torch.nn.functional.pad(padding, [0, extra], value=True)[part]
    own = slot.local.detach().reshape(-1).float().cpu()
    return torch.where(padding, own, flat).view(slot.local.shape)


def _whole(value):
    """A whole tensor from a saved master: a DTensor's full tensor (a
    collective), or the tensor itself."""
    dtensor = _loaded('torch.distributed.tensor', 'DTensor')
    if (
        value is not None
        and dtensor is not None
        and isinstance(value, dtensor)
    ):
        return value.full_tensor()
    return value


# --- Save and load ---------------------------------------------------------


def save_masters(target, masters, destination, prefix):
    """Write the masters of ``target``'s low-precision tensors into a state
    dict, in the target's layout (see the module doc).

    Args:
        target (nn.Module): The target network, as it sits in the model
            (inside its FSDP1 wrapper, if any).
        masters (TargetMasters): Its masters.
        destination (dict): The state dict.
        prefix (str): The model's key prefix.
    """
    try:
        slots = _slots(target)
    except ValueError:
        if masters.tensors or masters.loaded:
            raise  # masters that cannot be saved: say so
        return  # nothing to save (e.g. a model still on the meta device)
    prefix = prefix + MASTER_KEY
    for slot in slots:
        master = masters.current(slot.name, slot.local)
        if slot.kind == 'DTensor':
            from torch.distributed.tensor import DTensor

            param = slot.owner
            destination[prefix + slot.key] = DTensor.from_local(
                master,
                param.device_mesh,
                param.placements,
                run_check=False,
                shape=param.shape,
                stride=param.stride(),
            ).detach()
        elif slot.kind == 'FSDP1 unit':
            mode, rank0_only, offload = _fsdp1_mode(slot.owner)
            if mode == 'LOCAL_STATE_DICT':
                destination[prefix + slot.key + '_flat_param'] = master
                continue
            whole = _gather_fsdp1(slot, master)  # on every rank
            if (
                mode == 'FULL_STATE_DICT'
                and rank0_only
                and _fsdp1_group(slot.owner)[0] != 0
            ):
                continue  # as FSDP1 leaves its own keys to rank 0
            for key, value in whole.items():
                destination[prefix + key] = value.cpu() if offload else value
        else:
            destination[prefix + slot.key] = master


def take_masters(state_dict, prefix):
    """Take every ``MASTER_KEY`` key out of ``state_dict``.

    Returns:
        dict[str, Tensor]: The masters by the name after ``MASTER_KEY``.
    """
    key = prefix + MASTER_KEY
    return {
        name[len(key) :]: state_dict.pop(name)
        for name in [name for name in state_dict if name.startswith(key)]
    }


def place_masters(target, masters, loaded):
    """Keep, for the next update, the masters in ``loaded`` (from
    :func:`take_masters`) of ``target``'s low-precision tensors, in the
    target's current layout.

    A master that cannot be placed (its parameter is not low precision now,
    or a key is missing) is dropped; that tensor's master then restarts
    from the loaded target.

    Returns:
        bool: False, placing nothing, if ``target``'s tensors cannot be
        listed now (e.g. on the meta device, before ``load_state_dict(...,
        assign=True)`` has given them values).
    """
    try:
        slots = _slots(target)
    except ValueError:
        return False
    local = {}
    for slot in slots:
        if slot.kind == 'FSDP1 unit':
            value = loaded.get(slot.key + '_flat_param')
            if value is None or value.shape != slot.local.shape:
                value = _scatter_fsdp1(slot, loaded)
        elif slot.kind == 'DTensor':
            value = _dtensor_local(slot.owner, loaded.get(slot.key))
        else:
            value = loaded.get(slot.key)
        if value is not None and value.shape == slot.local.shape:
            local[slot.name] = value
    masters.load(local)
    return True


def _dtensor_local(param, value):
    """This rank's part of ``value`` in ``param``'s layout: a saved
    DTensor (resharded if laid out otherwise) or a whole tensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if value is None:
        return None
    if isinstance(value, DTensor):
        if (value.device_mesh, tuple(value.placements)) != (
            param.device_mesh,
            tuple(param.placements),
        ):
            value = value.redistribute(param.device_mesh, param.placements)
        return value.to_local()
    if tuple(value.shape) != tuple(param.shape):
        return None
    return distribute_tensor(
        value.detach().to(param.device_mesh.device_type, torch.float32),
        param.device_mesh,
        param.placements,
        src_data_rank=None,
    ).to_local()


# --- Rank-local ------------------------------------------------------------


def local_masters(targets, masters):
    """This rank's masters of ``targets``, as float32 copies on the CPU.

    Args:
        targets (Iterable[tuple[str, Tensor]]): The rank-local low-precision
            target tensors by their names in ``masters``
            (:meth:`~momentum_hook.ModuleUpdatePlan.master_targets`).
        masters (TargetMasters): Their masters.

    Returns:
        dict[str, Tensor]: Each master as
        :meth:`~momentum_hook.masters.TargetMasters.current` gives it.
    """
    return {
        name: masters.current(name, tensor).detach().to('cpu', copy=True)
        for name, tensor in targets
    }


def load_local_masters(targets, masters, saved):
    """Keep, for the next update, the masters in ``saved`` (from
    :func:`local_masters`) that round to ``targets`` now.

    A master that does not (saved by another rank, on another world size,
    for another target, or missing) is left out: that tensor's master
    restarts from the target's values.

    Args:
        targets (Iterable[tuple[str, Tensor]]): As for
            :func:`local_masters`.
        masters (TargetMasters): Where the kept masters go
            (:meth:`~momentum_hook.masters.TargetMasters.load`).
        saved (dict[str, Tensor]): The saved masters by name.

    Returns:
        list[str]: The names of the target tensors whose master restarts,
        in order.
    """
    fits, restart = {}, []
    for name, tensor in targets:
        value = saved.get(name)
        if value is not None and rounds_to(value, tensor):
            fits[name] = value
        else:
            restart.append(name)
    masters.load(fits)
    return restart
