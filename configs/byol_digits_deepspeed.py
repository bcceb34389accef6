# The demo's BYOL on the digits, sharded by DeepSpeed ZeRO-3: MMEngine's
# FlexibleRunner with DeepSpeedStrategy on the CPU, gloo between the
# processes. The model, data, optimizer and hook line are byol_digits.py's.
#
#   torchrun --nproc_per_node=2 -m momentum_hook.demo \
#       configs/byol_digits_deepspeed.py --launcher pytorch
#
# MMEngine 0.10.7's DeepSpeedStrategy builds with DeepSpeed <= 0.19.6 (later
# releases removed deepspeed.runtime.fp16.onebit, which it imports).
_base_ = 'byol_digits_fsdp.py'

# ZeRO-3 partitions every parameter, the target network's included; the
# momentum update is local to each rank's partitions and needs no policy.
# A torch optimizer (the config's AdamW) under ZeRO needs
# zero_allow_untested_optimizer. train_micro_batch_size_per_gpu defaults to
# data.samples_per_gpu. On a CPU-only machine DeepSpeed picks its CPU
# accelerator by itself (DS_ACCELERATOR=cpu says so explicitly).
#
# stage3_allgather_sequential: DeepSpeed 0.19.6 gathers several ZeRO-3
# parameters at once with asynchronous all-gathers and waits for the last one
# only; over gloo (the CPU) the others may not have arrived, and the weights
# read are partly stale or garbage (the persistent parameters regathered
# after each step, a GatheredParameters of several). Sequential gathers wait
# for each. DeepSpeed 0.19.8 waits for all, but MMEngine 0.10.7 cannot build
# its DeepSpeedStrategy with it.
strategy = dict(
    _delete_=True,
    type='DeepSpeedStrategy',
    config=dict(zero_allow_untested_optimizer=True),
    zero_optimization=dict(stage=3, stage3_allgather_sequential=True),
)
