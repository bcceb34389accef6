"""A user's model inside data-parallel and sharding wrappers, with torch only.

Nothing here imports a distributed package: a wrapper can only be an
engine's if that engine is already imported, so :func:`loaded` looks its
class up in ``sys.modules``.
"""

import sys

from torch import nn

from ._compat.mmengine import deepspeed_engine_wrapper

__all__ = ['loaded', 'wrapper_chain', 'unwrap']


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
    engine_wrapper = deepspeed_engine_wrapper()
    holders = tuple(
        cls
        for cls in (
            loaded('deepspeed', 'DeepSpeedEngine'),
            nn.DataParallel,
            nn.parallel.DistributedDataParallel,
        )
        if cls is not None
    )
    chain = [model]
    while True:
        if engine_wrapper is not None and isinstance(model, engine_wrapper):
            model = model.model
        elif isinstance(model, holders) or (
            is_wrapper is not None and is_wrapper(model)
        ):
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
