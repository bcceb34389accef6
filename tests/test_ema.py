"""momentum_update_ and ModuleUpdatePlan: values, memory layouts, errors,
the float32 masters of low-precision targets.

Convention: ``target = m * target + (1 - m) * online`` (m weighs the old
target). Every expected value is computed here, in float64, step by step.
"""

import copy
import functools
import math

import pytest
import torch
from momentum_testing import (
    assert_all_equal,
    assert_matches_reference,
    cuda_only,
    ema_step,
    float64_copy,
    params,
    snapshot,
)
from torch import nn

from momentum_hook import ModuleUpdatePlan, momentum_update_
from momentum_hook.masters import TargetMasters

#: Integers on purpose at the ends: 0 and 1 are valid momenta too.
MOMENTA = [0, 0.5, 0.99, 0.996, 1]
LOW_PRECISION = (torch.float16, torch.bfloat16)
STEPS = 4

#: (target dtype, online dtype): the same dtype, then the mixes supported
#: (the online tensor is cast to the target's dtype).
DTYPE_PAIRS = [
    (torch.float64, torch.float64),
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
    (torch.float32, torch.float64),
    (torch.float64, torch.float32),
    (torch.bfloat16, torch.float32),
    (torch.float32, torch.float16),
]


def short(dtype):
    """A test id: 'float32' for torch.float32."""
    return str(dtype).replace('torch.', '')


#: (target device, online device).
DEVICE_PAIRS = [
    ('cpu', 'cpu'),
    pytest.param('cuda', 'cuda', marks=cuda_only),
    pytest.param('cpu', 'cuda', marks=cuda_only),
    pytest.param('cuda', 'cpu', marks=cuda_only),
]


def make_pair(
    form,
    target_dtype=torch.float32,
    online_dtype=None,
    target_device='cpu',
    online_device=None,
):
    """A (target, online) pair that differs, as modules or tensor lists.

    The tensor lists also hold a 0-d and a non-contiguous tensor.
    """
    torch.manual_seed(0)
    online = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
    target = copy.deepcopy(online).requires_grad_(False)
    with torch.no_grad():
        for param in target.parameters():
            param.add_(torch.randn_like(param))
    target.to(target_device, target_dtype)
    online.to(online_device or target_device, online_dtype or target_dtype)
    if form == 'module':
        return target, online
    extras = [torch.randn(()), torch.randn(3, 2).t()]
    pair = []
    for module, device, dtype in (
        (target, target_device, target_dtype),
        (online, online_device, online_dtype),
    ):
        tensors = snapshot(module.parameters())
        tensors += [
            e.to(device or target_device, dtype or target_dtype, copy=True)
            for e in extras
        ]
        pair.append(tensors)
    pair[1][-1] = pair[1][-1] + 1  # the extras differ too
    assert not pair[0][-1].is_contiguous()
    return tuple(pair)


def tensors_of(network):
    return params(network) if isinstance(network, nn.Module) else network


@torch.no_grad()
def train_(tensors, seed):
    """Stand-in for an optimizer step: move ``tensors`` in place."""
    generator = torch.Generator().manual_seed(seed)
    for tensor in tensors:
        tensor.add_(
            torch.randn(tensor.shape, generator=generator).to(tensor),
            alpha=0.1,
        )


def planned(target, online):
    """``update(momentum)``: a ModuleUpdatePlan's for modules (it keeps the
    float32 masters of a low-precision target), else momentum_update_."""
    if isinstance(target, nn.Module):
        return ModuleUpdatePlan(target, online).update_
    return functools.partial(momentum_update_, target, online)


