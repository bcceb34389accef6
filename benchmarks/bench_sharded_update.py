"""Time the momentum update of an FSDP2-sharded ViT-B/16, per rank.

Two ranks (gloo, CPU) each build torchvision's ``vit_b_16()`` (no weights,
fp32) as the online network and its target with
:meth:`momentum_hook.MomentumTargetMixin.init_momentum_target`, and shard
both alike with :func:`momentum_hook.sharding.fully_shard_pair` (one FSDP2
group per encoder block, then each network) on ``init_device_mesh('cpu',
(2,))``. Each rank then times, side by side:

- ours: ``MomentumTargetMixin.momentum_update()`` (its plan is reused);
- ours: :func:`momentum_hook.momentum_update_` (plans on every call);
- ``torch._foreach_lerp_`` on the DTensor parameters (DTensor dispatch);
- DINOv2's ``_foreach_mul_`` + ``_foreach_add_`` on the local tensors;
- ``torch._foreach_lerp_`` on the local tensors;
- one flat ``lerp_`` over two buffers of the rank's local numel: the bound;
- ours on a bfloat16 copy of both networks, sharded alike:
  ``momentum_update()`` through the float32 masters of the target's local
  shards (their 4 bytes per local element are allocated on the first update,
  outside the timing and the extra-memory column).

Every style is first checked once against a float64 reference on the local
shards. The styles are then timed in interleaved rounds (every round runs
every style once, in a rotated order, both ranks in step behind a barrier)
and each row is the median over the rounds. The extra memory of an update is
measured with ``torch.profiler`` (``profile_memory=True``): the peak of the
running sum of every allocation and free inside the update, over the bytes
of the rank's target shard.

Usage::

    python benchmarks/bench_sharded_update.py              # ViT-B/16
    python benchmarks/bench_sharded_update.py --quick      # a smoke run
"""

import argparse
import os
import platform
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.profiler import ProfilerActivity, profile

from momentum_hook import MomentumTargetMixin, momentum_update_
from momentum_hook.sharding import fully_shard_pair

WORLD_SIZE = 2
MOMENTUM = 0.99
BOUND = 'one flat lerp_ (bound)'
BF16 = 'ours: bf16 target + fp32 master, momentum_update()'


class Pair(MomentumTargetMixin, nn.Module):
    def __init__(self, online):
        super().__init__()
        self.online_net = online
        self.target_net = self.init_momentum_target(online, MOMENTUM)


def build(quick):
    if quick:
        online = nn.Sequential(*[nn.Linear(256, 256) for _ in range(8)])
        return Pair(online), nn.Linear, 'Linear stack'
    import torchvision
    from torchvision.models.vision_transformer import EncoderBlock

    return Pair(torchvision.models.vit_b_16()), EncoderBlock, 'ViT-B/16'


def local(params):
    return [param.to_local() for param in params]


def styles(model):
    online_dt = list(model.online_net.parameters())
    target_dt = list(model.target_net.parameters())
    online, target = local(online_dt), local(target_dt)
    numel = sum(tensor.numel() for tensor in target)
    flat_target, flat_online = torch.randn(numel), torch.randn(numel)
    weight = 1 - MOMENTUM

    def dinov2():
        torch._foreach_mul_(target, MOMENTUM)
        torch._foreach_add_(target, online, alpha=weight)

    return (
        {
            'ours: MomentumTargetMixin.momentum_update()': (
                model.momentum_update
            ),
            'ours: momentum_update_': lambda: momentum_update_(
                model.target_net, model.online_net, MOMENTUM
            ),
            'torch._foreach_lerp_ on the DTensors': lambda: (
                torch._foreach_lerp_(target_dt, online_dt, weight)
            ),
            'DINOv2 _foreach_mul_ + _foreach_add_, local tensors': dinov2,
            'torch._foreach_lerp_, local tensors': lambda: (
                torch._foreach_lerp_(target, online, weight)
            ),
            BOUND: lambda: flat_target.lerp_(flat_online, weight),
        },
        target,
        online,
    )


def check(name, update, target, online):
    """One update must equal the float64 reference on every local shard
    (rounded once to the target's dtype)."""
    before = [tensor.clone() for tensor in target]
    with torch.no_grad():
        update()
    for old, new, source in zip(before, target, online):
        expected = MOMENTUM * old.double() + (1 - MOMENTUM) * source.double()
        if new.dtype == torch.bfloat16:
            torch.testing.assert_close(new, expected.to(new.dtype), msg=name)
        else:
            torch.testing.assert_close(
                new.double(), expected, rtol=1e-6, atol=1e-6, msg=name
            )


