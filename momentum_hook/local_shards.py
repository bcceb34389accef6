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
FSDP1 unit                 the unit's ``FlatParameter`` shard    parameter names, shapes and padding,
                                                                 rank, world size, local size
DeepSpeed ZeRO-3           ``param.ds_tensor`` (its partition)   full shape and size, partition size,
                                                                 rank, world size, persistence
=========================  ====================================  =======================================

An FSDP1 unit is updated through its ``FlatParameter``'s local shard, which
holds this rank's elements of all the unit's parameters (with
``use_orig_params=True`` the original parameters are views into it); that is
why the online and the target network must be separate units wrapped with the
same policy. A parameter flattened into an FSDP1 unit that is not inside the
network (a wrap of the model root alone) is refused, and so are meta tensors
and ZeRO-3 parameters without a partition in memory.

A ZeRO-3 parameter's persistent gathered copy and ZeRO++ state are handled
by :mod:`~momentum_hook.zero`; the cross-rank verdict at planning time by
:mod:`~momentum_hook.ranks`.

Nothing here imports a distributed package: a tensor can only be a DTensor or
an FSDP1 unit if ``torch.distributed.tensor`` or ``torch.distributed.fsdp``
is already imported.
"""  # noqa: E501 (the engine table)

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from ._compat import deepspeed as ds
from ._compat import torch as torch_internals
from .pairing import join, named_modules
from .ranks import group_position
from .wrappers import loaded as _loaded
from .zero import QUANTIZED

__all__ = [
    'LocalShard',
    'local_shards',
    'buffer_shards',
    'tensor_shard',
    'check_alike',
    'HOW_TO_SHARD',
    'SHARED_UNIT',
    'FSDP_UNIT',
]


#: How to shard a target so that a shard-local update is correct.
HOW_TO_SHARD = (
    'make the target a copy of the online network before any wrapping '
    '(MomentumTargetMixin.init_momentum_target does) and shard both the same '
    'way: FSDP2: fully_shard the same submodules of both on one mesh '
    '(momentum_hook.sharding.fully_shard_pair); FSDP1: wrap the online and '
    'the target network as separate units with the same auto_wrap_policy, '
    'e.g. ModuleWrapPolicy({type(online)}) (MMEngine FSDPStrategy: '
    'model_wrapper=dict(auto_wrap_policy=ModuleWrapPolicy(...))); '
    'DeepSpeed: ZeRO stages 1-3 '
    'need nothing else, but ZeRO-3 persistence thresholds must keep the same '
    "parameters of both gathered. See docs/sharded.md in momentum_hook's "
    'repository'
)


#: Why a network whose parameters sit in an FSDP1 unit around it fails.
SHARED_UNIT = (
    'is flattened into an FSDP1 unit that is not inside the network, so its '
    'local elements are a slice of a FlatParameter that also holds other '
    "networks' parameters (a wrap of the model root alone puts the online "
    'and the target network in one unit) and no shard-local update exists: '
    'wrap the online and the target network as separate FSDP1 units with an '
    'auto_wrap_policy, e.g. FSDP(model, auto_wrap_policy=ModuleWrapPolicy('
    "{type(model.online_net)}), ...) or, with MMEngine's FSDPStrategy, "
    'model_wrapper=dict(auto_wrap_policy=ModuleWrapPolicy({type(model.'
    'online_net)})); or use FSDP2 '
    '(momentum_hook.sharding.fully_shard_pair). If that unit wraps this '
    'network alone, pass the FSDP unit instead of the module inside it'
)


class LocalShard(NamedTuple):
    """One parameter's (or FSDP1 unit's) elements on this rank.

    Attributes:
        name (str): What the messages call it: the parameter's name, or the
            unit's module path.
        tensor (Tensor): The local elements, updated in place.
        layout (tuple): What must be equal on both sides for ``tensor`` to
            hold the same elements in the target and the online network.
        owner (Any): The object that links to ``tensor``, or None.
        link (Callable): Reads what ``owner`` holds now: ``tensor`` (or
            the tensor ``tensor`` views), or None. A plan is stale when it
            changes.
        base (Tensor): ``link(owner)`` when planned, else
            ``tensor``; its storage must stay the same.
        keys (tuple[str]): What the shard is paired by
            (:func:`~momentum_hook.pairing.pair_by_name`): its name without
            wrapper attributes, then the names of the parameters tied to it;
            empty for tensors that have no name, paired by position.
    """

    name: str
    tensor: torch.Tensor
    layout: tuple
    owner: Any = None
    link: Callable[[Any], torch.Tensor] | None = None
    base: torch.Tensor | None = None
    keys: tuple = ()


#: How the name of an FSDP1 unit's shard begins.
FSDP_UNIT = 'FSDP unit'


def _meta_error(name):
    return ValueError(
        f'{name!r} is a meta tensor, with no values to update: materialise '
        'the model before the first momentum update (e.g. to_empty(device='
        '...), then initialise the online network, or let the sharding '
        "engine do it). With MomentumTargetMixin, call the model's "
        'check_momentum_target() after initialising and before the first '
        'optimizer step (the momentum hooks do): a target that is not a copy '
        'of the online network then becomes one, unless it was loaded from '
        'a checkpoint'
    )


def _zero3_shard(name, param):
    partition = ds.partition(param)
    for what, tensor in (
        ('partition', partition),
        ('secondary partition', ds.secondary_partition(param)),
    ):
        if ds.is_quantized(tensor):
            raise ValueError(
                f'{name!r} is a DeepSpeed ZeRO-3 parameter whose {what} is '
                f'stored quantized to {tensor.dtype} '
                f'(zero_quantized_nontrainable_weights): {QUANTIZED}'
            )
    if (
        partition is None
        or partition.is_meta
        or (partition.numel() == 0 and ds.full_numel(param) > 0)
    ):
        raise ValueError(
            f'{name!r} is a DeepSpeed ZeRO-3 parameter whose partition is '
            f'not in memory on this rank (ds_tensor={partition!r}): the '
            'momentum update needs it; keep the parameters in CPU or GPU '
            'memory (no NVMe offload of parameters)'
        )
    persistence = 'persistent' if ds.is_persistent(param) else 'partitioned'
    layout = (
        'ZeRO-3 partition',
        ds.full_shape(param),
        ds.full_numel(param),
        partition.numel(),
        group_position(ds.process_group(param)),
        persistence,
    )
    return LocalShard(name, partition, layout, param, ds.partition, partition)


def tensor_shard(name, tensor, meta=False):
    """The :class:`LocalShard` of one parameter or tensor.

    Args:
        name (str): What the messages call it.
        tensor (Tensor): The parameter or tensor.
        meta (bool): Accept a (not sharded) meta tensor, for checks made
            before the values exist. Defaults to False.

    Raises:
        ValueError: If ``tensor`` (or its local shard) is a meta tensor, a
            DeepSpeed ZeRO-3 parameter without a partition on this rank, or a
            parameter of an FSDP1 unit outside it.
    """
    dtensor = _loaded('torch.distributed.tensor', 'DTensor')
    if dtensor is not None and isinstance(tensor, dtensor):
        # What to_local() views, without autograd.
        local = torch_internals.dtensor_local(tensor)
        if local.is_meta:
            raise _meta_error(name)
        layout = (
            'DTensor',
            tuple(tensor.shape),
            tuple(tensor.placements),
            tensor.device_mesh,
            tuple(local.shape),
        )
        return LocalShard(
            name, local, layout, tensor, torch_internals.dtensor_local, local
        )
    if ds.is_zero3_param(tensor):
        return _zero3_shard(name, tensor)
    if torch_internals.is_fsdp1_flattened(tensor):
        raise ValueError(f'{name!r} {SHARED_UNIT}')
    if tensor.is_meta and not meta:
        raise _meta_error(name)
    return LocalShard(
        name, tensor, ('tensor', tuple(tensor.shape)), base=tensor
    )


def _unit_name(path):
    return f'{FSDP_UNIT} {path or "<root>"!r}'


def _fsdp1_shard(path, unit):
    """The :class:`LocalShard` of an FSDP1 unit's ``FlatParameter``."""
    flat = torch_internals.fsdp1_flat_param(unit)
    name = _unit_name(path)
    if flat.is_meta:
        raise _meta_error(name)
    # Sharded, the FlatParameter's data is this rank's shard (_local_shard,
    # once FSDP has initialised lazily); unsharded, the whole unit.
    shard = torch_internals.flat_param_shard(flat)
    if flat.data_ptr() != shard.data_ptr():
        raise ValueError(
            f'{name} is unsharded now (inside its forward or '
            "summon_full_params), so its FlatParameter is not this rank's "
            'shard: call the momentum update outside them'
        )
    layout = (
        'FSDP1 unit',
        *torch_internals.flat_param_layout(flat),
        group_position(unit.process_group),
        tuple(flat.shape),
    )
    return LocalShard(name, flat, layout, base=flat)


