# The demo's BYOL on the digits, sharded: MMEngine's FlexibleRunner with
# FSDPStrategy on the CPU, gloo between the processes. The model, data,
# optimizer and hook line are byol_digits.py's.
#
#   torchrun --nproc_per_node=2 -m momentum_hook.demo \
#       configs/byol_digits_fsdp.py --launcher pytorch
_base_ = 'byol_digits.py'

# momentum_hook.demo.flexible registers the FlexibleRunner's model.
custom_imports = dict(
    imports=['momentum_hook', 'momentum_hook.demo.flexible'],
    allow_failed_imports=False,
)
model = dict(type='momentum_hook.FlexibleDigitsBYOL')

runner = dict(_delete_=True, type='FlexibleRunner', max_epochs=5)

# The momentum update is local to each rank's shards, so the online and the
# target network must be separate FSDP units, wrapped alike: the policy
# makes every nn.Sequential a unit. device_id='cpu': FSDPStrategy's default
# is the GPU LOCAL_RANK.
strategy = dict(
    type='FSDPStrategy',
    model_wrapper=dict(
        type='MMFullyShardedDataParallel',
        device_id='cpu',
        auto_wrap_policy='momentum_hook.demo.flexible.sequential_wrap_policy',
    ),
    # Checkpoints as one ordinary file on rank 0 ('local': a shard per rank)
    state_dict_cfg='full',
)

checkpoint_config = dict(_delete_=True, interval=5)  # and after the last
