# An MMEngine-style BYOL fragment: the optimizer wrapper, the training loop
# and the momentum hook, with gradient accumulation shared by the optimizer
# and the hook. Merge it into a config that defines the model (one with
# `base_momentum`, `momentum` and `momentum_update()`, e.g. built on
# momentum_hook.MomentumTargetMixin), the data and the runtime settings.
custom_imports = dict(imports=['momentum_hook'], allow_failed_imports=False)

# BYOL's 4096 images per step as 8 GPUs x 32 images x 16 accumulated
# iterations (MMSelfSup 0.x's byol_resnet50_8xb32-accum16 setting). The
# optimizer steps after every 16th iteration, and so must the target:
# one variable feeds both.
accumulative_counts = 16

optim_wrapper = dict(
    type='OptimWrapper',
    # BYOL uses LARS (lr=4.8, weight_decay=1e-6 at 4096 images), which
    # mmpretrain provides as type='LARS'; plain SGD keeps this fragment
    # runnable on MMEngine alone. Tune lr to your batch size.
    optimizer=dict(type='SGD', lr=0.8, momentum=0.9, weight_decay=1e-6),
    accumulative_counts=accumulative_counts,
)

train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=200)

# m rises from the model's base_momentum (0.99 in BYOL) to 1 over the run:
# K = max_epochs * iterations per epoch (runner.max_iters).
custom_hooks = [
    dict(
        type='momentum_hook.MomentumUpdateHook',
        end_momentum=1.0,
        update_interval=accumulative_counts,
    )
]
