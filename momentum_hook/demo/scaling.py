"""``python -m momentum_hook.demo.scaling``: the EMA scaling rule on the demo.

Trains the demo's BYOL (``configs/byol_digits.py``, batch ``B`` =
``data.samples_per_gpu``) at ``B`` and at larger batches ``n * B``, each
with and without the hook's ``base_batch_size=B`` (momentum ``m ** n``
instead of ``m``), for several seeds, and prints a markdown table of the
held-out 1-shot, 5-shot and kNN accuracy (mean and standard deviation over
the seeds) and the wall time of each arm.

Both arms scale the learning rate by AdamW's square-root rule, ``lr * n **
0.5`` (Malladi et al., "On the SDEs and Scaling Rules for Adaptive Gradient
Algorithms", 2022); AdamW's betas and eps keep their values. All arms train
for the same number of epochs, so a batch ``n`` times larger makes ``n``
times fewer updates. At ``n = 1`` the rule changes nothing (``m ** 1 ==
m``), so that arm is trained once.

Every run is ``python -m momentum_hook.demo`` in its own process (one CPU
thread, as the config says), with its work dir under ``--out``; the grid's
results are written to ``--out/scaling.json`` after each run, and
``--table FILE`` prints the table of such a file again.
"""
import argparse
import json
import math
import os
import os.path as osp
import statistics
import subprocess
import sys
import time

__all__ = ['main', 'arms', 'summarise', 'markdown_table']

METRICS = ('1-shot', '5-shot', 'knn')


def arms(multipliers, batch, lr):
    """The grid's arms: ``(name, multiplier, cfg options)``.

    Args:
        multipliers (Sequence[int]): Batch multipliers ``n``.
        batch (int): The config's batch ``B``.
        lr (float): The config's learning rate at ``B``.
    """
    out = []
    for n in multipliers:
        options = [f'data.samples_per_gpu={n * batch}',
                   f'optimizer.lr={lr * math.sqrt(n)!r}']
        out.append((f'{n}B per update', n, options))
        if n != 1:
            out.append((f'{n}B scaled', n, options + [
                f'custom_hooks.0.base_batch_size={batch}']))
    return out


def _run(options, seed, work_dir, log):
    command = [sys.executable, '-m', 'momentum_hook.demo', '--device', 'cpu',
               '--seed', str(seed), '--work-dir', work_dir,
               '--cfg-options', *options]
    start = time.monotonic()
    with open(log, 'w') as out:
        subprocess.run(command, stdout=out, stderr=subprocess.STDOUT,
                       check=True)
    seconds = time.monotonic() - start
    with open(osp.join(work_dir, 'results.json')) as f:
        results = json.load(f)
    return dict(results['byol'], seconds=seconds,
                random_init=results['random_init'])


def summarise(runs):
    """Mean and sample standard deviation of each metric over seeds."""
    summary = {}
    for metric in METRICS + ('seconds', ):
        values = [run[metric] for run in runs]
        summary[metric] = (statistics.mean(values),
                           statistics.stdev(values) if len(values) > 1 else 0.)
    return summary


def markdown_table(grid):
    """The table of :func:`main`'s JSON: one row per arm."""
    rows = ['| arm | momentum | lr | seeds | 1-shot | 5-shot | kNN | '
            'wall time per run (s) |', '|' + ' --- |' * 8]
    for arm in grid['arms']:
        s = summarise(arm['runs'])
        cells = [f'{s[m][0]:.3f} ± {s[m][1]:.3f}' for m in METRICS]
        rule = (f"m ** {arm['multiplier']:d}" if 'scaled' in arm['name']
                else 'm')
        rows.append(f"| {arm['name']} | {rule} | {arm['lr']:.4g} | "
                    f"{len(arm['runs'])} | {' | '.join(cells)} | "
                    f"{s['seconds'][0]:.0f} ± {s['seconds'][1]:.0f} |")
    untrained = [run['random_init'] for run in grid['arms'][0]['runs']
                 if 'random_init' in run]
    if untrained:  # the same seeds' encoders before training
        s = summarise([dict(run, seconds=0.) for run in untrained])
        cells = [f'{s[m][0]:.3f} ± {s[m][1]:.3f}' for m in METRICS]
        rows.append(f"| untrained encoder | | | {len(untrained)} | "
                    f"{' | '.join(cells)} | |")
    return '\n'.join(rows)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog='python -m momentum_hook.demo.scaling', description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', default='work_dirs/scaling',
                        help='where the runs and scaling.json go')
    parser.add_argument('--multipliers', type=int, nargs='+',
                        default=[1, 4, 8], help='batch multipliers n')
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--epochs', type=int, default=5,
                        help='runner.max_epochs of every run (default: the '
                        "config's 5)")
    parser.add_argument('--table', metavar='JSON',
                        help='only print the table of a scaling.json')
    return parser.parse_args(argv)


def main(argv=None):
    """Run the grid (or print a saved one) and print its table."""
    args = parse_args(argv)
    if args.table:
        with open(args.table) as f:
            print(markdown_table(json.load(f)))
        return 0
    from .train import default_config_path, load_config
    cfg = load_config(default_config_path())
    batch, lr = cfg.data.samples_per_gpu, cfg.optimizer.lr
    os.makedirs(args.out, exist_ok=True)
    grid = dict(batch=batch, epochs=args.epochs, seeds=args.seeds, arms=[])
    path = osp.join(args.out, 'scaling.json')
    for name, n, options in arms(args.multipliers, batch, lr):
        grid['arms'].append(dict(
            name=name, multiplier=n, lr=lr * math.sqrt(n),
            options=options + [f'runner.max_epochs={args.epochs}'], runs=[]))
    for seed in args.seeds:  # seeds outermost: every arm sees the same load
        for arm in grid['arms']:
            work_dir = osp.join(args.out,
                                f"{arm['name'].replace(' ', '_')}_{seed}")
            os.makedirs(work_dir, exist_ok=True)
            arm['runs'].append(dict(_run(arm['options'], seed, work_dir,
                                         osp.join(work_dir, 'out.txt')),
                                    seed=seed))
            print(f"{arm['name']}, seed {seed}: {arm['runs'][-1]}",
                  flush=True)
            with open(path, 'w') as f:
                json.dump(grid, f, indent=2)
    print(markdown_table(grid))
    print(f'Results: {path}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