@pytest.mark.parametrize('target_device,online_device', DEVICE_PAIRS)
@pytest.mark.parametrize('target_dtype,online_dtype', DTYPE_PAIRS, ids=short)
@pytest.mark.parametrize('form', ['module', 'list'])
def test_matches_float64_reference(
    form, target_dtype, online_dtype, target_device, online_device
):
    """One run goes through every momentum of MOMENTA, each for two steps.

    A low-precision target goes through a plan, whose float32 master keeps
    it at the float64 EMA rounded once (the stateless call refuses it).
    """
    if target_dtype in LOW_PRECISION and form == 'list':
        pytest.skip('refused: test_a_low_precision_target_is_refused')
    target, online = make_pair(
        form, target_dtype, online_dtype, target_device, online_device
    )
    targets, onlines = tensors_of(target), tensors_of(online)
    reference = float64_copy(targets)
    update = planned(target, online)
    for step, momentum in enumerate(m for m in MOMENTA for _ in range(2)):
        train_(onlines, seed=step)
        update(momentum)
        reference = ema_step(reference, onlines, momentum)
    for tensor in targets:
        assert (tensor.dtype, tensor.device.type) == (
            target_dtype,
            target_device,
        )
    assert_matches_reference(targets, reference, target_dtype)


@pytest.mark.parametrize(
    'dtype', [torch.float64, torch.float32, torch.bfloat16, torch.float16]
)
@pytest.mark.parametrize('form', ['module', 'list'])
def test_momentum_one_keeps_and_zero_copies_bit_identically(form, dtype):
    if dtype in LOW_PRECISION and form == 'list':
        pytest.skip('refused: test_a_low_precision_target_is_refused')
    target, online = make_pair(form, dtype)
    targets, onlines = tensors_of(target), tensors_of(online)
    before = snapshot(targets)
    update = planned(target, online)
    for step in range(STEPS):
        train_(onlines, seed=step)
        update(1)
        assert_all_equal(targets, before)
    update(0.0)
    assert_all_equal(targets, onlines)


LAYOUT_SHAPES = [(3,), (2, 2), (5,)]


def laid_out(arrangement, seed):
    """Tensors of LAYOUT_SHAPES placed in memory as ``arrangement`` says."""
    torch.manual_seed(seed)
    values = [torch.randn(shape) for shape in LAYOUT_SHAPES]
    if arrangement == 'separate':
        return values
    if arrangement == 'separate storages back to back':
        # Consecutive addresses, but each tensor owns a storage of its own.
        memory = bytearray(4 * 12)
        tensors, offset = [], 0
        for value in values:
            tensor = torch.frombuffer(
                memory, dtype=torch.float32, count=value.numel(), offset=offset
            )
            tensors.append(tensor.view(value.shape))
            offset += 4 * value.numel()
    else:
        starts = {
            'back to back': [0, 3, 7],
            'with a gap': [0, 4, 8],
            'out of order': [9, 5, 0],
        }[arrangement]
        memory = torch.zeros(13)
        tensors = [
            memory[start : start + value.numel()].view(value.shape)
            for start, value in zip(starts, values)
        ]
    for tensor, value in zip(tensors, values):
        tensor.copy_(value)
    return tensors


ARRANGEMENTS = [
    'separate',
    'back to back',
    'with a gap',
    'out of order',
    'separate storages back to back',
]


@pytest.mark.parametrize('online_layout', ARRANGEMENTS)
@pytest.mark.parametrize('target_layout', ARRANGEMENTS)
def test_any_memory_layout_gives_the_reference(target_layout, online_layout):
    targets = laid_out(target_layout, seed=0)
    onlines = laid_out(online_layout, seed=1)
    reference = ema_step(float64_copy(targets), onlines, 0.9)
    momentum_update_(targets, onlines, 0.9)
    assert_matches_reference(targets, reference)


def _tensors(*shapes):
    return [torch.zeros(shape) for shape in shapes]


def _modules_differing_in_count():
    return nn.Linear(2, 2), nn.Linear(2, 2, bias=False)


def _modules_differing_in_buffers():
    torch.manual_seed(0)
    online = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    target = nn.Sequential(
        nn.Linear(2, 3), nn.BatchNorm1d(3, track_running_stats=False)
    )
    return target.requires_grad_(False), online


