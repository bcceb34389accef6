"""Give a model the hook's contract from an (online, target) pair."""

import contextlib
import copy
import logging
import weakref
from operator import getitem, is_

from torch import nn

from ._compat import deepspeed as ds
from ._compat.torch import module_slots
from .local_shards import buffer_shards
from .master_state import MASTER_KEY, place_masters, save_masters, take_masters
from .masters import TargetMasters
from .plan import ModuleUpdatePlan, check_buffer_policy
from .validation import check_momentum

__all__ = ['MomentumTargetMixin', 'MASTER_KEY']

logger = logging.getLogger('momentum_hook')

#: Target networks loaded (``load_state_dict`` on the target alone) since
#: their model last planned; see :func:`_note_load`.
_LOADED_TARGETS: weakref.WeakSet[nn.Module] = weakref.WeakSet()


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

    The plan pairs the networks' tensors by name
    (:func:`~momentum_hook.pairing.pair_by_name`) and follows the
    attributes that hold them: the attribute paths of the online and the
    target network in the model (``online_net``, ``target_net``) are found
    at the first plan, and assigning another module to one of them (a
    wrapper, a new target) makes the next update plan again with what the
    attribute holds then.

    A target that starts unlike the online network is made a copy of it at
    the first plan when that plan is :meth:`check_momentum_target` (which
    the hooks call before iteration 1), or the first
    :meth:`momentum_update` of a model whose online network was on the meta
    device at :meth:`init_momentum_target`: the case of a model built under
    ``torch.device('meta')``, materialised with ``to_empty()`` and
    initialised, or of an ``init_weights()`` that draws both networks anew.
    It is logged (the ``momentum_hook`` logger, a warning). A model or
    target loaded since :meth:`init_momentum_target` (``load_state_dict``,
    a runner's resume, a distributed checkpoint) is never overwritten.
    """

    def init_momentum_target(
        self,
        online: nn.Module,
        base_momentum: float = 0.99,
        buffers: str = 'keep',
    ) -> nn.Module:
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
            raise TypeError(
                f'online must be an nn.Module, got {type(online).__name__}'
            )
        check_buffer_policy(buffers)
        if '_momentum_pair' in self.__dict__:
            raise RuntimeError(
                f'{type(self).__name__} already has a momentum target: '
                'init_momentum_target() keeps one (online, target) pair'
            )
        self.base_momentum = check_momentum(base_momentum, 'base_momentum')
        self.momentum = self.base_momentum
        target = _copy_of(online).requires_grad_(False)
        # A pre-hook: it runs in the target's _load_from_state_dict, which
        # every loader calls (mmcv's and MMEngine's skip load_state_dict).
        target.register_load_state_dict_pre_hook(_note_load)
        # Plain attributes, not submodules: the caller registers both.
        self.__dict__['_momentum_pair'] = (online, target, buffers)
        self.__dict__['_momentum_masters'] = TargetMasters()
        self.__dict__['_momentum_hooked'] = target  # see _note_load
        # Its values are drawn later: materialised, then initialised.
        self.__dict__['_momentum_from_meta'] = any(
            param.is_meta for param in online.parameters()
        )
        # A hook, not an override of _save_to_state_dict: mmcv's and
        # MMEngine's checkpoint savers call the hooks but not that method.
        self.register_state_dict_post_hook(  # type: ignore[attr-defined]
            _save_masters
        )  # (a mixin of nn.Module)
        return target

    def __getstate__(self):
        state = super().__getstate__()
        # The plan holds this copy's tensors; a copy plans its own.
        state.pop('_momentum_plan', None)
        state.pop('_momentum_watch', None)
        return state

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if '_momentum_masters' in self.__dict__:
            # Before the target's own keys are loaded: strict loads must not
            # see the master keys.
            self.__dict__['_momentum_loaded'] = take_masters(
                state_dict, prefix
            )
            self._place_loaded_masters()
        self.__dict__['_momentum_was_loaded'] = True
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _place_loaded_masters(self):
        """Bring the masters of the last load into the target's layout, or
        keep them until its tensors have values (a model on the meta device
        that ``load_state_dict(..., assign=True)`` is filling)."""
        loaded = self.__dict__.pop('_momentum_loaded', None)
        if loaded is not None and not place_masters(
            self.momentum_target_master,
            self.__dict__['_momentum_masters'],
            loaded,
        ):
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

    def momentum_update(self) -> None:
        """``target = m * target + (1 - m) * online``, m = ``self.momentum``.

        Plans again when the plan is stale (see
        :meth:`~momentum_hook.ModuleUpdatePlan.is_current`) or an attribute
        that held a network holds another module now. Only the first plan
        and the first after a load are checked across ranks (a collective);
        a later one, which one rank may make alone (e.g. after a ``.data``
        swap around a save on rank 0), checks this rank alone.
        """
        state = self.__dict__
        plan = state.get('_momentum_plan')
        if plan is None or not self._watched() or not plan.is_current():
            plan = self._plan('momentum_update')
        _take_load(state)  # a later plan is local
        plan.update_(self.momentum)

    def check_momentum_target(self) -> None:
        """Plan the update now, without updating: refuse an unusable target.

        The momentum hooks call it once before training, after the runner
        or its strategy wrapped the model, so that a target wrapped unlike
        the online network stops the run before iteration 1. It is a
        collective in a process group: call it on every rank at the same
        point. Called before any update, it also makes a target that
        differs from the online network on any rank (and was not loaded)
        a copy of it (see the class doc).

        Raises:
            ValueError: As :meth:`momentum_update` would, e.g. for networks
                in one FSDP unit or sharded unlike each other, or with
                parameters of other names.
        """
        self._plan('check_momentum_target', collective=True)

    def _plan(self, caller, collective=False):
        """Plan the update of the networks as they are now, and keep it.

        Collective when ``collective``, at the first plan and at the first
        after a load; the first plan also makes a target that is not a
        copy of the online network one (see the class doc).
        """
        state = self.__dict__
        if '_momentum_pair' not in state:
            raise RuntimeError(
                f'{type(self).__name__}.{caller}() was called before '
                'init_momentum_target(): call it in __init__'
            )
        online, target = self._networks()
        buffers = state['_momentum_pair'][2]
        loaded = _take_load(state)
        self._place_loaded_masters()
        start = not state.get('_momentum_planned', False)
        compare = start and (
            caller == 'check_momentum_target'
            or state.get('_momentum_from_meta', False)
        )
        plan = ModuleUpdatePlan(
            target,
            online,
            buffers,
            state['_momentum_masters'],
            collective=collective or start or loaded,
            compare=compare,
            loaded=loaded,
        )
        state['_momentum_plan'] = plan
        state['_momentum_planned'] = True
        if plan.differs is not None:
            self._start_from_online(plan, target, online, caller)
        return plan

    def _start_from_online(self, plan, target, online, caller):
        """Make the target a copy of the online network, and log it."""
        plan.update_(0.0)  # parameters, with their masters and ZeRO copies
        online_buffers = {
            shard.keys[0]: shard.tensor for shard in buffer_shards(online)
        }
        for shard in buffer_shards(target):
            source = online_buffers.get(shard.keys[0])
            if source is not None and source.shape == shard.tensor.shape:
                shard.tensor.copy_(source)
        late = (
            ' This is its first momentum_update(), after the online '
            "network's first optimizer step: call check_momentum_target() "
            'before that step (the momentum hooks do) to start from the '
            "online network's initial weights."
            if caller == 'momentum_update'
            else ''
        )
        logger.warning(
            '%s: the target network differs from the online network at the '
            'start of training (first at %r) and was not loaded from a '
            'checkpoint, so it was made a copy of the online network, as '
            'init_momentum_target() makes it.%s',
            type(self).__name__,
            plan.differs,
            late,
        )

    def _networks(self):
        """``(online, target)`` as the model holds them now.

        At the first plan, the attribute paths that hold them (or the
        wrappers in their place) are found; later plans take what those
        attributes hold then, and :meth:`_watched` checks them.

        Raises:
            ValueError: If such an attribute holds no module now.
        """
        state = self.__dict__
        online, target, buffers = state['_momentum_pair']
        paths = state.get('_momentum_paths')
        if paths is None:
            networks = [self._outermost(online), self._outermost(target)]
            found = {}
            for path, module in self.named_modules():
                found.setdefault(id(module), path)
            paths = state['_momentum_paths'] = [
                found.get(id(network)) for network in networks
            ]
        else:
            networks = [
                self._outermost(network)
                if path is None
                else self._held(path, role)
                for path, network, role in zip(
                    paths, (online, target), ('online', 'target')
                )
            ]
            state['_momentum_pair'] = (*networks, buffers)
        containers, keys, values = [], [], []
        for path in paths:
            module = self
            for attribute in path.split('.') if path else ():
                containers.append(module_slots(module, False)[1])
                keys.append(attribute)
                module = getattr(module, attribute)
                values.append(module)
        state['_momentum_watch'] = containers, keys, values
        return networks

    def _held(self, path, role):
        """The module at ``path`` in ``self``, which held the ``role``
        network."""
        try:
            module = self.get_submodule(path)
        except AttributeError:
            module = None
        if not isinstance(module, nn.Module):
            raise ValueError(
                f'{type(self).__name__}.{path} held the {role} network when '
                'the momentum update was first planned, but holds no module '
                f'now ({type(module).__name__}): assign the {role} network '
                'to it again (the update follows the module that attribute '
                'holds)'
            )
        return module

    def _watched(self):
        """Whether the attributes that held the networks still do."""
        watch = self.__dict__.get('_momentum_watch')
        if watch is None:
            return False
        containers, keys, values = watch
        try:
            return all(map(is_, map(getitem, containers, keys), values))
        except KeyError:  # an attribute was deleted
            return False

    def _outermost(self, network):
        """``network``, or the wrapper inside ``self`` that now holds it.

        Wrapping a submodule (FSDP1's per-unit wrap, a checkpoint wrapper)
        puts a wrapper whose ``module`` is the network in its place; the
        wrapper holds what is updated (an FSDP1 unit's flat shard).
        """
        for module in self.modules():
            if (
                module is not network
                and getattr(module, 'module', None) is network
            ):
                return self._outermost(module)
        return network


def _note_load(target, *args):
    """Load-state-dict pre-hook of a target: it is being loaded."""
    _LOADED_TARGETS.add(target)


def _take_load(state):
    """Whether the model (``state``: its ``__dict__``) or its target was
    loaded since the last call; forgets it."""
    loaded = state.pop('_momentum_was_loaded', False)
    hooked = state.get('_momentum_hooked')
    if hooked is not None and hooked in _LOADED_TARGETS:
        _LOADED_TARGETS.discard(hooked)
        loaded = True
    return loaded


def _save_masters(module, destination, prefix, local_metadata):
    """State-dict hook: the float32 masters of ``module``'s target."""
    masters = module.__dict__.get('_momentum_masters')
    if masters is not None:
        module._place_loaded_masters()
        save_masters(
            module.momentum_target_master, masters, destination, prefix
        )


def _copy_of(online):
    """A deep copy of ``online``, with its values even under ZeRO-3.

    A copy of a ZeRO-3 parameter is its 0-element placeholder, so the
    parameters partitioned already (``zero.Init``) are gathered first, one
    ``GatheredParameters`` each: for several at once, DeepSpeed up to 0.19.7
    waits for the last all-gather only, and on gloo the others may still be
    in flight when the copy reads them.
    """
    partitioned = [
        param for param in online.parameters() if ds.is_zero3_param(param)
    ]
    with contextlib.ExitStack() as gathered:
        for param in partitioned:
            gathered.enter_context(ds.gathered_parameters([param]))
        return copy.deepcopy(online)
