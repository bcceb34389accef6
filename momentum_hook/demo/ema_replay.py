"""``python -m momentum_hook.demo.ema_replay``: the EMA scaling rule alone.

One BYOL run at batch ``B`` (the ``B`` arm of
:mod:`momentum_hook.demo.scaling`, seed 0) keeps, beside its real target,
*shadow targets* that see the online network only after every ``κ``-th
update, as a target trained at batch ``κB`` would: one updated with
``m ** κ`` (the rule, as the hook's ``base_batch_size`` applies it) and one
with ``m``, where ``m`` is the cosine schedule's value at the shadow's own
update ``j`` of ``K / κ`` (the value a run at ``κB`` uses at that point of
training). The shadows never feed back into training, so the online
network, the optimizer and the data are the same for all of them: only the
EMA differs. Their distance to the real target, relative to how far the real
target moves over the whole run, measures how well each keeps the target of
batch ``B``.

:func:`product_form_gap` compares, on a schedule alone, ``κ`` updates at
the scheduled momenta with one update at the ``κ``-th power of the first.
"""

import argparse
import json
import math
import sys

import torch

from momentum_hook import cosine_momentum, scaled_momentum

__all__ = ['ShadowTargets', 'replay', 'product_form_gap', 'plot', 'main']


def _flat(module):
    return torch.cat([p.detach().flatten() for p in module.parameters()])


class ShadowTargets:
    """Shadow targets that see the online network every ``kappa`` updates.

    For each ``kappa``: ``'m ** kappa'`` is updated with
    ``scaled_momentum(m_j, kappa)`` and ``'m'`` with ``m_j``, where ``m_j``
    is ``cosine_momentum(j, K // kappa, base_momentum, end_momentum)`` at
    the shadow's ``j``-th update; both start as the real target.

    Args:
        target (nn.Module): The real target network at the start.
        kappas (Sequence[int]): The intervals, each dividing ``K``.
        base_momentum (float): The schedule's momentum at the start.
        end_momentum (float): The momentum the cosine rises to.
    """

    def __init__(self, target, kappas, base_momentum, end_momentum=1.0):
        start = _flat(target).double()
        self.base_momentum, self.end_momentum = base_momentum, end_momentum
        self.shadows = {
            (kappa, rule): start.clone()
            for kappa in kappas
            for rule in ('m ** kappa', 'm')
        }
        #: ``{(kappa, rule): [(update, ||shadow - target||)]}``
        self.distances = {key: [] for key in self.shadows}

    def __call__(self, update, updates, model):
        """After real update ``update`` (0-based) of ``updates``."""
        online, target = (
            _flat(model.online_net).double(),
            _flat(model.target_net).double(),
        )
        for (kappa, rule), shadow in self.shadows.items():
            if (update + 1) % kappa:
                continue
            if updates % kappa:
                raise ValueError(
                    f'kappa={kappa} does not divide the run '
                    f'of {updates} updates'
                )
            momentum = cosine_momentum(
                update // kappa,
                updates // kappa,
                self.base_momentum,
                self.end_momentum,
            )
            if rule == 'm ** kappa':
                momentum = scaled_momentum(momentum, kappa)
            shadow.mul_(momentum).add_(online, alpha=1 - momentum)
            self.distances[kappa, rule].append(
                (update + 1, float((shadow - target).norm()))
            )


def replay(settings, kappas=(2, 4, 8), seed=0):
    """Train the B arm once with :class:`ShadowTargets` beside its target.

    Args:
        settings (dict): As for :func:`~momentum_hook.demo.scaling.
            train_arm`, plus ``batch`` (B), ``optimizer`` (AdamW's
            arguments), ``augment`` (:func:`~momentum_hook.demo.data.
            two_views`'s) and optionally ``images``, the training images
            (the demo's training split by default).
        kappas (Sequence[int]): The intervals.
        seed (int): The seed of the weights and the data order.

    Returns:
        dict: ``updates``, ``total_move`` (``||target_K - target_0||``) and
        ``curves``: ``{'kappa=K, m ** kappa' or 'kappa=K, m': [[update,
        distance / total_move], ...]}``.
    """
    from .data import load_digits_split
    from .model import DigitsBYOL
    from .scaling import arms, sample_views, train_arm

    images = settings.get('images')
    if images is None:
        images = load_digits_split('train')[0]
    views = sample_views(
        images,
        settings['samples'],
        settings['batch'],
        seed,
        settings['augment'],
    )
    arm = arms(settings['batch'], 1, settings['optimizer'])[0]
    torch.manual_seed(seed)  # train_arm builds the same weights again
    reference = DigitsBYOL(**settings['model'])
    start = reference.target_net
    shadows = ShadowTargets(start, kappas, reference.base_momentum)
    end = {}

    def on_update(update, updates, model):
        shadows(update, updates, model)
        end.update(target=model.target_net, updates=updates)

    train_arm(
        arm,
        seed,
        views,
        None,
        dict(settings, eval_every=0),
        on_update=on_update,
    )
    total = float((_flat(end['target']) - _flat(start)).double().norm())
    curves = {
        f'kappa={kappa}, {rule}': [[u, d / total] for u, d in points]
        for (kappa, rule), points in shadows.distances.items()
    }
    return dict(updates=end['updates'], total_move=total, curves=curves)


