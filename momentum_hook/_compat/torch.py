"""The private torch attributes momentum_hook reads, and nothing else.

torch has no public API for an FSDP1 unit's flat shard and its layout, a
DTensor's local tensor without autograd, or a tensor's version counter;
they are read here. Nothing here imports a distributed package: FSDP1's
internals are looked up only once ``torch.distributed.fsdp`` is imported.
"""

import importlib
import sys

import torch

from . import missing_attribute

__all__ = [
    'internal',
    'version_counter',
    'dtensor_local',
    'fsdp1_flat_param',
    'flat_param_layout',
    'flat_param_members',
    'flat_param_padding',
    'flat_param_shard',
    'is_fsdp1_flattened',
    'is_flat_param',
    'module_slots',
    'wrapped_attribute',
    'WRAPPER_ATTRIBUTES',
    'view_base',
    'NO_GRAD_DECORATOR',
]

#: The file of torch's ``no_grad`` decorator, whose frames a warning skips.
NO_GRAD_DECORATOR = ('torch', 'utils', '_contextlib.py')


def internal(obj, name):
    """``obj.name``, a private torch attribute.

    Raises:
        RuntimeError: Naming the attribute, the torch version and the tested
            range, where this torch lacks it.
    """
    try:
        return getattr(obj, name)
    except AttributeError:
        raise missing_attribute(
            'torch', torch.__version__, type(obj).__name__, name
        ) from None


def version_counter(tensor):
    """``tensor._version``: moved by every in-place write to its storage."""
    return internal(tensor, '_version')


def dtensor_local(tensor):
    """The local tensor of a DTensor, what ``to_local()`` views, without
    autograd."""
    return internal(tensor, '_local_tensor')


def _fsdp1(module_name, name):
    """torch's ``module_name.name`` once FSDP is imported, else None (no
    tensor can then belong to an FSDP1 unit)."""
    if 'torch.distributed.fsdp' not in sys.modules:
        return None
    return internal(importlib.import_module(module_name), name)


def is_fsdp1_flattened(tensor):
    """Whether FSDP1 flattened ``tensor`` into a unit (torch's own test)."""
    flattened = _fsdp1(
        'torch.distributed.fsdp._common_utils', '_is_fsdp_flattened'
    )
    return flattened is not None and flattened(tensor)


def is_flat_param(tensor):
    """Whether ``tensor`` is an FSDP1 ``FlatParameter`` (torch's own test)."""
    flat_param = _fsdp1('torch.distributed.fsdp._flat_param', 'FlatParameter')
    return flat_param is not None and isinstance(tensor, flat_param)


def fsdp1_flat_param(unit):
    """An FSDP1 unit's ``FlatParameter``, or None for a unit without one."""
    return internal(unit, '_flat_param')


def flat_param_members(flat):
    """The original parameters a ``FlatParameter`` holds (may be None)."""
    return internal(flat, '_params')


def flat_param_layout(flat):
    """``(names, shapes, numels with padding)`` of a ``FlatParameter``."""
    return (
        tuple(internal(flat, '_fqns')),
        tuple(tuple(shape) for shape in internal(flat, '_shapes')),
        tuple(internal(flat, '_numels_with_padding')),
    )


def flat_param_padding(flat):
    """Whether each entry of ``flat_param_layout``'s numels is alignment
    padding rather than a parameter."""
    return tuple(internal(flat, '_is_padding_mask'))


def flat_param_shard(flat):
    """This rank's shard of a ``FlatParameter`` (its ``_local_shard`` once
    FSDP has initialised lazily), else the ``FlatParameter`` itself."""
    return getattr(flat, '_local_shard', flat)


def module_slots(module, buffers):
    """The dicts in which ``module`` holds its own parameters and
    submodules (and buffers, if ``buffers``): replacing an entry of one is
    how an attribute assignment changes the module."""
    slots = [internal(module, '_parameters'), internal(module, '_modules')]
    if buffers:
        slots.append(internal(module, '_buffers'))
    return slots


#: The attributes under which wrappers hold the one module they wrap: DDP,
#: DataParallel, DeepSpeed's engine and MMEngine's and mmcv's wrappers
#: (``module``), FSDP1 (``_fsdp_wrapped_module``), ``checkpoint_wrapper``
#: (``_checkpoint_wrapped_module``) and ``torch.compile``
#: (``_orig_mod``). They prefix the names of everything inside.
WRAPPER_ATTRIBUTES = frozenset(
    {
        'module',
        '_fsdp_wrapped_module',
        '_checkpoint_wrapped_module',
        '_orig_mod',
    }
)


def wrapped_attribute(module):
    """The attribute under which ``module`` wraps another, or None.

    A wrapper holds one submodule, under one of
    :data:`WRAPPER_ATTRIBUTES`, and no parameter or buffer of its own, so
    that leaving its attribute out of a name never makes two names one.
    """
    parameters, modules, buffers = module_slots(module, True)
    if parameters or buffers or len(modules) != 1:
        return None
    name = next(iter(modules))
    return name if name in WRAPPER_ATTRIBUTES else None


def view_base(value):
    """The tensor that ``value`` views (``value._base``), or None."""
    return (
        getattr(value, '_base', None)
        if isinstance(value, torch.Tensor)
        else None
    )
