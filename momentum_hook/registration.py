"""Registering the hook class in an mmcv 1.x or MMEngine ``HOOKS`` registry.

Both frameworks' registries share the public interface used here
(``children``, ``module_dict``, ``register_module``, and a child registry
made with ``type(root)(root.name, parent=root, scope=...)``), so one module
serves both adapters. Nothing here touches a registry's private methods.

Two ways in, two kinds of names:

- :func:`register_hook_class`, run by ``import momentum_hook`` (and so by a
  config's ``custom_imports``): the hook lives in a child registry of
  ``HOOKS`` with scope ``momentum_hook``, as ``'momentum_hook.<Name>'``, the
  OpenMMLab convention for a downstream package's names. No other package
  can shadow them, and a later package that registers the plain names (as
  MMSelfSup 0.x does) registers them as usual.
- :func:`take_plain_names`, run only by the drop-in module
  ``momentum_hook_dropin``: the plain names (``'MomentumUpdateHook'``,
  ``'BYOLHook'``) are registered in ``HOOKS`` itself, replacing whichever
  class held them, so that an existing config's ``custom_hooks`` line
  builds this package's hook unchanged.

:func:`installed_adapters`, run by ``import momentum_hook``, imports the
adapter of each installed framework, which registers the hook there; nothing
is imported for a framework that is absent, so the package needs only torch.
"""

import importlib
import importlib.util
import logging
import sys

__all__ = [
    'SCOPE',
    'HOOK_NAMES',
    'DROPIN_MODULE',
    'register_hook_class',
    'register_scoped',
    'take_plain_names',
    'plain_name_holders',
    'fallback_message',
    'has_mmcv1',
    'has_mmengine',
    'installed_adapters',
]

#: The scope of the child registry, the prefix of the names nobody shadows.
SCOPE = 'momentum_hook'

#: The hook's names, MMSelfSup 0.x's.
HOOK_NAMES = ('MomentumUpdateHook', 'BYOLHook')

#: The module whose import makes the plain names build this package's hook.
#: It is a top-level module, not ``momentum_hook.dropin``: importing a
#: submodule runs ``momentum_hook/__init__.py`` first, which would report
#: the plain names as another package's just before the drop-in takes them.
DROPIN_MODULE = 'momentum_hook_dropin'

#: The config line that does it.
DROPIN_LINE = (
    f"custom_imports = dict(imports=['{DROPIN_MODULE}'], "
    'allow_failed_imports=False)'
)

logger = logging.getLogger(SCOPE)


def qualified_name(cls):
    """``'package.module.Class'``, how the messages name a class."""
    return f'{cls.__module__}.{cls.__qualname__}'


def register_scoped(root, hook_cls, names=HOOK_NAMES):
    """Register ``hook_cls`` as ``'momentum_hook.<name>'`` for each name.

    Args:
        root: The framework's root registry: ``HOOKS``, or MMEngine's
            ``STRATEGIES`` for :mod:`momentum_hook.mmengine_strategies`.
        hook_cls (type): The class (the hook, or a strategy).
        names (Sequence[str]): Its names. Defaults to :data:`HOOK_NAMES`.
    """
    child = root.children.get(SCOPE)
    if child is None:
        child = type(root)(root.name, parent=root, scope=SCOPE)
    child.register_module(name=list(names), module=hook_cls, force=True)


def plain_name_holders(root, hook_cls, names):
    """``{name: class}`` for each of ``names`` that ``root`` resolves to a
    class other than ``hook_cls``."""
    return {
        name: root.module_dict[name]
        for name in names
        if root.module_dict.get(name, hook_cls) is not hook_cls
    }


def fallback_message(holders, registry_name):
    """What a user must be told when plain names build another class.

    Args:
        holders (dict): ``{name: class}``, from :func:`plain_name_holders`.
        registry_name (str): The registry, for the message.
    """
    if not holders:
        return None
    classes = sorted(set(map(qualified_name, holders.values())))
    quoted = ' and '.join(f"type='{name}'" for name in holders)
    return (
        f'{quoted} in the {registry_name!r} registry build '
        f"{' / '.join(classes)}, not momentum_hook's hook. To replace it "
        f'in this config without editing its custom_hooks, use '
        f'{DROPIN_LINE}; or name the hook '
        f"type='{SCOPE}.MomentumUpdateHook'."
    )


def register_hook_class(root, hook_cls, names=HOOK_NAMES):
    """:func:`register_scoped`, and say so when the plain names build
    another package's class.

    The message goes to the ``momentum_hook`` logger as a warning (printed on
    stderr when logging is not configured, whatever Python's warning
    filters), unless the drop-in module is being imported, which takes the
    plain names right after.
    """
    register_scoped(root, hook_cls, names)
    message = fallback_message(
        plain_name_holders(root, hook_cls, names), root.name
    )
    if message and DROPIN_MODULE not in sys.modules:
        logger.warning(message)


def take_plain_names(root, hook_cls, names=HOOK_NAMES):
    """Register ``hook_cls`` under the plain ``names`` in ``root`` itself.

    Whatever class held a name is replaced (``register_module(...,
    force=True)``, the registry's public way to do so), and logged.

    Returns:
        dict: ``{name: class}`` of the classes replaced.
    """
    replaced = plain_name_holders(root, hook_cls, names)
    root.register_module(name=list(names), module=hook_cls, force=True)
    for name, holder in replaced.items():
        logger.info(
            f"{DROPIN_MODULE}: type='%s' in the %r registry now "
            'builds %s instead of %s',
            name,
            root.name,
            qualified_name(hook_cls),
            qualified_name(holder),
        )
    return replaced


def has_mmcv1():
    """Whether mmcv 1.x (with ``mmcv.runner``) is installed."""
    if importlib.util.find_spec('mmcv') is None:
        return False
    import mmcv

    from ._compat.mmcv import is_mmcv1

    return is_mmcv1(mmcv.__version__)


def has_mmengine():
    """Whether MMEngine is installed."""
    return importlib.util.find_spec('mmengine') is not None


def installed_adapters():
    """Import the adapter of every installed framework and return them.

    Returns:
        list[module]: ``momentum_hook.mmcv_hook`` if mmcv 1.x is installed,
        ``momentum_hook.mmengine_hook`` if MMEngine is, in that order.
    """
    names = [
        name
        for name, installed in (
            ('mmcv_hook', has_mmcv1),
            ('mmengine_hook', has_mmengine),
        )
        if installed()
    ]
    return [importlib.import_module(f'momentum_hook.{name}') for name in names]
