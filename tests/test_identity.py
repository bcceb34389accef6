"""Which tensors the update pairs, and what a kept plan notices.

- Pairing by name: target and online tensors are paired by their names
  (without wrapper attributes), so a network registered in another order is
  still averaged name with name, and a pruned layer (``weight`` becomes
  ``weight_orig``) is refused before anything is written.
- Tracking by reference: a submodule replaced by one at the same address, or
  a network attribute of the mixin replaced, makes the next update plan
  again, right by name.
- A target that starts unlike its online network (a meta build materialised
  with ``to_empty()`` and initialised, an ``init_weights()`` that draws both
  networks) is made a copy of it at the first plan, unless it was loaded:
  alone, in a real mmcv 1.x ``IterBasedRunner`` and MMEngine ``Runner``.
- ``torch.compile`` and ``checkpoint_wrapper`` around the online network
  (or part of it) keep working.

References are float64 EMAs written out here, name by name.
"""

import copy
import logging

import pytest
import torch
from momentum_testing import assert_all_equal
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    checkpoint_wrapper,
)
from torch.nn.utils import prune
from torch.utils.data import DataLoader

from momentum_hook import MomentumTargetMixin, momentum_update_


def by_name(module):
    """``{name: float64 copy}`` of ``module``'s parameters."""
    return {
        name: param.detach().to(torch.float64, copy=True)
        for name, param in module.named_parameters()
    }


def reference(target, online, momentum, rename=lambda name: name):
    """The float64 EMA of ``target`` towards ``online``, name by name
    (``rename`` maps a target name to its online name)."""
    online = by_name(online)
    return {
        name: momentum * value + (1 - momentum) * online[rename(name)]
        for name, value in by_name(target).items()
    }


def assert_matches(module, expected):
    actual = dict(module.named_parameters())
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(
            actual[name].detach().double(),
            value,
            rtol=1.3e-6,
            atol=1e-5,
            msg=name,
        )


def drift(module, seed):
    """Move ``module``'s parameters, as an optimizer step would."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(torch.randn_like(param))


class Pair(MomentumTargetMixin, nn.Module):
    """Online: two 4 x 4 layers and a LayerNorm; its target."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.online_net = nn.Sequential(
            nn.Linear(4, 4), nn.Linear(4, 4), nn.LayerNorm(4)
        )
        self.target_net = self.init_momentum_target(self.online_net)

    def forward(self, x):
        return self.online_net(x).pow(2).mean()


# --- Pairing by name --------------------------------------------------------


def reordered_pair():
    """Two layers of one shape, registered in the other order in the target."""
    torch.manual_seed(0)
    online = nn.Module()
    online.first, online.second = nn.Linear(4, 4), nn.Linear(4, 4)
    target = nn.Module()
    target.second = copy.deepcopy(online.second)
    target.first = copy.deepcopy(online.first)
    drift(online, seed=1)
    return target.requires_grad_(False), online


@pytest.mark.parametrize('plan_first', [False, True])
def test_networks_registered_in_another_order_are_paired_by_name(plan_first):
    target, online = reordered_pair()
    assert [p.shape for p in target.parameters()] == [
        p.shape for p in online.parameters()
    ]
    if plan_first:  # a kept plan, checked again on its second call
        momentum_update_(target, online, 1.0)
    expected = reference(target, online, 0.9)
    momentum_update_(target, online, 0.9)
    assert_matches(target, expected)


@pytest.mark.parametrize('form', ['stateless', 'mixin'])
def test_a_pruned_layer_is_refused_before_anything_is_written(form):
    model = Pair()
    model.momentum = 0.5
    model.momentum_update()  # planned before the pruning, in the mixin
    prune.identity(model.online_net[2], 'weight')
    assert [name for name, _ in model.online_net[2].named_parameters()] == [
        'bias',
        'weight_orig',
    ]
    before = copy.deepcopy(model.target_net.state_dict())
    with pytest.raises(ValueError) as error:
        if form == 'mixin':
            model.momentum_update()
        else:
            momentum_update_(model.target_net, model.online_net, 0.5)
    message = str(error.value)
    assert message.startswith(
        "the target's and the online network's parameters differ in their "
        "names: '2.weight' in the target only; '2.weight_orig' in the "
        'online network only.'
    )
    assert "torch.nn.utils.prune.remove(submodule, 'weight')" in message
    assert "the online network's submodule '2'" in message
    assert message.endswith('Nothing was updated')
    assert_all_equal(model.target_net.state_dict().values(), before.values())
    # Made permanent, the pruning leaves the names as they were.
    prune.remove(model.online_net[2], 'weight')
    expected = reference(model.target_net, model.online_net, 0.5)
    model.momentum_update()
    assert_matches(model.target_net, expected)


