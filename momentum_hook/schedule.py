"""The cosine momentum schedule of BYOL / MoCo v3, free of any framework.

Convention used throughout the package: the momentum ``m`` is the weight of
the *old target* weights, ``target = m * target + (1 - m) * online``. A
momentum of 1 freezes the target; 0 copies the online network into it.
"""

import math

from .validation import (
    check_kappa,
    check_momentum,
    check_non_negative_int,
    check_positive_int,
)

__all__ = [
    'cosine_momentum',
    'scaled_momentum',
    'is_update_iter',
    'last_update_iter',
]


def cosine_momentum(
    cur_iter: int, max_iters: int, base_momentum: float, end_momentum: float
) -> float:
    """Momentum at 0-based iteration ``cur_iter`` of ``max_iters``.

    .. math::

        m = m_{end} - (m_{end} - m_{base}) \\cdot
            \\frac{\\cos(\\pi k / K) + 1}{2}

    with :math:`k` = ``cur_iter`` and :math:`K` = ``max_iters``. This is the
    formula of MMSelfSup 0.x's ``MomentumUpdateHook``, evaluated in the same
    order of floating-point operations, so the values are bit for bit the
    same. A run's last iteration is ``k = K - 1``, so the schedule never
    reaches ``end_momentum`` inside a run; ``cur_iter >= max_iters`` returns
    ``end_momentum`` exactly.

    Args:
        cur_iter (int): The 0-based iteration, ``runner.iter``.
        max_iters (int): The number of iterations of the run (>= 1).
        base_momentum (float): The momentum at iteration 0, in [0, 1].
        end_momentum (float): The momentum the cosine rises to, in [0, 1].

    Returns:
        float: The momentum, a plain Python float.

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If an argument is out of range.

    Example:
        >>> cosine_momentum(cur_iter=0, max_iters=100, base_momentum=0.99,
        ...                 end_momentum=1.0)
        0.99
    """
    cur_iter = check_non_negative_int(cur_iter, 'cur_iter')
    max_iters = check_positive_int(max_iters, 'max_iters')
    base_momentum = check_momentum(base_momentum, 'base_momentum')
    end_momentum = check_momentum(end_momentum, 'end_momentum')
    if cur_iter >= max_iters:
        return end_momentum
    return (
        end_momentum
        - (end_momentum - base_momentum)
        * (math.cos(math.pi * cur_iter / float(max_iters)) + 1)
        / 2
    )


def scaled_momentum(momentum: float, kappa: float) -> float:
    """The momentum for an update over ``kappa`` times the samples.

    .. math::

        \\hat m = m^{\\kappa}

    The EMA scaling rule of Busbridge et al., "How to Scale Your EMA"
    (NeurIPS 2023): where ``momentum`` was tuned for ``B`` samples per
    update, an update over ``kappa * B`` samples uses ``momentum **
    kappa``. One such update moves the target as far towards a fixed online
    network as ``kappa`` updates with ``momentum`` would (for an integer
    ``kappa``), so the target averages over the same number of samples.
    ``kappa = 1`` returns ``momentum`` unchanged.

    Args:
        momentum (float): The momentum tuned for ``B`` samples per update,
            in [0, 1]; for a schedule, its value at this point of training.
        kappa (float): Samples per update now over ``B``, a finite real
            number > 0 (e.g. 0.25 on 4x fewer samples per update).

    Returns:
        float: ``momentum ** kappa``, a plain Python float.

    Raises:
        TypeError: If an argument is not a real number (``bool`` and
            strings included).
        ValueError: If ``momentum`` is NaN or outside [0, 1], or ``kappa``
            is NaN, infinite, zero or negative.

    Example:
        >>> scaled_momentum(0.99, kappa=2)  # twice the samples per update
        0.9801
    """
    momentum = check_momentum(momentum, 'momentum')
    return momentum ** check_kappa(kappa, 'kappa')


def is_update_iter(cur_iter: int, update_interval: int) -> bool:
    """Whether the target is updated after 0-based iteration ``cur_iter``.

    The same rule as mmcv's ``Hook.every_n_iters``, ``GradientCumulative
    OptimizerHook`` and MMSelfSup's ``DistOptimizerHook(update_interval=n)``:
    ``(cur_iter + 1) % update_interval == 0``, i.e. after every optimizer step
    when gradients are accumulated over ``update_interval`` iterations.
    """
    return (cur_iter + 1) % update_interval == 0


def last_update_iter(max_iters: int, update_interval: int) -> int:
    """The 0-based iteration of a run's last target update.

    Args:
        max_iters (int): The number of iterations of the run.
        update_interval (int): Iterations between two target updates.

    Returns:
        int: ``(max_iters // update_interval) * update_interval - 1``, or -1
        when the run is shorter than one interval and never updates.
    """
    return (max_iters // update_interval) * update_interval - 1
