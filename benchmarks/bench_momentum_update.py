"""Time every momentum (EMA) update style side by side on the same networks.

``target = m * target + (1 - m) * online`` over the parameters of ResNet-50,
ViT-B/16 and ViT-L/16 (torchvision, no weights, fp32), by each style people
use, and by :func:`momentum_hook.momentum_update_`:

- MMSelfSup 0.x's loop, ``param_tgt.data = param_tgt.data * m + ...``;
- torch ``AveragedModel`` with ``get_ema_multi_avg_fn``
  (``update_parameters``);
- timm ``ModelEmaV3.update`` (re-implemented here when timm is missing);
- ``torch._foreach_mul_`` + ``torch._foreach_add_``;
- ``torch._foreach_lerp_`` over tensor lists made once, and the same
  hand-written as timm's ``ModelEmaV3`` does it, over
  ``list(target.parameters())`` made on every call;
- one ``lerp_`` over two flat copies of the weights (the bandwidth limit,
  in practice; no user's model is laid out like that);
- ours: :func:`momentum_hook.momentum_update_` and
  :class:`momentum_hook.MomentumTargetMixin`'s ``momentum_update()``; both
  keep a plan between calls (a staleness check and one ``_foreach_lerp_``
  per call);
- ours with a bfloat16 target and online network: the mixin's
  ``momentum_update()`` through the target's float32 masters (cast the online
  tensors to float32, lerp the masters, round them into the target), and the
  same update by the kernels alone (``momentum_hook.kernels``, planned
  once); with ``--baseline-kernels PATH``, also by another version of that
  module, side by side. Their ratios to the float32 flat ``lerp_`` of the
  same number of elements, timed in the same rounds, are printed apart (the
  target: at most 1.5x on a CPU);
- ours with a float32 target of a bfloat16 online network (the online
  tensors converted to float32 first).

Every row also gives the aten ops one update dispatches, counted with a
``TorchDispatchMode`` (a ``torch._foreach`` op is one op: one CUDA
multi-tensor launch, or a few for large lists), and on CUDA the kernels and
memory operations it runs on the GPU (``torch.profiler``) and its host time
until they are queued: launches, host time and GPU time in one run.

Each style is first checked once against a float64 reference, so that no
timing of a wrong update is ever printed. The styles are then timed in
interleaved rounds (every round runs every style once, in a rotated order) and
each row is the median over the rounds (``--stat min`` for the fastest round),
so that machine noise hits all rows alike. The limit of a row is the time to
move the bytes the update must move (read online, read target, write target:
``3 * numel * 4`` bytes) at the copy bandwidth measured in the same rounds
(``flat_dst.copy_(flat_src)``, counted as ``2 * numel * 4`` bytes). On a CPU a
copy also reads its destination into the cache before writing it, so an
update can beat this limit there (ratios below 1x); on a GPU it cannot.

On a CPU, every kernel is one parallel region over all torch threads: when
another process holds a core, each region waits for a descheduled thread, and
styles that launch one kernel per tensor slow down by far more than one flat
kernel does. Run on an idle machine, or with ``--threads 1``; the header
prints the load average.

Host time, apart: the same networks with every parameter replaced by a
1-element tensor (same modules, same tensor count), so that a call costs only
its host side. The hand-written ``_foreach_lerp_`` over
``list(target.parameters())``, ``momentum_update_`` and the mixin are timed
there side by side in interleaved rounds, in microseconds per call.

Apart from the rows, it also measures the host side of ours, in microseconds
per call (the median of many calls): planning (what ``momentum_update_`` does
on every call and the mixin once), the mixin's check that its plan is current
(what it does on every call), and on CUDA the CPU time of one mixin
``momentum_update()`` until its kernels are queued, which must stay below
the kernels' own time for the GPU never to wait on the update.

Usage::

    python benchmarks/bench_momentum_update.py                 # all models
    python benchmarks/bench_momentum_update.py --device cuda --markdown
    python benchmarks/bench_momentum_update.py --quick         # smoke run
    git show REV:momentum_hook/kernels.py > /tmp/old_kernels.py
    python benchmarks/bench_momentum_update.py --baseline-kernels \
        /tmp/old_kernels.py                                    # compare
"""