def test_a_parameter_in_one_network_only_is_named():
    online = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    target = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4, bias=False))
    with pytest.raises(
        ValueError,
        match=(
            r'the target has 3 parameters but the online network has 4: '
            r"'1\.bias' in the online network only\. .*Likely cause: a "
            r'submodule replaced or added in one network only'
        ),
    ):
        momentum_update_(target.requires_grad_(False), online, 0.5)


def tied(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    net[1].weight = net[0].weight
    return net


def test_tied_parameters_stay_tied_and_a_tie_on_one_side_is_refused():
    online = tied()
    target = copy.deepcopy(online).requires_grad_(False)
    drift(online, seed=1)
    expected = reference(target, online, 0.5)
    momentum_update_(target, online, 0.5)
    assert target[1].weight is target[0].weight
    assert_matches(target, expected)
    untied = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    untied.requires_grad_(False)
    with pytest.raises(
        ValueError,
        match=(
            r"the target's parameters '0\.weight' and '1\.weight' are two "
            'tensors, but one tied tensor in the online network'
        ),
    ):
        momentum_update_(untied, online, 0.5)


def test_wrappers_on_one_side_are_left_out_of_the_names():
    """torch.compile around the online network and checkpoint_wrapper
    around one of its layers: a real forward and backward, then an update
    name by name."""
    torch.manual_seed(0)
    online = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    target = copy.deepcopy(online).requires_grad_(False)
    online[2] = checkpoint_wrapper(online[2])
    compiled = torch.compile(online, backend='eager')
    assert '_orig_mod.2._checkpoint_wrapped_module.weight' in dict(
        compiled.named_parameters()
    )
    optimizer = torch.optim.SGD(compiled.parameters(), lr=0.5)
    for _ in range(2):
        compiled(torch.randn(3, 4)).pow(2).mean().backward()
        optimizer.step()
        plain = {
            name.replace('._checkpoint_wrapped_module', ''): value
            for name, value in by_name(online).items()
        }
        expected = {
            name: 0.5 * value + 0.5 * plain[name]
            for name, value in by_name(target).items()
        }
        momentum_update_(target, compiled, 0.5)
        assert_matches(target, expected)
    assert not torch.equal(target[0].weight, online[0].weight)


# --- Tracking by reference --------------------------------------------------


def replace_at_the_same_address(container, key, cls, *args):
    """Replace ``container[key]`` by a new ``cls(*args)``, at the old
    module's address if the old module was freed: CPython's allocator hands
    the freed block to the next object of its size (tried up to 100 times).

    Returns:
        bool: Whether the new module took the old one's address.
    """
    address = id(container[key])
    container[key] = nn.Identity()  # the old module goes, unless kept
    kept = []
    for _ in range(100):
        module = cls.__new__(cls)
        if id(module) == address:
            break
        kept.append(module)
    module.__init__(*args)
    container[key] = module
    return id(module) == address


@pytest.mark.parametrize('form', ['stateless', 'mixin'])
def test_a_submodule_replaced_at_the_same_address_is_noticed(form):
    model = Pair()
    drift(model.online_net, seed=1)

    def update(momentum):
        if form == 'mixin':
            model.momentum = momentum
            model.momentum_update()
        else:
            momentum_update_(model.target_net, model.online_net, momentum)

    update(0.5)  # planned, and the plan is kept

    torch.manual_seed(7)
    replace_at_the_same_address(model.online_net, 1, nn.Linear, 4, 4)
    expected = reference(model.target_net, model.online_net, 0.5)
    update(0.5)
    assert_matches(model.target_net, expected)


def test_a_replaced_target_net_is_the_one_updated():
    model = Pair()
    drift(model.online_net, seed=1)
    model.momentum = 0.5
    model.momentum_update()
    old = model.target_net
    model.target_net = copy.deepcopy(old)
    drift(model.target_net, seed=2)
    kept = copy.deepcopy(old.state_dict())
    expected = reference(model.target_net, model.online_net, 0.5)
    model.momentum_update()
    assert_matches(model.target_net, expected)
    assert_all_equal(old.state_dict().values(), kept.values())


def test_a_replaced_online_net_is_the_one_followed():
    model = Pair()
    model.momentum = 0.5
    model.momentum_update()
    model.online_net = copy.deepcopy(model.online_net)
    drift(model.online_net, seed=3)
    expected = reference(model.target_net, model.online_net, 0.5)
    model.momentum_update()
    assert_matches(model.target_net, expected)


def test_a_network_attribute_that_holds_no_module_is_refused():
    model = Pair()
    model.momentum_update()
    model.target_net = None
    with pytest.raises(
        ValueError,
        match=(
            r'Pair\.target_net held the target network when the momentum '
            r'update was first planned, but holds no module now \(NoneType\)'
        ),
    ):
        model.momentum_update()


# --- A target that starts from scratch ------------------------------------


def materialised(cls):
    """The large-model recipe: built on the meta device, materialised with
    to_empty(), then every layer initialised anew (both networks)."""
    with torch.device('meta'):
        model = cls()
    model.to_empty(device='cpu')
    torch.manual_seed(5)
    for module in model.modules():
        if hasattr(module, 'reset_parameters'):
            module.reset_parameters()
    return model


def meta_pair():
    model = materialised(Pair)
    with torch.no_grad():  # a LayerNorm starts at (1, 0): make it differ
        model.target_net[2].weight.normal_()
    assert not torch.equal(
        model.target_net[0].weight, model.online_net[0].weight
    )
    return model


def test_a_materialised_meta_target_starts_as_a_copy(caplog):
    model = meta_pair()
    with caplog.at_level(logging.WARNING, logger='momentum_hook'):
        model.check_momentum_target()
    assert_all_equal(
        model.target_net.parameters(), model.online_net.parameters()
    )
    assert_all_equal(model.target_net.buffers(), model.online_net.buffers())
    (message,) = [record.getMessage() for record in caplog.records]
    assert message.startswith(
        'Pair: the target network differs from the online network at the '
        "start of training (first at '0.weight') and was not loaded from a "
        'checkpoint, so it was made a copy of the online network'
    )
    # Then a real step and an update, against the reference.
    start = copy.deepcopy(model.online_net)
    drift(model.online_net, seed=1)
    expected = reference(start, model.online_net, 0.9)
    model.momentum = 0.9
    model.momentum_update()
    assert_matches(model.target_net, expected)


def test_without_a_check_the_first_update_of_a_meta_build_syncs(caplog):
    model = meta_pair()
    drift(model.online_net, seed=1)
    with caplog.at_level(logging.WARNING, logger='momentum_hook'):
        model.momentum_update()
    assert_all_equal(
        model.target_net.parameters(), model.online_net.parameters()
    )
    assert (
        'call check_momentum_target() before that step'
        in caplog.records[0].getMessage()
    )


def assert_the_check_leaves_the_target_alone(model, caplog):
    before = copy.deepcopy(model.target_net.state_dict())
    with caplog.at_level(logging.WARNING, logger='momentum_hook'):
        model.check_momentum_target()
    assert not caplog.records
    assert_all_equal(model.target_net.state_dict().values(), before.values())


@pytest.mark.parametrize(
    'load',
    [
        'model',
        'target',
        pytest.param('target by mmcv', marks=pytest.mark.mmcv),
    ],
)
def test_a_loaded_target_is_never_overwritten(load, caplog):
    saved = Pair(seed=1)
    drift(saved.online_net, seed=1)
    saved.momentum = 0.5
    saved.momentum_update()  # its target differs from its online network
    model = meta_pair()
    if load == 'model':
        model.load_state_dict(saved.state_dict())
    elif load == 'target':
        model.target_net.load_state_dict(saved.target_net.state_dict())
    else:  # mmcv's loader calls _load_from_state_dict, not load_state_dict
        from mmcv.runner import load_state_dict

        load_state_dict(model.target_net, saved.target_net.state_dict())
    assert_the_check_leaves_the_target_alone(model, caplog)


def test_a_target_equal_to_its_online_network_is_left_alone(caplog):
    assert_the_check_leaves_the_target_alone(Pair(), caplog)


def test_a_target_that_moved_is_not_synced_after_the_first_plan(caplog):
    """Only the first plan decides: a later check (a second run of the
    hooks in one process) leaves a trained target alone."""
    model = Pair()
    model.check_momentum_target()
    drift(model.online_net, seed=1)
    model.momentum = 0.5
    model.momentum_update()
    assert_the_check_leaves_the_target_alone(model, caplog)


class RunnerPair(Pair):
    def train_step(self, data_batch, optimizer, **kwargs):
        loss = self(data_batch)
        return dict(
            loss=loss,
            log_vars=dict(loss=loss.item()),
            num_samples=len(data_batch),
        )


@pytest.mark.mmcv
def test_an_mmcv_runner_starts_a_meta_built_target_from_the_online_network(
    tmp_path,
):
    """The hook checks the target before iteration 1: the run's target is
    the EMA of the online network from its initial weights."""
    import mmcv
    from mmcv.runner import IterBasedRunner

    from momentum_hook.mmcv_hook import MomentumUpdateHook

    model = materialised(RunnerPair)
    initial = by_name(model.online_net)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    runner = IterBasedRunner(
        model,
        optimizer=optimizer,
        work_dir=str(tmp_path),
        logger=mmcv.utils.get_logger('test_identity'),
        max_iters=3,
    )
    runner.register_optimizer_hook(dict(grad_clip=None))
    runner.register_hook(MomentumUpdateHook(end_momentum=1.0))
    history = []

    class Record(mmcv.runner.Hook):
        def after_train_iter(self, runner):
            history.append(
                (runner.model.momentum, by_name(runner.model.online_net))
            )

    runner.register_hook(Record(), priority='LOWEST')
    torch.manual_seed(9)
    runner.run(
        [DataLoader(list(torch.randn(3, 2, 4)), batch_size=None)],
        [('train', 3)],
    )
    expected = initial
    for momentum, online in history:
        expected = {
            name: momentum * value + (1 - momentum) * online[name]
            for name, value in expected.items()
        }
    assert_matches(model.target_net, expected)


@pytest.mark.mmengine
def test_an_mmengine_runner_starts_a_redrawn_target_from_the_online_network(
    tmp_path,
):
    """MMEngine's Runner calls the model's init_weights(), which here draws
    both networks anew; the hook's check before training makes the target
    the online network's copy, and the run's target is their EMA."""
    from test_hook_mmengine import (
        HOOK,
        OnlineRecorder,
        TinyMomentumModel,
        assert_follows_reference,
        build_runner,
        reference_momenta,
    )

    class Redrawn(TinyMomentumModel):
        def init_weights(self):
            torch.manual_seed(3)
            self.online.reset_parameters()
            self.target.reset_parameters()

    torch.manual_seed(0)
    model = Redrawn(base_momentum=0.5)
    recorder = OnlineRecorder()
    runner = build_runner(
        tmp_path, model, [dict(type=HOOK, end_momentum=1.0), recorder]
    )
    runner.train()
    expected = reference_momenta(0.5, 1.0, max_iters=6)
    assert_follows_reference(model, recorder, expected, 0.5, max_iters=6)


def test_fully_shard_pair_pairs_by_name_before_sharding():
    from momentum_hook.sharding import fully_shard_pair

    torch.manual_seed(0)
    online = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    target = copy.deepcopy(online).requires_grad_(False)
    prune.identity(online[1], 'weight')
    with pytest.raises(
        ValueError, match="'1.weight_orig' in the online network only"
    ):
        fully_shard_pair(online=online, target=target)
