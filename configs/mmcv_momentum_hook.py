# Copy into an mmcv 1.x (MMSelfSup 0.x-style) config to schedule the target
# momentum of BYOL / MoCo v3. The model must have `base_momentum`, `momentum`
# and `momentum_update()` (see "The model contract and the mixin" in
# README.md).
custom_imports = dict(imports=['momentum_hook'], allow_failed_imports=False)

# Iterations per target update: keep equal to the optimizer's gradient
# accumulation (1 = update after every iteration).
update_interval = 1

custom_hooks = [
    # The scoped name builds momentum_hook's hook in every process, MMSelfSup
    # 0.x's included ('momentum_hook.BYOLHook' is the same hook). For
    # MMSelfSup's plain names see mmselfsup_dropin.py.
    dict(
        type='momentum_hook.MomentumUpdateHook',
        end_momentum=1.0,
        update_interval=update_interval,
    )
]
