"""momentum_hook: the cosine-scheduled momentum (EMA) hook of BYOL / MoCo v3.

Importing the package registers the hook in every runner framework that is
installed: mmcv 1.x (``mmcv.runner.HOOKS``) and MMEngine
(``mmengine.registry.HOOKS``), under ``'MomentumUpdateHook'``, ``'BYOLHook'``
and the scoped ``'momentum_hook.MomentumUpdateHook'`` /
``'momentum_hook.BYOLHook'``. ``MomentumUpdateHook`` here is the mmcv 1.x hook
when mmcv 1.x is installed, else the MMEngine one; both are also reachable as
``momentum_hook.mmcv_hook.MomentumUpdateHook`` and
``momentum_hook.mmengine_hook.MomentumUpdateHook``.

Convention: the momentum ``m`` weighs the *old target*,
``target = m * target + (1 - m) * online`` (MMEngine's
``ExponentialMovingAverage`` calls ``1 - m`` its momentum).
"""
import importlib.util

from .ema import BUFFER_POLICIES, momentum_update_
from .model import MomentumTargetMixin
from .schedule import cosine_momentum
from .updater import MomentumUpdater, check_momentum_contract
from .version import __version__

__all__ = [
    '__version__', 'cosine_momentum', 'momentum_update_', 'BUFFER_POLICIES',
    'MomentumTargetMixin', 'MomentumUpdater', 'check_momentum_contract',
    'MomentumUpdateHook', 'BYOLHook'
]


def _has_mmcv1():
    if importlib.util.find_spec('mmcv') is None:
        return False
    import mmcv
    return int(mmcv.__version__.split('.')[0]) < 2


_HAS_MMCV1 = _has_mmcv1()
_HAS_MMENGINE = importlib.util.find_spec('mmengine') is not None

if not (_HAS_MMCV1 or _HAS_MMENGINE):
    raise ImportError(
        'momentum_hook needs a runner framework, and neither mmcv 1.x nor '
        "MMEngine is installed: pip install 'momentum_hook[mmcv]' (mmcv 1.x "
        "runners) or 'momentum_hook[mmengine]' (MMEngine's Runner)")

if _HAS_MMENGINE:
    from . import mmengine_hook
    MomentumUpdateHook = mmengine_hook.MomentumUpdateHook
if _HAS_MMCV1:
    from . import mmcv_hook
    MomentumUpdateHook = mmcv_hook.MomentumUpdateHook

BYOLHook = MomentumUpdateHook
