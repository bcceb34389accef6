"""Which online tensor each target tensor is averaged with: the one of the
same name.

The target is a copy of the online network, so each of its parameters has
the same name in both: ``named_parameters()`` is the contract users read. A
match by position would accept two networks whose parameters have the same
shapes in another order, or a pruned layer whose ``weight`` became
``weight_orig`` (registered after ``bias``), and average unrelated tensors.

Names are read without the attributes of wrappers (a module that holds one
other module and nothing else under ``module``, ``_fsdp_wrapped_module``,
``_checkpoint_wrapped_module`` or ``_orig_mod``: DDP, MMEngine's and mmcv's
wrappers, FSDP1, ``checkpoint_wrapper``, ``torch.compile``), which engines
and tools often put around one network only. A name in one network only is
refused before anything is written (:func:`pair_by_name`).
"""

from ._compat.torch import WRAPPER_ATTRIBUTES, wrapped_attribute

__all__ = ['join', 'named_modules', 'pair_by_name']


def join(prefix, name):
    """``prefix.name``, or ``name`` at the root."""
    return f'{prefix}.{name}' if prefix else name


def named_modules(module):
    """Every submodule of ``module`` (each once, parents first).

    Yields:
        tuple[str, str, nn.Module]: The submodule's path, as
        ``module.named_modules()`` gives it; its name without wrapper
        attributes, what pairing compares; the submodule.
    """
    names, wrapped = {}, {}
    for path, submodule in module.named_modules():
        parent, _, attribute = path.rpartition('.')
        if not path:
            name = ''
        elif wrapped[parent] == attribute:
            name = names[parent]
        else:
            name = join(names[parent], attribute)
        names[path], wrapped[path] = name, wrapped_attribute(submodule)
        yield path, name, submodule


_WRAPPERS = ', '.join(f'{name}.' for name in sorted(WRAPPER_ATTRIBUTES))


def _cause(target_only, online_only, fsdp_unit):
    """The likely cause of names that differ, and its fix."""
    sides = [(shard.keys[0], 'target') for shard in target_only] + [
        (shard.keys[0], 'online network') for shard in online_only
    ]
    if any(name.startswith(fsdp_unit) for name, _ in sides):
        return (
            'one network is an FSDP1 unit (or holds units) where the '
            'other does not: wrap both with the same auto_wrap_policy'
        )
    pruned = next(
        (
            (name, side)
            for name, side in sides
            if name.rpartition('.')[2].endswith('_orig')
        ),
        None,
    )
    if pruned is not None:
        (name, side), (layer, _, attribute) = pruned, pruned[0].rpartition('.')
        weight = attribute[: -len('_orig')]
        return (
            f'{name!r} is what torch.nn.utils.prune leaves of a pruned '
            f"{weight!r}: make the pruning of the {side}'s submodule "
            f'{layer or "<root>"!r} permanent before the update, with '
            f'torch.nn.utils.prune.remove(submodule, {weight!r}), or '
            'prune both networks alike'
        )
    return (
        'a submodule replaced or added in one network only (give both '
        'the same architecture, or make the target a new copy of the '
        'online network), or two networks that are not a target and '
        'its online network (momentum_update_(target, online, m) takes '
        'the target first)'
    )


def _names(shards):
    return ' and '.join(repr(shard.keys[0]) for shard in shards[:2]) + (
        f' and {len(shards) - 2} more' if len(shards) > 2 else ''
    )


def pair_by_name(targets, onlines, what='parameters', fsdp_unit='FSDP unit'):
    """``onlines`` reordered so that each pairs with the target of its name.

    Each shard's ``keys`` are its names without wrapper attributes, the
    first its own, the others those of a parameter tied to it; a target
    pairs with the online shard that has its name (or a tied name).

    Args:
        targets (list[LocalShard]): The target's shards.
        onlines (list[LocalShard]): The online network's.
        what (str): What the shards are, for the messages.
        fsdp_unit (str): How the keys of FSDP1 units begin.

    Returns:
        list[LocalShard]: The online shards, in the order of ``targets``.

    Raises:
        ValueError: If a name is in one network only, or a tensor is tied to
            another in one network only, naming the first and its likely
            cause.
    """
    position = {}
    for index, shard in enumerate(onlines):
        for key in shard.keys:
            position.setdefault(key, index)
    paired, used, target_only = [], {}, []
    for shard in targets:
        index = next(
            (position[key] for key in shard.keys if key in position), None
        )
        if index is None:
            target_only.append(shard)
        elif index in used:
            raise ValueError(
                f"the target's {what} {used[index].keys[0]!r} and "
                f'{shard.keys[0]!r} are two tensors, but one tied tensor in '
                f'the online network ({onlines[index].keys[0]!r}): tie them '
                'in both networks, or in neither. Nothing was updated'
            )
        else:
            used[index] = shard
            paired.append(onlines[index])
    online_only = [
        shard for index, shard in enumerate(onlines) if index not in used
    ]
    if not (target_only or online_only):
        return paired
    if len(targets) != len(onlines):
        head = (
            f'the target has {len(targets)} {what} but the online '
            f'network has {len(onlines)}'
        )
    else:
        head = (
            f"the target's and the online network's {what} differ in "
            'their names'
        )
    sides = []
    if target_only:
        sides.append(f'{_names(target_only)} in the target only')
    if online_only:
        sides.append(f'{_names(online_only)} in the online network only')
    raise ValueError(
        f'{head}: {"; ".join(sides)}. They are paired by their names in '
        f'the two networks (leaving out the wrapper attributes {_WRAPPERS}), '
        'so the networks must have the same names. Likely cause: '
        f'{_cause(target_only, online_only, fsdp_unit)}. Nothing was updated'
    )
