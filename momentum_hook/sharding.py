"""Shard the online and the target network alike, so that the update is local.

The momentum update is shard-local (:mod:`~momentum_hook.local_shards`): it
is correct only when each rank holds the same elements of the target and of
the online network. :func:`fully_shard_pair` applies one FSDP2 plan to both.
FSDP1 needs no helper (one ``auto_wrap_policy`` that makes each network a
unit), DeepSpeed ZeRO none at all.

Importing this module imports nothing distributed; ``fully_shard`` is
imported when called.
"""

from collections.abc import Callable

from torch import nn

from .local_shards import check_alike, local_shards
from .pairing import pair_by_name

__all__ = ['fully_shard_pair']


def _selector(submodules):
    if submodules is None:
        return lambda name, module: False
    if isinstance(submodules, type) or (
        isinstance(submodules, tuple)
        and all(isinstance(kind, type) for kind in submodules)
    ):
        return lambda name, module: isinstance(module, submodules)
    if callable(submodules):
        return submodules
    raise TypeError(
        'submodules must be None, an nn.Module class, a tuple of '
        'classes or a callable (name, module) -> bool, got '
        f'{type(submodules).__name__}'
    )


def fully_shard_pair(
    *,
    online: nn.Module,
    target: nn.Module,
    submodules: (
        type[nn.Module]
        | tuple[type[nn.Module], ...]
        | Callable[[str, nn.Module], bool]
        | None
    ) = None,
    **fully_shard_kwargs,
) -> tuple[nn.Module, nn.Module]:
    """Apply the same FSDP2 ``fully_shard`` plan to the online and the target.

    The two networks are keyword-only: ``momentum_update_`` takes the target
    first (as ``Tensor.lerp_``), lightly's ``update_momentum`` the online
    network first, so a positional pair here would read one way or the other;
    ``fully_shard_pair(model.online_net, model.target_net)`` is a
    ``TypeError``.

    The selected submodules of each network become their own FSDP2 groups
    (innermost first, as ``fully_shard`` wants), then each network a group of
    its own, all with the same arguments; so every parameter of the target is
    a DTensor laid out like its online twin, and the momentum update stays on
    each rank's local shards. Call it after
    :meth:`~momentum_hook.MomentumTargetMixin.init_momentum_target` and
    before ``fully_shard`` of the model that holds both::

        mesh = init_device_mesh('cuda', (world_size,))
        fully_shard_pair(online=model.online_net, target=model.target_net,
                         submodules=Block, mesh=mesh)
        fully_shard(model, mesh=mesh)

    Args:
        online (nn.Module): The online network, not sharded yet.
        target (nn.Module): Its target, the same architecture (a copy made
            before any wrapping), not sharded yet.
        submodules (type | tuple[type] | Callable | None): Which submodules
            become groups of their own: module classes (e.g. a transformer
            block), or a predicate ``(name, module) -> bool`` called on the
            online network's submodules. Defaults to None: each network is
            one group.
        **fully_shard_kwargs: Passed to every ``fully_shard`` call:
            ``mesh``, ``reshard_after_forward``, ``mp_policy``,
            ``offload_policy``, ``shard_placement_fn``...

    Returns:
        tuple[nn.Module, nn.Module]: ``(online, target)``, sharded in place.

    Raises:
        TypeError: If a network is not an ``nn.Module`` or ``submodules`` is
            of an unknown kind.
        ValueError: If the two networks differ in their parameters' names
            or shapes, or share memory, before anything is sharded.
    """
    for name, network in (('online', online), ('target', target)):
        if not isinstance(network, nn.Module):
            raise TypeError(
                f'{name} must be an nn.Module, got {type(network).__name__}'
            )
    # By name, as the update pairs them; on the meta device too (the
    # large-model recipe shards before it materialises).
    targets = local_shards(target, meta=True)
    onlines = pair_by_name(targets, local_shards(online, meta=True))
    check_alike(targets, onlines)
    selected = _selector(submodules)
    names = [
        name
        for name, module in online.named_modules()
        if name and selected(name, module)
    ]
    targets = dict(target.named_modules())
    missing = [name for name in names if name not in targets]
    if missing:
        raise ValueError(
            f'the target has no submodule {missing[0]!r}: it '
            'must be a copy of the online network'
        )
    from torch.distributed.fsdp import fully_shard

    for name in reversed(names):  # innermost first
        fully_shard(online.get_submodule(name), **fully_shard_kwargs)
        fully_shard(targets[name], **fully_shard_kwargs)
    fully_shard(online, **fully_shard_kwargs)
    fully_shard(target, **fully_shard_kwargs)
    return online, target
