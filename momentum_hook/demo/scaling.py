"""``python -m momentum_hook.demo.scaling``: BYOL at batch B and at κB.

Does the EMA scaling rule keep the demo's BYOL on the trajectory of batch
``B`` when the batch grows to ``κB``, if the optimizer keeps it there too?
Three arms train the demo's model (``configs/byol_digits.py``'s network,
``base_momentum`` 0.99 rising to 1 along a cosine) on the same images, in
the same order, with the same two views of each and the same initial
weights for a given seed:

- ``B``: batch ``B``, AdamW at the base hyper-parameters, momentum ``m``;
- ``κB scaled``: batch ``κB``, AdamW under the SDE scaling rule
  (:func:`adam_sde`), momentum ``m ** κ`` (the hook's ``base_batch_size``);
- ``κB per update``: the same, with momentum ``m``.

Every arm sees the same number of samples; the learning rate warms up
linearly over the same number of samples, then stays constant. At fixed
numbers of samples seen, each arm is scored on the 540 held-out digits: the
BYOL loss on fixed views of them (online prediction against the target's
projection, both networks in eval mode), and the 1-shot, 5-shot and kNN
accuracy of the online encoder's features.

The pass criterion (:func:`verdict`), fixed before the runs: B's band at a
point is the mean over seeds ± 2 standard deviations. An arm *stays on B* for
a metric when its mean over seeds lies in B's band at every evaluation point
after the warm-up. The rule is supported when the scaled arm stays on B and
the per-update arm does not; when neither stays on B the optimizer's rule
did not reproduce B's training, and the experiment says nothing about the
EMA rule ("optimizer rule not met").
"""

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch

__all__ = [
    'adam_sde',
    'arms',
    'sample_views',
    'train_arm',
    'verdict',
    'paired_gaps',
    'markdown_tables',
    'demo_settings',
    'main',
]

METRICS = ('heldout loss', '1-shot', '5-shot', 'knn')


def adam_sde(kappa, lr, betas, eps, weight_decay):
    """AdamW's hyper-parameters for ``kappa`` times the batch.

    The square-root scaling rule of Malladi et al., "On the SDEs and Scaling
    Rules for Adaptive Gradient Algorithms" (NeurIPS 2022):
    ``lr * sqrt(kappa)``, ``1 - beta1`` and ``1 - beta2`` times ``kappa``,
    ``eps / sqrt(kappa)``, and the decoupled weight decay times
    ``sqrt(kappa)``, so that the decay per sample, ``lr * weight_decay /
    batch``, is kept.

    Returns:
        dict: ``lr``, ``betas``, ``eps`` and ``weight_decay`` for
        ``torch.optim.AdamW``.

    Raises:
        ValueError: If ``kappa * (1 - beta)`` reaches 1.
    """
    scaled = tuple(1 - kappa * (1 - beta) for beta in betas)
    if min(scaled) <= 0:
        raise ValueError(
            f'kappa={kappa} is too large for betas={betas}: '
            f'1 - kappa * (1 - beta) = {scaled}'
        )
    root = math.sqrt(kappa)
    return dict(
        lr=lr * root,
        betas=scaled,
        eps=eps / root,
        weight_decay=weight_decay * root,
    )


def arms(batch, kappa, optimizer):
    """The three arms: ``dict(name, batch, kappa, momentum_kappa, optimizer)``.

    ``momentum_kappa`` is the power each scheduled momentum is raised to.
    """
    large = adam_sde(kappa, **optimizer)
    return [
        dict(
            name='B',
            batch=batch,
            kappa=1,
            momentum_kappa=1,
            optimizer=dict(optimizer),
        ),
        dict(
            name=f'{kappa}B scaled',
            batch=kappa * batch,
            kappa=kappa,
            momentum_kappa=kappa,
            optimizer=large,
        ),
        dict(
            name=f'{kappa}B per update',
            batch=kappa * batch,
            kappa=kappa,
            momentum_kappa=1,
            optimizer=large,
        ),
    ]


