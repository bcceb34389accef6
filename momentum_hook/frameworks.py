"""Which runner frameworks are installed, and their adapters.

``import momentum_hook`` registers the hook in each installed framework by
importing its adapter; nothing is imported for a framework that is absent,
so the package itself needs only torch.
"""
import importlib
import importlib.util

__all__ = ['has_mmcv1', 'has_mmengine', 'installed_adapters']


def has_mmcv1():
    """Whether mmcv 1.x (with ``mmcv.runner``) is installed."""
    if importlib.util.find_spec('mmcv') is None:
        return False
    import mmcv
    return int(mmcv.__version__.split('.')[0]) < 2


def has_mmengine():
    """Whether MMEngine is installed."""
    return importlib.util.find_spec('mmengine') is not None


def installed_adapters():
    """Import the adapter of every installed framework and return them.

    Returns:
        list[module]: ``momentum_hook.mmcv_hook`` if mmcv 1.x is installed,
        ``momentum_hook.mmengine_hook`` if MMEngine is, in that order.
    """
    names = [name for name, installed in (('mmcv_hook', has_mmcv1),
                                          ('mmengine_hook', has_mmengine))
             if installed()]
    return [importlib.import_module(f'momentum_hook.{name}')
            for name in names]
