# The schedule-related part of an MMSelfSup 0.x BYOL config (mmcv 1.x
# runners), with momentum_hook's hook. Merge it into a full config that
# defines `model` (with base_momentum=0.99 / 0.996), `data` and `log_config`.
custom_imports = dict(imports=['momentum_hook'], allow_failed_imports=False)

# One number drives gradient accumulation and the target update, so that the
# target is updated after every optimizer step and never in between.
update_interval = 16  # e.g. 4096 / (16 GPUs x 16 images per GPU)

optimizer = dict(type='LARS', lr=4.8, momentum=0.9, weight_decay=1e-6)
# Plain mmcv: accumulate gradients over `update_interval` iterations. In
# MMSelfSup 0.x write
# `optimizer_config = dict(update_interval=update_interval)` (its
# DistOptimizerHook); the hook accepts both.
optimizer_config = dict(
    type='GradientCumulativeOptimizerHook', cumulative_iters=update_interval
)

lr_config = dict(
    policy='CosineAnnealing',
    min_lr=0.0,
    warmup='linear',
    warmup_iters=10,
    warmup_ratio=1e-4,
    warmup_by_epoch=True,
)
runner = dict(type='EpochBasedRunner', max_epochs=300)

custom_hooks = [
    dict(
        type='momentum_hook.MomentumUpdateHook',
        end_momentum=1.0,
        update_interval=update_interval,
    )
]
