"""The demo's data: scikit-learn's handwritten digits, seen twice per image.

scikit-learn ships the 1,797 8x8 digit images of the UCI "optical
recognition of handwritten digits" set inside its package, so the demo runs
on a fresh machine without a download. :func:`load_digits_split` splits them
once, stratified and seeded, into a training split (used without labels by
BYOL) and a held-out split (used, with labels, only by the evaluation).

:class:`DigitsTwoViews` yields what the model's ``train_step`` needs: two
independently augmented views of each image (:func:`two_views`). The
augmentation is BYOL's recipe shrunk to 8x8: a small random affine warp
(rotation, scale, shear, shift: BYOL's crop), a random brightness and
contrast change (its colour jitter) and Gaussian noise (its blur/solarize,
which mean little at this size).
"""

import numpy as np
import torch
import torch.nn.functional as F
from mmcv.utils import Registry
from torch.utils.data import Dataset

__all__ = [
    'DATASETS',
    'load_digits_split',
    'random_affine',
    'two_views',
    'TwoViewsDataset',
    'DigitsTwoViews',
]

#: Dataset types a config can name in ``data.train.type``.
DATASETS = Registry('dataset')

#: The largest value of a pixel in scikit-learn's digits (16 grey levels).
_DIGITS_MAX = 16.0