import argparse
import collections
import copy
import dataclasses
import gc
import importlib.util
import json
import os
import platform
import statistics
import time

import torch
import torchvision
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils._python_dispatch import TorchDispatchMode

from momentum_hook import (
    ModuleUpdatePlan,
    MomentumTargetMixin,
    kernels,
    momentum_update_,
)

try:
    from timm.utils import ModelEmaV3

    TIMM_LABEL = 'timm ModelEmaV3'
except ImportError:
    ModelEmaV3 = None
    TIMM_LABEL = 'timm ModelEmaV3 (re-implemented)'

MODELS = {
    'resnet50': 'ResNet-50',
    'vit_b_16': 'ViT-B/16',
    'vit_l_16': 'ViT-L/16',
}
#: The momentum of every update (BYOL's base momentum in MMSelfSup 0.x's
#: ImageNet configs is 0.99 to 0.996; the value does not change the cost).
MOMENTUM = 0.99
COPY_LABEL = 'copy (bandwidth probe)'
LOOP_LABEL = 'MMSelfSup 0.x loop'
HAND_LABEL = 'hand-written _foreach_lerp_ over list(parameters())'
FLAT_LABEL = 'one flat lerp_ (reference)'
STATS = {'median': statistics.median, 'min': min}
OURS_LABELS = (
    'ours: momentum_update_',
    'ours: MomentumTargetMixin.momentum_update()',
)
BF16_LABEL = 'ours: bf16 target + fp32 master (mixin)'
CAST_LABEL = 'ours: fp32 target of a bf16 online network (mixin)'
KERNELS_LABEL = 'kernels only: bf16 target + fp32 master'


@dataclasses.dataclass
class Style:
    """One way to do the update.

    Attributes:
        label (str): The row's name.
        update (Callable[[], None]): One update, in place.
        targets (Callable[[], list[Tensor]]): The tensors it updates, in
            parameter order (read after each update: some styles replace
            them).
        onlines (list[Tensor]): The online tensors, in the same order.
    """

    label: str
    update: object
    targets: object
    onlines: list


class _ModelEmaV3:
    """timm's ``ModelEmaV3`` update, re-implemented because timm is missing.

    Written from timm's source (``timm/utils/model_ema.py``, 0.9 to 1.0):
    ``ModelEmaV3.update`` -> ``apply_update_`` with the class defaults
    (``foreach=True``, ``exclude_buffers=False``, no decay warmup): each call
    walks both ``state_dict()``, lerps every floating-point entry (BatchNorm
    running statistics included) with one ``torch._foreach_lerp_`` and copies
    the others (``num_batches_tracked``).
    """

    def __init__(self, model, decay):
        self.module = copy.deepcopy(model).eval()
        self.decay = decay

    @torch.no_grad()
    def update(self, model):
        """EMA ``model`` into ``self.module`` as timm does."""
        ema_lerp_values, model_lerp_values = [], []
        for ema_v, model_v in zip(
            self.module.state_dict().values(), model.state_dict().values()
        ):
            if ema_v.is_floating_point():
                ema_lerp_values.append(ema_v)
                model_lerp_values.append(model_v)
            else:
                ema_v.copy_(model_v)
        torch._foreach_lerp_(
            ema_lerp_values, model_lerp_values, weight=1.0 - self.decay
        )


@torch.no_grad()
def mmselfsup_loop(online, target, momentum):
    """MMSelfSup 0.x's ``BYOL._momentum_update``, written out as it is."""
    for param_ol, param_tgt in zip(online.parameters(), target.parameters()):
        param_tgt.data = param_tgt.data * momentum + param_ol.data * (
            1.0 - momentum
        )


