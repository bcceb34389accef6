"""An MMEngine 0.10.7 ``FSDPStrategy`` that resumes, Adam's state included.

Import this module (``custom_imports = dict(imports=['momentum_hook',
'momentum_hook.mmengine_strategies'], ...)``) and name the strategy
``strategy=dict(type='momentum_hook.FSDPResumeStrategy', ...)``: it takes
every argument of MMEngine's ``FSDPStrategy`` (``model_wrapper``,
``state_dict_cfg='full'`` or ``'local'``, ...). Importing it registers the
class in a child registry of MMEngine's ``STRATEGIES`` with scope
``momentum_hook``, as the hook is registered, so no name of MMEngine's or
another package's changes. ``import momentum_hook`` alone does not import
this module: MMEngine's strategy package imports DeepSpeed, when installed.

What it changes in ``FSDPStrategy``, and why:

- **Loading the optimizer state.** MMEngine 0.10.7 calls
  ``FSDP.optim_state_dict_to_load(state_dict, model, optim)``, the argument
  order of torch < 2.1, and a resume fails with ``TypeError: unhashable
  type: 'dict'`` (pytorch/pytorch#105727). This class calls
  ``FSDP.optim_state_dict_to_load(model, optim, state_dict)``.
- **Saving a full optimizer state on the CPU.** With
  ``state_dict_cfg='full'`` MMEngine asks torch for the full optimizer state
  with ``FullOptimStateDictConfig(offload_to_cpu=True)``. On a CPU device
  torch 2.14's FSDP1 (``use_orig_params=True``) returns, for each parameter,
  views of one all-gather buffer that it reuses for every state of the
  optimizer, because ``.cpu()`` of a CPU tensor copies nothing: AdamW's
  ``exp_avg`` is saved equal to its ``exp_avg_sq``, and a resumed run
  diverges from its first step (``docs/sharded.md``, "Resuming FSDP runs
  with Adam"). Where the FSDP compute device is the CPU, where the offload
  has nothing to move, this class gathers the full optimizer state with
  ``offload_to_cpu=False``, which copies each state out of the buffer. On a
  GPU it keeps the config as given.
- **Refusing a corrupted checkpoint.** A full checkpoint whose every Adam
  state has ``exp_avg`` equal to ``exp_avg_sq`` (as plain ``FSDPStrategy``
  writes them on the CPU) is refused by :meth:`FSDPResumeStrategy.resume`
  with a ``ValueError``, on every rank and before the weights are loaded,
  instead of resuming from the wrong state.

``state_dict_cfg='local'`` (every rank saves its own shards,
``LocalOptimStateDictConfig``) is not affected by the torch bug and needs
only the first change.
"""

import dataclasses
from typing import Any

import torch
from mmengine.registry import STRATEGIES
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

from ._compat.mmengine import fsdp_strategy
from .registration import register_scoped

FSDPStrategy: Any = fsdp_strategy()  # MMEngine ships no types

__all__ = ['FSDPResumeStrategy', 'STRATEGY_NAMES', 'check_adam_state']

#: The names this module registers, ``'momentum_hook.<name>'`` in a config.
STRATEGY_NAMES = ('FSDPResumeStrategy',)


def check_adam_state(state_dict, source):
    """Refuse an optimizer state dict whose Adam moments were corrupted.

    The signature of torch 2.14's full FSDP1 optimizer state dict on the
    CPU: every parameter's ``exp_avg`` equals its ``exp_avg_sq``. Real Adam
    moments never all coincide (after one step ``exp_avg = (1 - beta1) g``
    and ``exp_avg_sq = (1 - beta2) g**2``).

    Args:
        state_dict (dict): An optimizer state dict (``'state'`` maps each
            parameter to its state).
        source (str): What to name in the error, e.g. the checkpoint.

    Raises:
        ValueError: If at least one parameter has a nonzero ``exp_avg`` and
            every parameter with both moments has them equal.
    """
    pairs = [
        (state['exp_avg'], state['exp_avg_sq'])
        for state in state_dict.get('state', {}).values()
        if isinstance(state, dict)
        and torch.is_tensor(state.get('exp_avg'))
        and torch.is_tensor(state.get('exp_avg_sq'))
    ]
    if (
        pairs
        and any(bool(avg.any()) for avg, _ in pairs)
        and all(torch.equal(avg, avg_sq) for avg, avg_sq in pairs)
    ):
        raise ValueError(
            f'the optimizer state of {source} is corrupted: every exp_avg '
            'equals its exp_avg_sq, as torch 2.14 writes a full FSDP '
            'optimizer state dict on the CPU (FSDPStrategy with '
            "state_dict_cfg='full'). Resuming from it would diverge from "
            'the first step. Resume from a checkpoint saved by '
            "strategy=dict(type='momentum_hook.FSDPResumeStrategy', ...), "
            'or load only the weights (load_from=..., resume=False)'
        )


class FSDPResumeStrategy(FSDPStrategy):
    """MMEngine's ``FSDPStrategy`` whose checkpoints resume bit for bit.

    Takes the arguments of ``mmengine._strategy.FSDPStrategy``. See the
    module docstring for the three changes: torch's current argument order
    for ``FSDP.optim_state_dict_to_load``, the full optimizer state gathered
    without the no-op CPU offload that corrupts Adam's moments, and the
    refusal of a checkpoint that holds such corrupted moments.
    """

    def _offload_corrupts_state(self):
        """Whether torch's full optimizer state dict would alias its states:
        a full state dict, ``offload_to_cpu=True``, a CPU compute device."""
        device = getattr(self.model, 'compute_device', None)
        return (
            self._is_full_state_dict()
            and getattr(self.optim_state_dict_config, 'offload_to_cpu', False)
            and device is not None
            and device.type == 'cpu'
        )

    def optim_state_dict(self):
        """The optimizer state dict as ``state_dict_cfg`` says, with each
        state copied out of torch's all-gather buffer on the CPU."""
        if not self._offload_corrupts_state():
            return super().optim_state_dict()
        config = dataclasses.replace(
            self.optim_state_dict_config, offload_to_cpu=False
        )
        with FSDP.state_dict_type(
            self.model, self.state_dict_type, self.state_dict_config, config
        ):
            return FSDP.optim_state_dict(self.model, self.optim_wrapper)

    def resume(
        self, filename, *, resume_optimizer=True, callback=None, **kwargs
    ):
        """``FSDPStrategy.resume``, refusing first (on every rank, before
        the weights are loaded) a full checkpoint whose Adam moments are
        corrupted (:func:`check_adam_state`)."""

        def check(checkpoint):
            if (
                resume_optimizer
                and self._is_full_state_dict()
                and 'optimizer' in checkpoint
            ):
                check_adam_state(checkpoint['optimizer'], filename)
            if callback is not None:
                callback(checkpoint)

        return super().resume(
            filename,
            resume_optimizer=resume_optimizer,
            callback=check,
            **kwargs,
        )

    def load_optim_state_dict(self, state_dict):
        """Load ``state_dict`` (from :meth:`optim_state_dict`) into the
        optimizer: ``FSDP.optim_state_dict_to_load(model, optim,
        state_dict)``, torch's current argument order."""
        self.optim_wrapper.load_state_dict(
            FSDP.optim_state_dict_to_load(
                self.model, self.optim_wrapper.optimizer, state_dict
            )
        )


register_scoped(STRATEGIES, FSDPResumeStrategy, STRATEGY_NAMES)
