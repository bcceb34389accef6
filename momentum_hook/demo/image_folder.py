"""Your own images instead of the digits: a folder in ImageFolder layout.

``root/<class>/<image>.png`` (torchvision's ``ImageFolder`` layout; the
class folders of the training set may be a single ``all/``, labels are not
used for training). Point the config at it::

    data = dict(samples_per_gpu=128, workers_per_gpu=0,
                train=dict(type='ImageFolderTwoViews', root='my_images/train',
                           size=32, heldout_root='my_images/heldout'))
    model = dict(type='momentum_hook.DigitsBYOL', in_channels=3, ...)

The images are resized, centre-cropped and loaded into memory once, which
suits a few thousand small images; the views are made as for the digits
(:func:`~.data.two_views`).
"""

import torch

from .data import DATASETS, TwoViewsDataset

__all__ = ['load_image_folder', 'ImageFolderTwoViews']


def load_image_folder(root, size, grayscale=False):
    """Every image under ``root/<class>/``, as a tensor, with class labels.

    Args:
        root (str): The folder; one subfolder per class.
        size (int): Images are resized (shorter side) and centre-cropped to
            ``size x size``.
        grayscale (bool): Convert to one channel. Defaults to False (RGB).

    Returns:
        tuple[Tensor, Tensor]: Images ``(N, C, size, size)`` in [0, 1] and
        labels ``(N, )``, the index of each image's class folder in sorted
        order.

    Raises:
        FileNotFoundError: If ``root`` holds no class folder with images.
    """
    from torchvision import datasets, transforms

    steps = [transforms.Grayscale()] if grayscale else []
    steps += [
        transforms.Resize(size),
        transforms.CenterCrop(size),
        transforms.ToTensor(),
    ]
    folder = datasets.ImageFolder(root, transform=transforms.Compose(steps))
    images = torch.stack([image for image, _ in folder])
    return images, torch.tensor(folder.targets)


@DATASETS.register_module()
class ImageFolderTwoViews(TwoViewsDataset):
    """Two augmented views of each image of a folder.

    Args:
        root (str): The training images, ``root/<class>/<image>``.
        size (int): The side the images are brought to. Defaults to 32.
        grayscale (bool): Convert to one channel. Defaults to False.
        heldout_root (str, optional): Labelled images the training does not
            see, same layout, for the demo's evaluation (each class needs
            more than 5 images for the 5-shot score). Without it the demo
            trains and skips the evaluation.
        repeat (int): Passes over the images per epoch. Defaults to 1.
        **augment: Options of :func:`~.data.two_views`.
    """

    def __init__(
        self,
        root,
        size=32,
        grayscale=False,
        heldout_root=None,
        repeat=1,
        **augment,
    ):
        self.size, self.grayscale = size, grayscale
        self.heldout_root = heldout_root
        images, _ = load_image_folder(root, size, grayscale)
        super().__init__(images, repeat=repeat, **augment)

    def heldout(self):
        """``(images, labels)`` of ``heldout_root``, or None without one."""
        if self.heldout_root is None:
            return None
        return load_image_folder(self.heldout_root, self.size, self.grayscale)