# (make (target, online), momentum, buffers, error, message pattern)
ERROR_CASES = [
    pytest.param(
        lambda: (_tensors(3, 4), _tensors(3)),
        0.9,
        'keep',
        ValueError,
        'target has 2 tensors but the online network has 1',
        id='tensor-count',
    ),
    pytest.param(
        _modules_differing_in_count,
        0.9,
        'keep',
        ValueError,
        'target has 2 parameters but the online network has 1',
        id='parameter-count',
    ),
    pytest.param(
        lambda: (_tensors(3, (2, 5)), _tensors(3, (5, 2))),
        0.9,
        'keep',
        ValueError,
        r'tensors 1 differs .*target\[1\]: tensor \(2, 5\).*'
        r'online\[1\]: tensor \(5, 2\)',
        id='shape',
    ),
    pytest.param(
        _modules_differing_in_buffers,
        0.9,
        'copy',
        ValueError,
        'target has 0 buffers but the online network has 3',
        id='buffer-count',
    ),
    pytest.param(
        lambda: (_tensors(3), _tensors(3)),
        1.5,
        'keep',
        ValueError,
        r'momentum .*\[0, 1\].*1\.5',
        id='momentum-above-1',
    ),
    pytest.param(
        lambda: (_tensors(3), _tensors(3)),
        -0.1,
        'keep',
        ValueError,
        r'got -0\.1',
        id='momentum-negative',
    ),
    pytest.param(
        lambda: (_tensors(3), _tensors(3)),
        math.nan,
        'keep',
        ValueError,
        'got nan',
        id='momentum-nan',
    ),
    pytest.param(
        lambda: (_tensors(3), _tensors(3)),
        '0.9',
        'keep',
        TypeError,
        r"got '0\.9'",
        id='momentum-str',
    ),
    pytest.param(
        lambda: (_tensors(3), _tensors(3)),
        True,
        'keep',
        TypeError,
        'got True',
        id='momentum-bool',
    ),
    pytest.param(
        lambda: (_tensors(3), _tensors(3)),
        None,
        'keep',
        TypeError,
        'got None',
        id='momentum-none',
    ),
    pytest.param(
        lambda: (_tensors(3), _tensors(3)),
        torch.tensor(0.9),
        'keep',
        TypeError,
        r'got tensor\(0\.9',
        id='momentum-tensor',
    ),
    pytest.param(
        lambda: (nn.Linear(2, 2), params(nn.Linear(2, 2))),
        0.9,
        'keep',
        TypeError,
        'both be nn.Modules or both tensor sequences, got Linear and list',
        id='module-and-list',
    ),
    pytest.param(
        lambda: (params(nn.Linear(2, 2)), nn.Linear(2, 2)),
        0.9,
        'keep',
        TypeError,
        'got list and Linear',
        id='list-and-module',
    ),
    pytest.param(
        lambda: (_tensors(3, 3), _tensors(3) + [1.0]),
        0.9,
        'keep',
        TypeError,
        r'online\[1\] must be a tensor, got float',
        id='non-tensor-item',
    ),
    pytest.param(
        lambda: (torch.zeros(3), torch.zeros(3)),
        0.9,
        'keep',
        TypeError,
        'sequence of tensors, got Tensor',
        id='bare-tensor',
    ),
    pytest.param(
        lambda: (nn.Linear(2, 2), nn.Linear(2, 2)),
        0.9,
        'ema',
        ValueError,
        r"one of \('keep', 'copy', 'average'\), "
        "got 'ema'",
        id='unknown-buffer-policy',
    ),
    pytest.param(
        lambda: (_tensors(3), _tensors(3)),
        0.9,
        'average',
        ValueError,
        "buffers='average' needs nn.Modules",
        id='buffer-policy-with-tensors',
    ),
    # What sharding can leave behind is refused, never skipped.
    pytest.param(
        lambda: (_tensors(0, 3), _tensors(3, 3)),
        0.9,
        'keep',
        ValueError,
        r'tensors 0 differs .*tensor \(0,\).*tensor '
        r'\(3,\).*shard both the same way',
        id='empty-placeholder',
    ),
    pytest.param(
        lambda: (
            nn.Linear(2, 2, device='meta'),
            nn.Linear(2, 2, device='meta'),
        ),
        0.9,
        'keep',
        ValueError,
        "'weight' is a meta tensor",
        id='meta',
    ),
    pytest.param(
        lambda: (lambda net: (net, net))(nn.Linear(2, 2)),
        0.9,
        'keep',
        ValueError,
        'share memory',
        id='target-is-online',
    ),
    pytest.param(
        lambda: (nn.ReLU(), nn.ReLU()),
        0.9,
        'keep',
        ValueError,
        'has no parameters',
        id='no-parameters',
    ),
]


