"""The full, unsharded weights of a (sharded) run, as one ordinary file.

Under FSDP or DeepSpeed ZeRO-3 each rank holds a shard of every network and
the checkpoints are per rank; the teacher people evaluate and publish is the
target network's plain ``state_dict``. :func:`export_target` writes it on
rank 0, loadable with ``torch.load`` into an unwrapped copy of the network::

    export_target(runner.model, 'teacher.pth')   # on every rank
    teacher = copy.deepcopy(plain_model.online_net)
    teacher.load_state_dict(torch.load('teacher.pth'))

How the weights are gathered (public APIs; a collective on every rank):

========================  ==============================================
engine                    gathering
========================  ==============================================
none, DDP, FSDP1, FSDP2,  ``torch.distributed.checkpoint.state_dict.get_
ZeRO-1/2                  model_state_dict(full_state_dict=True,
                          cpu_offload=True)``: rank 0 gets CPU tensors
DeepSpeed ZeRO-3          ``deepspeed.zero.GatheredParameters``, one
                          parameter at a time (memory: one parameter)
========================  ==============================================

Nothing distributed is imported before a call needs it.
"""

from typing import Any

import torch
from torch import nn

from ._compat import deepspeed as ds
from .master_state import MASTER_KEY
from .ranks import rank
from .wrappers import loaded as _loaded
from .wrappers import unwrap

__all__ = ['full_state_dict', 'export_target']


def _user_model(model):
    """The user's module, inside the wrappers and an FSDP1 root as well."""
    fsdp = _loaded('torch.distributed.fsdp', 'FullyShardedDataParallel')
    return unwrap(
        model, lambda module: fsdp is not None and isinstance(module, fsdp)
    )


def _zero3_state_dict(model, keep):
    """Rank 0's CPU copy of ``model``'s state dict, ZeRO-3 parameters
    gathered one by one; only the keys for which ``keep(key)`` holds.

    The float32 masters of a bf16/fp16 target are left out: under ZeRO-3
    each rank's are its partitions, which travel in its own checkpoint
    file, not whole tensors.
    """
    state, first = {}, rank() == 0
    for key, value in model.state_dict(keep_vars=True).items():
        if not keep(key) or MASTER_KEY in key:
            continue
        if ds.is_zero3_param(value):
            with ds.gathered_parameters([value]):
                if first:
                    state[key] = value.detach().cpu().clone()
        elif first:
            state[key] = value.detach().cpu().clone()
    return state


def full_state_dict(
    model: nn.Module, prefix: str = ''
) -> dict[str, torch.Tensor]:
    """The whole, unsharded ``state_dict`` of ``model``, on rank 0.

    A collective under FSDP and ZeRO-3: call it on every rank.

    Args:
        model (nn.Module): The model, wrapped or not (FSDP1/FSDP2, DDP,
            DeepSpeed's engine or MMEngine's ``MMDeepSpeedEngineWrapper``,
            e.g. ``runner.model``).
        prefix (str): Keep only the keys that start with it. Defaults to
            all.

    Returns:
        dict[str, Tensor]: On rank 0 (or without a process group), the
        model's keys as an unwrapped model names them, with detached CPU
        tensors; on the other ranks an empty dict. The float32 masters of a
        bf16/fp16 target (``momentum_target_master.*``) are whole tensors
        under plain, DDP, FSDP1 and FSDP2 models and left out under ZeRO-3.
    """
    # MMEngine's DeepSpeed wrapper, DeepSpeed's engine, DDP and DataParallel
    # prefix the model's keys: gather from the model inside them.
    model = unwrap(model)
    if not isinstance(model, nn.Module):
        raise TypeError(
            f'model must be an nn.Module or a DeepSpeed engine, '
            f'got {type(model).__name__}'
        )

    def keep(key):
        return key.startswith(prefix)

    if any(map(ds.is_zero3_param, model.parameters())):
        return _zero3_state_dict(model, keep)
    if torch.distributed.is_available():  # plain, FSDP1 and FSDP2 alike
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        state: dict[str, Any] = get_model_state_dict(
            model,
            options=StateDictOptions(full_state_dict=True, cpu_offload=True),
        )
    else:
        state = model.state_dict()
    return (
        {
            key: value.detach().cpu().clone()
            for key, value in state.items()
            if keep(key)
        }
        if rank() == 0
        else {}
    )


def export_target(
    model: nn.Module, path: str, target: str = 'target_net'
) -> dict[str, torch.Tensor] | None:
    """Write the full, unsharded target network's ``state_dict`` to ``path``.

    A collective under FSDP and ZeRO-3: call it on every rank; rank 0 writes
    one ordinary ``torch.save`` file whose keys are the target network's own
    (``target_net.0.weight`` is saved as ``0.weight``), so it loads into an
    unwrapped copy of the network.

    Args:
        model (nn.Module): The model that holds the target, wrapped or not
            (e.g. ``runner.model``).
        path (str): The file to write on rank 0.
        target (str): The target network's attribute path in the unwrapped
            model. Defaults to ``'target_net'`` (MMSelfSup's BYOL, MoCo).

    Returns:
        dict[str, Tensor] | None: What was written, on rank 0; None on the
        other ranks.

    Raises:
        ValueError: On every rank, before anything is gathered, if the model
            has no submodule ``target``.
    """
    try:
        _user_model(model).get_submodule(target)
    except AttributeError:
        names = [name for name, _ in _user_model(model).named_children()]
        raise ValueError(
            f'the model has no target network {target!r}: pass '
            f'target=<its attribute path>, one of {names}'
        ) from None
    prefix = f'{target}.'
    state = full_state_dict(model, prefix)
    if rank() != 0:
        return None
    state = {key[len(prefix) :]: value for key, value in state.items()}
    torch.save(state, path)
    return state
