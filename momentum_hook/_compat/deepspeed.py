"""The DeepSpeed ZeRO-3 attributes momentum_hook reads and writes.

DeepSpeed keeps a ZeRO-3 parameter's state in ``ds_*`` attributes on the
parameter (its partition ``ds_tensor``, its full shape ``ds_shape``, the
ZeRO++ secondary partition ``ds_secondary_tensor``, ...); they are touched
here and nowhere else. Nothing here imports DeepSpeed: a parameter can only
be a ZeRO-3 parameter once DeepSpeed is imported.
"""

import sys

from . import missing_attribute, release

__all__ = [
    'is_zero3_param',
    'partition',
    'secondary_partition',
    'drop_secondary_partition',
    'is_quantized',
    'is_persistent',
    'full_shape',
    'full_numel',
    'process_group',
    'hpz_group',
    'is_gathered',
    'release_gathered',
    'gathered_parameters',
    'version',
    'version_text',
]


def _deepspeed():
    return sys.modules['deepspeed']


def version_text():
    """The installed DeepSpeed's version string (DeepSpeed imported)."""
    return _deepspeed().__version__


def version():
    """The installed DeepSpeed's release, e.g. ``(0, 19, 6)``."""
    return release(version_text())


def _attribute(param, name):
    try:
        return getattr(param, name)
    except AttributeError:
        raise missing_attribute(
            'deepspeed', version_text(), 'Parameter', name
        ) from None


def is_zero3_param(tensor):
    """Whether ``tensor`` is a DeepSpeed ZeRO-3 parameter (has a
    partition attribute)."""
    return hasattr(tensor, 'ds_tensor')


def partition(param):
    """This rank's partition of a ZeRO-3 parameter (may be None)."""
    return _attribute(param, 'ds_tensor')


def secondary_partition(param):
    """The ZeRO++ hpZ secondary partition of a ZeRO-3 parameter, or None."""
    return getattr(param, 'ds_secondary_tensor', None)


def drop_secondary_partition(param):
    """Drop a parameter's hpZ secondary partition, as DeepSpeed does for a
    trained parameter after an optimizer step."""
    if getattr(param, 'ds_secondary_tensor', None) is not None:
        param.ds_secondary_tensor = None


def is_quantized(tensor):
    """Whether ZeRO++ stores ``tensor`` (a partition) quantized."""
    return hasattr(tensor, 'ds_quant_scale')


def is_persistent(param):
    """Whether the parameter keeps a gathered copy between steps."""
    return bool(getattr(param, 'ds_persist', False))


def full_shape(param):
    """The parameter's full shape, as a tuple."""
    return tuple(_attribute(param, 'ds_shape'))


def full_numel(param):
    """The parameter's full number of elements."""
    return _attribute(param, 'ds_numel')


def process_group(param):
    """The process group the parameter is partitioned over (None: the
    default group)."""
    return getattr(param, 'ds_process_group', None)


def hpz_group(param):
    """The ZeRO++ hpZ group of the parameter, or None without hpZ."""
    return getattr(param, 'ds_zero_param_process_group', None)


def is_gathered(param):
    """Whether the parameter's ``data`` holds the whole tensor now (else a
    0-element placeholder)."""
    return tuple(param.data.shape) == full_shape(param)


def release_gathered(params):
    """Free the gathered copies of ``params``; DeepSpeed re-gathers them
    from their partitions when a forward next needs them."""
    if params:
        params[0].partition(param_list=params)


def gathered_parameters(params):
    """``deepspeed.zero.GatheredParameters(params)``: a context in which
    ``params`` are whole on every rank (a collective)."""
    return _deepspeed().zero.GatheredParameters(params)