def _check_views_covered(modules, covered):
    """Refuse FSDP1 ``use_orig_params=False`` views of a unit outside.

    Such a unit deletes the original parameters of each module it flattens
    (all of them) and puts plain tensor attributes viewing its
    FlatParameter in their place.

    Args:
        modules (list[tuple[str, nn.Module]]): The modules without
            parameters, named.
        covered (set[int]): The ids of the FlatParameters inside the network.
    """
    for path, submodule in modules:
        for key, value in vars(submodule).items():
            base = torch_internals.view_base(value)
            if torch_internals.is_flat_param(base) and id(base) not in covered:
                raise ValueError(
                    f'{(path + "." if path else "") + key!r} {SHARED_UNIT}'
                )


def local_shards(module, meta=False):
    """The :class:`LocalShard` of every parameter of ``module``, in order.

    FSDP1 units inside ``module`` come first, one entry per unit's
    ``FlatParameter``; the parameters they hold are not listed again.

    Args:
        module (nn.Module): The online or the target network.
        meta (bool): Accept parameters on the meta device (see
            :func:`tensor_shard`). Defaults to False.

    Returns:
        list[LocalShard]: One entry per update unit.

    Raises:
        ValueError: See :func:`tensor_shard`.
    """
    fsdp = _loaded('torch.distributed.fsdp', 'FullyShardedDataParallel')
    shards, covered, params, bare = [], set(), {}, []
    # One walk; the parameters in named_parameters() order, without repeats.
    for path, name, submodule in named_modules(module):
        if (
            fsdp is not None
            and isinstance(submodule, fsdp)
            and torch_internals.fsdp1_flat_param(submodule) is not None
        ):
            flat = torch_internals.fsdp1_flat_param(submodule)
            covered.update(
                map(id, torch_internals.flat_param_members(flat) or ())
            )
            covered.add(id(flat))
            shards.append(
                _fsdp1_shard(path, submodule)._replace(
                    keys=(_unit_name(name),)
                )
            )
        own = list(
            submodule.named_parameters(recurse=False, remove_duplicate=False)
        )
        if not own:
            bare.append((path, submodule))
        _note(params, path, name, own)
    if fsdp is not None:
        _check_views_covered(bare, covered)
    shards.extend(_named_shards(params, covered, meta))
    return shards


