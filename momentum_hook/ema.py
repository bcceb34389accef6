"""The momentum (EMA) update of a target network, free of any framework.

``target = m * target + (1 - m) * online``, computed in place as
``target.lerp_(online, 1 - m)``: one read of each network and one write of
the target, the least memory traffic the update allows.

Speed comes from the layout of the weights, which this module leaves to the
caller and detects on every call:

- tensors are grouped by device and dtype and each group is updated by one
  ``torch._foreach_lerp_`` (a few kernel launches for the whole group);
- a group whose target tensors and online tensors are each laid out back to
  back in one storage (see :func:`flatten_parameters_`) is updated by a single
  ``lerp_`` over that flat memory, the bandwidth limit on a GPU.

Nothing here synchronises host and device: the momentum is a Python float.
"""
import warnings

import torch
from torch import nn

from .validation import check_momentum

__all__ = [
    'BUFFER_POLICIES', 'momentum_update_', 'flatten_parameters_',
    'ModuleUpdatePlan'
]

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


def _check_pairs(targets, onlines, what):
    if len(targets) != len(onlines):
        raise ValueError(f'target has {len(targets)} {what} but online has '
                         f'{len(onlines)}: they must be the same network')
    for index, (target, online) in enumerate(zip(targets, onlines)):
        if target.shape != online.shape:
            raise ValueError(
                f'{what} {index} differs in shape: target '
                f'{tuple(target.shape)} vs online {tuple(online.shape)}')


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


