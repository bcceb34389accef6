"""Registering a hook class in an mmcv 1.x or MMEngine ``HOOKS`` registry.

Both frameworks' registries share the interface used here (``children``,
``module_dict``, ``register_module`` and the private ``_register_module`` that
``register_module`` funnels through), so one function serves both adapters.

Names a hook gets in a root registry ``HOOKS``:

- ``'momentum_hook.<Name>'`` for every name, always: the hook lives in a child
  registry of ``HOOKS`` with scope ``momentum_hook`` (the scoped-name
  convention of OpenMMLab packages), which no other package can shadow;
- the plain names (``'MomentumUpdateHook'``, ``'BYOLHook'``), *held softly*:
  registered only when free. If another package (MMSelfSup 0.x registers both
  names) already holds one, it keeps it and a warning points to the scoped
  name. If another package registers one of them later, ours steps aside
  instead of making that package's import fail, with the same warning.
"""
import warnings

__all__ = ['SCOPE', 'register_hook_class']

#: The scope of the child registry, the prefix of the names nobody shadows.
SCOPE = 'momentum_hook'

_warned = set()


def _warn_taken(registry, names, holder, hook_cls):
    """Warn once per registry and holder that ``names`` build ``holder``."""
    key = (id(registry), holder)
    if not names or key in _warned:
        return
    _warned.add(key)
    quoted = ' and '.join(f"'{name}'" for name in names)
    warnings.warn(
        f'{quoted} in the {registry.name!r} registry belong to '
        f'{holder.__module__}.{holder.__qualname__}, so configs naming them '
        'build that class; momentum_hook leaves them there. Use '
        f"type='{SCOPE}.{hook_cls.__name__}' to build momentum_hook's hook.",
        UserWarning, stacklevel=4)


def _is_ours(module):
    return getattr(module, '__module__', '').split('.')[0] == SCOPE


def _child_registry(root):
    child = root.children.get(SCOPE)
    if child is None:
        child = type(root)(root.name, parent=root, scope=SCOPE)
    return child


def _yield_soft_names(root, soft_names):
    """Let later registrations of ``soft_names`` in ``root`` replace ours."""
    if getattr(root, '_momentum_hook_soft_names', None) is not None:
        root._momentum_hook_soft_names.update(soft_names)
        return
    root._momentum_hook_soft_names = set(soft_names)
    register = root._register_module

    def _register_module(module, module_name=None, force=False):
        names = module_name if module_name is not None else module.__name__
        names = [names] if isinstance(names, str) else list(names)
        ours = {name: root.module_dict[name] for name in names
                if name in root._momentum_hook_soft_names
                and _is_ours(root.module_dict.get(name))}
        if ours and not _is_ours(module):
            for name in ours:
                del root.module_dict[name]
                root._momentum_hook_soft_names.discard(name)
            _warn_taken(root, list(ours), module, next(iter(ours.values())))
        return register(module=module, module_name=module_name, force=force)

    root._register_module = _register_module


def register_hook_class(root, hook_cls, names):
    """Register ``hook_cls`` in ``root`` under scoped and plain ``names``.

    Args:
        root: The framework's root ``HOOKS`` registry.
        hook_cls (type): The hook class.
        names (Sequence[str]): Its names, e.g. ``('MomentumUpdateHook',
            'BYOLHook')``.

    Returns:
        dict: For each plain name, the class it resolves to in ``root``.
    """
    _child_registry(root).register_module(name=list(names), module=hook_cls,
                                           force=True)
    free, taken = [], {}
    for name in names:
        holder = root.module_dict.get(name)
        if holder is None or _is_ours(holder):
            root.register_module(name=name, module=hook_cls, force=True)
            free.append(name)
        else:
            taken.setdefault(holder, []).append(name)
    for holder, taken_names in taken.items():
        _warn_taken(root, taken_names, holder, hook_cls)
    _yield_soft_names(root, free)
    return {name: root.module_dict[name] for name in names}
