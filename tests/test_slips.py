"""The easy slips are refused or flagged, and correct calls stay silent.

- ``momentum_update_(online, target, m)``, in the order of lightly's
  ``update_momentum``, would train the target and overwrite the online
  network: refused before anything is written, because the first argument's
  parameters require grad. ``fully_shard_pair`` takes the networks by
  keyword only, so that no order can be read the wrong way.
- A momentum in (0, 0.5), almost always MMEngine's convention (the weight of
  the new value) written into ours, warns once.

And the stateless call's cached plan: reused only while it describes the
networks, and never keeps a dead network alive.
"""

import copy
import gc
import warnings
import weakref

import pytest
import torch
from torch import nn

from momentum_hook import (
    MomentumTargetMixin,
    MomentumUpdater,
    fully_shard_pair,
    momentum_update_,
    scaled_momentum,
    validation,
)
from momentum_hook import plan as plan_module


def networks():
    torch.manual_seed(0)
    online = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    target = copy.deepcopy(online).requires_grad_(False)
    with torch.no_grad():
        for param in target.parameters():
            param.add_(1.0)
    return online, target


def snapshot(*modules):
    return [
        [t.detach().clone() for t in m.state_dict().values()] for m in modules
    ]


def assert_unchanged(before, *modules):
    for old, module in zip(before, modules):
        for tensor, new in zip(old, module.state_dict().values()):
            assert torch.equal(tensor, new)


def expected_lerp(target, online, momentum):
    """The update written out in float64, independently of the package."""
    return [
        (t.double() * momentum + o.double() * (1 - momentum)).float()
        for t, o in zip(target.parameters(), online.parameters())
    ]


@pytest.fixture
def fresh_warning(monkeypatch):
    """As in a new process: the once-per-process warning not yet shown."""
    monkeypatch.setattr(validation, '_warned_small_momentum', False)


SWAP = r'require grad.*arguments are swapped.*never frozen'


@pytest.mark.parametrize('form', ['modules', 'tensors'])
def test_swapped_arguments_are_refused_before_anything_is_written(form):
    online, target = networks()
    before = snapshot(online, target)
    first, second = online, target  # lightly's order: online first
    if form == 'tensors':
        first, second = list(online.parameters()), list(target.parameters())
    with pytest.raises(ValueError, match=SWAP):
        momentum_update_(first, second, 0.5)
    assert_unchanged(before, online, target)


def test_fully_shard_pair_refuses_positional_networks():
    from torch.distributed.fsdp import FSDPModule

    online, target = networks()
    with pytest.raises(TypeError, match='positional argument'):
        fully_shard_pair(online, target)
    assert not isinstance(online, FSDPModule)
    assert not isinstance(target, FSDPModule)


def test_the_error_names_the_first_trainable_parameter():
    online, target = networks()
    with pytest.raises(ValueError, match=r"\('0\.weight' and 3 more\)"):
        momentum_update_(online, target, 0.9)


def test_a_target_unfrozen_between_calls_is_refused():
    """The cached plan of the first call must not skip the check."""
    online, target = networks()
    momentum_update_(target, online, 0.9)
    target[0].weight.requires_grad_(True)
    before = snapshot(online, target)
    with pytest.raises(ValueError, match=r"\('0\.weight'\)"):
        momentum_update_(target, online, 0.9)
    assert_unchanged(before, online, target)


class Model(MomentumTargetMixin, nn.Module):
    def __init__(self):
        super().__init__()
        self.online_net = networks()[0]
        self.target_net = self.init_momentum_target(self.online_net, 0.9)


def test_the_mixin_refuses_a_target_unfrozen_after_its_first_update():
    model = Model()
    model.momentum_update()  # plans and keeps the plan
    model.requires_grad_(True)  # e.g. a training script unfreezing all
    before = snapshot(model)
    with pytest.raises(ValueError, match=SWAP):
        model.momentum_update()
    assert_unchanged(before, model)


@pytest.mark.parametrize('momentum', [0.0002, 0.004, 0.3, 0.4999])
def test_a_momentum_below_one_half_warns_once(fresh_warning, momentum):
    online, target = networks()
    with pytest.warns(UserWarning) as record:
        momentum_update_(target, online, momentum)
    (warning,) = record
    text = str(warning.message)
    assert f'momentum={momentum!r} is below 0.5' in text
    assert 'm weighs the old target' in text
    assert 'momentum=x is m = 1 - x here' in text
    assert f'm={1 - momentum!r}' in text
    assert warning.filename == __file__  # it points at the user's call
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        momentum_update_(target, online, momentum)  # once per process


