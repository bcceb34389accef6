"""The drop-in: MMSelfSup 0.x's hook names build momentum_hook's hook.

One line in an existing config, with no edit to its ``custom_hooks``::

    custom_imports = dict(imports=['momentum_hook_dropin'],
                          allow_failed_imports=False)

Importing this module registers momentum_hook's hook under the plain names
``'MomentumUpdateHook'`` and ``'BYOLHook'`` in the ``HOOKS`` registry of
every installed framework (mmcv 1.x, MMEngine), replacing the class that
held them (MMSelfSup 0.x's hook), through the registries' public
``register_module(..., force=True)``. The scoped names
``'momentum_hook.MomentumUpdateHook'`` / ``'momentum_hook.BYOLHook'`` stay
as they are.

Either import order works. If MMSelfSup 0.x is installed, this module first
imports its hooks (``mmselfsup.core.hooks``), as MMSelfSup's
``tools/train.py`` does anyway, so that they are registered before ours
replace them; a later ``import mmselfsup`` finds them already registered and
does not fail on a duplicate name.
"""

import importlib
from importlib import metadata

from momentum_hook._compat import release
from momentum_hook.registration import installed_adapters, take_plain_names

__all__ = ['REPLACED']


def _mmselfsup0_version():
    """MMSelfSup's version if a 0.x release is installed, else None."""
    try:
        version = metadata.version('mmselfsup')
    except metadata.PackageNotFoundError:
        return None
    return version if release(version)[:1] < (1,) else None


def _register_mmselfsup_hooks_first():
    version = _mmselfsup0_version()
    if version is None:
        return
    try:
        importlib.import_module('mmselfsup.core.hooks')
    except ImportError as error:
        raise ImportError(
            f'momentum_hook_dropin imports the hooks of the installed '
            f'MMSelfSup {version} first, so that they are registered before '
            f'momentum_hook replaces them, and that import failed ({error}). '
            'Fix the MMSelfSup install, or use '
            "custom_imports=dict(imports=['momentum_hook']) with "
            "type='momentum_hook.MomentumUpdateHook' instead"
        ) from error


def _take_plain_names():
    adapters = installed_adapters()
    if not adapters:
        raise ImportError(
            'momentum_hook_dropin registers the hook in a runner framework, '
            'and neither mmcv 1.x nor MMEngine is installed: in a clone of '
            'momentum_hook, pip install -e ".[mmengine]", or for mmcv 1.x '
            'pip install "setuptools<81" wheel, then pip install '
            '--no-build-isolation -e ".[mmcv]"'
        )
    _register_mmselfsup_hooks_first()
    return {
        adapter.__name__: take_plain_names(
            adapter.HOOKS, adapter.MomentumUpdateHook
        )
        for adapter in adapters
    }


#: ``{adapter module name: {plain name: the class it replaced}}``.
REPLACED = _take_plain_names()
