"""A bfloat16 target under FSDP2, FSDP1 and DeepSpeed bf16 (ZeRO-2/3), on
two gloo ranks (CPU): the float32 master keeps it on the float64 EMA.

Each scenario trains a bfloat16 :class:`TinyBYOL` (DeepSpeed: a float32 one
in an engine with ``bf16: {enabled: true}``, which stores every module
parameter, the target's included, in bfloat16) for ``STEPS`` optimizer steps,
updating the target with momentum 0.996 after each. Stored in bfloat16 alone,
most of those updates round to no change. The tests compare the gathered
target with a float64 EMA replayed from the recorded online weights, and the
target network's forward output with the same bfloat16 network holding that
EMA rounded to bfloat16.
"""

import functools
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from momentum_testing import (
    SHARDED_WORLD_SIZE,
    TinyBYOL,
    record_sharded_training,
    replay_ema,
    run_scenarios,
    set_rank_environment,
    sharded_results,
)
from test_sharded import fsdp1, gather_fsdp2, sgd_step
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp import fully_shard
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

from momentum_hook.sharding import fully_shard_pair

pytestmark = pytest.mark.distributed

BF16 = torch.bfloat16
STEPS = 60
MOMENTA = [0.996] * STEPS


class LayerNormBYOL(TinyBYOL):
    """:class:`TinyBYOL` with a LayerNorm for its BatchNorm: a DeepSpeed
    bf16 engine casts parameters, not buffers, and a CPU BatchNorm refuses
    bfloat16 inputs with float32 statistics."""

    def __init__(self):
        nn.Module.__init__(self)
        self.online_net = nn.Sequential(
            nn.Linear(4, 3), nn.LayerNorm(3), nn.ReLU(), nn.Linear(3, 2)
        )
        self.target_net = self.init_momentum_target(self.online_net)


def build_bf16():
    """A seeded :class:`LayerNormBYOL`: ``(model, online, target)``."""
    torch.manual_seed(0)
    model = LayerNormBYOL()
    return model, model.online_net, model.target_net


def probe():
    """The input of the target's forward that the tests check."""
    return torch.randn(5, 4, generator=torch.Generator().manual_seed(7))


def in_bf16(train_step):
    return lambda batch: train_step(batch.to(BF16))


def bf16_training(rank, model, online, target, train_step, gather, forward):
    """Train and record (see :func:`record_sharded_training`), then run
    ``forward(probe)``, the target network's forward in bfloat16."""
    # The online network starts away from the target, as after warm-up.
    with torch.no_grad():
        for param in online.parameters():
            param.add_(0.25)
    record = record_sharded_training(
        rank,
        model,
        online,
        target,
        in_bf16(train_step),
        gather,
        momenta=MOMENTA,
    )
    record['forward'] = forward(probe().to(BF16)).detach().clone()
    return record


def buffers_of(network):
    return {
        name: buffer.detach().clone()
        for name, buffer in network.named_buffers()
    }


def plain(rank):
    model, online, target = build_bf16()
    model.to(BF16)

    def gather(network):
        return (
            [param.detach().clone() for param in network.parameters()],
            buffers_of(network),
        )

    return bf16_training(
        rank, model, online, target, sgd_step(model), gather, target
    )


def fsdp2(rank):
    model, online, target = build_bf16()
    model.to(BF16)
    mesh = init_device_mesh('cpu', (SHARDED_WORLD_SIZE,))
    fully_shard_pair(
        online=online, target=target, submodules=nn.Linear, mesh=mesh
    )
    fully_shard(model, mesh=mesh)
    return bf16_training(
        rank, model, online, target, sgd_step(model), gather_fsdp2, target
    )


def fsdp1_bf16(rank):
    model, online, target = build_bf16()
    model.to(BF16)
    wrapped = fsdp1(model, True, ModuleWrapPolicy({nn.Sequential}))

    def gather(network):
        with FSDP.summon_full_params(wrapped, writeback=False):
            params = [param.detach().clone() for param in network.parameters()]
        return params, buffers_of(network)

    return bf16_training(
        rank,
        model,
        online,
        target,
        sgd_step(wrapped),
        gather,
        lambda x: model.target_net(x),
    )


