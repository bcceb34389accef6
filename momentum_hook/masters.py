"""Float32 masters of a float16/bfloat16 target network.

A target tensor stored in float16 or bfloat16 cannot take the small steps of
an EMA: ``(1 - m) * (online - target)`` is mostly below half an ulp of the
target, so ``target.lerp_`` rounds it to no change. :class:`TargetMasters`
keeps a float32 master of each such rank-local tensor; the update
(:mod:`~momentum_hook.kernels`) lerps the master and writes it, rounded, into
the target.
"""

import torch

__all__ = [
    'LOW_PRECISION',
    'TargetMasters',
    'is_low_precision',
    'refuse_low_precision',
    'rounds_to',
]

#: The target dtypes that get a float32 master.
LOW_PRECISION = (torch.float16, torch.bfloat16)


def is_low_precision(tensor):
    return tensor.dtype in LOW_PRECISION


def rounds_to(master, target):
    """Whether ``target`` holds ``master`` rounded to its dtype."""
    return master.shape == target.shape and torch.equal(
        master.to(target.device, target.dtype), target
    )


class TargetMasters:
    """The float32 masters of one target network's low-precision tensors.

    A target tensor stored in float16 or bfloat16 cannot take the small
    steps of an EMA: ``(1 - m) * (online - target)`` is mostly below half an
    ulp of the target, so ``target.lerp_`` rounds it to no change. Each such
    local tensor gets a float32 master here, on its device; the update lerps
    the master and copies it, rounded, into the target
    (:class:`ModuleUpdatePlan`). A target in float32 or float64 has none.

    Masters are kept by the name of the local tensor (the parameter's or
    buffer's name in the target, or the FSDP1 unit's), so that they survive
    a new plan; :mod:`~momentum_hook.master_state` puts them in a state
    dict in the target's own layout and takes them back. A master is used
    only while its target holds it rounded;
    when the target was written otherwise (``load_state_dict``, an in-place
    write, a reload of the same values under another name), the master
    restarts from the target's values, or from a master loaded with it
    (:meth:`load`) that rounds to the loaded values.
    """

    def __init__(self):
        self.tensors = {}  # name -> the float32 master
        self.loaded = {}  # name -> a master from a checkpoint, not bound yet
        self.stale = False  # the target was loaded: check the masters
        self._copies = {}  # data_ptr() of a gathered copy -> its master

    def bind(self, names, targets):
        """The masters of ``targets``, reused where they round to them."""
        masters, bound = [], {}
        for name, target in zip(names, targets):
            master = None
            for candidate in (self.loaded.get(name), self.tensors.get(name)):
                if candidate is not None and rounds_to(candidate, target):
                    master = candidate.to(target.device)
                    break
            if master is None:
                master = target.to(torch.float32, copy=True)
            bound[name] = master
            masters.append(master)
        self.tensors, self.loaded, self.stale = bound, {}, False
        return masters

    def resync(self, names, targets):
        """Re-check bound masters in place after their targets changed."""
        for name, target in zip(names, targets):
            master, loaded = self.tensors[name], self.loaded.get(name)
            if loaded is not None and rounds_to(loaded, target):
                master.copy_(loaded)
            elif not rounds_to(master, target):
                master.copy_(target)
        self.loaded, self.stale = {}, False

    def for_copies(self, copies):
        """The masters of persistent ZeRO-3 gathered copies (whole tensors).

        Kept by the copy's address, and used only while the copy holds its
        master rounded: a copy DeepSpeed gathered anew starts a new master
        from its values, and so does a copy at an address that another
        parameter's copy had before (the allocator reuses addresses, and
        persistent parameters often share a shape). These tensors are small
        (below the persistence threshold), so the check is cheap. A
        float32 or float64 copy has none (None in the list).
        """
        masters, kept = [], {}
        for copy in copies:
            if not is_low_precision(copy):
                masters.append(None)
                continue
            master = self._copies.get(copy.data_ptr())
            if master is not None and not rounds_to(master, copy):
                master = None
            if master is None:
                master = copy.to(torch.float32, copy=True)
            kept[copy.data_ptr()] = master
            masters.append(master)
        self._copies = kept
        return masters

    def current(self, name, target):
        """The master of the local tensor ``target``, as a checkpoint holds
        it: a loaded or bound master (the very tensor, so that a checkpointer
        that loads in place writes into it) where it rounds to ``target``,
        else a float32 copy of ``target``, where the next update would
        start."""
        for candidate in (self.loaded.get(name), self.tensors.get(name)):
            if candidate is not None and rounds_to(candidate, target):
                return candidate
        return target.detach().to(torch.float32, copy=True)

    def load(self, masters):
        """Keep ``masters`` (by name) from a checkpoint; check them at the
        next update against the loaded target."""
        self.loaded = {
            name: tensor.detach().to(torch.float32, copy=True)
            for name, tensor in masters.items()
        }
        self.stale = True


def refuse_low_precision(names, tensors):
    """Refuse a stateless update of a float16/bfloat16 target tensor."""
    for name, tensor in zip(names, tensors):
        if is_low_precision(tensor):
            raise ValueError(
                f'target tensor {name!r} is {tensor.dtype}: momentum_update_ '
                'keeps no state, and an EMA stored in '
                f'{tensor.dtype} rounds most small steps (1 - momentum) * '
                '(online - target) to no change, so the target would stall. '
                'Keep a float32 master of it: use MomentumTargetMixin '
                '(model.momentum_update()) or a ModuleUpdatePlan(target, '
                'online) kept across updates (plan.update_(momentum)), which '
                'keep one for you; or update a float32 copy you own, '
                'momentum_update_(master, online, momentum), and copy it '
                'into the target (target.copy_(master))'
            )
