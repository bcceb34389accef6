# An MMSelfSup 0.x BYOL config, shaped like its
# byol_resnet50_8xb32-accum16-coslr-200e_in1k.py, shrunk to run on a CPU in
# seconds (ResNet-18, 16x16 images, small necks, BN instead of SyncBN). The
# hook and optimizer lines are MMSelfSup's own, unchanged; the drop-in is
# the one added line, `_base_` below (configs/mmselfsup_dropin.py).
_base_ = '../../configs/mmselfsup_dropin.py'

model = dict(
    type='BYOL',
    base_momentum=0.99,
    backbone=dict(
        type='ResNet',
        depth=18,
        in_channels=3,
        out_indices=[4],
        norm_cfg=dict(type='BN'),
    ),
    neck=dict(
        type='NonLinearNeck',
        in_channels=512,
        hid_channels=32,
        out_channels=16,
        num_layers=2,
        with_bias=True,
        with_last_bn=False,
        with_avg_pool=True,
        norm_cfg=dict(type='BN1d'),
    ),
    head=dict(
        type='LatentPredictHead',
        predictor=dict(
            type='NonLinearNeck',
            in_channels=16,
            hid_channels=32,
            out_channels=16,
            num_layers=2,
            with_bias=True,
            with_last_bn=False,
            with_avg_pool=False,
            norm_cfg=dict(type='BN1d'),
        ),
    ),
)

# additional hooks
update_interval = 2  # interval for accumulate gradient
custom_hooks = [
    dict(
        type='MomentumUpdateHook',
        end_momentum=1.0,
        update_interval=update_interval,
    )
]

# optimizer
optimizer = dict(type='SGD', lr=0.05, momentum=0.9, weight_decay=1e-6)
optimizer_config = dict(update_interval=update_interval)

runner = dict(type='EpochBasedRunner', max_epochs=2)