def deepspeed_bf16(stage, rank, **zero):
    import deepspeed
    from test_sharded_deepspeed import config

    model, online, target = build_bf16()
    engine = deepspeed.initialize(
        model=model,
        config=dict(config(stage, **zero), bf16=dict(enabled=True)),
    )[0]
    assert next(target.parameters()).dtype == BF16  # the engine's doing

    def train_step(batch):
        engine.backward(engine(batch))
        engine.step()

    def gather(network):
        if stage == 3:
            # DeepSpeed's own gather of bfloat16 partitions over gloo now
            # and then returns garbage elements on the CPU; rebuild them
            # from the partitions in float32 instead.
            params = [rebuilt.to(BF16) for rebuilt in partitions(network)]
        else:
            params = [param.detach().clone() for param in network.parameters()]
        return params, buffers_of(network)

    record = bf16_training(
        rank, model, online, target, train_step, gather, target
    )
    return record


def partitions(network):
    """``network``'s ZeRO-3 parameters rebuilt from every rank's partition,
    in float32."""
    rebuilt = []
    for param in network.parameters():
        mine = param.ds_tensor.detach().float()
        pieces = [torch.empty_like(mine) for _ in range(SHARDED_WORLD_SIZE)]
        dist.all_gather(pieces, mine)
        rebuilt.append(
            torch.cat(pieces)[: param.ds_numel].view(param.ds_shape)
        )
    return rebuilt


SCENARIOS = {
    'plain': plain,
    'fsdp2': fsdp2,
    'fsdp1': fsdp1_bf16,
    'deepspeed zero2 bf16': functools.partial(deepspeed_bf16, 2),
    # bias, BatchNorm and the 2x3 Linear persistent (a gathered copy each),
    # the first Linear's weight partitioned only.
    'deepspeed zero3 bf16, some persistent': functools.partial(
        deepspeed_bf16, 3, stage3_param_persistence_threshold=10
    ),
    'deepspeed zero3 bf16, none persistent': functools.partial(
        deepspeed_bf16, 3, stage3_param_persistence_threshold=0
    ),
}


def rank_main(rank, port, out_dir):
    set_rank_environment(rank, port)
    dist.init_process_group('gloo', timeout=timedelta(seconds=60))
    run_scenarios(rank, SCENARIOS, out_dir)


@pytest.fixture(scope='module')
def results(tmp_path_factory):
    pytest.importorskip('deepspeed')
    return sharded_results(
        rank_main, tmp_path_factory.mktemp('low_precision_sharded'), SCENARIOS
    )


def reference_forward(weights, buffers, x):
    """The target network holding ``weights`` (rounded to bfloat16) and
    ``buffers``, unsharded and in eval mode, run on ``x`` in bfloat16."""
    network = LayerNormBYOL().target_net.to(BF16).eval()
    with torch.no_grad():
        for param, weight in zip(network.parameters(), weights):
            param.copy_(weight)
        for name, buffer in network.named_buffers():
            buffer.copy_(buffers[name])
        return network(x.to(BF16))


@pytest.mark.parametrize('name', SCENARIOS)
def test_a_bf16_target_follows_the_float64_ema(results, name):
    for record in results[name]:
        assert isinstance(record, dict), record  # not an error
        (initial, buffers), (final, _) = record['initial'], record['final']
        online = [params for params, _ in record['online']]
        reference = replay_ema(initial, online, record['momenta'])
        assert {tensor.dtype for tensor in final} == {BF16}
        moved = max(
            float((ref - start.double()).abs().max())
            for ref, start in zip(reference, initial)
        )
        assert moved > 0.05  # the EMA moved: a stalled target is far off
        # The target is the EMA rounded once to bfloat16: equal to it
        # rounded, but for an element at a rounding boundary now and then.
        rounded = [ref.to(BF16) for ref in reference]
        equal = sum(int((a == b).sum()) for a, b in zip(final, rounded))
        assert equal / sum(t.numel() for t in final) > 0.95
        for tensor, ref in zip(final, reference):
            torch.testing.assert_close(
                tensor.double(), ref, rtol=2**-8, atol=1e-5
            )
        # What the target computes: the EMA's forward, in bfloat16 (under
        # ZeRO-3 through the gathered copies of persistent parameters, which
        # DeepSpeed may gather anew from the partitions between updates).
        expected = reference_forward(reference, buffers, probe())
        torch.testing.assert_close(
            record['forward'], expected, rtol=2**-7, atol=2**-7
        )