def _flat(tensors):
    """One 1-D view over ``tensors`` if they lie back to back, else None."""
    first = tensors[0]
    size = first.element_size()
    pointer = first.data_ptr()
    total = 0
    for tensor in tensors:
        if tensor.data_ptr() != pointer + total * size or \
                not tensor.is_contiguous():
            return None
        total += tensor.numel()
    end = (first.storage_offset() + total) * size
    if end > first.untyped_storage().nbytes():
        return None  # consecutive addresses, but not one storage
    return first.as_strided((total, ), (1, ))


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
    with kind ``'flat'`` (one ``lerp_`` over the group's flat memory),
    ``'foreach'`` (one ``_foreach_lerp_``) or ``'cast'`` (online tensors on
    another device or dtype, converted one by one).
    """
    steps = []
    for (device, dtype, online_device, online_dtype), (group_t, group_o) in \
            _grouped(targets, onlines).items():
        if (device, dtype) != (online_device, online_dtype):
            steps.append(('cast', group_t, group_o, dtype))
            continue
        flat_t, flat_o = _flat(group_t), _flat(group_o)
        if flat_t is not None and flat_o is not None:
            steps.append(('flat', flat_t, flat_o, dtype))
        else:
            steps.append(('foreach', group_t, group_o, dtype))
    return steps


def _run_lerp(steps, weight):
    for kind, target, online, dtype in steps:
        if dtype in _LOW_PRECISION:
            _warn_if_lost(dtype, weight)
        if kind == 'flat':
            target.lerp_(online, weight)
        elif kind == 'foreach':
            torch._foreach_lerp_(target, online, weight)
        else:
            for target_tensor, online_tensor in zip(target, online):
                target_tensor.lerp_(
                    online_tensor.to(device=target_tensor.device, dtype=dtype),
                    weight)


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


# Counts parameter, buffer and submodule (re)assignments on any module, so
# that a ModuleUpdatePlan notices one without walking its modules again.
_registrations = [0]


def _count_registration(module, name, value):
    _registrations[0] += 1


for _register in (
        nn.modules.module.register_module_parameter_registration_hook,
        nn.modules.module.register_module_buffer_registration_hook,
        nn.modules.module.register_module_module_registration_hook):
    _register(_count_registration)


class ModuleUpdatePlan:
    """:func:`momentum_update_` for one (target, online) module pair, planned.

    Planning walks both modules, checks them, groups their tensors and finds
    the flat ones; :meth:`update_` then only launches the planned kernels.
    :meth:`is_current` says, cheaply, whether the plan still describes the
    modules: no parameter, buffer or submodule was assigned on any module
    since (``module.x = ...``, ``load_state_dict(assign=True)``) and every
    parameter still has the storage address it was planned with (a
    ``.to()``, ``.cuda()`` or ``.data = ...`` moves it). Storage moves that
    keep parameter objects and addresses are undetectable here; callers that
    move modules (``.to()`` with buffers) make a new plan, as
    :class:`~momentum_hook.MomentumTargetMixin` does in ``_apply``.

    Args:
        target (nn.Module): The target network.
        online (nn.Module): The online network, the same architecture.
        buffers (str): One of :data:`BUFFER_POLICIES`.

    Raises:
        ValueError: If the modules differ in parameter or (for ``'copy'`` and
            ``'average'``) buffer count or shapes.
    """

    def __init__(self, target, online, buffers='keep'):
        check_buffer_policy(buffers)
        self.buffers = buffers
        self.registrations = _registrations[0]
        targets, onlines = list(target.parameters()), list(online.parameters())
        _check_pairs(targets, onlines, 'parameters')
        self.buffer_pairs = None
        if buffers != 'keep':  # checked before anything is written
            self.buffer_pairs = (list(target.buffers()), list(online.buffers()))
            _check_pairs(*self.buffer_pairs, 'buffers')
        self.params = targets + onlines
        self.addresses = [param.data_ptr() for param in self.params]
        self.steps = _plan_lerp(targets, onlines)

    def is_current(self):
        """Whether the plan still matches the modules (see the class doc)."""
        return (self.registrations == _registrations[0] and
                [param.data_ptr() for param in self.params] == self.addresses)

    @torch.no_grad()
    def update_(self, momentum):
        """``target = momentum * target + (1 - momentum) * online``."""
        momentum = check_momentum(momentum)
        _run_lerp(self.steps, 1.0 - momentum)
        if self.buffer_pairs is not None:
            _update_buffers(*self.buffer_pairs, momentum, self.buffers)


@torch.no_grad()
def momentum_update_(target, online, momentum, buffers='keep'):
    """In place, ``target = momentum * target + (1 - momentum) * online``.

    Args:
        target (nn.Module | Sequence[Tensor]): The target network, or its
            tensors; updated in place.
        online (nn.Module | Sequence[Tensor]): The online network, or its
            tensors, in the same order and shapes.
        momentum (float): The weight of the old target, in [0, 1]: 1 keeps the
            target, 0 copies the online network.
        buffers (str): For modules, what to do with the target's buffers, one
            of :data:`BUFFER_POLICIES`. Defaults to ``'keep'``.

    Raises:
        TypeError: If ``target``/``online`` are not both modules or both
            tensor sequences, or ``momentum`` is not a real number.
        ValueError: If the two differ in count or shape, ``momentum`` is
            outside [0, 1] or ``buffers`` is unknown.

    Warns:
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
        ModuleUpdatePlan(target, online, buffers).update_(momentum)
        return
    if buffers != 'keep':
        raise ValueError(f'buffers={buffers!r} needs nn.Modules, got tensor '
                         'sequences')
    targets = _as_tensor_list(target, 'target')
    onlines = _as_tensor_list(online, 'online')
    _check_pairs(targets, onlines, 'tensors')
    _run_lerp(_plan_lerp(targets, onlines), 1.0 - momentum)


@torch.no_grad()
def flatten_parameters_(module):
    """Lay ``module``'s parameters back to back in one buffer per device/dtype.

    Each parameter keeps its identity (optimizers and DDP hold the same
    ``Parameter`` objects) and its values; only its ``.data`` becomes a view
    into the flat buffer, so that :func:`momentum_update_` updates the whole
    group with one ``lerp_``. In-place writes (``load_state_dict``, optimizer
    steps) keep the layout; anything that replaces ``.data`` (``.to()``,
    ``.cuda()``, ``load_state_dict(assign=True)``) breaks it, which
    :func:`momentum_update_` detects and handles on the slower path until this
    function is called again. :class:`~momentum_hook.MomentumTargetMixin`
    calls it again after every device or dtype move.

    Args:
        module (nn.Module): The module; its parameters' gradients are left
            alone.

    Returns:
        nn.Module: ``module``.
    """
    groups = {}
    for param in module.parameters():
        groups.setdefault((param.device, param.dtype), []).append(param)
    for (device, dtype), params in groups.items():
        if _flat([p.data for p in params]) is not None:
            continue
        flat = torch.empty(sum(p.numel() for p in params), device=device,
                           dtype=dtype)
        offset = 0
        for param in params:
            view = flat[offset:offset + param.numel()].view_as(param)
            view.copy_(param.data)
            param.data = view
            offset += param.numel()
    return module
