"""A user's model inside data-parallel and sharding wrappers, with torch only.

Nothing here imports a distributed package: a wrapper can only be an
engine's if that engine is already imported, so :func:`loaded` looks its
class up in ``sys.modules``.
"""
import sys

from torch import nn

__all__ = ['loaded', 'wrapper_chain', 'unwrap', 'check_zero3_gathers']


def loaded(module_name, attribute):
    """``module_name.attribute`` if that module is already imported, else
    None."""
    return getattr(sys.modules.get(module_name), attribute, None)


def wrapper_chain(model, is_wrapper=None):
    """``model`` and every model inside it, outermost first.

    Steps through MMEngine's ``MMDeepSpeedEngineWrapper`` (which holds the
    engine as ``model``), DeepSpeed's ``DeepSpeedEngine`` and torch's
    ``DataParallel`` / ``DistributedDataParallel`` (``module``), and through
    whatever ``is_wrapper`` recognises (e.g. MMEngine's ``is_model_wrapper``,
    whose wrappers hold the model as ``module``).

    Args:
        model (nn.Module): The model a runner or an engine holds.
        is_wrapper (Callable[[nn.Module], bool], optional): A framework's
            test for its own wrappers. Defaults to None.

    Returns:
        list[nn.Module]: ``model`` first, the innermost model last.
    """
    engine_wrapper = loaded('mmengine._strategy.deepspeed',
                            'MMDeepSpeedEngineWrapper')
    holders = tuple(cls for cls in (loaded('deepspeed', 'DeepSpeedEngine'),
                                    nn.DataParallel,
                                    nn.parallel.DistributedDataParallel)
                    if cls is not None)
    chain = [model]
    while True:
        if engine_wrapper is not None and isinstance(model, engine_wrapper):
            model = model.model
        elif isinstance(model, holders) or (is_wrapper is not None and
                                            is_wrapper(model)):
            model = model.module
        else:
            return chain
        chain.append(model)


def unwrap(model, is_wrapper=None):
    """The model inside every wrapper :func:`wrapper_chain` steps through.

    Args:
        model (nn.Module): The model a runner or an engine holds.
        is_wrapper (Callable[[nn.Module], bool], optional): A framework's
            test for its own wrappers. Defaults to None.

    Returns:
        nn.Module: The innermost model.
    """
    return wrapper_chain(model, is_wrapper)[-1]


def _version(text):
    """``'0.19.6+abc'`` as ``(0, 19, 6)``."""
    return tuple(int(part) for part in
                 text.split('+')[0].split('.')[:3] if part.isdigit())


def check_zero3_gathers(engine):
    """Refuse a ZeRO-3 engine on gloo whose gathers may read unfinished data.

    DeepSpeed before 0.19.8 waits only for the last of the all-gathers it
    issues when it gathers several parameters at once (``_allgather_params_
    coalesced``); on gloo the others may still be in flight. It gathers the
    persistent parameters that way after every optimizer step, so the online
    network, and the target's EMA of it, can read stale or uninitialised
    values. ``stage3_allgather_sequential`` gathers one at a time.

    Args:
        engine (deepspeed.DeepSpeedEngine): The engine that holds the model.

    Raises:
        ValueError: Naming the DeepSpeed version and the option to set.
    """
    distributed = sys.modules['torch.distributed']
    deepspeed = sys.modules['deepspeed']
    if (engine.zero_optimization_stage() == 3 and
            not engine.zero_allgather_sequential() and
            _version(deepspeed.__version__) < (0, 19, 8) and
            distributed.is_initialized() and
            distributed.get_backend() == 'gloo'):
        raise ValueError(
            f'DeepSpeed {deepspeed.__version__} on gloo waits for only the '
            'last of the all-gathers of a ZeRO-3 multi-parameter gather, so '
            'the persistent parameters it re-gathers after each optimizer '
            'step can be read unfinished, and the target would average '
            'them: set zero_optimization=dict(stage=3, '
            'stage3_allgather_sequential=True) (in MMEngine, strategy=dict('
            "type='DeepSpeedStrategy', zero_optimization=dict(stage=3, "
            'stage3_allgather_sequential=True))), or use DeepSpeed >= 0.19.8')