class SmallBase(MomentumTargetMixin, nn.Module):
    def __init__(self):
        super().__init__()
        self.online_net = nn.Linear(2, 2)
        self.target_net = self.init_momentum_target(
            self.online_net, base_momentum=0.004
        )


@pytest.mark.parametrize(
    'make',
    [lambda: MomentumUpdater(end_momentum=0.004), SmallBase],
    ids=['hook-argument', 'mixin-base-momentum'],
)
def test_small_momenta_in_the_hook_and_the_mixin_warn(fresh_warning, make):
    with pytest.warns(UserWarning, match='is below 0.5'):
        make()


@pytest.mark.mmcv
def test_the_mmcv_hook_warns_for_mmengine_s_convention(fresh_warning):
    mmcv_hook = pytest.importorskip('momentum_hook.mmcv_hook')
    with pytest.warns(UserWarning, match=r'end_momentum=0\.0002 is below'):
        mmcv_hook.MomentumUpdateHook(end_momentum=0.0002)


@pytest.mark.parametrize('momentum', [0.0, 0.5, 0.9, 0.99, 0.9998, 1.0])
def test_correct_calls_stay_silent(fresh_warning, momentum):
    online, target = networks()
    model = Model()
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        expected = expected_lerp(target, online, momentum)
        momentum_update_(target, online, momentum)
        model.momentum = momentum
        model.momentum_update()
        MomentumUpdater(end_momentum=momentum)
    for got, want in zip(target.parameters(), expected):
        torch.testing.assert_close(got, want)


def test_a_scaled_momentum_below_one_half_stays_silent(fresh_warning):
    # The EMA scaling rule with a large batch: 0.9 ** 8 = 0.43, a momentum
    # the hook writes into the model before each update.
    model = Model()
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        model.momentum = scaled_momentum(0.9, 8)
        model.momentum_update()


# --- The stateless call's cached plan --------------------------------------


def assert_update_matches_reference(target, online, momentum):
    expected = expected_lerp(target, online, momentum)
    momentum_update_(target, online, momentum)
    for got, want in zip(target.parameters(), expected):
        torch.testing.assert_close(got, want)


def replace_a_parameter(online, target):
    target[0].weight = nn.Parameter(torch.zeros(4, 3), requires_grad=False)


def add_a_layer_to_both(online, target):
    online.add_module('3', nn.Linear(2, 2))
    target.add_module('3', copy.deepcopy(online[3]).requires_grad_(False))
    with torch.no_grad():
        target[3].weight.zero_()


@pytest.mark.parametrize('change', [replace_a_parameter, add_a_layer_to_both])
def test_a_network_changed_between_calls_is_planned_again(change):
    online, target = networks()
    momentum_update_(target, online, 0.5)
    change(online, target)
    assert_update_matches_reference(target, online, 0.5)


def test_a_layer_added_to_one_network_is_refused():
    online, target = networks()
    momentum_update_(target, online, 0.5)
    online.add_module('3', nn.Linear(2, 2))
    with pytest.raises(
        ValueError,
        match='target has 4 parameters but the online network has 6',
    ):
        momentum_update_(target, online, 0.5)


def test_another_online_network_and_another_buffer_policy_replan():
    online, target = networks()
    momentum_update_(target, online, 0.5)
    other = networks()[0]
    with torch.no_grad():
        for param in other.parameters():
            param.mul_(-1)
    assert_update_matches_reference(target, other, 0.5)
    bn_online = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    bn_target = copy.deepcopy(bn_online).requires_grad_(False)
    bn_online[1].running_mean.fill_(1.0)
    momentum_update_(bn_target, bn_online, 0.5)  # 'keep'
    assert torch.equal(bn_target[1].running_mean, torch.zeros(2))
    momentum_update_(bn_target, bn_online, 0.5, buffers='copy')
    assert torch.equal(bn_target[1].running_mean, torch.ones(2))


def test_the_cache_keeps_no_dead_network_alive():
    online, target = networks()
    momentum_update_(target, online, 0.5)
    assert target in plan_module._STATELESS_PLANS
    weights = weakref.ref(online[0].weight), weakref.ref(target[0].weight)
    del online
    gc.collect()
    # the online network died
    assert target not in plan_module._STATELESS_PLANS
    assert weights[0]() is None
    momentum_update_(target, networks()[0], 0.5)
    del target
    gc.collect()
    assert weights[1]() is None
