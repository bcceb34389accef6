"""The private MMEngine names momentum_hook reads.

MMEngine exports its strategies and the DeepSpeed engine wrapper only from
the private package ``mmengine._strategy``, and an optimizer wrapper's
accumulation only as ``_accumulative_counts``; they are read here.
"""

import sys

__all__ = [
    'accumulative_counts',
    'auto_scale_lr',
    'deepspeed_engine_wrapper',
    'fsdp_strategy',
]


def auto_scale_lr(runner):
    """The runner's ``auto_scale_lr`` config: a public attribute of
    ``Runner``, private (``_auto_scale_lr``) in ``FlexibleRunner``
    (MMEngine 0.10.7)."""
    if hasattr(runner, 'auto_scale_lr'):
        return runner.auto_scale_lr
    return getattr(runner, '_auto_scale_lr', None)


def accumulative_counts(optim_wrapper):
    """The iterations per optimizer step of an ``OptimWrapper`` (1 for a
    wrapper that does not accumulate)."""
    return getattr(optim_wrapper, '_accumulative_counts', 1)


def deepspeed_engine_wrapper():
    """MMEngine's ``MMDeepSpeedEngineWrapper`` class once its module is
    imported (by a ``DeepSpeedStrategy``), else None."""
    return getattr(
        sys.modules.get('mmengine._strategy.deepspeed'),
        'MMDeepSpeedEngineWrapper',
        None,
    )


def fsdp_strategy():
    """MMEngine's ``FSDPStrategy`` class (imports MMEngine's strategies)."""
    from mmengine._strategy import FSDPStrategy

    return FSDPStrategy
