"""momentum_hook: the cosine-scheduled momentum (EMA) target update of BYOL,
MoCo v3 and DINO-style teachers.

The core needs only torch: :func:`cosine_momentum` (the schedule),
:func:`scaled_momentum` (the schedule at another batch size),
:func:`momentum_update_` (the EMA), :class:`ModuleUpdatePlan` (the EMA of
one module pair, planned once), :class:`MomentumTargetMixin` (the model
side), :class:`MomentumUpdater` (what the hook decides, free of any
runner), :func:`fully_shard_pair` (one FSDP2 plan for both networks) and
:func:`export_target` (the full target of a sharded run, as one file).
The runner hooks are in their own modules,
:mod:`momentum_hook.mmcv_hook` (mmcv 1.x) and
:mod:`momentum_hook.mmengine_hook` (MMEngine).

Importing the package (or listing it in a config's ``custom_imports``)
registers the hook in every installed framework's ``HOOKS`` registry as
``'momentum_hook.MomentumUpdateHook'`` and ``'momentum_hook.BYOLHook'``.
The plain names that MMSelfSup 0.x configs use are taken over only by
the top-level module :mod:`momentum_hook_dropin`.

Convention: the momentum ``m`` weighs the *old target*,
``target = m * target + (1 - m) * online`` (MMEngine's
``ExponentialMovingAverage`` calls ``1 - m`` its momentum).
"""

from .ema import BUFFER_POLICIES, momentum_update_
from .export import export_target, full_state_dict
from .model import MomentumTargetMixin
from .plan import ModuleUpdatePlan
from .registration import installed_adapters
from .schedule import cosine_momentum, scaled_momentum
from .sharding import fully_shard_pair
from .updater import MomentumUpdater, check_momentum_contract
from .version import __version__

__all__ = [
    '__version__',
    'cosine_momentum',
    'scaled_momentum',
    'momentum_update_',
    'BUFFER_POLICIES',
    'ModuleUpdatePlan',
    'MomentumTargetMixin',
    'MomentumUpdater',
    'check_momentum_contract',
    'fully_shard_pair',
    'export_target',
    'full_state_dict',
]

installed_adapters()  # registers the hook in each installed framework

#: Names a user coming from MMSelfSup may look for here; each hook lives in
#: its framework's adapter.
_IN_ADAPTERS = ('MomentumUpdateHook', 'BYOLHook')


def __getattr__(name):
    if name in _IN_ADAPTERS:
        raise AttributeError(
            f'momentum_hook.{name} is framework-specific: import it from its '
            f'adapter, momentum_hook.mmcv_hook.{name} (mmcv 1.x runners) or '
            f'momentum_hook.mmengine_hook.{name} (MMEngine); in a config, '
            "type='momentum_hook.MomentumUpdateHook'"
        )
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
