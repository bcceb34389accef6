"""How good are frozen features? Few-shot and kNN accuracy on a labelled set.

The functions take features and labels of one labelled set (the demo's
held-out split, which training never sees) and score them with
scikit-learn's classifiers:

- :func:`nearest_centroid_accuracy`: an n-shot episode draws ``shots``
  labelled examples per class, and ``NearestCentroid`` labels every other
  example by the nearest class mean of the unit-length features (the
  "CL2N" nearest-centroid of SimpleShot); the accuracy is averaged over
  episodes with fixed seeds;
- :func:`knn_accuracy`: ``KNeighborsClassifier(metric='cosine')`` labels
  every example by a majority vote of its ``k`` most similar other examples
  (leave-one-out).

Only :func:`extract_features` touches a network; the rest are pure functions
of arrays. scikit-learn is imported when they are called, so that the demo
can say it is missing in one line.
"""

import warnings

import numpy as np
import torch

__all__ = [
    'extract_features',
    'nearest_centroid_accuracy',
    'knn_accuracy',
    'evaluate_features',
]


@torch.no_grad()
def extract_features(
    encoder, images, batch_size=256, device='cpu', progress=None
):
    """Features of ``images`` from ``encoder`` in eval mode.

    Args:
        encoder (nn.Module): Maps ``(N, C, H, W)`` images to ``(N, D)``.
        images (Tensor): The images, ``(N, C, H, W)``.
        batch_size (int): Images per forward pass. Defaults to 256.
        device (str | torch.device): Where to run. Defaults to ``'cpu'``.
        progress (mmcv.ProgressBar, optional): Advanced by the images of
            each batch.

    Returns:
        np.ndarray: float32 features, ``(N, D)``.
    """
    was_training = encoder.training
    encoder.eval()
    features = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size].to(device)
        features.append(encoder(batch).flatten(1).float().cpu())
        if progress is not None:
            progress.update(len(batch))
    encoder.train(was_training)
    return torch.cat(features).numpy()


def _class_members(labels, shots):
    """The indices of each class's examples, checked to allow episodes."""
    members = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    smallest = min(len(m) for m in members)
    if smallest <= shots:
        raise ValueError(
            f'{shots}-shot episodes need more than {shots} '
            f'examples per class, but a class has {smallest}'
        )
    return members


def nearest_centroid_accuracy(features, labels, shots, seeds=range(10)):
    """Mean accuracy of ``shots``-shot nearest-centroid episodes.

    In each episode, ``NearestCentroid`` is fitted to the ``shots`` labelled
    examples per class and scored on all other examples, features scaled to
    unit length first.

    Args:
        features (array-like): ``(N, D)`` features.
        labels (array-like): ``(N, )`` class labels.
        shots (int): Labelled examples per class in each episode.
        seeds (Iterable[int]): One episode per seed; the seed fixes which
            examples are labelled. Defaults to ``range(10)``.

    Returns:
        float: The accuracy on the unlabelled rest, averaged over episodes.

    Raises:
        ValueError: If a class has no more than ``shots`` examples.
    """
    from sklearn.neighbors import NearestCentroid
    from sklearn.preprocessing import normalize

    features, labels = normalize(features), np.asarray(labels)
    members = _class_members(labels, shots)
    accuracies = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        support = np.concatenate(
            [rng.choice(m, shots, replace=False) for m in members]
        )
        query = np.ones(len(features), dtype=bool)
        query[support] = False
        with warnings.catch_warnings(), np.errstate(invalid='ignore'):
            # fit() also measures the spread within each class, for a
            # shrinkage this function does not use: 0 / 0 with one shot,
            # and a warning wherever a feature is constant in a class.
            warnings.filterwarnings('ignore', 'self.within_class_std_dev_')
            classifier = NearestCentroid().fit(
                features[support], labels[support]
            )
        accuracies.append(classifier.score(features[query], labels[query]))
    return float(np.mean(accuracies))


def knn_accuracy(features, labels, k=10):
    """Leave-one-out accuracy of a ``k``-nearest-neighbour majority vote.

    Neighbours are the ``k`` other examples of highest cosine similarity
    (``KNeighborsClassifier(metric='cosine')``, which leaves each example
    out of its own vote); a tie between classes goes to the smallest label.

    Args:
        features (array-like): ``(N, D)`` features.
        labels (array-like): ``(N, )`` class labels.
        k (int): Neighbours per vote, at most ``N - 1``. Defaults to 10.

    Returns:
        float: The share of examples whose vote gives their own label.
    """
    from sklearn.neighbors import KNeighborsClassifier

    labels = np.asarray(labels)
    if not 1 <= k < len(labels):
        raise ValueError(f'k must be in [1, {len(labels) - 1}], got {k}')
    classifier = KNeighborsClassifier(n_neighbors=k, metric='cosine')
    predicted = classifier.fit(features, labels).predict(None)
    return float((predicted == labels).mean())


def evaluate_features(features, labels, shots=(1, 5), seeds=range(10), k=10):
    """Few-shot and kNN accuracy of one set of features.

    Returns:
        dict: ``{'1-shot': .., '5-shot': .., 'knn': ..}`` (one key per entry
        of ``shots``).
    """
    results = {
        f'{n}-shot': nearest_centroid_accuracy(features, labels, n, seeds)
        for n in shots
    }
    results['knn'] = knn_accuracy(features, labels, k)
    return results
