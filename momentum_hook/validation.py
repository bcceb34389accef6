"""Argument checks shared by the schedule, the EMA and both runner adapters.

Every check raises early with the argument's name and its bad value, and
never uses ``assert`` (which ``python -O`` removes).
"""

import inspect
import math
import numbers
import os
import warnings

from ._compat.torch import NO_GRAD_DECORATOR

__all__ = [
    'check_momentum',
    'check_positive_int',
    'check_non_negative_int',
    'check_kappa',
]

#: Whether :func:`check_momentum` has warned about a momentum below 0.5 in
#: this process; it warns once.
_warned_small_momentum = False


_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep
_DECORATOR = os.path.join(*NO_GRAD_DECORATOR)


def _caller_stacklevel():
    """The ``stacklevel`` of the first frame outside this package (and
    torch's ``no_grad`` decorator), for a warning issued by our caller."""
    frame, level = inspect.currentframe().f_back.f_back, 2
    while frame is not None and (
        frame.f_code.co_filename.startswith(_PACKAGE)
        or frame.f_code.co_filename.endswith(_DECORATOR)
    ):
        frame, level = frame.f_back, level + 1
    return level


def _warn_small_momentum(value, name):
    global _warned_small_momentum
    _warned_small_momentum = True
    warnings.warn(
        f'{name}={value!r} is below 0.5, so each update keeps less of the old '
        'target than it takes from the online network. Here the momentum m '
        'weighs the old target, target = m * target + (1 - m) * online, as '
        "in BYOL and MoCo; MMEngine's EMAHook(momentum=x) and "
        'ExponentialMovingAverage(momentum=x) weigh the new value, so their '
        f'momentum=x is m = 1 - x here (momentum={value!r} there is '
        f'm={1 - value!r}). This warning is shown once.',
        UserWarning,
        stacklevel=_caller_stacklevel(),
    )


def check_momentum(
    value: object, name: str = 'momentum', warn_small: bool = True
) -> float:
    """Return ``value`` as a float after checking it is a real number in
    [0, 1].

    Args:
        value: The candidate momentum. ``bool`` is rejected although it is an
            ``int``: ``True`` as a momentum is always a mistake.
        name (str): The argument name used in the error message.
        warn_small (bool): Warn for a value in (0, 0.5). The places where a
            user sets a momentum warn; the per-update path does not, since
            the hook writes computed values there, and the EMA scaling rule
            (``m ** kappa``) can rightly go below 0.5. Defaults to True.

    Returns:
        float: ``value`` converted to a Python float.

    Raises:
        TypeError: If ``value`` is not a real number (strings, ``None`` and
            ``bool`` included).
        ValueError: If ``value`` is NaN or outside [0, 1].

    Warns:
        UserWarning: Once per process, for a value in (0, 0.5): almost always
            MMEngine's convention (the weight of the new value) written into
            this package's, where m weighs the old target.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f'{name} must be a real number in [0, 1], '
            f'got {value!r} of type {type(value).__name__}'
        )
    value = float(value)
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise ValueError(
            f'{name} must be a real number in [0, 1], got {value!r}'
        )
    if warn_small and 0.0 < value < 0.5 and not _warned_small_momentum:
        _warn_small_momentum(value, name)
    return value


def _check_int(value, name, minimum, wording):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f'{name} must be {wording}, got {value!r} of type '
            f'{type(value).__name__}'
        )
    if value < minimum:
        raise ValueError(f'{name} must be {wording}, got {value!r}')
    return int(value)


def check_positive_int(
    value: object, name: str, hint: str | None = None
) -> int:
    """Return ``value`` as an int after checking it is an integer >= 1.

    Args:
        value: The candidate.
        name (str): The argument name used in the error message.
        hint (str, optional): What the argument means and what to pass,
            added to the error message.

    Raises:
        TypeError: If ``value`` is not an integer (``bool`` and ``1.0``
            included).
        ValueError: If ``value`` is smaller than 1.
    """
    wording = 'a positive int' + (f' ({hint})' if hint else '')
    return _check_int(value, name, 1, wording)


def check_non_negative_int(value: object, name: str) -> int:
    """Return ``value`` as an int after checking it is an integer >= 0.

    Raises:
        TypeError: If ``value`` is not an integer (``bool`` included).
        ValueError: If ``value`` is negative.
    """
    return _check_int(value, name, 0, 'a non-negative int')


def check_kappa(value: object, name: str = 'kappa') -> float:
    """Return ``value`` as a float after checking it is a finite real > 0.

    Args:
        value: The candidate batch-size ratio: the samples per update now
            over the samples per update the momentum was tuned for.
        name (str): The argument name used in the error message.

    Raises:
        TypeError: If ``value`` is not a real number (strings, ``None`` and
            ``bool`` included).
        ValueError: If ``value`` is NaN, infinite, zero or negative.
    """
    wording = (
        'a finite real number > 0 (the samples per update over the '
        'samples per update the momentum was tuned for)'
    )
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f'{name} must be {wording}, got {value!r} of type '
            f'{type(value).__name__}'
        )
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f'{name} must be {wording}, got {value!r}')
    return value
