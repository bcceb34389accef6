"""One verdict on every rank: the cross-rank check at planning time.

A refusal raised on some ranks only would leave the others waiting in their
next collective; :func:`agree_across_ranks` shares each rank's verdict once,
where every rank is at the same point, so that all raise together. Nothing
here imports ``torch.distributed``.
"""

import sys

__all__ = ['rank', 'world_size', 'group_position', 'agree_across_ranks']


def _initialized():
    """``torch.distributed`` if a default process group exists, else None
    (no import)."""
    distributed = sys.modules.get('torch.distributed')
    if (
        distributed is None
        or not distributed.is_available()
        or not distributed.is_initialized()
    ):
        return None
    return distributed


def world_size():
    """The default process group's size, or 1 without one (no import)."""
    distributed = _initialized()
    return 1 if distributed is None else distributed.get_world_size()


def rank():
    """This process's rank in the default process group, or 0 without one
    (no import)."""
    distributed = _initialized()
    return 0 if distributed is None else distributed.get_rank()


def _ranks(ranks):
    return f'rank{"s" if len(ranks) > 1 else ""} {", ".join(map(str, ranks))}'


def agree_across_ranks(plan, ballot=None):
    """Run ``plan()`` on every rank and reach one verdict on all of them.

    A refusal raised on some ranks only (a shard laid out differently on one
    rank) would leave the others to go on into their next collective and
    block there until the process group's timeout. So each rank plans, then
    every rank of the default process group shares whether and why it
    refused (one ``all_gather_object`` of a short string, at plan time
    only), and every rank raises the same error, naming the ranks that
    refused. Without a process group (or with one rank) nothing is
    communicated.

    Args:
        plan (Callable[[], Any]): Plans and checks; may raise.
        ballot (Callable[[], Any], optional): Called after ``plan()`` on
            each rank that did not refuse; what it returns (small, picklable)
            travels with the verdict, so that every rank learns every
            rank's answer in the same exchange. Defaults to None.

    Returns:
        Any: What ``plan()`` returned, when no rank refused; with a
        ``ballot``, ``(that, [each rank's ballot, by rank])``.

    Raises:
        ValueError, TypeError: The first refusing rank's error (its type;
            other exception types become RuntimeError on the other ranks),
            on every rank.
    """
    world = world_size()
    vote = None
    try:
        result = plan()
        if ballot is not None:
            vote = ballot()
    except Exception as error:
        if world == 1:
            raise
        verdict, local = (type(error).__name__, str(error)), error
    else:
        if world == 1:
            return result if ballot is None else (result, [vote])
        verdict, local = None, None
    gathered = [None] * world
    sys.modules['torch.distributed'].all_gather_object(
        gathered, (verdict, vote)
    )
    verdicts = [each for each, _ in gathered]
    refused = [rank for rank, each in enumerate(verdicts) if each]
    if not refused:
        return (
            result
            if ballot is None
            else (result, [each for _, each in gathered])
        )
    kind, message = verdicts[refused[0]]
    if len(refused) < world or len(set(verdicts)) > 1:
        notes = []
        if len(refused) > 1:
            notes.append(f'{_ranks(refused[1:])} refused too')
        if len(refused) < world:
            accepted = [rank for rank in range(world) if rank not in refused]
            notes.append(
                f'{_ranks(accepted)} found nothing wrong: the '
                'layout differs between ranks'
            )
        message = (
            f'rank {refused[0]} of {world} refused the momentum '
            f'target ({"; ".join(notes)}): {message}'
        )
    error_type = {'ValueError': ValueError, 'TypeError': TypeError}.get(
        kind, RuntimeError
    )
    raise error_type(message) from local


def group_position(group):
    """``(rank, world size)`` in a process group (no communication)."""
    distributed = sys.modules['torch.distributed']
    return distributed.get_rank(group), distributed.get_world_size(group)
