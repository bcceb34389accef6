"""DeepSpeed ZeRO state that the update reads and changes, and the ZeRO
configurations it refuses.

A ZeRO-3 parameter below ``stage3_param_persistence_threshold`` is
*persistent*: besides its partition it keeps a gathered copy between steps,
which DeepSpeed refreshes from the partitions only after the next optimizer
step. :func:`gathered_copies` lists those pairs, so that the update can
lerp the copies too (both are whole on every rank, so no communication) and
the target's next forward sees the update. A target copy whose online copy
was released (a user's ``GatheredParameters`` over the online network) is
released too (:func:`available_copies`): DeepSpeed re-gathers it from the
updated partition at the target's next forward.

Under ZeRO++ hierarchical partitioning (``zero_hpz_partition_size`` > 1),
DeepSpeed gathers a parameter from a secondary partition that it never
refreshes for a frozen one: :func:`secondary_partitions` lists the target's,
and the update drops them (:func:`drop_secondary_partitions`), so that the
next gather reads the updated partitions. ZeRO++ quantized weights are
refused: by the plan where a partition is stored quantized, and from the
DeepSpeed config by :func:`check_zero_config`. :func:`check_zero3_gathers`
refuses a ZeRO-3 engine whose multi-parameter gathers may be read unfinished
(DeepSpeed before 0.19.8 on gloo).
"""

import sys

from ._compat import deepspeed as ds

__all__ = [
    'QUANTIZED',
    'QUANTIZED_WEIGHTS',
    'gathered_copies',
    'available_copies',
    'secondary_partitions',
    'drop_secondary_partitions',
    'check_zero_config',
    'check_zero3_gathers',
]


#: Why ZeRO++ quantized weights (qwZ) are refused, and what to set.
QUANTIZED = (
    "the momentum update needs the target's partitions in floating point, "
    'and its forward must use the EMA it computes, but ZeRO++ quantized '
    "weights store the frozen target's partitions in int8 "
    '(zero_quantized_nontrainable_weights) or round every gather of them '
    'to int8 (zero_quantized_weights), so updates would be lost or never '
    'reach the forward: set zero_optimization=dict(..., '
    'zero_quantized_weights=False, zero_quantized_nontrainable_weights='
    'False) in the DeepSpeed config (zero_quantized_gradients and '
    'zero_hpz_partition_size may stay)'
)


#: The ZeRO++ options :func:`check_zero_config` refuses.
QUANTIZED_WEIGHTS = (
    'zero_quantized_weights',
    'zero_quantized_nontrainable_weights',
)


def gathered_copies(targets, onlines):
    """The ZeRO-3 pairs that can hold a gathered copy besides the partition.

    Args:
        targets (list[LocalShard]): The target's shards, checked alike with
            ``onlines`` (:func:`check_alike`).
        onlines (list[LocalShard]): The online network's.

    Returns:
        list[tuple[Parameter, Parameter]]: The (target, online) persistent
        ZeRO-3 parameters; see :func:`available_copies`.
    """
    return [
        (target.owner, online.owner)
        for target, online in zip(targets, onlines)
        if target.layout[0] == 'ZeRO-3 partition'
        and target.layout[-1] == 'persistent'
    ]


def available_copies(pairs):
    """The gathered (target, online) copies in ``pairs`` to update now.

    A persistent ZeRO-3 parameter's ``data`` is a 0-element placeholder until
    its first forward gathers it, then the whole tensor on every rank.

    Args:
        pairs (list): From :func:`gathered_copies`.

    Returns:
        tuple[list[Tensor], list[Tensor]]: The target and online copies.

    A target copy whose online copy is not gathered now (a user's
    ``deepspeed.zero.GatheredParameters`` over the online network releases
    its persistent copies on exit) cannot be updated locally: it is
    released here, so that the target's next
    forward gathers it from its updated partition.
    """
    targets, onlines, stale = [], [], []
    for target, online in pairs:
        if not ds.is_gathered(target):
            continue  # not gathered: the partition is all there is
        if not ds.is_gathered(online):
            stale.append(target)
            continue
        targets.append(target.data)
        onlines.append(online.data)
    ds.release_gathered(stale)
    return targets, onlines


