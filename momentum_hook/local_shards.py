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

A ZeRO-3 parameter below ``stage3_param_persistence_threshold`` is
*persistent*: besides its partition it keeps a gathered copy between steps,
which DeepSpeed refreshes from the partitions only after the next optimizer
step. :func:`gathered_copies` lists those pairs, so that the update can
lerp the copies too (both are whole on every rank, so no communication) and
the target's next forward sees the update. A target copy whose online copy
was released (a user's ``GatheredParameters`` over the online network) is
released too (:func:`available_copies`): DeepSpeed re-gathers it from the
updated partition at the target's next forward.

Under ZeRO++ hierarchical partitioning (``zero_hpz_partition_size`` > 1),
DeepSpeed gathers a parameter from a secondary partition that it never
refreshes for a frozen one: :func:`secondary_partitions` lists the target's,
and the update drops them (:func:`drop_secondary_partitions`), so that the
next gather reads the updated partitions. ZeRO++ quantized weights are
refused: by the plan where a partition is stored quantized, and from the
DeepSpeed config by :func:`check_zero_config`. :func:`check_zero3_gathers`
refuses a ZeRO-3 engine whose multi-parameter gathers may be read unfinished
(DeepSpeed before 0.19.8 on gloo).

Planning (:class:`~momentum_hook.ema.ModuleUpdatePlan`) ends with one
verdict on every rank (:func:`agree_across_ranks`), so that a shard that
differs on one rank is refused on all of them instead of leaving the others
waiting in their next collective.

Nothing here imports a distributed package: a tensor can only be a DTensor or
an FSDP1 unit if ``torch.distributed.tensor`` or ``torch.distributed.fsdp``
is already imported.
"""
import importlib
import sys
from typing import Any, NamedTuple, Optional

import torch

from .wrappers import loaded as _loaded

__all__ = ['LocalShard', 'local_shards', 'tensor_shard', 'check_alike',
           'gathered_copies', 'available_copies', 'secondary_partitions',
           'drop_secondary_partitions', 'check_zero_config',
           'check_zero3_gathers', 'agree_across_ranks', 'world_size']

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
    'parameters of both gathered. See docs/sharded.md in momentum_hook\'s '
    'repository')

#: Why a network whose parameters sit in an FSDP1 unit around it fails.
SHARED_UNIT = (
    'is flattened into an FSDP1 unit that is not inside the network, so its '
    'local elements are a slice of a FlatParameter that also holds other '
    'networks\' parameters (a wrap of the model root alone puts the online '
    'and the target network in one unit) and no shard-local update exists: '
    'wrap the online and the target network as separate FSDP1 units with an '
    'auto_wrap_policy, e.g. FSDP(model, auto_wrap_policy=ModuleWrapPolicy('
    '{type(model.online_net)}), ...) or, with MMEngine\'s FSDPStrategy, '
    'model_wrapper=dict(auto_wrap_policy=ModuleWrapPolicy({type(model.'
    'online_net)})); or use FSDP2 '
    '(momentum_hook.sharding.fully_shard_pair). If that unit wraps this '
    'network alone, pass the FSDP unit instead of the module inside it')


#: Why ZeRO++ quantized weights (qwZ) are refused, and what to set.
QUANTIZED = (
    'the momentum update needs the target\'s partitions in floating point, '
    'and its forward must use the EMA it computes, but ZeRO++ quantized '
    'weights store the frozen target\'s partitions in int8 '
    '(zero_quantized_nontrainable_weights) or round every gather of them '
    'to int8 (zero_quantized_weights), so updates would be lost or never '
    'reach the forward: set zero_optimization=dict(..., '
    'zero_quantized_weights=False, zero_quantized_nontrainable_weights='
    'False) in the DeepSpeed config (zero_quantized_gradients and '
    'zero_hpz_partition_size may stay)')

#: The ZeRO++ options :func:`check_zero_config` refuses.
QUANTIZED_WEIGHTS = ('zero_quantized_weights',
                     'zero_quantized_nontrainable_weights')


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


def _torch_internal(obj, name):
    """``obj.name``: a private torch attribute that the shard lookup reads.

    torch has no public API for an FSDP1 unit's flat shard and its layout,
    so these few attributes are read here and nowhere else; where a torch
    version lacks one, the update stops with the version rather than guess.

    Raises:
        RuntimeError: Naming the attribute and the torch version.
    """
    try:
        return getattr(obj, name)
    except AttributeError:
        raise RuntimeError(
            f'the shard-local momentum update reads torch\'s '
            f'{type(obj).__name__}.{name}, which torch {torch.__version__} '
            'does not have: use a torch version within momentum_hook\'s '
            'tested range (setup.py: torch>=2.14,<2.16)') from None


def _fsdp1_internal(module_name, name):
    """torch's ``module_name.name`` once FSDP is imported, else None (no
    tensor can then belong to an FSDP1 unit)."""
    if 'torch.distributed.fsdp' not in sys.modules:
        return None
    return _torch_internal(importlib.import_module(module_name), name)


def _fsdp1_flattened(tensor):
    """Whether FSDP1 flattened ``tensor`` into a unit (torch's own test)."""
    flattened = _fsdp1_internal('torch.distributed.fsdp._common_utils',
                                '_is_fsdp_flattened')
    return flattened is not None and flattened(tensor)


def _is_flat_param(tensor):
    """Whether ``tensor`` is an FSDP1 ``FlatParameter`` (torch's own test)."""
    flat_param = _fsdp1_internal('torch.distributed.fsdp._flat_param',
                                 'FlatParameter')
    return flat_param is not None and isinstance(tensor, flat_param)


def _meta_error(name):
    return ValueError(
        f'{name!r} is a meta tensor, with no values to update: materialise '
        'the model (e.g. to_empty(device=...) and initialise it, or let '
        'the sharding engine do it) before the first momentum update')


def _group_position(group):
    """``(rank, world size)`` in a process group (no communication)."""
    distributed = sys.modules['torch.distributed']
    return distributed.get_rank(group), distributed.get_world_size(group)


def _zero3_shard(name, param):
    partition = param.ds_tensor
    for what, tensor in (('partition', partition), ('secondary partition',
                         getattr(param, 'ds_secondary_tensor', None))):
        if hasattr(tensor, 'ds_quant_scale'):
            raise ValueError(
                f'{name!r} is a DeepSpeed ZeRO-3 parameter whose {what} is '
                f'stored quantized to {tensor.dtype} '
                f'(zero_quantized_nontrainable_weights): {QUANTIZED}')
    if partition is None or partition.is_meta or (
            partition.numel() == 0 and param.ds_numel > 0):
        raise ValueError(
            f'{name!r} is a DeepSpeed ZeRO-3 parameter whose partition is '
            f'not in memory on this rank (ds_tensor={partition!r}): the '
            'momentum update needs it; keep the parameters in CPU or GPU '
            'memory (no NVMe offload of parameters)')
    persistence = ('persistent' if getattr(param, 'ds_persist', False) else
                   'partitioned')
    layout = ('ZeRO-3 partition', tuple(param.ds_shape), param.ds_numel,
              partition.numel(),
              _group_position(getattr(param, 'ds_process_group', None)),
              persistence)
    return LocalShard(name, partition, layout, param, 'ds_tensor', partition)


def tensor_shard(name, tensor):
    """The :class:`LocalShard` of one parameter or tensor.

    Raises:
        ValueError: If ``tensor`` (or its local shard) is a meta tensor, a
            DeepSpeed ZeRO-3 parameter without a partition on this rank, or a
            parameter of an FSDP1 unit outside it.
    """
    dtensor = _loaded('torch.distributed.tensor', 'DTensor')
    if dtensor is not None and isinstance(tensor, dtensor):
        # What to_local() views, without autograd.
        local = _torch_internal(tensor, '_local_tensor')
        if local.is_meta:
            raise _meta_error(name)
        layout = ('DTensor', tuple(tensor.shape), tuple(tensor.placements),
                  tensor.device_mesh, tuple(local.shape))
        return LocalShard(name, local, layout, tensor, '_local_tensor', local)
    if hasattr(tensor, 'ds_tensor'):  # a DeepSpeed ZeRO-3 parameter
        return _zero3_shard(name, tensor)
    if _fsdp1_flattened(tensor):
        raise ValueError(f'{name!r} {SHARED_UNIT}')
    if tensor.is_meta:
        raise _meta_error(name)
    return LocalShard(name, tensor, ('tensor', tuple(tensor.shape)),
                      base=tensor)


def _fsdp1_shard(path, unit):
    """The :class:`LocalShard` of an FSDP1 unit's ``FlatParameter``."""
    flat = _torch_internal(unit, '_flat_param')
    name = f'FSDP unit {path or "<root>"!r}'
    if flat.is_meta:
        raise _meta_error(name)
    # Sharded, the FlatParameter's data is this rank's shard (_local_shard,
    # once FSDP has initialised lazily); unsharded, the whole unit.
    shard = getattr(flat, '_local_shard', flat)
    if flat.data_ptr() != shard.data_ptr():
        raise ValueError(
            f'{name} is unsharded now (inside its forward or '
            'summon_full_params), so its FlatParameter is not this rank\'s '
            'shard: call the momentum update outside them')
    layout = ('FSDP1 unit', tuple(_torch_internal(flat, '_fqns')),
              tuple(tuple(shape) for shape in _torch_internal(flat,
                                                              '_shapes')),
              tuple(_torch_internal(flat, '_numels_with_padding')),
              _group_position(unit.process_group), tuple(flat.shape))
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
            base = getattr(value, '_base', None) if isinstance(
                value, torch.Tensor) else None
            if _is_flat_param(base) and \
                    id(base) not in covered:
                raise ValueError(
                    f'{(path + "." if path else "") + key!r} {SHARED_UNIT}')


def local_shards(module):
    """The :class:`LocalShard` of every parameter of ``module``, in order.

    FSDP1 units inside ``module`` come first, one entry per unit's
    ``FlatParameter``; the parameters they hold are not listed again.

    Args:
        module (nn.Module): The online or the target network.

    Returns:
        list[LocalShard]: One entry per update unit.

    Raises:
        ValueError: See :func:`tensor_shard`.
    """
    fsdp = _loaded('torch.distributed.fsdp', 'FullyShardedDataParallel')
    shards, covered, params, seen, bare = [], set(), [], set(), []
    # One walk; the parameters in named_parameters() order, without repeats.
    for path, submodule in module.named_modules():
        if fsdp is not None and isinstance(submodule, fsdp) and \
                _torch_internal(submodule, '_flat_param') is not None:
            flat = submodule._flat_param
            covered.update(map(id, _torch_internal(flat, '_params') or ()))
            covered.add(id(flat))
            shards.append(_fsdp1_shard(path, submodule))
        if not submodule._parameters:
            bare.append((path, submodule))
        prefix = path + '.' if path else ''
        for key, param in submodule._parameters.items():
            if param is not None and id(param) not in seen:
                seen.add(id(param))
                params.append((prefix + key, param))
    if fsdp is not None:
        _check_views_covered(bare, covered)
    shards.extend(tensor_shard(name, param) for name, param in params
                  if id(param) not in covered)
    return shards


def gathered_copies(targets, onlines):
    """The ZeRO-3 pairs that can hold a gathered copy besides the partition.

    Args:
        targets (list[LocalShard]): The target's shards, checked alike with
            ``onlines`` (:func:`check_alike`).
        onlines (list[LocalShard]): The online network's.

    Returns:
        list[tuple[Parameter, Parameter]]: The (target, online) persistent
        ZeRO-3 parameters; see :func:`available_copies`.
    """
    return [(target.owner, online.owner)
            for target, online in zip(targets, onlines)
            if target.layout[0] == 'ZeRO-3 partition' and
            target.layout[-1] == 'persistent']


def available_copies(pairs):
    """The gathered (target, online) copies in ``pairs`` to update now.

    A persistent ZeRO-3 parameter's ``data`` is a 0-element placeholder until
    its first forward gathers it, then the whole tensor on every rank.

    Args:
        pairs (list): From :func:`gathered_copies`.

    Returns:
        tuple[list[Tensor], list[Tensor]]: The target and online copies.

    A target copy whose online copy is not gathered now (a user's
    ``deepspeed.zero.GatheredParameters`` over the online network releases
    its persistent copies on exit) cannot be updated locally: it is
    released here (:func:`release_copies`), so that the target's next
    forward gathers it from its updated partition.
    """
    targets, onlines, stale = [], [], []
    for target, online in pairs:
        if target.data.shape != target.ds_shape:
            continue  # not gathered: the partition is all there is
        if online.data.shape != online.ds_shape:
            stale.append(target)
            continue
        targets.append(target.data)
        onlines.append(online.data)
    release_copies(stale)
    return targets, onlines


def release_copies(params):
    """Free the gathered copies of ZeRO-3 ``params``; DeepSpeed re-gathers
    them from their partitions when a forward next needs them."""
    if params:
        params[0].partition(param_list=params)


def secondary_partitions(targets):
    """The ZeRO-3 target parameters with a ZeRO++ hpZ secondary partition.

    Under ``zero_hpz_partition_size`` > 1, DeepSpeed gathers a parameter from
    its secondary partition (``ds_secondary_tensor``: this rank's slice of
    the parameter split over its hpZ group, larger than its partition
    ``ds_tensor``) whenever that exists, and rebuilds it only after the
    parameter's next gather from ``ds_tensor``; for trainable parameters it
    drops them after every optimizer step, never for a frozen target. Its
    elements are not all local to ``ds_tensor``, so it cannot be updated
    without communication: :func:`drop_secondary_partitions` drops it after
    each update instead.

    Args:
        targets (list[LocalShard]): The target's shards.

    Returns:
        list[Parameter]: The parameters to pass to
        :func:`drop_secondary_partitions`.
    """
    return [shard.owner for shard in targets
            if shard.layout[0] == 'ZeRO-3 partition' and
            getattr(shard.owner, 'ds_zero_param_process_group', None)
            is not None]


def drop_secondary_partitions(params):
    """Drop the hpZ secondary partitions of ``params`` (no communication), as
    DeepSpeed does for trainable parameters after an optimizer step: the
    next gather reads the updated partitions over the whole data-parallel
    group and rebuilds them."""
    for param in params:
        if param.ds_secondary_tensor is not None:
            param.ds_secondary_tensor = None


def check_zero_config(config):
    """Refuse a DeepSpeed config whose ZeRO++ options break the update.

    Quantized weights (qwZ) need CUDA kernels, so this reads the config
    instead of the engine: the MMEngine hook calls it with
    ``DeepSpeedStrategy``'s config before training, and a model's plan
    refuses a partition that DeepSpeed stored quantized.

    Args:
        config (dict | None): A DeepSpeed config as a dict (its
            ``zero_optimization`` is read), or None.

    Raises:
        ValueError: If ``zero_quantized_weights`` or
            ``zero_quantized_nontrainable_weights`` is set.
    """
    zero = (config or {}).get('zero_optimization') or {}
    enabled = [key for key in QUANTIZED_WEIGHTS if zero.get(key)]
    if enabled:
        raise ValueError(
            f'the DeepSpeed config sets {" and ".join(enabled)}=True: '
            f'{QUANTIZED}')


def _release(text):
    """``'0.19.6+abc'`` as ``(0, 19, 6)``."""
    return tuple(int(part) for part in
                 text.split('+')[0].split('.')[:3] if part.isdigit())


def check_zero3_gathers(engine):
    """Refuse a ZeRO-3 engine on gloo whose gathers may read unfinished data.

    DeepSpeed before 0.19.8 waits only for the last of the all-gathers it
    issues when it gathers several parameters at once (``_allgather_params_
    coalesced``); on gloo the others may still be in flight. It gathers the
    persistent parameters that way after every optimizer step, so the online
    network, and the target's EMA of it, can read stale or uninitialised
    values. ``stage3_allgather_sequential`` gathers one at a time.

    Args:
        engine (deepspeed.DeepSpeedEngine): The engine that holds the model.

    Raises:
        ValueError: Naming the DeepSpeed version and the option to set.
    """
    distributed = sys.modules['torch.distributed']
    deepspeed = sys.modules['deepspeed']
    if (engine.zero_optimization_stage() == 3 and
            not engine.zero_allgather_sequential() and
            _release(deepspeed.__version__) < (0, 19, 8) and
            distributed.is_initialized() and
            distributed.get_backend() == 'gloo'):
        raise ValueError(
            f'DeepSpeed {deepspeed.__version__} on gloo waits for only the '
            'last of the all-gathers of a ZeRO-3 multi-parameter gather, so '
            'the persistent parameters it re-gathers after each optimizer '
            'step can be read unfinished, and the target would average '
            'them: set zero_optimization=dict(stage=3, '
            'stage3_allgather_sequential=True) (in MMEngine, strategy=dict('
            "type='DeepSpeedStrategy', zero_optimization=dict(stage=3, "
            'stage3_allgather_sequential=True))), or use DeepSpeed >= 0.19.8')


def world_size():
    """The default process group's size, or 1 without one (no import)."""
    distributed = sys.modules.get('torch.distributed')
    if (distributed is None or not distributed.is_available() or
            not distributed.is_initialized()):
        return 1
    return distributed.get_world_size()


def _ranks(ranks):
    return f'rank{"s" if len(ranks) > 1 else ""} {", ".join(map(str, ranks))}'


def agree_across_ranks(plan):
    """Run ``plan()`` on every rank and reach one verdict on all of them.

    A refusal raised on some ranks only (a shard laid out differently on one
    rank) would leave the others to go on into their next collective and
    block there until the process group's timeout. So each rank plans, then
    every rank of the default process group shares whether and why it
    refused (one ``all_gather_object`` of a short string, at plan time
    only), and every rank raises the same error, naming the ranks that
    refused. Without a process group (or with one rank) nothing is
    communicated.

    Args:
        plan (Callable[[], Any]): Plans and checks; may raise.

    Returns:
        Any: What ``plan()`` returned, when no rank refused.

    Raises:
        ValueError, TypeError: The first refusing rank's error (its type;
            other exception types become RuntimeError on the other ranks),
            on every rank.
    """
    world = world_size()
    try:
        result = plan()
    except Exception as error:
        if world == 1:
            raise
        verdict, local = (type(error).__name__, str(error)), error
    else:
        if world == 1:
            return result
        verdict, local = None, None
    verdicts = [None] * world
    sys.modules['torch.distributed'].all_gather_object(verdicts, verdict)
    refused = [rank for rank, each in enumerate(verdicts) if each]
    if not refused:
        return result
    kind, message = verdicts[refused[0]]
    if len(refused) < world or len(set(verdicts)) > 1:
        notes = []
        if len(refused) > 1:
            notes.append(f'{_ranks(refused[1:])} refused too')
        if len(refused) < world:
            accepted = [rank for rank in range(world) if rank not in refused]
            notes.append(f'{_ranks(accepted)} found nothing wrong: the '
                         'layout differs between ranks')
        message = (f'rank {refused[0]} of {world} refused the momentum '
                   f'target ({"; ".join(notes)}): {message}')
    error_type = {'ValueError': ValueError, 'TypeError': TypeError}.get(
        kind, RuntimeError)
    raise error_type(message) from local


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
