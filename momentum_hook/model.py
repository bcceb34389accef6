"""Give a model the hook's contract from an (online, target) pair."""
import contextlib
import copy

from torch import nn

from ._compat import deepspeed as ds

from .master_state import (MASTER_KEY, place_masters, save_masters,
                           take_masters)
from .masters import TargetMasters
from .plan import ModuleUpdatePlan, check_buffer_policy
from .validation import check_momentum

__all__ = ['MomentumTargetMixin', 'MASTER_KEY']


class MomentumTargetMixin:
    """Mixin for an ``nn.Module`` that keeps a momentum target network.

    It provides the contract the momentum hook relies on — ``base_momentum``,
    ``momentum`` and ``momentum_update()`` — so that an MMSelfSup-style model
    needs no update loop of its own::

        class BYOL(MomentumTargetMixin, BaseModel):
            def __init__(self, backbone, neck, head, base_momentum=0.99):
                super().__init__()
                self.online_net = nn.Sequential(backbone, neck)
                self.target_net = self.init_momentum_target(
                    self.online_net, base_momentum=base_momentum)

    ``momentum_update()`` computes ``target = m * target + (1 - m) * online``
    with ``m = self.momentum`` like :func:`~momentum_hook.momentum_update_`,
    through a :class:`~momentum_hook.ModuleUpdatePlan` it keeps while it
    is current, so that a call costs a few kernel launches and a check local
    to the two networks, not a walk of both. Under FSDP or DeepSpeed it
    updates each rank's shards (see :mod:`momentum_hook.local_shards`); make
    the target here, before wrapping, and wrap both networks alike
    (FSDP2: :func:`momentum_hook.sharding.fully_shard_pair`; FSDP1: one
    ``auto_wrap_policy`` that makes each network a unit).

    A target stored in float16 or bfloat16 (``model.half()``, a DeepSpeed
    engine with ``bf16`` or ``fp16`` enabled) gets a float32 master of each
    of its rank-local tensors (:class:`~momentum_hook.masters.TargetMasters`):
    4 bytes per local target element, on the target's device, nothing for a
    float32 target. The update lerps the master and writes it, rounded, into
    the target, so that the target is the float64 EMA to its own rounding
    instead of stalling. The masters are in the model's ``state_dict`` from
    the start, under ``momentum_target_master.<name>`` (``<name>`` the
    parameter's key in the target network's ``state_dict``), in the
    parameter's layout: under FSDP2 a DTensor sharded like it, in a full
    state dict (FSDP1 and FSDP2) the whole tensor
    (:mod:`~momentum_hook.master_state`). Checkpoints save them and a resume
    restores them, on another world size too; a loaded target without them
    (an older checkpoint) restarts its masters from its loaded values, and
    so does a target written by ``load_state_dict`` or an in-place write
    between updates (a write through ``.data`` is not seen). A float32
    target has no master keys.
    """

    def init_momentum_target(self, online, base_momentum=0.99,
                             buffers='keep'):
        """Make the target a frozen copy of ``online`` and return it.

        Assign the result to an attribute (``self.target_net = ...``) so that
        the target is a submodule: it then moves with the model and travels
        in its ``state_dict`` and checkpoints.

        Args:
            online (nn.Module): The online network, a submodule of ``self``.
            base_momentum (float): The momentum at iteration 0, in [0, 1].
                Defaults to 0.99.
            buffers (str): The target's buffer policy, one of
                :data:`~momentum_hook.BUFFER_POLICIES`. Defaults to
                ``'keep'`` (MMSelfSup 0.x's BYOL).

        Returns:
            nn.Module: The target network: a deep copy of ``online`` whose
            parameters do not require gradients. Built under DeepSpeed's
            ``zero.Init``, ``online``'s ZeRO-3 parameters are gathered for
            the copy (a collective: every rank builds the model), so that
            the target holds their values; ``deepspeed.initialize`` then
            partitions the target like the online network.
        """
        if not isinstance(online, nn.Module):
            raise TypeError('online must be an nn.Module, got '
                            f'{type(online).__name__}')
        check_buffer_policy(buffers)
        if '_momentum_pair' in self.__dict__:
            raise RuntimeError(
                f'{type(self).__name__} already has a momentum target: '
                'init_momentum_target() keeps one (online, target) pair')
        self.base_momentum = check_momentum(base_momentum, 'base_momentum')
        self.momentum = self.base_momentum
        target = _copy_of(online).requires_grad_(False)
        # Plain attributes, not submodules: the caller registers both.
        self.__dict__['_momentum_pair'] = (online, target, buffers)
        self.__dict__['_momentum_masters'] = TargetMasters()
        # A hook, not an override of _save_to_state_dict: mmcv's and
        # MMEngine's checkpoint savers call the hooks but not that method.
        self.register_state_dict_post_hook(_save_masters)
        return target

    def __getstate__(self):
        state = super().__getstate__()
        # The plan holds this copy's tensors; a copy plans its own.
        state.pop('_momentum_plan', None)
        return state

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if '_momentum_masters' in self.__dict__:
            # Before the target's own keys are loaded: strict loads must not
            # see the master keys.
            self.__dict__['_momentum_loaded'] = take_masters(state_dict,
                                                             prefix)
            self._place_loaded_masters()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _place_loaded_masters(self):
        """Bring the masters of the last load into the target's layout, or
        keep them until its tensors have values (a model on the meta device
        that ``load_state_dict(..., assign=True)`` is filling)."""
        loaded = self.__dict__.pop('_momentum_loaded', None)
        if loaded is not None and not place_masters(
                self.momentum_target_master,
                self.__dict__['_momentum_masters'], loaded):
            self.__dict__['_momentum_loaded'] = loaded

    @property
    def momentum_target_master(self):
        """The target network as it sits in the model: what the names of the
        ``momentum_target_master.<name>`` state-dict keys walk, as torch's
        ``get_model_state_dict`` and ``set_model_state_dict`` walk every
        key's attribute path."""
        if '_momentum_pair' not in self.__dict__:  # no target, no masters
            raise AttributeError('momentum_target_master')
        return self._outermost(self.__dict__['_momentum_pair'][1])

    def momentum_update(self):
        """``target = m * target + (1 - m) * online``, m = ``self.momentum``."""
        plan = self.__dict__.get('_momentum_plan')
        if plan is None or not plan.is_current():
            plan = self._plan('momentum_update')
        plan.update_(self.momentum)

    def check_momentum_target(self):
        """Plan the update now, without updating: refuse an unusable target.

        The momentum hooks call it once before training, after the runner
        or its strategy wrapped the model, so that a target wrapped unlike
        the online network stops the run before iteration 1.

        Raises:
            ValueError: As :meth:`momentum_update` would, e.g. for networks
                in one FSDP unit or sharded unlike each other.
        """
        self._plan('check_momentum_target')

    def _plan(self, caller):
        """Plan the update of the networks as they are now, and keep it."""
        if '_momentum_pair' not in self.__dict__:
            raise RuntimeError(
                f'{type(self).__name__}.{caller}() was called before '
                'init_momentum_target(): call it in __init__')
        online, target, buffers = self.__dict__['_momentum_pair']
        self._place_loaded_masters()
        plan = ModuleUpdatePlan(self._outermost(target),
                                self._outermost(online), buffers,
                                self.__dict__['_momentum_masters'])
        self.__dict__['_momentum_plan'] = plan
        return plan

    def _outermost(self, network):
        """``network``, or the wrapper inside ``self`` that now holds it.

        Wrapping a submodule (FSDP1's per-unit wrap, a checkpoint wrapper)
        puts a wrapper whose ``module`` is the network in its place; the
        wrapper holds what is updated (an FSDP1 unit's flat shard).
        """
        for module in self.modules():
            if module is not network and \
                    getattr(module, 'module', None) is network:
                return self._outermost(module)
        return network


def _save_masters(module, destination, prefix, local_metadata):
    """State-dict hook: the float32 masters of ``module``'s target."""
    masters = module.__dict__.get('_momentum_masters')
    if masters is not None:
        module._place_loaded_masters()
        save_masters(module.momentum_target_master, masters, destination,
                     prefix)


def _copy_of(online):
    """A deep copy of ``online``, with its values even under ZeRO-3.

    A copy of a ZeRO-3 parameter is its 0-element placeholder, so the
    parameters partitioned already (``zero.Init``) are gathered first, one
    ``GatheredParameters`` each: for several at once, DeepSpeed up to 0.19.7
    waits for the last all-gather only, and on gloo the others may still be
    in flight when the copy reads them.
    """
    partitioned = [param for param in online.parameters()
                   if ds.is_zero3_param(param)]
    with contextlib.ExitStack() as gathered:
        for param in partitioned:
            gathered.enter_context(ds.gathered_parameters([param]))
        return copy.deepcopy(online)
