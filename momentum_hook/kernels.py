"""The kernels of one update: a few ``torch._foreach`` ops per group.

:func:`plan_lerp` groups the (target, online) tensor pairs by device and
dtype once, when a plan is made, into a short list of ``torch._foreach``
calls; :func:`run_lerp` then makes those calls at every update. Their number
depends on the groups only, never on how many tensors a group holds or how
large they are (one call, one CUDA multi-tensor launch or a few):

- ``'foreach'``, online tensors of the target's device and dtype: one
  ``torch._foreach_lerp_(targets, onlines, w)``.
- ``'master'``, a float16/bfloat16 target with float32 masters
  (:mod:`.masters`): ``torch._foreach_lerp_(masters, onlines, w)`` (online
  tensors converted to float32 first, see below), then
  ``torch._foreach_copy_(targets, masters)``, which rounds each master once
  into its target.
- ``'cast'``, online tensors of another device or dtype than a float32 (or
  float64) target: converted, then ``torch._foreach_lerp_(targets, ...)``.

``torch._foreach_lerp_`` takes tensors of one dtype, so online tensors of
another dtype or device are first converted with ``torch._foreach_copy_``
into a float32 (the lerped side's dtype) scratch buffer, which the plan
allocates once: at most a quarter of the group's elements (at least
:data:`_MIN_PIECE`), so the group is lerped in at most :data:`_PIECES`
pieces, two calls each. Of torch's multi-tensor kernels only
``_foreach_copy_`` takes two dtypes on its CUDA fast path
(``_foreach_add_`` of bfloat16 into float32 falls back to one kernel per
tensor, and on a CPU converts each tensor into a temporary), so the
conversion is a copy. The result is the same as converting each online
tensor and lerping it, bit for bit.
"""

import math

import torch

from .masters import LOW_PRECISION
from .zero import available_copies

__all__ = ['plan_lerp', 'run_lerp', 'lerp_gathered']

#: The most pieces a converted group is lerped in: the scratch buffer holds
#: ``1 / _PIECES`` of the group (1 byte per element of a float32 scratch),
#: and the group costs ``2 * _PIECES`` calls, plus one copy into the
#: targets for masters.
_PIECES = 4
#: The fewest elements of one piece, so that a small group is one piece
#: (and one scratch of at most 256 KiB in float32).
_MIN_PIECE = 1 << 16

_LERP, _COPY = 'lerp', 'copy'


def _grouped(targets, onlines, masters):
    groups = {}
    for target, online, master in zip(targets, onlines, masters):
        key = (target.device, target.dtype, online.device, online.dtype)
        group = groups.setdefault(key, ([], [], []))
        group[0].append(target)
        group[1].append(online)
        group[2].append(master)
    return groups


def _memory_order(tensor):
    """The dims of ``tensor`` from the largest stride down, when in that
    order it is contiguous (dense, no overlap); otherwise None."""
    order = sorted(range(tensor.dim()), key=lambda dim: -tensor.stride(dim))
    return order if tensor.permute(order).is_contiguous() else None


def _flat(lerped, online):
    """Both as 1-d views in their memory order, or None if they cannot be:
    each dense and non-overlapping, with the same strides."""
    if lerped.stride() != online.stride() or lerped.dim() == 0:
        return None
    order = _memory_order(lerped)
    if order is None:
        return None
    return [
        tensor.detach().permute(order).view(-1) for tensor in (lerped, online)
    ]


def _scratch_view(buffer, start, like):
    """``like.numel()`` elements of ``buffer`` from ``start``, laid out like
    ``like`` where it is dense (so that CUDA's fast path takes the pair)."""
    piece = buffer[start : start + like.numel()]
    if _memory_order(like) is not None:
        return piece.as_strided(like.shape, like.stride())
    return piece.view(like.shape)