def product_form_gap(base_momentum, end_momentum, max_iters, kappa):
    """``kappa`` updates at the scheduled momenta against one at the
    ``kappa``-th power of the first of them.

    For block ``j`` of a run of ``max_iters`` updates: the product
    ``P_j = m_{jκ} m_{jκ+1} ... m_{jκ+κ-1}`` of the cosine's values, and
    ``m_{jκ} ** κ``, the momentum of update ``j`` in a run of ``max_iters /
    κ`` updates (the same point of training). The two are equal to first
    order in the schedule's change within a block, and exactly equal for a
    constant momentum.

    Returns:
        list[tuple[float, float]]: For each block, the fraction of training
        at its start, ``j κ / max_iters``, and the relative excess of the
        weight on the online network, ``(1 - m_{jκ} ** κ) / (1 - P_j) - 1``
        (0 where ``P_j`` is 1).
    """
    gaps = []
    for j in range(max_iters // kappa):
        product = math.prod(
            cosine_momentum(
                j * kappa + i, max_iters, base_momentum, end_momentum
            )
            for i in range(kappa)
        )
        power = (
            cosine_momentum(j * kappa, max_iters, base_momentum, end_momentum)
            ** kappa
        )
        gap = (1 - power) / (1 - product) - 1 if product < 1 else 0.0
        gaps.append((j * kappa / max_iters, gap))
    return gaps


def plot(result, path, caption):
    """Save the curves of :func:`replay` as a small PNG."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 3.4), dpi=100)
    colours = dict(
        zip(
            sorted({k.split(',')[0] for k in result['curves']}),
            ('tab:blue', 'tab:orange', 'tab:green', 'tab:red'),
        )
    )
    for name, points in result['curves'].items():
        kappa, rule = name.split(', ')
        updates, distance = zip(*points)
        axes.plot(
            updates,
            distance,
            color=colours[kappa],
            linestyle='-' if rule == 'm ** kappa' else '--',
            label=f'{kappa.replace("kappa", "κ")}, '
            f'{rule.replace("kappa", "κ")}',
        )
    axes.set_yscale('log')
    axes.set_xlabel('update of the run at batch B')
    axes.set_ylabel('|shadow - target| / total move')
    axes.set_title(caption, fontsize=8)
    axes.legend(fontsize=7, ncol=2)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def summary(result):
    """Markdown: each shadow's distance at a quarter, half, three quarters
    and the end of the run, and its largest."""
    updates = result['updates']
    marks = [updates // 4, updates // 2, 3 * updates // 4, updates]
    lines = [
        '| shadow | 1/4 | 1/2 | 3/4 | end | largest |',
        '| --- | --- | --- | --- | --- | --- |',
    ]
    for name, points in result['curves'].items():
        at = dict((u, d) for u, d in points)
        cells = [f'{at[min(at, key=lambda u: abs(u - m))]:.4f}' for m in marks]
        lines.append(
            f'| {name} | '
            + ' | '.join(cells)
            + f' | {max(d for _, d in points):.4f} |'
        )
    return '\n'.join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog='python -m momentum_hook.demo.ema_replay',
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument('--plot', metavar='PNG')
    parser.add_argument('--json', metavar='FILE')
    parser.add_argument('--caption', default='')
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from .scaling import demo_settings

    settings = demo_settings()
    result = replay(settings)
    print(summary(result))
    for kappa in (4, 8):
        gaps = product_form_gap(0.99, 1.0, 980, kappa)
        quarters = [
            min(gaps, key=lambda g: abs(g[0] - q)) for q in (0.25, 0.5, 0.75)
        ]
        print(
            f'product form, the demo schedule (0.99 -> 1 over 980 '
            f'updates), kappa={kappa}: '
            + ', '.join(f'{f:.2f}: {g:+.3%}' for f, g in quarters)
            + f', last block {gaps[-1][1]:+.1%}'
        )
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(result, f)
    if args.plot:
        plot(result, args.plot, args.caption)
    return 0


if __name__ == '__main__':
    sys.exit(main())
