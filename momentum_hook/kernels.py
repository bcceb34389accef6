"""The lerp kernels of one update, grouped by device and dtype.

:func:`plan_lerp` groups the (target, online) tensor pairs once, when a plan
is made; :func:`run_lerp` then launches the group's kernels at every update:
one ``torch._foreach_lerp_`` for a group whose online tensors share the
target's device and dtype, a conversion per tensor for one that does not, and
for a float16/bfloat16 target with float32 masters (:mod:`.masters`) the
master update in cache-sized blocks.
"""
import torch

from .masters import LOW_PRECISION
from .zero import available_copies

__all__ = ['plan_lerp', 'run_lerp', 'lerp_gathered']


#: The elements of one block of a master update: the online block is cast
#: into a float32 scratch buffer of this size, lerped into the master and the
#: master block rounded into the target while the block is still in cache.
_BLOCK = 1 << 16


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


def plan_lerp(targets, onlines, masters=None):
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
        if dtype in LOW_PRECISION and group[2][0] is not None:
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


def run_lerp(steps, weight):
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


def lerp_gathered(pairs, weight, masters=None):
    """Lerp the gathered copies of persistent ZeRO-3 pairs, when there.

    Low-precision copies go through their float32 masters in ``masters``
    (a :class:`TargetMasters`).
    """
    targets, onlines = available_copies(pairs)
    if targets:
        copies = None if masters is None else masters.for_copies(targets)
        run_lerp(plan_lerp(targets, onlines, copies), weight)