def _converted(lerped, onlines):
    """The calls that lerp ``lerped`` towards ``onlines`` of another dtype
    or device, through a scratch buffer of ``lerped``'s dtype and device.

    The group is cut at every ``size`` elements (``size``: a quarter of the
    group, at least :data:`_MIN_PIECE`) into at most :data:`_PIECES` pieces;
    a tensor that cannot be viewed flat (:func:`_flat`) goes whole into the
    piece where it starts. Each piece is one ``_foreach_copy_`` into the
    scratch and one ``_foreach_lerp_`` from it.
    """
    total = sum(tensor.numel() for tensor in lerped)
    size = max(_MIN_PIECE, math.ceil(total / _PIECES))
    pieces, offset = {}, 0
    for tensor, online in zip(lerped, onlines):
        flat, numel = _flat(tensor, online), tensor.numel()
        if flat is None:
            pieces.setdefault(offset // size, []).append((tensor, online))
        else:
            start = 0
            while start < numel:
                stop = min(
                    numel, (offset + start) // size * size + size - offset
                )
                pieces.setdefault((offset + start) // size, []).append(
                    (flat[0][start:stop], flat[1][start:stop])
                )
                start = stop
        offset += numel
    if not pieces:  # every tensor empty (e.g. ZeRO-3 partitions)
        return []
    buffer = torch.empty(
        max(
            sum(pair[0].numel() for pair in piece) for piece in pieces.values()
        ),
        dtype=lerped[0].dtype,
        device=lerped[0].device,
    )
    calls = []
    for index in sorted(pieces):
        dst, src = map(list, zip(*pieces[index]))
        scratch, start = [], 0
        for tensor in dst:
            scratch.append(_scratch_view(buffer, start, tensor))
            start += tensor.numel()
        calls += [(_COPY, scratch, src), (_LERP, dst, scratch)]
    return calls


@torch.no_grad()
def plan_lerp(targets, onlines, masters=None):
    """The calls that lerp ``targets`` towards ``onlines``, as a list.

    Args:
        targets (list[Tensor]): The local target tensors.
        onlines (list[Tensor]): The local online tensors, in the same order
            and shapes.
        masters (list[Tensor | None]): Parallel to ``targets``: the float32
            master of each float16/bfloat16 target tensor (a local tensor,
            on its target's device, laid out like it), or None. Defaults to
            none.

    Returns:
        list[tuple]: ``(op, dst, src)`` for :func:`run_lerp`, ``op`` one of
        ``'lerp'`` (``torch._foreach_lerp_(dst, src, w)``) and ``'copy'``
        (``torch._foreach_copy_(dst, src)``): per device/dtype group one
        call for a ``'foreach'`` group, two for a ``'master'`` group whose
        online tensors are float32 on the same device, and up to
        ``2 * _PIECES`` (+1 for masters) for a group whose online tensors
        must be converted (see the module doc).
    """
    masters = [None] * len(targets) if masters is None else masters
    calls = []
    for (_device, dtype, online_device, online_dtype), group in _grouped(
        targets, onlines, masters
    ).items():
        group_targets, group_onlines, group_masters = group
        master = dtype in LOW_PRECISION and group_masters[0] is not None
        lerped = group_masters if master else group_targets
        same = (lerped[0].device, lerped[0].dtype) == (
            online_device,
            online_dtype,
        )
        if same:
            calls.append((_LERP, lerped, group_onlines))
        else:
            calls += _converted(lerped, group_onlines)
        if master:
            calls.append((_COPY, group_targets, group_masters))
    return calls


def run_lerp(calls, weight):
    """Make the calls of :func:`plan_lerp` with lerp weight ``weight``
    (``1 - momentum``)."""
    for op, dst, src in calls:
        if op is _LERP:
            torch._foreach_lerp_(dst, src, weight)
        else:
            torch._foreach_copy_(dst, src)


def lerp_gathered(pairs, weight, masters=None):
    """Lerp the gathered copies of persistent ZeRO-3 pairs, when there.

    Low-precision copies go through their float32 masters in ``masters``
    (a :class:`TargetMasters`).
    """
    targets, onlines = available_copies(pairs)
    if targets:
        copies = None if masters is None else masters.for_copies(targets)
        run_lerp(plan_lerp(targets, onlines, copies), weight)