@pytest.mark.parametrize('make,momentum,buffers,error,match', ERROR_CASES)
def test_rejects_bad_arguments_before_touching_the_target(
    make, momentum, buffers, error, match
):
    target, online = make()
    before = (
        snapshot(target.state_dict().values())
        if isinstance(target, nn.Module)
        and not any(t.is_meta for t in target.state_dict().values())
        else None
    )
    with pytest.raises(error, match=match):
        momentum_update_(target, online, momentum, buffers=buffers)
    if before is not None:
        assert_all_equal(target.state_dict().values(), before)


def bn_pair():
    """Modules with BatchNorm whose buffers differ; online saw two batches."""
    torch.manual_seed(0)
    online = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    target = copy.deepcopy(online).requires_grad_(False)
    online(torch.randn(6, 3))
    online(torch.randn(6, 3) + 1)
    target(torch.randn(6, 3) * 2)
    with torch.no_grad():
        online[0].weight.add_(1)
    return target, online


@pytest.mark.parametrize('momentum', [0.5, 0.99])
@pytest.mark.parametrize('policy', ['keep', 'copy', 'average'])
def test_buffer_policies(policy, momentum):
    target, online = bn_pair()
    old = {name: b.clone() for name, b in target.named_buffers()}
    new = dict(online.named_buffers())
    assert new['1.num_batches_tracked'] == 2
    assert old['1.num_batches_tracked'] == 1
    reference = ema_step(
        float64_copy(params(target)), params(online), momentum
    )
    momentum_update_(target, online, momentum, buffers=policy)
    assert_matches_reference(params(target), reference)
    buffers = dict(target.named_buffers())
    assert buffers['1.num_batches_tracked'].dtype == torch.int64
    if policy == 'keep':
        assert_all_equal(buffers.values(), old.values())
    elif policy == 'copy':
        assert_all_equal(buffers.values(), new.values())
    else:
        for name in ('1.running_mean', '1.running_var'):
            assert not torch.equal(old[name], new[name])
            torch.testing.assert_close(
                buffers[name].double(),
                momentum * old[name].double()
                + (1 - momentum) * new[name].double(),
            )
        # The integer buffer is copied, never averaged.
        assert buffers['1.num_batches_tracked'] == 2


def test_average_copies_integer_buffers_of_any_kind():
    modules = []
    for value in (3, 8):
        module = nn.Linear(2, 2)
        module.register_buffer('steps', torch.tensor(value, dtype=torch.int32))
        module.register_buffer('scale', torch.tensor(float(value)))
        modules.append(module)
    target, online = modules
    momentum_update_(
        target.requires_grad_(False), online, 0.5, buffers='average'
    )
    assert target.steps.dtype == torch.int32 and target.steps == 8
    assert target.scale == 5.5


@cuda_only
def test_no_host_device_synchronisation_on_cuda():
    target, online = bn_pair()
    target.cuda()
    online.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try:
        for momentum in (0.99, 0.5):
            for policy in ('keep', 'copy', 'average'):
                momentum_update_(target, online, momentum, buffers=policy)
            momentum_update_(params(target), params(online), momentum)
    finally:
        torch.cuda.set_sync_debug_mode(0)


