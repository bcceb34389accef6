"""How good are frozen features? Few-shot and kNN accuracy on a labelled set.

The functions take features and labels of one labelled set (the demo's
held-out split, which training never sees) and compare features by cosine
similarity:

- :func:`nearest_centroid_accuracy`: an n-shot episode draws ``shots``
  labelled examples per class, averages each class's unit-length features
  into a centroid, and labels every other example by its most similar
  centroid; the accuracy is averaged over episodes with fixed seeds;
- :func:`knn_accuracy`: every example is labelled by a majority vote of its
  ``k`` most similar other examples (leave-one-out).

Only :func:`extract_features` touches a network; the rest are pure functions
of arrays.
"""
import numpy as np
import torch

__all__ = [
    'extract_features', 'l2_normalize', 'nearest_centroid_accuracy',
    'knn_accuracy', 'evaluate_features'
]


@torch.no_grad()
def extract_features(encoder, images, batch_size=256, device='cpu',
                     progress=None):
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
        batch = images[start:start + batch_size].to(device)
        features.append(encoder(batch).flatten(1).float().cpu())
        if progress is not None:
            progress.update(len(batch))
    encoder.train(was_training)
    return torch.cat(features).numpy()


def l2_normalize(features):
    """Scale each row of ``features`` to unit length (zero rows stay zero)."""
    features = np.asarray(features, dtype=np.float64)
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.maximum(norms, 1e-12)


def _class_indices(labels, shots):
    labels = np.asarray(labels)
    classes, inverse = np.unique(labels, return_inverse=True)
    members = [np.flatnonzero(inverse == c) for c in range(len(classes))]
    smallest = min(len(m) for m in members)
    if smallest <= shots:
        raise ValueError(f'{shots}-shot episodes need more than {shots} '
                         f'examples per class, but a class has {smallest}')
    return inverse, members


def nearest_centroid_accuracy(features, labels, shots, seeds=range(10)):
    """Mean accuracy of ``shots``-shot nearest-centroid episodes.

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
    features = l2_normalize(features)
    inverse, members = _class_indices(labels, shots)
    accuracies = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        support = [rng.choice(m, shots, replace=False) for m in members]
        centroids = l2_normalize(
            np.stack([features[s].mean(0) for s in support]))
        query = np.ones(len(features), dtype=bool)
        query[np.concatenate(support)] = False
        predicted = (features[query] @ centroids.T).argmax(1)
        accuracies.append(float((predicted == inverse[query]).mean()))
    return float(np.mean(accuracies))


def knn_accuracy(features, labels, k=10):
    """Leave-one-out accuracy of a ``k``-nearest-neighbour majority vote.

    Neighbours are the ``k`` other examples of highest cosine similarity.
    A tie between classes goes to the class whose first neighbour is the
    most similar.

    Args:
        features (array-like): ``(N, D)`` features.
        labels (array-like): ``(N, )`` class labels.
        k (int): Neighbours per vote, at most ``N - 1``. Defaults to 10.

    Returns:
        float: The share of examples whose vote gives their own label.
    """
    features = l2_normalize(features)
    if not 1 <= k < len(features):
        raise ValueError(f'k must be in [1, {len(features) - 1}], got {k}')
    classes, inverse = np.unique(np.asarray(labels), return_inverse=True)
    similarity = features @ features.T
    np.fill_diagonal(similarity, -np.inf)
    neighbours = np.argsort(-similarity, axis=1, kind='stable')[:, :k]
    votes = inverse[neighbours][:, :, None] == np.arange(len(classes))
    first = np.where(votes, np.arange(k)[None, :, None], k).min(1)
    predicted = (votes.sum(1) * (k + 1) - first).argmax(1)
    return float((predicted == inverse).mean())


def evaluate_features(features, labels, shots=(1, 5), seeds=range(10),
                      k=10):
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
