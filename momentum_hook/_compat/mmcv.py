"""The private mmcv 1.x attribute momentum_hook reads."""

__all__ = ['train_loader']


def train_loader(loader):
    """The ``DataLoader`` a runner trains from: ``IterBasedRunner`` wraps it
    in an ``IterLoader`` (``_dataloader``)."""
    return getattr(loader, '_dataloader', loader)
