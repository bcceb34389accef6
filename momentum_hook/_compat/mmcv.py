"""The private mmcv 1.x attribute momentum_hook reads, and the version
check that tells mmcv 1.x (with ``mmcv.runner``) from mmcv 2."""

from . import release

__all__ = ['train_loader', 'is_mmcv1']


def is_mmcv1(version):
    """Whether an mmcv ``version`` string is a 1.x release (mmcv 2 has no
    runners)."""
    return release(version)[:1] < (2,)


def train_loader(loader):
    """The ``DataLoader`` a runner trains from: ``IterBasedRunner`` wraps it
    in an ``IterLoader`` (``_dataloader``)."""
    return getattr(loader, '_dataloader', loader)