def load_digits_split(split, heldout_fraction=0.3, split_seed=0):
    """One split of scikit-learn's digits, as images in [0, 1] and labels.

    Args:
        split (str): ``'train'`` or ``'heldout'``.
        heldout_fraction (float): The share of each class held out. Defaults
            to 0.3 (1,257 training and 540 held-out images).
        split_seed (int): The seed of the split; the same seed gives the same
            split on every machine. Defaults to 0.

    Returns:
        tuple[Tensor, Tensor]: float32 images of shape ``(N, 1, 8, 8)`` and
        int64 labels of shape ``(N, )``.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if split not in ('train', 'heldout'):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    digits = load_digits()
    images = digits.images.astype(np.float32) / _DIGITS_MAX
    train_x, heldout_x, train_y, heldout_y = train_test_split(
        images,
        digits.target,
        test_size=heldout_fraction,
        random_state=split_seed,
        stratify=digits.target,
    )
    x, y = (train_x, train_y) if split == 'train' else (heldout_x, heldout_y)
    return torch.from_numpy(x).unsqueeze(1), torch.from_numpy(y).long()


def _uniform(n, low, high, generator):
    return torch.empty(n).uniform_(low, high, generator=generator)


def random_affine(
    images,
    degrees=15.0,
    scale=(0.85, 1.15),
    shear=10.0,
    shift=1.0,
    generator=None,
):
    """Warp each image by its own small random affine transform.

    Args:
        images (Tensor): ``(N, C, H, W)`` images.
        degrees (float): Rotations are drawn from [-degrees, degrees].
        scale (tuple[float, float]): The range of the zoom factor.
        shear (float): Shears are drawn from [-shear, shear] degrees.
        shift (float): Shifts are drawn from [-shift, shift] pixels.
        generator (torch.Generator, optional): The random source; the global
            one when None.

    Returns:
        Tensor: The warped images, zero outside the source image.
    """
    n, _, height, width = images.shape
    angle = torch.deg2rad(_uniform(n, -degrees, degrees, generator))
    shear_angle = torch.deg2rad(_uniform(n, -shear, shear, generator))
    zoom = _uniform(n, *scale, generator)
    # affine_grid maps output to input coordinates in [-1, 1]: a zoom in
    # reads a smaller input region, hence the division.
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    tan = torch.tan(shear_angle)
    theta = torch.stack(
        [
            torch.stack(
                [
                    cos,
                    -sin + cos * tan,
                    _uniform(n, -shift, shift, generator) * 2 / width,
                ],
                1,
            ),
            torch.stack(
                [
                    sin,
                    cos + sin * tan,
                    _uniform(n, -shift, shift, generator) * 2 / height,
                ],
                1,
            ),
        ],
        1,
    )
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, align_corners=False)


def two_views(images, brightness=0.4, noise=0.1, generator=None, **affine):
    """Two independently augmented views of each image.

    Each view is a random affine warp (:func:`random_affine`), then a
    random contrast ``* U(1 - b, 1 + b)`` and brightness ``+ U(-b/2, b/2)``
    with ``b = brightness``, then Gaussian noise of standard deviation
    ``noise``.

    Args:
        images (Tensor): ``(N, C, H, W)`` images in [0, 1].
        brightness (float): The strength ``b`` of the intensity change.
        noise (float): The standard deviation of the added noise.
        generator (torch.Generator, optional): The random source.
        **affine: Passed to :func:`random_affine`.

    Returns:
        tuple[Tensor, Tensor]: The two views, each shaped like ``images``.
    """
    views = []
    for _ in range(2):
        view = random_affine(images, generator=generator, **affine)
        n = view.shape[0]
        contrast = _uniform(n, 1 - brightness, 1 + brightness, generator)
        offset = _uniform(n, -brightness / 2, brightness / 2, generator)
        view = view * contrast.view(n, 1, 1, 1) + offset.view(n, 1, 1, 1)
        view = view + noise * torch.randn(view.shape, generator=generator)
        views.append(view)
    return tuple(views)


class TwoViewsDataset(Dataset):
    """Two augmented views of each of a set of images held in memory.

    An item is ``dict(img1=Tensor(C, H, W), img2=Tensor(C, H, W))``; the
    default collate function stacks a batch into the ``dict(img1=Tensor(N,
    C, H, W), img2=...)`` that ``DigitsBYOL.train_step`` takes. A batch is
    augmented in one call (``__getitems__``, which torch's ``DataLoader``
    prefers to ``__getitem__``), several times faster than image by image.

    Args:
        images (Tensor): ``(N, C, H, W)`` images in [0, 1].
        repeat (int): Passes over the images per epoch, as mmdet's
            ``RepeatDataset``: mmcv's ``EpochBasedRunner`` sleeps 2 s at
            every epoch start, which dominates epochs of a few ms. Defaults
            to 1.
        **augment: Options of :func:`two_views` and :func:`random_affine`.
    """

    def __init__(self, images, repeat=1, **augment):
        if (
            isinstance(repeat, bool)
            or not isinstance(repeat, int)
            or repeat < 1
        ):
            raise ValueError(f'repeat must be an int >= 1, got {repeat!r}')
        self.images = images
        self.repeat = repeat
        two_views(images[:1], **augment)  # reject bad options now
        self.augment = augment

    def __len__(self):
        return self.repeat * len(self.images)

    def __getitems__(self, indices):
        images = self.images[[i % len(self.images) for i in indices]]
        img1, img2 = two_views(images, **self.augment)
        return [dict(img1=a, img2=b) for a, b in zip(img1, img2)]

    def __getitem__(self, index):
        return self.__getitems__([index])[0]


@DATASETS.register_module()
class DigitsTwoViews(TwoViewsDataset):
    """The training split of the digits, two augmented views per image.

    Args:
        repeat (int): Passes over the images per epoch. Defaults to 1.
        heldout_fraction (float): See :func:`load_digits_split`.
        split_seed (int): See :func:`load_digits_split`.
        **augment: Options of :func:`two_views` and :func:`random_affine`.
    """

    def __init__(
        self, repeat=1, heldout_fraction=0.3, split_seed=0, **augment
    ):
        self.split = dict(
            heldout_fraction=heldout_fraction, split_seed=split_seed
        )
        images, _ = load_digits_split('train', **self.split)
        super().__init__(images, repeat=repeat, **augment)

    def heldout(self):
        """The held-out split for the evaluation: ``(images, labels)``."""
        return load_digits_split('heldout', **self.split)
