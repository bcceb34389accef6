# BYOL on the 8x8 handwritten digits that ship with scikit-learn: the main job
# of `python -m momentum_hook.demo`, an mmcv 1.x config like a user's own.
#
#   python -m momentum_hook.demo [this file] [--cfg-options k=v ...]
#   torchrun --nproc_per_node=2 -m momentum_hook.demo --launcher pytorch

# Importing momentum_hook registers the hook in mmcv.runner.HOOKS as
# 'momentum_hook.MomentumUpdateHook'. The demo builds `model` from mmcv's
# root registry mmcv.cnn.MODELS, where its own model is
# 'momentum_hook.DigitsBYOL'; to use yours, register it in mmcv.cnn.MODELS
# and add its module here.
custom_imports = dict(imports=['momentum_hook'], allow_failed_imports=False)

# Online network: CNN encoder -> MLP projector -> MLP predictor. Target:
# a frozen copy of encoder + projector whose momentum the hook raises from
# base_momentum to end_momentum along a cosine.
model = dict(
    type='momentum_hook.DigitsBYOL',
    in_channels=1,
    widths=(16, 32, 64),
    hidden_dim=256,
    proj_dim=64,
    base_momentum=0.99,
)

# 1,257 training images (labels unused) and 540 held-out ones for the
# evaluation, split once with split_seed. mmcv's EpochBasedRunner sleeps 2 s
# at every epoch start, so an epoch passes `repeat` times over the images:
# 5 epochs x 20 = 100 passes, 980 iterations.
data = dict(
    samples_per_gpu=128,  # batch per process
    workers_per_gpu=0,
    train=dict(
        type='DigitsTwoViews',
        repeat=20,
        heldout_fraction=0.3,
        split_seed=0,
        # two views per image: random affine, contrast/brightness, noise
        degrees=15.0,
        scale=(0.85, 1.15),
        shear=10.0,
        shift=1.0,
        brightness=0.4,
        noise=0.1,
    ),
)

optimizer = dict(type='AdamW', lr=5e-3, weight_decay=1e-2)
optimizer_config = dict(grad_clip=None)
lr_config = None
runner = dict(type='EpochBasedRunner', max_epochs=5)

# The hook under demonstration: before every iteration it writes
# m = end - (end - base) * (cos(pi k / K) + 1) / 2 into model.momentum,
# after it calls model.momentum_update(); it logs m as target_momentum.
# base_batch_size=128 (this config's batch) would keep the EMA per image
# seen at any other batch: each m is then used as m ** (S / 128), with S the
# samples per update (see docs/scaling.md). None: m as scheduled.
custom_hooks = [
    dict(
        type='momentum_hook.MomentumUpdateHook',
        end_momentum=1.0,
        base_batch_size=None,
    )
]

log_config = dict(interval=20, hooks=[dict(type='TextLoggerHook')])
checkpoint_config = dict(interval=1, max_keep_ckpts=2)

# After training, on the held-out split: n-shot nearest-centroid accuracy
# (mean of `episodes` seeded episodes) and leave-one-out kNN accuracy.
evaluation = dict(shots=(1, 5), episodes=10, knn_k=10)

# The model is tiny: one CPU thread per process is about as fast as two and
# does not stall when other programs share the cores. OMP_NUM_THREADS wins.
omp_num_threads = 1

dist_params = dict(backend=None)  # None: nccl on GPU, gloo on CPU
workflow = [('train', 1)]
seed = 0
resume_from = None