@cuda_only
def test_module_split_across_devices():
    target, online = make_pair('module')
    for module in (target, online):
        module[0].cuda()
    assert {p.device.type for p in params(target)} == {'cpu', 'cuda'}
    reference = ema_step(float64_copy(params(target)), params(online), 0.9)
    momentum_update_(target, online, 0.9)
    assert_matches_reference(params(target), reference)


# --- Low-precision targets: the float32 master -----------------------------


def drifting_pair(dtype, seed=0):
    """A (target, online) pair of ``dtype`` modules, equal at the start."""
    torch.manual_seed(seed)
    online = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 8)).to(dtype)
    return copy.deepcopy(online).requires_grad_(False), online


@pytest.mark.parametrize(
    'dtype,momentum',
    [(torch.bfloat16, 0.996), (torch.bfloat16, 0.99), (torch.float16, 0.99)],
    ids=['bf16 0.996', 'bf16 0.99', 'fp16 0.99'],
)
def test_the_master_keeps_a_low_precision_target_on_the_float64_ema(
    dtype, momentum
):
    """1000 small online steps. Lerped in bfloat16 alone, 40% of the target
    (bf16, m=0.996) never changes and it ends 0.6 of the EMA's move away
    from it; through the master, it is the float64 EMA rounded once."""
    target, online = drifting_pair(dtype)
    initial, reference = snapshot(params(target)), float64_copy(params(target))
    plan = ModuleUpdatePlan(target, online)
    generator = torch.Generator().manual_seed(1)
    for _ in range(1000):
        with torch.no_grad():
            for param in online.parameters():
                param.add_(
                    0.002
                    * torch.randn(param.shape, generator=generator).to(dtype)
                )
        plan.update_(momentum)
        reference = ema_step(reference, params(online), momentum)
    final = [tensor.detach() for tensor in params(target)]
    assert all(tensor.dtype == dtype for tensor in final)

    def unchanged(tensors):
        return sum(
            int((a == b).sum()) for a, b in zip(tensors, initial)
        ) / sum(tensor.numel() for tensor in initial)

    # Only elements whose EMA rounds to their start may stay unchanged.
    rounded = [ref.to(dtype) for ref in reference]
    assert unchanged(final) <= unchanged(rounded) + 0.01, (
        unchanged(final),
        unchanged(rounded),
    )
    # Distance to the float64 EMA, relative to how far the EMA moved.
    moved = (
        sum(
            float((ref - start.double()).norm() ** 2)
            for ref, start in zip(reference, initial)
        )
        ** 0.5
    )
    off = (
        sum(
            float((tensor.double() - ref).norm() ** 2)
            for tensor, ref in zip(final, reference)
        )
        ** 0.5
    )
    assert off / moved < 0.05, off / moved
    # Each element is the EMA rounded once to the target's dtype.
    for tensor, ref in zip(final, reference):
        torch.testing.assert_close(
            tensor.double(), ref, rtol=torch.finfo(dtype).eps / 2, atol=1e-6
        )


@pytest.mark.parametrize('dtype', LOW_PRECISION, ids=short)
@pytest.mark.parametrize('form', ['module', 'list'])
def test_a_low_precision_target_is_refused(form, dtype):
    target, online = make_pair(form, dtype)
    before = snapshot(tensors_of(target))
    with pytest.raises(ValueError) as error:
        momentum_update_(target, online, 0.99)
    message = str(error.value)
    assert (
        f"'0.weight' is {dtype}" in message
        or f"'target[0]' is {dtype}" in message
    ), message
    for fix in (
        'MomentumTargetMixin',
        'ModuleUpdatePlan(target, online)',
        'momentum_update_(master, online, momentum)',
    ):
        assert fix in message
    assert_all_equal(tensors_of(target), before)  # nothing written