def sample_views(images, samples, chunk, seed, augment):
    """The run's training views: ``samples`` images drawn epoch by epoch in
    a seeded order, two views each, drawn ``chunk`` images at a time, so
    that every batch size that is a multiple of ``chunk`` sees the same
    views. ``seed`` fixes the order and the views (through ``1000 +
    seed``, so that they do not share a stream with the weights of the
    same seed).

    Returns:
        tuple[Tensor, Tensor]: ``(samples, C, H, W)`` each.
    """
    from .data import two_views

    generator = torch.Generator().manual_seed(1000 + seed)
    order = torch.cat(
        [
            torch.randperm(len(images), generator=generator)
            for _ in range(-(-samples // len(images)))
        ]
    )[:samples]
    views = [
        two_views(
            images[order[start : start + chunk]],
            generator=generator,
            **augment,
        )
        for start in range(0, samples, chunk)
    ]
    return tuple(torch.cat(v) for v in zip(*views))


def _evaluate(model, heldout_views, images, labels):
    from .evaluate import evaluate_features, extract_features

    was_training = model.training
    model.eval()
    with torch.no_grad():
        loss = float(model.loss(*heldout_views))
    model.train(was_training)
    scores = evaluate_features(
        extract_features(model.encoder, images), labels.numpy()
    )
    return dict(scores, **{'heldout loss': loss})


def train_arm(arm, seed, views, heldout, settings, on_update=None):
    """Train one arm from the seed's initial weights; score it at
    ``settings['eval_every']`` samples and at the end.

    Args:
        arm (dict): One of :func:`arms`.
        seed (int): Seeds the initial weights.
        views (tuple[Tensor, Tensor]): :func:`sample_views`'s views.
        heldout (tuple, optional): ``(views, images, labels)`` of the
            held-out split; None: no scores.
        settings (dict): ``model`` (DigitsBYOL's arguments), ``samples``,
            ``warmup`` (samples) and ``eval_every`` (samples; 0: only at
            the start and the end).
        on_update (Callable[[int, int, DigitsBYOL], None], optional): Called
            after each target update with the 0-based update, the number of
            updates and the model.

    Returns:
        list[dict]: One record per evaluation point: ``samples`` and the
        metrics.
    """
    from momentum_hook import cosine_momentum, scaled_momentum

    from .model import DigitsBYOL

    torch.manual_seed(seed)
    model = DigitsBYOL(**settings['model'])
    params = [p for p in model.parameters() if p.requires_grad]
    hp = arm['optimizer']
    optimizer = torch.optim.AdamW(params, **hp)
    size = arm['batch']
    steps = settings['samples'] // size
    trajectory = []
    if heldout is not None:
        trajectory.append(dict(samples=0, **_evaluate(model, *heldout)))
    for step in range(steps):
        seen = (step + 1) * size
        for group in optimizer.param_groups:
            group['lr'] = hp['lr'] * min(1.0, seen / settings['warmup'])
        loss = model.loss(
            views[0][seen - size : seen], views[1][seen - size : seen]
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.momentum = scaled_momentum(
            cosine_momentum(step, steps, model.base_momentum, 1.0),
            arm['momentum_kappa'],
        )
        model.momentum_update()
        if on_update is not None:
            on_update(step, steps, model)
        every = settings['eval_every']
        if heldout is not None and (
            (every and seen % every == 0) or step == steps - 1
        ):
            trajectory.append(dict(samples=seen, **_evaluate(model, *heldout)))
    return trajectory


def _mean_sd(values):
    return (
        statistics.mean(values),
        statistics.stdev(values) if len(values) > 1 else 0.0,
    )


def verdict(results, warmup, width=2.0):
    """Apply the pass criterion to each metric.

    Args:
        results (dict): ``{arm name: {seed: trajectory}}``, the first arm
            being B, the second the scaled, the third the per-update arm.
        warmup (int): Points at or before this many samples are skipped.
        width (float): B's band is mean ± ``width`` standard deviations.

    Returns:
        dict: ``{metric: (verdict, {arm: points off B's band})}``.
    """
    names = list(results)
    points = [
        p['samples']
        for p in next(iter(results[names[0]].values()))
        if p['samples'] > warmup
    ]
    out = {}
    for metric in METRICS:
        off = {}
        for name in names[1:]:
            off[name] = []
            for index, samples in enumerate(points):  # noqa: B007
                base = _mean_sd(
                    [
                        _at(t, samples)[metric]
                        for t in results[names[0]].values()
                    ]
                )
                mean = _mean_sd(
                    [_at(t, samples)[metric] for t in results[name].values()]
                )[0]
                if abs(mean - base[0]) > width * base[1]:
                    off[name].append(samples)
        scaled_on, plain_on = (not off[names[1]]), (not off[names[2]])
        out[metric] = (
            {
                (True, False): 'rule supported',
                (True, True): 'no difference at this scale',
                (False, False): 'optimizer rule not met',
                (False, True): 'rule contradicted',
            }[scaled_on, plain_on],
            off,
        )
    return out


def paired_gaps(results, warmup):
    """Seed by seed, each large-batch arm minus B at the same samples, over
    the points after the warm-up (a description, not the criterion).

    Returns:
        dict: ``{metric: {arm: (mean gap, mean absolute gap)}, 'closer':
        {metric: (points where the scaled arm is nearer B, points)}}``.
    """
    names = list(results)
    out, closer = {}, {}
    for metric in METRICS:
        gaps = {name: [] for name in names[1:]}
        for seed, base in results[names[0]].items():
            for point in base:
                if point['samples'] <= warmup:
                    continue
                for name in names[1:]:
                    gaps[name].append(
                        _at(results[name][seed], point['samples'])[metric]
                        - point[metric]
                    )
        out[metric] = {
            name: (statistics.mean(g), statistics.mean(map(abs, g)))
            for name, g in gaps.items()
        }
        scaled, plain = gaps[names[1]], gaps[names[2]]
        closer[metric] = (
            sum(abs(a) < abs(b) for a, b in zip(scaled, plain)),
            len(scaled),
        )
    out['closer'] = closer
    return out


def _at(trajectory, samples):
    return next(p for p in trajectory if p['samples'] == samples)


def markdown_tables(grid):
    """One table per metric: mean ± sd over seeds of each arm at each
    evaluation point, then the verdicts."""
    results = grid['results']
    names = list(results)
    points = [p['samples'] for p in next(iter(results[names[0]].values()))]
    lines = []
    for metric in METRICS:
        lines += [
            f'**{metric}**',
            '',
            '| samples seen | ' + ' | '.join(names) + ' |',
            '|' + ' --- |' * (len(names) + 1),
        ]
        for samples in points:
            cells = []
            for name in names:
                mean, sd = _mean_sd(
                    [_at(t, samples)[metric] for t in results[name].values()]
                )
                cells.append(f'{mean:.3f} ± {sd:.3f}')
            lines.append(f'| {samples} | ' + ' | '.join(cells) + ' |')
        lines.append('')
    lines += [
        "| metric | verdict | points off B's band (scaled) | "
        "points off B's band (per update) |",
        '|' + ' --- |' * 4,
    ]
    for metric, (word, off) in verdict(results, grid['warmup']).items():
        lines.append(
            f'| {metric} | {word} | '
            + ' | '.join(
                ', '.join(map(str, off[n])) or 'none' for n in names[1:]
            )
            + ' |'
        )
    gaps = paired_gaps(results, grid['warmup'])
    lines += [
        '',
        '| metric | '
        + ' | '.join(f'{n} - B: mean, mean abs' for n in names[1:])
        + ' | scaled nearer B than per update |',
        '|' + ' --- |' * 4,
    ]
    for metric in METRICS:
        lines.append(
            f'| {metric} | '
            + ' | '.join(
                '{:+.4f}, {:.4f}'.format(*gaps[metric][n]) for n in names[1:]
            )
            + ' | {} of {} |'.format(*gaps['closer'][metric])
        )
    return '\n'.join(lines)


#: B, the samples every arm sees, the samples of the warm-up and between
#: two evaluations.
DEFAULTS = dict(batch=64, samples=98_304, warmup=8_192, eval_every=16_384)


def demo_settings(**overrides):
    """The experiment's settings: :data:`DEFAULTS` with ``overrides``, and
    the model, AdamW's base hyper-parameters and the augmentation of
    ``configs/byol_digits.py``.

    Returns:
        dict: ``batch``, ``samples``, ``warmup``, ``eval_every`` and
        ``model``, ``optimizer``, ``augment`` (keyword arguments of
        ``DigitsBYOL``, ``torch.optim.AdamW`` and ``two_views``).
    """
    from .train import default_config_path, load_config

    cfg = load_config(default_config_path())
    return dict(
        DEFAULTS,
        **overrides,
        model={k: v for k, v in cfg.model.items() if k != 'type'},
        optimizer=dict(
            lr=cfg.optimizer.lr,
            betas=(0.9, 0.999),
            eps=1e-8,
            weight_decay=cfg.optimizer.weight_decay,
        ),
        augment={
            k: v
            for k, v in cfg.data.train.items()
            if k not in ('type', 'repeat', 'heldout_fraction', 'split_seed')
        },
    )


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog='python -m momentum_hook.demo.scaling',
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument('--out', default='work_dirs/scaling')
    parser.add_argument(
        '--batch', type=int, default=DEFAULTS['batch'], help='B'
    )
    parser.add_argument('--kappa', type=int, default=4)
    parser.add_argument(
        '--samples',
        type=int,
        default=DEFAULTS['samples'],
        help='samples seen by every arm',
    )
    parser.add_argument(
        '--warmup',
        type=int,
        default=DEFAULTS['warmup'],
        help='samples of the linear learning-rate warm-up',
    )
    parser.add_argument(
        '--eval-every',
        type=int,
        default=DEFAULTS['eval_every'],
        help='samples between evaluations',
    )
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument(
        '--table',
        metavar='JSON',
        help='only print the tables of a scaling.json',
    )
    return parser.parse_args(argv)


def main(argv=None):
    """Run the three arms for every seed (or print a saved run's tables)."""
    args = parse_args(argv)
    if args.table:
        with open(args.table) as f:
            print(markdown_tables(json.load(f)))
        return 0
    for name in ('samples', 'eval_every'):
        if getattr(args, name) % (args.kappa * args.batch):
            raise ValueError(
                f'--{name.replace("_", "-")} must be a multiple of kappa x '
                f'batch = {args.kappa * args.batch}, so that every arm is '
                f'scored at the same samples, got {getattr(args, name)}'
            )
    from .data import load_digits_split, two_views

    torch.set_num_threads(1)
    settings = demo_settings(
        batch=args.batch,
        samples=args.samples,
        warmup=args.warmup,
        eval_every=args.eval_every,
    )
    augment = settings['augment']
    grid = dict(
        batch=args.batch,
        kappa=args.kappa,
        samples=args.samples,
        warmup=args.warmup,
        eval_every=args.eval_every,
        seeds=args.seeds,
        model=settings['model'],
        arms=arms(args.batch, args.kappa, settings['optimizer']),
        results={},
        seconds={},
    )
    train_images, _ = load_digits_split('train')
    images, labels = load_digits_split('heldout')
    heldout_views = two_views(
        images, generator=torch.Generator().manual_seed(12345), **augment
    )
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, 'scaling.json')
    print(__doc__[__doc__.index('The pass criterion') :], flush=True)
    start = time.monotonic()
    for seed in args.seeds:
        views = sample_views(
            train_images, args.samples, args.batch, seed, augment
        )
        for arm in grid['arms']:
            tick = time.monotonic()
            trajectory = train_arm(
                arm, seed, views, (heldout_views, images, labels), settings
            )
            grid['results'].setdefault(arm['name'], {})[seed] = trajectory
            grid['seconds'].setdefault(arm['name'], []).append(
                time.monotonic() - tick
            )
            print(
                f'{arm["name"]}, seed {seed}: {trajectory[-1]} '
                f'({time.monotonic() - tick:.0f} s)',
                flush=True,
            )
            with open(path, 'w') as f:
                json.dump(grid, f, indent=1)
    grid['total_seconds'] = time.monotonic() - start
    with open(path, 'w') as f:
        json.dump(grid, f, indent=1)
    print(markdown_tables(grid))
    print(f'{grid["total_seconds"]:.0f} s in all. Results: {path}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
