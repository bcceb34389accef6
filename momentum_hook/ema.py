"""The momentum (EMA) update of a target network, free of any framework.

``target = m * target + (1 - m) * online``, computed in place as
``target.lerp_(online, 1 - m)``: one read of each network and one write of
the target, the least memory traffic the update allows.

The tensors are each rank's local shards (:mod:`~momentum_hook.local_shards`),
grouped by device and dtype; each group is updated by one
``torch._foreach_lerp_`` (a few more ``torch._foreach`` calls where the
online tensors need converting, :mod:`~momentum_hook.kernels`), a few
kernel launches for the whole group. The
user's tensors are never moved, re-laid out or re-allocated. Nothing here
synchronises host and device in a regular update: the momentum is a Python
float.

A float16/bfloat16 target tensor is updated through a float32 master of it
(:class:`~momentum_hook.masters.TargetMasters`, kept by
:class:`~momentum_hook.ModuleUpdatePlan` and
:class:`~momentum_hook.MomentumTargetMixin`): the lerp runs in float32 and
the target receives the rounded result. The stateless
:func:`momentum_update_` refuses such a target. Only after the target was
written elsewhere (a load) are masters and targets compared, on the host.
"""

from collections.abc import Sequence

import torch
from torch import nn

from .kernels import lerp_gathered, plan_lerp, run_lerp
from .local_shards import check_alike, tensor_shard
from .masters import refuse_low_precision
from .plan import (
    BUFFER_POLICIES,
    check_buffer_policy,
    check_frozen,
    stateless_plan,
    trainable,
)
from .validation import check_momentum
from .zero import (
    drop_secondary_partitions,
    gathered_copies,
    secondary_partitions,
)

__all__ = ['BUFFER_POLICIES', 'momentum_update_']


def _as_tensor_list(tensors, name):
    if isinstance(tensors, torch.Tensor) or not hasattr(tensors, '__iter__'):
        raise TypeError(
            f'{name} must be an nn.Module or a sequence of '
            f'tensors, got {type(tensors).__name__}'
        )
    tensors = list(tensors)
    for index, tensor in enumerate(tensors):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(
                f'{name}[{index}] must be a tensor, got '
                f'{type(tensor).__name__}'
            )
    return tensors


@torch.no_grad()
def momentum_update_(
    target: nn.Module | Sequence[torch.Tensor],
    online: nn.Module | Sequence[torch.Tensor],
    momentum: float,
    buffers: str = 'keep',
) -> None:
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
        online (nn.Module | Sequence[Tensor]): The online network, with the
            same parameter names (wrapper attributes such as ``module.`` or
            ``_orig_mod.`` left out; see
            :func:`~momentum_hook.pairing.pair_by_name`), shapes and
            sharding; or its tensors, in the same order.
        momentum (float): The weight of the old target, in [0, 1]: 1 keeps the
            target, 0 copies the online network.
        buffers (str): For modules, what to do with the target's buffers, one
            of :data:`BUFFER_POLICIES`. Defaults to ``'keep'``.

    Raises:
        TypeError: If ``target``/``online`` are not both modules or both
            tensor sequences, or ``momentum`` is not a real number.
        ValueError: If the two differ in names, count, shape or sharding, share
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
        raise TypeError(
            'target and online must both be nn.Modules or both '
            f'tensor sequences, got {type(target).__name__} and '
            f'{type(online).__name__}'
        )
    if modules[0]:
        stateless_plan(target, online, buffers).update_(momentum)
        return
    if buffers != 'keep':
        raise ValueError(
            f'buffers={buffers!r} needs nn.Modules, got tensor sequences'
        )
    targets, onlines = (
        [
            tensor_shard(f'{name}[{index}]', tensor)
            for index, tensor in enumerate(_as_tensor_list(tensors, name))
        ]
        for name, tensors in (('target', target), ('online', online))
    )
    check_alike(targets, onlines, what='tensors')
    check_frozen(
        list(map(trainable, targets)), [shard.name for shard in targets]
    )
    refuse_low_precision(
        [shard.name for shard in targets], [shard.tensor for shard in targets]
    )
    run_lerp(
        plan_lerp(
            [shard.tensor for shard in targets],
            [shard.tensor for shard in onlines],
        ),
        1.0 - momentum,
    )
    lerp_gathered(gathered_copies(targets, onlines), 1.0 - momentum)
    drop_secondary_partitions(secondary_partitions(targets))