def test_a_low_precision_averaged_buffer_is_refused_but_a_copied_one_not():
    target, online = bn_pair()
    for module in (target, online):
        module[1].running_mean = module[1].running_mean.to(torch.bfloat16)
    with pytest.raises(ValueError, match="'1.running_mean' is torch.bfloat16"):
        momentum_update_(target, online, 0.9, buffers='average')
    momentum_update_(target, online, 0.9, buffers='copy')
    assert torch.equal(target[1].running_mean, online[1].running_mean)


def test_a_float32_target_of_a_low_precision_online_network_needs_no_master():
    target, online = make_pair('list', torch.float32, torch.bfloat16)
    reference = ema_step(float64_copy(target), online, 0.99)
    momentum_update_(target, online, 0.99)  # not refused
    assert_matches_reference(target, reference)
    plan = ModuleUpdatePlan(
        *make_pair('module', torch.float32, torch.bfloat16)
    )
    assert not plan.masters.tensors  # no memory spent


def test_the_masters_outlive_a_new_plan_and_restart_from_a_write():
    """A re-plan (here after a move) keeps the masters; a target written in
    place between updates restarts its master from the written values."""
    target, online = drifting_pair(torch.bfloat16)
    reference = float64_copy(params(target))
    plan = ModuleUpdatePlan(target, online)
    for step in range(3):
        train_(params(online), seed=step)
        plan.update_(0.999)
        reference = ema_step(reference, params(online), 0.999)
    masters = plan.masters
    kept = dict(masters.tensors)
    plan = ModuleUpdatePlan(
        target.to('cpu', torch.bfloat16), online, masters=masters
    )
    assert all(plan.masters.tensors[name] is kept[name] for name in kept)
    for tensor, ref in zip(plan.masters.tensors.values(), reference):
        torch.testing.assert_close(
            tensor.double(), ref, rtol=1e-6, atol=1e-6
        )  # the master is the EMA
    with torch.no_grad():
        target[0].weight.copy_(torch.ones_like(target[0].weight))
    plan.update_(1)  # keeps the written values, not the old master
    assert torch.equal(target[0].weight, torch.ones_like(target[0].weight))
    assert torch.equal(
        plan.masters.tensors['0.weight'],
        torch.ones_like(plan.masters.tensors['0.weight']),
    )


def test_the_master_update_of_large_and_strided_tensors():
    """Tensors above one block (split into flat views) and channels-last
    ones (whole) go through their masters element for element."""
    torch.manual_seed(0)
    online = nn.Sequential(
        nn.Linear(300, 300), nn.Conv2d(64, 64, 3), nn.Linear(3, 3)
    ).to(torch.bfloat16)
    online[1].to(memory_format=torch.channels_last)
    target = copy.deepcopy(online).requires_grad_(False)
    with torch.no_grad():
        for param in online.parameters():
            param.add_(torch.randn_like(param))
    reference = float64_copy(params(target))
    plan = ModuleUpdatePlan(target, online)
    for momentum in (0.9, 0.99, 0.5):
        plan.update_(momentum)
        reference = ema_step(reference, params(online), momentum)
    assert target[1].weight.is_contiguous(memory_format=torch.channels_last)
    for tensor, ref in zip(params(target), reference):
        torch.testing.assert_close(
            tensor.detach().double(), ref, rtol=2**-8, atol=1e-6
        )


def test_a_gathered_copy_at_a_reused_address_starts_its_own_master():
    # ZeRO-3 frees a persistent parameter's gathered copy and gathers
    # another parameter of the same shape into the same memory: the first
    # one's master must not be written into it.
    masters = TargetMasters()
    copy = torch.tensor([1.0, 2.0, 3.0], dtype=torch.bfloat16)
    first = masters.for_copies([copy])[0]
    assert torch.equal(first, copy.float())
    copy.copy_(
        torch.tensor([7.0, 8.0, 9.0])
    )  # another parameter, same address
    second = masters.for_copies([copy])[0]
    assert torch.equal(second, copy.float())