def _note(found, path, name, members):
    """Note each of a module's own ``(attribute, tensor)`` ``members`` in
    ``found`` (by tensor: ``[its first name, tensor, all its names without
    wrapper attributes]``)."""
    for attribute, tensor in members:
        entry = found.setdefault(
            id(tensor), [join(path, attribute), tensor, []]
        )
        entry[2].append(join(name, attribute))


def _named_shards(found, covered=(), meta=False):
    return [
        tensor_shard(name, tensor, meta)._replace(keys=tuple(keys))
        for key, (name, tensor, keys) in found.items()
        if key not in covered
    ]


def buffer_shards(module):
    """The :class:`LocalShard` of every buffer of ``module``, in order."""
    buffers = {}
    for path, name, submodule in named_modules(module):
        _note(
            buffers,
            path,
            name,
            submodule.named_buffers(recurse=False, remove_duplicate=False),
        )
    return _named_shards(buffers)


def _describe(layout):
    kind, *rest = layout
    return f'{kind} {", ".join(map(str, rest))}'


def check_alike(targets, onlines, what='parameters'):
    """Check that target and online shards hold the same elements pairwise.

    Args:
        targets (list[LocalShard]): The target's shards.
        onlines (list[LocalShard]): The online network's, paired with the
            targets by position.
        what (str): What the shards are, for the messages.

    Raises:
        ValueError: Naming the first pair that differs in count, layout or
            shape, or that shares memory, and how to shard both networks.
    """
    if len(targets) != len(onlines):
        raise ValueError(
            f'the target has {len(targets)} {what} but the online network '
            f'has {len(onlines)}: they must be the same network, sharded '
            f'alike; {HOW_TO_SHARD}'
        )
    for index, (target, online) in enumerate(zip(targets, onlines)):
        if target.layout != online.layout:
            raise ValueError(
                f'{what} {index} differs between target ({target.name}: '
                f'{_describe(target.layout)}) and online ({online.name}: '
                f'{_describe(online.layout)}), so their local elements do '
                f'not correspond; {HOW_TO_SHARD}'
            )
        if (
            target.tensor.numel()
            and not target.tensor.is_meta
            and target.tensor.untyped_storage().data_ptr()
            == online.tensor.untyped_storage().data_ptr()
        ):
            raise ValueError(
                f'{what} {index} ({target.name}) of the target and the online '
                'network share memory: the target must be a separate copy, '
                f'and the two must not be one sharded unit; {HOW_TO_SHARD}'
            )
