"""The rank-local tensors of a network's parameters, for a shard-local update.

The momentum update ``target = m * target + (1 - m) * online`` is elementwise,
so each rank can update the elements it holds, with no communication, as long
as its local target tensor and its local online tensor hold the *same*
elements. This module finds those local tensors under each engine and
describes how each is laid out, so that :func:`check_alike` can refuse a pair
that is not sharded alike before anything is written:

=========================  ====================================  =======================================
engine                     local tensor of a parameter           layout compared between the two sides
=========================  ====================================  =======================================
none, DDP, ZeRO-1/2        the parameter itself                  shape
FSDP2 (``fully_shard``)    ``param.to_local()``                  global shape, placements, mesh, local shape
FSDP1 unit                 the unit's ``FlatParameter``          parameter names and shapes, local size
DeepSpeed ZeRO-3           ``param.ds_tensor`` (its partition)   full shape, partition size
=========================  ====================================  =======================================

An FSDP1 unit is updated through its ``FlatParameter``, which holds this
rank's shard of all the unit's parameters; that is why the online and the
target network must be separate units wrapped with the same policy. Meta
tensors are refused.

Nothing here imports a distributed package: a tensor can only be a DTensor or
an FSDP1 unit if ``torch.distributed.tensor`` or ``torch.distributed.fsdp``
is already imported.
"""
import sys
from typing import Any, NamedTuple, Optional

import torch

__all__ = ['LocalShard', 'local_shards', 'tensor_shard', 'check_alike']

#: How to shard a target so that a shard-local update is correct.
HOW_TO_SHARD = (
    'make the target a copy of the online network before any wrapping '
    '(MomentumTargetMixin.init_momentum_target does) and shard both the same '
    "way: FSDP2: fully_shard the same submodules of both on one mesh; FSDP1: "
    'wrap the online and the target network as separate units with the same '
    'auto_wrap_policy (a wrap of the model root alone puts both in one unit); '
    'DeepSpeed: ZeRO stages 1-3 need nothing else. See "Sharded training" in '
    "momentum_hook's README")


class LocalShard(NamedTuple):
    """One parameter's (or FSDP1 unit's) elements on this rank.

    Attributes:
        name (str): What the messages call it: the parameter's name, or the
            unit's module path.
        tensor (Tensor): The local elements, updated in place.
        layout (tuple): What must be equal on both sides for ``tensor`` to
            hold the same elements in the target and the online network.
        owner (Any): The object that links to ``tensor``, or None.
        link (str): The attribute of ``owner`` that holds ``tensor`` (or the
            tensor ``tensor`` views), or None. A plan is stale when it
            changes.
        base (Tensor): ``getattr(owner, link)`` when planned, else
            ``tensor``; its ``data_ptr()`` must stay the same.
    """
    name: str
    tensor: torch.Tensor
    layout: tuple
    owner: Any = None
    link: Optional[str] = None
    base: Optional[torch.Tensor] = None


def _loaded(module_name, attribute):
    """``module_name.attribute`` if that module is already imported."""
    module = sys.modules.get(module_name)
    return getattr(module, attribute, None) if module is not None else None


def tensor_shard(name, tensor):
    """The :class:`LocalShard` of one parameter or tensor.

    Raises:
        ValueError: If ``tensor`` is a meta tensor or a DeepSpeed ZeRO-3
            parameter without a partition on this rank.
    """
    dtensor = _loaded('torch.distributed.tensor', 'DTensor')
    if dtensor is not None and isinstance(tensor, dtensor):
        base = tensor._local_tensor
        with torch.no_grad():
            local = tensor.to_local()
        layout = ('DTensor', tuple(tensor.shape), tuple(tensor.placements),
                  tensor.device_mesh, tuple(local.shape))
        return LocalShard(name, local, layout, tensor, '_local_tensor', base)
    if hasattr(tensor, 'ds_tensor'):  # a DeepSpeed ZeRO-3 parameter
        partition = tensor.ds_tensor
        if partition is None or partition.is_meta:
            raise ValueError(
                f'{name!r} is a DeepSpeed ZeRO-3 parameter whose partition is '
                f'not in memory on this rank (ds_tensor={partition!r}): the '
                'momentum update needs it; keep the parameters in CPU or GPU '
                'memory (no NVMe offload of parameters)')
        layout = ('ZeRO-3 partition', tuple(tensor.ds_shape),
                  partition.numel())
        return LocalShard(name, partition, layout, tensor, 'ds_tensor',
                          partition)
    if tensor.is_meta:
        raise ValueError(
            f'{name!r} is a meta tensor, with no values to update: materialise '
            'the model (e.g. to_empty(device=...) and initialise it, or let '
            'the sharding engine do it) before the first momentum update')
    return LocalShard(name, tensor, ('tensor', tuple(tensor.shape)),
                      base=tensor)


def local_shards(module):
    """The :class:`LocalShard` of every parameter of ``module``, in order.

    FSDP1 units inside ``module`` come first, one entry per unit's
    ``FlatParameter``; the parameters they hold are not listed again.

    Args:
        module (nn.Module): The online or the target network.

    Returns:
        list[LocalShard]: One entry per update unit.
    """
    shards, covered = [], set()
    fsdp = _loaded('torch.distributed.fsdp', 'FullyShardedDataParallel')
    if fsdp is not None:
        for path, unit in module.named_modules():
            flat = unit._flat_param if isinstance(unit, fsdp) else None
            if flat is None:
                continue
            covered.update(map(id, flat._params or ()))
            layout = ('FSDP1 unit', tuple(flat._fqns),
                      tuple(tuple(shape) for shape in flat._shapes),
                      tuple(flat.shape))
            shards.append(LocalShard(f'FSDP unit {path or "<root>"!r}', flat,
                                     layout, base=flat))
    for name, param in module.named_parameters():
        if id(param) in covered or getattr(param, '_is_flat_param', False):
            continue
        shards.append(tensor_shard(name, param))
    return shards


def _describe(layout):
    kind, *rest = layout
    return f'{kind} {", ".join(map(str, rest))}'


def check_alike(targets, onlines, what='parameters'):
    """Check that target and online shards hold the same elements pairwise.

    Args:
        targets (list[LocalShard]): The target's shards.
        onlines (list[LocalShard]): The online network's, in the same order.
        what (str): What the shards are, for the messages.

    Raises:
        ValueError: Naming the first pair that differs in count, layout or
            shape, or that shares memory, and how to shard both networks.
    """
    if len(targets) != len(onlines):
        raise ValueError(
            f'the target has {len(targets)} {what} but the online network '
            f'has {len(onlines)}: they must be the same network, sharded '
            f'alike; {HOW_TO_SHARD}')
    for index, (target, online) in enumerate(zip(targets, onlines)):
        if target.layout != online.layout:
            raise ValueError(
                f'{what} {index} differs between target ({target.name}: '
                f'{_describe(target.layout)}) and online ({online.name}: '
                f'{_describe(online.layout)}), so their local elements do '
                f'not correspond; {HOW_TO_SHARD}')
        if (target.tensor.numel() and target.tensor.untyped_storage().data_ptr()
                == online.tensor.untyped_storage().data_ptr()):
            raise ValueError(
                f'{what} {index} ({target.name}) of the target and the online '
                'network share memory: the target must be a separate copy, '
                f'and the two must not be one sharded unit; {HOW_TO_SHARD}')