def secondary_partitions(targets):
    """The ZeRO-3 target parameters with a ZeRO++ hpZ secondary partition.

    Under ``zero_hpz_partition_size`` > 1, DeepSpeed gathers a parameter from
    its secondary partition (``ds_secondary_tensor``: this rank's slice of
    the parameter split over its hpZ group, larger than its partition
    ``ds_tensor``) whenever that exists, and rebuilds it only after the
    parameter's next gather from ``ds_tensor``; for trainable parameters it
    drops them after every optimizer step, never for a frozen target. Its
    elements are not all local to ``ds_tensor``, so it cannot be updated
    without communication: :func:`drop_secondary_partitions` drops it after
    each update instead.

    Args:
        targets (list[LocalShard]): The target's shards.

    Returns:
        list[Parameter]: The parameters to pass to
        :func:`drop_secondary_partitions`.
    """
    return [
        shard.owner
        for shard in targets
        if shard.layout[0] == 'ZeRO-3 partition'
        and ds.hpz_group(shard.owner) is not None
    ]


def drop_secondary_partitions(params):
    """Drop the hpZ secondary partitions of ``params`` (no communication), as
    DeepSpeed does for trainable parameters after an optimizer step: the
    next gather reads the updated partitions over the whole data-parallel
    group and rebuilds them."""
    for param in params:
        ds.drop_secondary_partition(param)


def check_zero_config(config):
    """Refuse a DeepSpeed config whose ZeRO++ options break the update.

    Quantized weights (qwZ) need CUDA kernels, so this reads the config
    instead of the engine: the MMEngine hook calls it with
    ``DeepSpeedStrategy``'s config before training, and a model's plan
    refuses a partition that DeepSpeed stored quantized.

    Args:
        config (dict | None): A DeepSpeed config as a dict (its
            ``zero_optimization`` is read), or None.

    Raises:
        ValueError: If ``zero_quantized_weights`` or
            ``zero_quantized_nontrainable_weights`` is set.
    """
    zero = (config or {}).get('zero_optimization') or {}
    enabled = [key for key in QUANTIZED_WEIGHTS if zero.get(key)]
    if enabled:
        raise ValueError(
            f'the DeepSpeed config sets {" and ".join(enabled)}=True: '
            f'{QUANTIZED}'
        )


def check_zero3_gathers(engine):
    """Refuse a ZeRO-3 engine on gloo whose gathers may read unfinished data.

    DeepSpeed before 0.19.8 waits only for the last of the all-gathers it
    issues when it gathers several parameters at once (``_allgather_params_
    coalesced``); on gloo the others may still be in flight. It gathers the
    persistent parameters that way after every optimizer step, so the online
    network, and the target's EMA of it, can read stale or uninitialised
    values. ``stage3_allgather_sequential`` gathers one at a time.

    Args:
        engine (deepspeed.DeepSpeedEngine): The engine that holds the model.

    Raises:
        ValueError: Naming the DeepSpeed version and the option to set.
    """
    distributed = sys.modules['torch.distributed']
    if (
        engine.zero_optimization_stage() == 3
        and not engine.zero_allgather_sequential()
        and ds.version() < (0, 19, 8)
        and distributed.is_initialized()
        and distributed.get_backend() == 'gloo'
    ):
        raise ValueError(
            f'DeepSpeed {ds.version_text()} on gloo waits for only the '
            'last of the all-gathers of a ZeRO-3 multi-parameter gather, so '
            'the persistent parameters it re-gathers after each optimizer '
            'step can be read unfinished, and the target would average '
            'them: set zero_optimization=dict(stage=3, '
            'stage3_allgather_sequential=True) (in MMEngine, strategy=dict('
            "type='DeepSpeedStrategy', zero_optimization=dict(stage=3, "
            'stage3_allgather_sequential=True))), or use DeepSpeed >= 0.19.8'
        )
