"""The demo's verdict: BYOL features against two baselines, on held-out data.

:func:`compare_features` scores the trained encoder, the same encoder at its
random initialisation and the raw pixels with
:func:`~.evaluate.evaluate_features`; :func:`format_table` and
:func:`write_results` print and save the scores.
"""

import json

import mmcv
from torch import nn

from .evaluate import evaluate_features, extract_features

__all__ = ['FEATURES', 'compare_features', 'format_table', 'write_results']

#: The rows of the comparison: key in results.json, and label in the table.
FEATURES = {
    'byol': 'BYOL encoder (trained)',
    'random_init': 'same encoder, random init',
    'pixels': 'raw pixels',
}


def compare_features(
    trained,
    untrained,
    images,
    labels,
    device='cpu',
    shots=(1, 5),
    episodes=10,
    knn_k=10,
):
    """Few-shot and kNN accuracy of three feature sets of ``images``.

    Args:
        trained (nn.Module): The trained encoder.
        untrained (nn.Module): The same encoder before training.
        images (Tensor): Labelled images ``(N, C, H, W)`` the training never
            saw.
        labels (Tensor): Their labels ``(N, )``.
        device (str): Where the encoders run.
        shots (Sequence[int]): Shots per class of the few-shot episodes.
            Defaults to (1, 5).
        episodes (int): Episodes (seeds ``0 .. episodes - 1``) per shot
            count. Defaults to 10.
        knn_k (int): Neighbours of the kNN vote. Defaults to 10.

    Returns:
        dict: ``{'byol': {'1-shot': .., '5-shot': .., 'knn': ..},
        'random_init': {...}, 'pixels': {...}}``.
    """
    encoders = dict(byol=trained, random_init=untrained, pixels=nn.Flatten())
    print(
        f'Evaluating {len(encoders)} feature sets on {len(images)} '
        'held-out images:'
    )
    progress = mmcv.ProgressBar(len(encoders) * len(images))  # one per image
    results = {}
    for name, encoder in encoders.items():
        features = extract_features(
            encoder.to(device), images, device=device, progress=progress
        )
        results[name] = evaluate_features(
            features, labels.numpy(), shots, range(episodes), knn_k
        )
    print()
    return results


def format_table(results):
    """The results as a plain-text table, one row per feature set."""
    metrics = list(next(iter(results.values())))
    header = f'{"features":<28}' + ''.join(f'{m:>8}' for m in metrics)
    rows = [header, '-' * len(header)]
    for name, scores in results.items():
        rows.append(
            f'{FEATURES.get(name, name):<28}'
            + ''.join(f'{scores[m]:>8.3f}' for m in metrics)
        )
    return '\n'.join(rows)


def write_results(results, path):
    """Write ``results`` as indented JSON to ``path``."""
    with open(path, 'w') as f:
        json.dump(results, f, indent=2)
        f.write('\n')
