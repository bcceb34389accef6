# The momentum hook in an MMEngine config: copy these lines into yours.
#
# `custom_imports` imports momentum_hook when the config is loaded, which
# registers the hook in MMEngine's HOOKS registry as
# 'momentum_hook.MomentumUpdateHook' (and 'momentum_hook.BYOLHook'), names no
# other package can shadow.
#
# The model must provide `base_momentum`, `momentum` and `momentum_update()`
# (momentum_hook.MomentumTargetMixin gives all three). Before each update
# iteration k of K = runner.max_iters the hook sets
#     m = end_momentum - (end_momentum - base_momentum)
#         * (cos(pi * k / K) + 1) / 2
# and after it calls model.momentum_update():
#     target = m * target + (1 - m) * online.
# With optim_wrapper=dict(..., accumulative_counts=N), set update_interval to
# N (or a multiple of it); the hook refuses to start otherwise.
# Resuming (resume=True) with torch >= 2.6 and MMEngine 0.10.7: MMEngine's
# checkpoints need TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 in the environment;
# set it only for checkpoints you trust (it allows arbitrary pickles).
custom_imports = dict(imports=['momentum_hook'], allow_failed_imports=False)

custom_hooks = [
    dict(type='momentum_hook.MomentumUpdateHook', end_momentum=1.0)
]