def flat_copy(module):
    """One flat copy of ``module``'s parameters and views of it, per tensor.

    Returns:
        tuple[Tensor, list[Tensor]]: The flat buffer and, in parameter
        order, views of it shaped like the parameters.
    """
    params = list(module.parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    views = [
        view.view_as(p)
        for view, p in zip(flat.split([p.numel() for p in params]), params)
    ]
    return flat, views


class Pair(MomentumTargetMixin, nn.Module):
    """A model that holds the two networks the way users' models do."""

    def __init__(self, online, target):
        super().__init__()
        self.online = online
        self.target = self.init_momentum_target(online)
        self.target.load_state_dict(target.state_dict())  # in place


def build_networks(name, device):
    """Online and target networks, and the same in a MomentumTargetMixin.

    The target starts as a perturbed copy of the online network, so that a
    style that swapped the roles or skipped the update fails the check.

    Returns:
        dict[str, nn.Module]: ``online``, ``target`` and ``pair``, the mixin
        holding copies of both; the targets do not require gradients.
    """
    with torch.device(device):
        online = getattr(torchvision.models, name)(weights=None)
    target = copy.deepcopy(online).requires_grad_(False)
    generator = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for param in target.parameters():
            param.add_(
                torch.randn(param.shape, generator=generator, device=device),
                alpha=0.1,
            )
    pair = Pair(copy.deepcopy(online), target)
    bf16 = Pair(copy.deepcopy(online), target).to(torch.bfloat16)
    cast = Pair(copy.deepcopy(online), target)
    cast.online.to(torch.bfloat16)  # the target stays float32
    return {
        'online': online,
        'target': target,
        'pair': pair,
        'bf16': bf16,
        'cast': cast,
    }


def load_kernels(path):
    """A kernels module read from ``path``, for a side-by-side comparison.

    For example an earlier version of the package's:
    ``git show REV:momentum_hook/kernels.py > old_kernels.py``. It is
    imported inside ``momentum_hook``, so that its relative imports resolve.
    """
    spec = importlib.util.spec_from_file_location(
        'momentum_hook._baseline_kernels', path
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def kernel_style(label, module, nets, weight):
    """The bfloat16 + master update by ``module.plan_lerp`` and
    ``module.run_lerp`` alone (no plan check), planned once, on a copy of
    the bfloat16 target and float32 masters of it."""
    target = copy.deepcopy(nets['bf16'].target)
    targets = list(target.parameters())
    onlines = list(nets['bf16'].online.parameters())
    masters = [tensor.float() for tensor in targets]
    calls = module.plan_lerp(targets, onlines, masters)
    return Style(
        label, lambda: module.run_lerp(calls, weight), lambda: targets, onlines
    )


def make_styles(nets, momentum, baseline=None):
    """Every update style over ``nets``, the copy probe first.

    The styles that stand for a bare kernel (foreach, flat ``lerp_``) get
    their tensor lists and flat buffers once, outside the timing; the library
    styles and ours do all their per-call work inside it. ``baseline``: a
    kernels module (:func:`load_kernels`) whose bfloat16 + master update is
    timed next to the package's.
    """
    online, target, pair = nets['online'], nets['target'], nets['pair']
    # The MMSelfSup loop replaces its target's storage on every call (fresh
    # memory to fault in, and a kept plan rightly goes stale): its own copy.
    loop_target = copy.deepcopy(target)
    pair.momentum = nets['bf16'].momentum = nets['cast'].momentum = momentum
    onlines, targets = list(online.parameters()), list(target.parameters())
    pair_onlines = list(pair.online.parameters())
    (flat_o, flat_onlines), (flat_t, flat_targets) = (
        flat_copy(online),
        flat_copy(target),
    )
    weight = 1.0 - momentum

    averaged = AveragedModel(
        target, multi_avg_fn=get_ema_multi_avg_fn(momentum)
    )
    averaged.n_averaged.fill_(1)  # past the first call, which only copies
    ema = (ModelEmaV3 or _ModelEmaV3)(target, decay=momentum)

    def foreach_mul_add():
        torch._foreach_mul_(targets, momentum)
        torch._foreach_add_(targets, onlines, alpha=weight)

    hand_written = hand_written_update(target, online, momentum)
    extra = (
        []
        if baseline is None
        else [kernel_style(baseline_label(baseline), baseline, nets, weight)]
    )

    return [
        Style(COPY_LABEL, lambda: flat_t.copy_(flat_o), lambda: [], []),
        Style(
            LOOP_LABEL,
            lambda: mmselfsup_loop(online, loop_target, momentum),
            loop_target.parameters,
            onlines,
        ),
        Style(
            'torch AveragedModel + get_ema_multi_avg_fn',
            lambda: averaged.update_parameters(online),
            averaged.module.parameters,
            onlines,
        ),
        Style(
            TIMM_LABEL,
            lambda: ema.update(online),
            ema.module.parameters,
            onlines,
        ),
        Style(
            'foreach mul_ + add_', foreach_mul_add, target.parameters, onlines
        ),
        Style(
            'torch._foreach_lerp_',
            lambda: torch._foreach_lerp_(targets, onlines, weight),
            target.parameters,
            onlines,
        ),
        Style(HAND_LABEL, hand_written, target.parameters, onlines),
        Style(
            FLAT_LABEL,
            lambda: flat_t.lerp_(flat_o, weight),
            lambda: flat_targets,
            flat_onlines,
        ),
        Style(
            OURS_LABELS[0],
            lambda: momentum_update_(target, online, momentum),
            target.parameters,
            onlines,
        ),
        Style(
            OURS_LABELS[1],
            pair.momentum_update,
            pair.target.parameters,
            pair_onlines,
        ),
        Style(
            BF16_LABEL,
            nets['bf16'].momentum_update,
            nets['bf16'].target.parameters,
            list(nets['bf16'].online.parameters()),
        ),
        Style(
            CAST_LABEL,
            nets['cast'].momentum_update,
            nets['cast'].target.parameters,
            list(nets['cast'].online.parameters()),
        ),
        kernel_style(KERNELS_LABEL, kernels, nets, weight),
    ] + extra


def baseline_label(module):
    """The row of the kernels read by :func:`load_kernels`."""
    return f'{KERNELS_LABEL}, kernels of {os.path.basename(module.__file__)}'


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched inside the ``with`` block, by name.

    A ``torch._foreach`` op is one op here, and one CUDA multi-tensor launch
    or a few (torch 2.14 built with CUDA 13: one per 2,240 blocks of 65,536
    elements or per 210 to 770 tensors); any other op is one kernel or none
    (a view).
    """

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def cuda_activity(fn, device):
    """The kernels and memory operations ``fn()`` runs on the GPU (from
    ``torch.profiler``) and its host time until they are queued, in us."""
    torch.cuda.synchronize(device)
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CUDA]
    ) as profile:
        fn()
        torch.cuda.synchronize(device)
    launches = sum(
        str(event.device_type).endswith('CUDA') for event in profile.events()
    )
    samples = []
    for _ in range(20):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    torch.cuda.synchronize(device)
    return launches, statistics.median(samples) * 1e6


@torch.no_grad()
def count_style(style, device):
    """The ops one update of ``style`` dispatches (see :class:`OpCounter`);
    on CUDA also its GPU launches and host time (:func:`cuda_activity`).

    Returns:
        dict: ``ops`` (the count), ``op_names`` (by name), ``launches`` and
        ``host_us`` (None on a CPU).
    """
    with OpCounter() as counter:
        style.update()
    launches = host_us = None
    if device.type == 'cuda':
        launches, host_us = cuda_activity(style.update, device)
    return {
        'ops': sum(counter.ops.values()),
        'op_names': dict(counter.ops),
        'launches': launches,
        'host_us': host_us,
    }


def hand_written_update(target, online, momentum):
    """The update as people write it by hand, timm's ``ModelEmaV3`` way."""
    weight = 1.0 - momentum

    @torch.no_grad()
    def update():
        torch._foreach_lerp_(
            list(target.parameters()), list(online.parameters()), weight
        )

    return update


def one_element(module):
    """``module`` with every parameter replaced by a 1-element tensor, in
    place: the same modules and tensor count, next to no kernel time."""
    for submodule in module.modules():
        for key, param in submodule._parameters.items():
            if param is not None:
                submodule._parameters[key] = nn.Parameter(
                    torch.zeros(1, device=param.device),
                    requires_grad=param.requires_grad,
                )
    return module


#: The rows of the host-time table.
HOST_LABELS = (HAND_LABEL,) + OURS_LABELS


@torch.no_grad()
def host_times(name, device, rounds, stat='median', calls=50):
    """Microseconds per call with 1-element tensors, in interleaved rounds.

    Returns:
        dict[str, float]: The ``stat`` (median or min) over the rounds of
        each style's mean time per call, by label; ``'tensors'``: the
        parameter count.
    """
    with torch.device(device):
        online = one_element(getattr(torchvision.models, name)(weights=None))
    target = copy.deepcopy(online).requires_grad_(False)
    pair = Pair(copy.deepcopy(online), target)
    pair.momentum = MOMENTUM
    updates = dict(
        zip(
            HOST_LABELS,
            (
                hand_written_update(target, online, MOMENTUM),
                lambda: momentum_update_(target, online, MOMENTUM),
                pair.momentum_update,
            ),
        )
    )
    samples = {label: [] for label in updates}
    for index in range(rounds + 1):  # one warm-up round
        for label in HOST_LABELS[index % 3 :] + HOST_LABELS[: index % 3]:
            elapsed = time_block(updates[label], calls, torch.device('cpu'))
            if index:
                samples[label].append(elapsed * 1e3)
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    times = {label: STATS[stat](us) for label, us in samples.items()}
    times['tensors'] = len(list(online.parameters()))
    return times


@torch.no_grad()
def check_style(style, momentum):
    """Run one update and compare it with a float64 reference.

    Raises:
        AssertionError: If any target tensor is off by more than the
            tolerance of ``torch.testing.assert_close`` for its dtype (a
            bfloat16 target: the float64 result rounded once).
    """
    before = [t.detach().clone() for t in style.targets()]
    style.update()
    after = list(style.targets())
    if len(after) != len(style.onlines) or len(before) != len(after):
        raise AssertionError(f'{style.label}: tensor count changed')
    for index, (new, old, online) in enumerate(
        zip(after, before, style.onlines)
    ):
        expected = old.double() * momentum + online.double() * (1 - momentum)
        torch.testing.assert_close(
            new,
            expected.to(new.dtype),
            msg=lambda text, i=index: f'{style.label}, tensor {i}: {text}',
        )


def time_block(fn, number, device):
    """Milliseconds per call of ``fn`` over ``number`` back-to-back calls."""
    if device.type == 'cuda':
        start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
        torch.cuda.synchronize(device)
        start.record()
        for _ in range(number):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / number
    start = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - start) * 1e3 / number


@torch.no_grad()
def time_styles(styles, rounds, warmup, number, device):
    """Milliseconds per update of each style, over interleaved rounds.

    Every round times each style once (``number`` calls), starting one style
    further along the list than the round before.

    Returns:
        dict[str, list[float]]: Label to one time per timed round.
    """
    samples = {style.label: [] for style in styles}
    for index in range(warmup + rounds):
        shift = index % len(styles)
        for style in styles[shift:] + styles[:shift]:
            elapsed = time_block(style.update, number, device)
            if index >= warmup:
                samples[style.label].append(elapsed)
    return samples


def summarize(name, nets, samples, stat, counts):
    """The rows of one model, with the limit and ours' speed-ups.

    Args:
        name (str): The model's torchvision name.
        nets (dict[str, nn.Module]): The networks timed.
        samples (dict[str, list[float]]): The times of each style.
        stat (str): ``'median'`` or ``'min'``: which statistic of each
            style's times the rows, the limit and the ratios use.
        counts (dict[str, dict]): The ops of each style
            (:func:`count_style`).
    """
    params = list(nets['online'].parameters())
    numel = sum(p.numel() for p in params)
    element = params[0].element_size()
    pick = STATS[stat]
    times = {label: pick(ms) for label, ms in samples.items()}
    copy_ms = times.pop(COPY_LABEL)
    bandwidth = 2 * numel * element / (copy_ms * 1e-3)
    limit_ms = 3 * numel * element / bandwidth * 1e3
    return {
        'model': name,
        'tensors': len(params),
        'numel': numel,
        'stat': stat,
        'copy_bandwidth_GBps': bandwidth / 1e9,
        'limit_ms': limit_ms,
        'rows': [
            {
                'style': label,
                'ms': ms,
                'x_limit': ms / limit_ms,
                'ms_median': statistics.median(samples[label]),
                'ms_min': min(samples[label]),
                **counts[label],
            }
            for label, ms in times.items()
        ],
        'ours_speedup_over_loop': {
            label: times[LOOP_LABEL] / times[label] for label in OURS_LABELS
        },
        'ours_over_flat_lerp': {
            label: times[label] / times[FLAT_LABEL]
            for label in times
            if label.startswith(('ours', KERNELS_LABEL))
        },
        'ours_over_hand_written': {
            label: times[label] / times[HAND_LABEL] for label in OURS_LABELS
        },
    }


def host_microseconds(fn, calls=200):
    """The median wall time of one call of ``fn``, in microseconds."""
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


@torch.no_grad()
def host_costs(nets, device):
    """The host side of ours, in microseconds per call (see the module doc).

    Returns:
        dict[str, float]: ``plan``, ``plan_check`` and, on CUDA,
        ``mixin_enqueue`` (None on a CPU, where kernels run on the host).
    """
    pair = nets['pair']
    plan = ModuleUpdatePlan(pair.target, pair.online)
    costs = {
        'plan': host_microseconds(
            lambda: ModuleUpdatePlan(pair.target, pair.online), 20
        ),
        'plan_check': host_microseconds(plan.is_current),
        'mixin_enqueue': None,
    }
    if device.type == 'cuda':
        samples = []
        for _ in range(50):
            torch.cuda.synchronize(device)
            start = time.perf_counter()
            pair.momentum_update()
            samples.append(time.perf_counter() - start)
        torch.cuda.synchronize(device)
        costs['mixin_enqueue'] = statistics.median(samples) * 1e6
    return costs


def bench_model(name, args, device):
    """Build, check and time every style on one model; return its summary."""
    nets = build_networks(name, device)
    styles = make_styles(
        nets,
        MOMENTUM,
        args.baseline_kernels and load_kernels(args.baseline_kernels),
    )
    for style in styles[1:]:
        check_style(style, MOMENTUM)
    counts = {style.label: count_style(style, device) for style in styles}
    samples = time_styles(
        styles, args.repeats, args.warmup, args.number, device
    )
    result = summarize(name, nets, samples, args.stat, counts)
    result['host_us'] = host_costs(nets, device)
    del nets, styles
    gc.collect()
    result['host_only_us'] = host_times(name, device, args.repeats, args.stat)
    return result


def fmt_host(result):
    """The host costs of one model as ``plan 310 µs, check 20 µs``."""
    host = result['host_us']
    text = (
        f'planning {host["plan"]:.0f} us, plan check '
        f'{host["plan_check"]:.0f} us'
    )
    if host['mixin_enqueue'] is not None:
        text += f', mixin call until queued {host["mixin_enqueue"]:.0f} us'
    return text


def fmt_ops(row):
    """``1 op`` or, on CUDA, ``3 ops, 12 launches, 40 us host``."""
    text = f'{row["ops"]} op{"s" * (row["ops"] != 1)}'
    if row['launches'] is not None:
        text += f', {row["launches"]} launches, {row["host_us"]:.0f} us host'
    return text


def fmt_ms(ms):
    """Milliseconds with about three significant digits."""
    return f'{ms:.0f}' if ms >= 100 else f'{ms:.3g}'


def fmt_ratio(ratio):
    """A ratio as ``93x`` or ``1.2x``."""
    return f'{ratio:.0f}x' if ratio >= 10 else f'{ratio:.1f}x'


def model_title(result):
    """``ResNet-50 (161 tensors, 25.6M)``."""
    return (
        f'{MODELS[result["model"]]} ({result["tensors"]} tensors, '
        f'{result["numel"] / 1e6:.1f}M)'
    )


def print_text(result):
    """One model's rows as an aligned text table."""
    print(
        f'\n{model_title(result)}: copy bandwidth '
        f'{result["copy_bandwidth_GBps"]:.1f} GB/s, limit '
        f'{fmt_ms(result["limit_ms"])} ms'
    )
    width = max(len(row['style']) for row in result['rows'])
    for row in result['rows']:
        print(
            f'  {row["style"]:<{width}}  {fmt_ms(row["ms"]):>7} ms  '
            f'{fmt_ratio(row["x_limit"]):>6} limit  {fmt_ops(row)}'
        )
    for label, ratio in result['ours_over_flat_lerp'].items():
        if label not in OURS_LABELS:
            print(
                f'  {label}: {ratio:.2f}x the float32 flat lerp_ of as '
                'many elements (target <= 1.5x)'
            )
    for label in OURS_LABELS:
        print(
            f'  {label}: '
            f'{result["ours_speedup_over_loop"][label]:.1f}x faster than '
            f'the loop, {result["ours_over_flat_lerp"][label]:.2f}x the '
            'flat lerp_'
        )
    print(f'  host side of ours: {fmt_host(result)}')
    host = result['host_only_us']
    print(f'  host time per call, {host["tensors"]} 1-element tensors:')
    for label in HOST_LABELS:
        print(
            f'    {label:<{width}}  {host[label]:7.0f} us  '
            f'{host[label] / host[HAND_LABEL]:.2f}x hand-written'
        )


def host_table(results):
    """Host time per call with 1-element tensors, as a Markdown table."""
    lines = [
        'Host time per call, every parameter a 1-element tensor '
        f'({results[0]["stat"]} of the rounds, us per call, x the '
        'hand-written foreach).',
        '',
        '| update style | '
        + ' | '.join(
            f'{MODELS[r["model"]]} ({r["host_only_us"]["tensors"]} tensors)'
            for r in results
        )
        + ' |',
        '|---' * (len(results) + 1) + '|',
    ]
    for label in HOST_LABELS:
        cells = [
            f'{r["host_only_us"][label]:.0f} us ({ratio:.2f}x)'
            for r in results
            for ratio in [
                r['host_only_us'][label] / r['host_only_us'][HAND_LABEL]
            ]
        ]
        lines.append(f'| {label} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def markdown_table(results, machine):
    """All models in one Markdown table, as docs/performance.md shows it."""
    lines = [
        f'{machine}, fp32 unless the row says otherwise, momentum '
        f'{MOMENTUM}, {results[0]["stat"]} ms per update (x the '
        'bandwidth limit), aten ops per update.',
        '',
        '| update style | ' + ' | '.join(map(model_title, results)) + ' |',
        '|---' * (len(results) + 1) + '|',
    ]
    for index, row in enumerate(results[0]['rows']):
        cells = [
            f'{fmt_ms(r["rows"][index]["ms"])} ms '
            f'({fmt_ratio(r["rows"][index]["x_limit"])}), '
            f'{fmt_ops(r["rows"][index])}'
            for r in results
        ]
        lines.append(f'| {row["style"]} | ' + ' | '.join(cells) + ' |')
    extra = [
        (
            'limit (3 x 4 bytes x numel / copy bandwidth)',
            lambda r: f'{fmt_ms(r["limit_ms"])} ms',
        ),
        (
            'measured copy bandwidth',
            lambda r: f'{r["copy_bandwidth_GBps"]:.1f} GB/s',
        ),
        ('host side of ours, per call', fmt_host),
    ]
    for label in OURS_LABELS:
        extra.append(
            (
                f'{label}: speed-up over the loop / x flat lerp_ / '
                'x hand-written foreach',
                lambda r, k=label: (
                    f'{r["ours_speedup_over_loop"][k]:.1f}x / '
                    f'{r["ours_over_flat_lerp"][k]:.2f}x / '
                    f'{r["ours_over_hand_written"][k]:.2f}x'
                ),
            )
        )
    for label in results[0]['ours_over_flat_lerp']:
        if label not in OURS_LABELS:
            extra.append(
                (
                    f'{label}: x float32 flat lerp_',
                    lambda r, k=label: f'{r["ours_over_flat_lerp"][k]:.2f}x',
                )
            )
    for label, cell in extra:
        lines.append(f'| {label} | ' + ' | '.join(map(cell, results)) + ' |')
    return '\n'.join(lines)


def machine_name(device):
    """The GPU's name, or the CPU model with its core and thread counts."""
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    model = platform.processor() or 'CPU'
    try:
        with open('/proc/cpuinfo') as cpuinfo:
            model = next(
                line.split(':', 1)[1].strip()
                for line in cpuinfo
                if line.startswith('model name')
            )
    except (OSError, StopIteration):
        pass
    return (
        f'{model} ({os.cpu_count()} cores, {torch.get_num_threads()} '
        'torch threads)'
    )


def parse_args(argv=None):
    """The command line, with the device-dependent defaults filled in."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument(
        '--device',
        choices=('cpu', 'cuda'),
        default='cuda' if torch.cuda.is_available() else 'cpu',
    )
    parser.add_argument(
        '--models', nargs='+', choices=tuple(MODELS), default=list(MODELS)
    )
    parser.add_argument(
        '--repeats',
        type=int,
        help='timed rounds (default: 30 on CUDA, 7 on CPU)',
    )
    parser.add_argument(
        '--warmup', type=int, help='untimed rounds first (default: 5 / 1)'
    )
    parser.add_argument(
        '--number',
        type=int,
        help='back-to-back updates per timed block (default: 10 / 1)',
    )
    parser.add_argument(
        '--stat',
        choices=tuple(STATS),
        default='median',
        help='statistic of the rounds that the rows show; min '
        'resists other load on a shared machine',
    )
    parser.add_argument(
        '--threads',
        type=int,
        help="CPU threads for torch (default: torch's own)",
    )
    parser.add_argument(
        '--quick',
        action='store_true',
        help='smoke run: ResNet-50, 3 rounds, 1 warm-up',
    )
    parser.add_argument(
        '--markdown', action='store_true', help='also print one Markdown table'
    )
    parser.add_argument('--json', metavar='PATH', help='write the results')
    parser.add_argument(
        '--baseline-kernels',
        metavar='PATH',
        help='also time the bf16 + master update by the '
        'kernels module in PATH (e.g. an earlier version: '
        'git show REV:momentum_hook/kernels.py > PATH)',
    )
    args = parser.parse_args(argv)
    cuda = args.device == 'cuda'
    if args.quick:
        args.models, args.repeats, args.warmup = ['resnet50'], 3, 1
    for name, on_cuda, on_cpu in (
        ('repeats', 30, 7),
        ('warmup', 5, 1),
        ('number', 10, 1),
    ):
        if getattr(args, name) is None:
            setattr(args, name, on_cuda if cuda else on_cpu)
    return args


def main(argv=None):
    """Run the benchmark and print (and optionally save) its tables."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    machine = machine_name(device)
    print(
        f'{machine}; torch {torch.__version__}, torchvision '
        f'{torchvision.__version__}; {args.repeats} rounds after '
        f'{args.warmup} warm-up, {args.number} update(s) per block; '
        f'load average {os.getloadavg()[0]:.1f}'
    )
    results = []
    for name in args.models:
        start = time.perf_counter()
        results.append(bench_model(name, args, device))
        results[-1]['load_average'] = os.getloadavg()[0]
        print_text(results[-1])
        print(
            f'  ({time.perf_counter() - start:.0f} s, load average '
            f'{results[-1]["load_average"]:.1f})'
        )
        gc.collect()
        if device.type == 'cuda':
            torch.cuda.empty_cache()
    if args.markdown:
        print('\n' + markdown_table(results, machine))
        print('\n' + host_table(results))
    if args.json:
        with open(args.json, 'w') as out:
            json.dump(
                {
                    'machine': machine,
                    'torch': torch.__version__,
                    'momentum': MOMENTUM,
                    'args': vars(args),
                    'results': results,
                },
                out,
                indent=2,
            )


if __name__ == '__main__':
    main()
