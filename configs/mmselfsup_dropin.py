# The drop-in for an existing MMSelfSup 0.x project: add this one line to a
# config (or `_base_` this file) and its unchanged custom_hooks line, e.g.
#     custom_hooks = [dict(type='MomentumUpdateHook', end_momentum=1.,
#                          update_interval=update_interval)]
# builds momentum_hook's hook instead of MMSelfSup's: the same momenta and
# target weights, plus its checks (the model contract, the optimizer hook's
# gradient accumulation, its priority) before iteration 1. The run's log
# then says which hook was built, with which arguments.
custom_imports = dict(
    imports=['momentum_hook_dropin'], allow_failed_imports=False
)