def sharded(quick, mesh, dtype=torch.float32):
    """The pair built with seed 0 in ``dtype``, sharded with FSDP2."""
    torch.manual_seed(0)
    model, block, label = build(quick)
    model.to(dtype)
    fully_shard_pair(
        online=model.online_net,
        target=model.target_net,
        submodules=block,
        mesh=mesh,
    )
    fully_shard(model, mesh=mesh)
    return model, label


def extra_memory(update):
    """The peak extra bytes allocated during ``update()`` (CPU profiler)."""
    with profile(
        activities=[ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        update()
    running = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        running += event.self_cpu_memory_usage
        peak = max(peak, running)
    return peak


def rank_main(rank, port, args, out):
    torch.set_num_threads(args.threads)
    dist.init_process_group(
        'gloo',
        init_method=f'tcp://127.0.0.1:{port}',
        rank=rank,
        world_size=WORLD_SIZE,
    )
    try:
        mesh = init_device_mesh('cpu', (WORLD_SIZE,))
        model, label = sharded(args.quick, mesh)
        table, target, online = styles(model)
        for name, update in table.items():
            if name != BOUND:
                check(name, update, target, online)
        low, _ = sharded(args.quick, mesh, torch.bfloat16)
        table[BF16] = low.momentum_update
        check(
            BF16,
            low.momentum_update,
            local(low.target_net.parameters()),
            local(low.online_net.parameters()),
        )
        times = {name: [] for name in table}
        names = list(table)
        with torch.no_grad():
            for round_ in range(args.rounds):
                for name in (
                    names[round_ % len(names) :] + names[: round_ % len(names)]
                ):
                    dist.barrier()
                    start = time.perf_counter()
                    table[name]()
                    times[name].append(time.perf_counter() - start)
            memory = {
                name: extra_memory(update) for name, update in table.items()
            }
            # The probe must see a temporary the size of the shard.
            largest = max(target, key=torch.Tensor.numel)
            probe = extra_memory(lambda: largest * 2) / (
                largest.numel() * largest.element_size()
            )
        shard_bytes = sum(t.numel() * t.element_size() for t in target)
        result = dict(
            label=label,
            tensors=len(target),
            shard_bytes=shard_bytes,
            numel=sum(p.numel() for p in model.target_net.parameters()),
            median={
                name: statistics.median(values)
                for name, values in times.items()
            },
            memory=memory,
            probe=probe,
        )
        results = [None] * WORLD_SIZE
        dist.all_gather_object(results, result)
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


def cpu_name():
    try:
        with open('/proc/cpuinfo') as cpuinfo:
            for line in cpuinfo:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def markdown(results, args):
    first = results[0]
    lines = [
        f'{cpu_name()} '
        f'({os.cpu_count()} cores, load average '
        f'{os.getloadavg()[0]:.2f}), {WORLD_SIZE} gloo ranks, '
        f'{args.threads} torch thread(s) each, FSDP2 on '
        f'{first["label"]} ({first["numel"] / 1e6:.1f}M parameters, '
        f'{first["tensors"]} tensors, '
        f'{first["shard_bytes"] / 2**20:.0f} MiB of target shard per rank), '
        f'fp32, median of {args.rounds} interleaved rounds. Extra memory: '
        'the torch.profiler peak over the target shard (the probe saw '
        f'{first["probe"]:.2f}x the size of a temporary it was shown).',
        '',
        '| update style | '
        + ' | '.join(
            f'rank {rank}: ms (x bound), extra memory'
            for rank in range(WORLD_SIZE)
        )
        + ' |',
        '|---' * (WORLD_SIZE + 1) + '|',
    ]
    for name in first['median']:
        cells = []
        for result in results:
            seconds = result['median'][name]
            ratio = seconds / result['median'][BOUND]
            extra = result['memory'][name]
            cells.append(
                f'{seconds * 1e3:.1f} ms ({ratio:.2f}x), '
                f'{extra / 2**10:.1f} KiB '
                f'({100 * extra / result["shard_bytes"]:.3f}%)'
            )
        lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--rounds', type=int, default=15)
    parser.add_argument(
        '--threads',
        type=int,
        default=1,
        help='torch threads per rank. Defaults to 1.',
    )
    parser.add_argument(
        '--quick',
        action='store_true',
        help='a small Linear stack instead of ViT-B/16',
    )
    args = parser.parse_args()
    from socket import socket

    with socket() as sock:
        sock.bind(('127.0.0.1', 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, 'results.pth')
        mp.start_processes(
            rank_main,
            args=(port, args, out),
            nprocs=WORLD_SIZE,
            start_method='spawn',
        )
        print(markdown(torch.load(out, weights_only=False), args))


if __name__ == '__main__':
    main()
