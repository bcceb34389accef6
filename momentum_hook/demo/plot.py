"""Plot the target momentum and the loss of a run from its mmcv JSON log.

mmcv's ``TextLoggerHook`` appends one JSON object per log interval to
``<work_dir>/<timestamp>.log.json``; training lines hold ``epoch`` (from 1),
``iter`` (from 1 within the epoch) and the interval's mean of every logged
value, among them ``loss`` and the hook's ``target_momentum``.
"""

import json

__all__ = ['read_train_log', 'momentum_schedule', 'plot_training']


def read_train_log(json_log, iters_per_epoch):
    """The training records of an mmcv JSON log, with a global iteration.

    Args:
        json_log (str): The ``.log.json`` file.
        iters_per_epoch (int): Iterations per epoch of the run.

    Returns:
        list[dict]: One record per training log line, with ``global_iter``
        added: the 1-based iteration of the whole run,
        ``(epoch - 1) * iters_per_epoch + iter``.
    """
    records = []
    with open(json_log) as f:
        for line in f:
            record = json.loads(line)
            if record.get('mode') != 'train':
                continue  # the first line holds the environment and seed
            record['global_iter'] = (
                record['epoch'] - 1
            ) * iters_per_epoch + record['iter']
            records.append(record)
    return records


def momentum_schedule(hooks, max_iters, model):
    """The momenta the run's momentum hook sets, from its own formula.

    Args:
        hooks (Sequence[Hook]): The runner's hooks.
        max_iters (int): The run's length.
        model (nn.Module): The unwrapped model (for ``base_momentum``).

    Returns:
        tuple[list[int], list[float]] | None: The 1-based iterations that
        update the target and their momenta; None without a momentum hook.
    """
    from momentum_hook import MomentumUpdater

    updater = next(
        (
            h.updater
            for h in hooks
            if isinstance(getattr(h, 'updater', None), MomentumUpdater)
        ),
        None,
    )
    if updater is None:
        return None
    iters = [k for k in range(max_iters) if updater.is_update_iter(k)]
    return (
        [k + 1 for k in iters],
        [
            updater.momentum_at(k, max_iters, model.base_momentum)
            for k in iters
        ],
    )


def plot_training(records, out_file, interval=1, schedule=None, title=None):
    """Save a PNG: the target momentum above, the loss below.

    Args:
        records (list[dict]): From :func:`read_train_log`.
        out_file (str): The PNG path.
        interval (int): The log interval. A value logged at iteration ``g``
            is the mean over iterations ``g - interval + 1 .. g``, so it is
            drawn at the middle of that span. Defaults to 1.
        schedule (tuple[Sequence[int], Sequence[float]], optional): The
            momentum formula's ``(iterations, momenta)``, drawn as a line
            under the logged values.
        title (str, optional): The figure title.
    """
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    iters = [r['global_iter'] - (interval - 1) / 2 for r in records]
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(7, 5.5))
    if schedule is not None:
        top.plot(
            *schedule, color='0.6', lw=2, label='cosine schedule (formula)'
        )
    top.plot(
        iters,
        [r.get('target_momentum') for r in records],
        '.',
        color='C0',
        label='target_momentum (logged by the hook)',
    )
    top.set_ylabel('target momentum')
    top.legend(loc='lower right')
    bottom.plot(iters, [r.get('loss') for r in records], color='C1')
    bottom.set_ylabel('BYOL loss')
    bottom.set_xlabel('iteration')
    for axes in (top, bottom):
        axes.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_file, dpi=100)
    plt.close(fig)
