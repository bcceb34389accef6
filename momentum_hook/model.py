"""Give a model the hook's contract from an (online, target) pair."""
import copy

from torch import nn

from .ema import ModuleUpdatePlan, check_buffer_policy, flatten_parameters_
from .validation import check_momentum

__all__ = ['MomentumTargetMixin']


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
    through a :class:`~momentum_hook.ema.ModuleUpdatePlan` it keeps while it
    is current, so that a call costs a few kernel launches and an address
    check, not a walk of both networks. With ``flatten=True`` (the
    default) both networks' parameters are laid out back to back (see
    :func:`~momentum_hook.ema.flatten_parameters_`), again after every
    ``.to()`` / ``.cuda()`` / ``.half()``, ``copy.deepcopy`` and unpickling,
    so the update is one ``lerp_`` per device and dtype.
    """

    def init_momentum_target(self, online, base_momentum=0.99,
                             buffers='keep', flatten=True):
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
            flatten (bool): Keep each network's parameters in one flat
                buffer per device and dtype. Defaults to True.

        Returns:
            nn.Module: The target network: a deep copy of ``online`` whose
            parameters do not require gradients.
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
        target = copy.deepcopy(online).requires_grad_(False)
        # Plain attributes, not submodules: the caller registers both.
        self.__dict__['_momentum_pair'] = (online, target, buffers, flatten)
        self._flatten_momentum_pair()
        return target

    def _flatten_momentum_pair(self):
        online, target, _, flatten = self.__dict__['_momentum_pair']
        self.__dict__.pop('_momentum_plan', None)
        if flatten:
            flatten_parameters_(online)
            flatten_parameters_(target)

    def _apply(self, fn, *args, **kwargs):
        result = super()._apply(fn, *args, **kwargs)
        if '_momentum_pair' in self.__dict__:
            self._flatten_momentum_pair()
        return result

    def __getstate__(self):
        state = super().__getstate__()
        state.pop('_momentum_plan', None)  # views of this copy's memory
        return state

    def __setstate__(self, state):
        # copy.deepcopy and pickle rebuild parameters one by one.
        super().__setstate__(state)
        if '_momentum_pair' in self.__dict__:
            self._flatten_momentum_pair()

    def momentum_update(self):
        """``target = m * target + (1 - m) * online``, m = ``self.momentum``."""
        if '_momentum_pair' not in self.__dict__:
            raise RuntimeError(
                f'{type(self).__name__}.momentum_update() was called before '
                'init_momentum_target(): call it in __init__')
        plan = self.__dict__.get('_momentum_plan')
        if plan is None or not plan.is_current():
            online, target, buffers, _ = self.__dict__['_momentum_pair']
            plan = ModuleUpdatePlan(target, online, buffers)
            self.__dict__['_momentum_plan'] = plan
        plan.update_(self.momentum)
