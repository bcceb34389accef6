"""A small BYOL for 8x8 images that meets the momentum hook's contract.

The online network is a CNN encoder and an MLP projector, followed by an MLP
predictor; the target network is a frozen copy of encoder + projector made by
:meth:`~momentum_hook.MomentumTargetMixin.init_momentum_target`, which also
gives the model the ``base_momentum``, ``momentum`` and ``momentum_update()``
that the hook drives. Nothing in the model schedules or applies the EMA.
"""

import torch
import torch.nn.functional as F
from mmcv.cnn import MODELS as MMCV_MODELS
from mmcv.utils import Registry
from torch import nn

from momentum_hook import MomentumTargetMixin

__all__ = ['MODELS', 'DigitsBYOL', 'byol_loss']

#: The demo's own models: a child of mmcv's root registry
#: ``mmcv.cnn.MODELS``, from which the demo builds ``cfg.model``, with the
#: scope ``momentum_hook``, so that a config names them
#: ``'momentum_hook.DigitsBYOL'`` and no other package can shadow them.
#: Register your own models in ``mmcv.cnn.MODELS`` (or a child of it with
#: your scope), not here.
MODELS = Registry('model', parent=MMCV_MODELS, scope='momentum_hook')


def _conv_block(in_channels, out_channels):
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def _mlp(in_dim, hidden_dim, out_dim):
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim, bias=False),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim),
    )


def byol_loss(prediction, target):
    """BYOL's loss ``2 - 2 cos(prediction, target)``, averaged over a batch.

    Args:
        prediction (Tensor): ``(N, D)`` outputs of the online predictor.
        target (Tensor): ``(N, D)`` projections of the target network.

    Returns:
        Tensor: A scalar in [0, 4]; 0 when every pair points the same way.
    """
    cosine = F.cosine_similarity(prediction, target.detach(), dim=1)
    return (2 - 2 * cosine).mean()


@MODELS.register_module()
class DigitsBYOL(MomentumTargetMixin, nn.Module):
    """BYOL with a small CNN encoder, for the 8x8 digits (or any image size).

    Args:
        in_channels (int): Image channels. Defaults to 1.
        widths (Sequence[int]): Channels of the encoder's 3x3 conv blocks;
            a 2x2 max-pool follows the second block, a global average pool
            the last one. Defaults to (32, 64, 128).
        hidden_dim (int): Hidden width of the projector and predictor MLPs.
            Defaults to 256.
        proj_dim (int): Output width of the projector and predictor.
            Defaults to 64.
        base_momentum (float): The target momentum at iteration 0, which the
            hook raises to its ``end_momentum``. Defaults to 0.99.
    """

    def __init__(
        self,
        in_channels=1,
        widths=(32, 64, 128),
        hidden_dim=256,
        proj_dim=64,
        base_momentum=0.99,
    ):
        super().__init__()
        blocks, channels = [], in_channels
        for index, width in enumerate(widths):
            blocks.append(_conv_block(channels, width))
            if index == 1:
                blocks.append(nn.MaxPool2d(2))
            channels = width
        encoder = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.feat_dim = channels
        self.online_net = nn.Sequential(
            encoder, _mlp(channels, hidden_dim, proj_dim)
        )
        self.predictor = _mlp(proj_dim, hidden_dim, proj_dim)
        self.target_net = self.init_momentum_target(
            self.online_net, base_momentum=base_momentum
        )

    @property
    def encoder(self):
        """The online encoder, whose features the evaluation uses."""
        return self.online_net[0]

    def forward(self, img):
        """Encoder features ``(N, feat_dim)`` of images ``(N, C, H, W)``."""
        return self.encoder(img)

    def loss(self, img1, img2):
        """BYOL's symmetric loss of two batches of views.

        Both views go through the online network and the predictor, and
        through the target network without gradients; each view's prediction
        is pulled towards the target projection of the other view.

        Args:
            img1 (Tensor): ``(N, C, H, W)``, the first view of each image.
            img2 (Tensor): ``(N, C, H, W)``, the second view.

        Returns:
            Tensor: The scalar loss.
        """
        views = torch.cat([img1, img2])
        prediction1, prediction2 = self.predictor(
            self.online_net(views)
        ).chunk(2)
        with torch.no_grad():
            target1, target2 = self.target_net(views).chunk(2)
        return (
            byol_loss(prediction1, target2) + byol_loss(prediction2, target1)
        ) / 2

    def train_step(self, data, optimizer=None):
        """One BYOL step's loss (:meth:`loss`), in the form mmcv runners
        expect.

        Args:
            data (dict): ``dict(img1=Tensor(N, C, H, W), img2=...)``.
            optimizer: Unused; the runner's ``OptimizerHook`` steps.

        Returns:
            dict: ``loss`` (for the optimizer hook), ``log_vars`` and
            ``num_samples`` (for the logger).
        """
        loss = self.loss(data['img1'], data['img2'])
        return dict(
            loss=loss,
            log_vars=dict(loss=loss.item()),
            num_samples=len(data['img1']),
        )
