"""MomentumTargetMixin: the frozen copy, the contract, moves, the user's
tensors left as they are, state_dict and checkpoints, a planned update that
follows every change, and a real mmcv 1.x runner.

References are float64 EMAs replayed here from recorded online weights, with
the convention ``target = m * target + (1 - m) * online``.
"""

import copy
import io
import pickle

import pytest
import torch
from momentum_testing import (
    Interrupt,
    TinyBYOL,
    assert_all_equal,
    assert_matches_reference,
    cuda_only,
    ema_step,
    float64_copy,
    params,
    reference_momentum,
    replay_ema,
    snapshot,
)
from torch import nn
from torch.utils.data import DataLoader

import momentum_hook
from momentum_hook import MomentumTargetMixin


def tiny_model(seed=0, **kwargs):
    torch.manual_seed(seed)
    return TinyBYOL(**kwargs)


def sgd_step(model, optimizer, seed):
    """One real training step of the online network."""
    torch.manual_seed(seed)
    optimizer.zero_grad()
    model(torch.randn(4, 4)).backward()
    optimizer.step()


def test_target_is_a_frozen_deep_copy_registered_as_a_submodule():
    model = tiny_model()
    online, target = params(model.online_net), params(model.target_net)
    assert_all_equal(target, online)
    assert_all_equal(model.target_net.buffers(), model.online_net.buffers())
    online_storages = {p.untyped_storage().data_ptr() for p in online}
    assert not online_storages & {
        p.untyped_storage().data_ptr() for p in target
    }
    assert all(p.requires_grad for p in online)
    assert not any(p.requires_grad for p in target)
    assert model.target_net in model.children()
    assert any(k.startswith('target_net.') for k in model.state_dict())
    # Training the online network leaves the target alone.
    before = snapshot(target)
    sgd_step(model, torch.optim.SGD(model.parameters(), lr=0.5), seed=1)
    assert not torch.equal(online[0], before[0])
    assert_all_equal(target, before)
    assert all(p.grad is None for p in target)


def test_contract_is_satisfied():
    model = tiny_model(base_momentum=0.996)
    momentum_hook.check_momentum_contract(model)
    assert model.base_momentum == model.momentum == 0.996
    assert tiny_model().base_momentum == 0.99  # the default


@pytest.mark.parametrize(
    'kwargs,error,match',
    [
        (dict(base_momentum=1.5), ValueError, r'base_momentum .*got 1\.5'),
        (dict(base_momentum=-0.5), ValueError, r'base_momentum .*got -0\.5'),
        (
            dict(base_momentum='0.99'),
            TypeError,
            r"base_momentum .*got '0\.99'",
        ),
        (dict(buffers='sync'), ValueError, "got 'sync'"),
    ],
)
def test_bad_arguments_are_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        tiny_model(**kwargs)


def test_online_must_be_a_module():
    class NotAModule(MomentumTargetMixin, nn.Module):
        pass

    with pytest.raises(
        TypeError, match='online must be an nn.Module, got list'
    ):
        NotAModule().init_momentum_target([torch.zeros(2)])


@pytest.mark.parametrize(
    'method', ['momentum_update', 'check_momentum_target']
)
def test_momentum_update_before_init_is_refused(method):
    class Forgetful(MomentumTargetMixin, nn.Module):
        base_momentum = momentum = 0.99

    with pytest.raises(
        RuntimeError,
        match=rf'Forgetful.{method}\(\).*before '
        r'init_momentum_target\(\)',
    ):
        getattr(Forgetful(), method)()


def test_momentum_update_matches_the_reference():
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    reference = float64_copy(params(model.target_net))
    for step, momentum in enumerate([0.99, 0.5, 0.9, 0]):
        sgd_step(model, optimizer, seed=step)
        model.momentum = momentum
        model.momentum_update()
        reference = ema_step(reference, params(model.online_net), momentum)
    assert_matches_reference(params(model.target_net), reference)


@pytest.mark.parametrize('policy', ['keep', 'copy'])
def test_buffer_policy_reaches_the_update(policy):
    model = tiny_model(buffers=policy)
    model(torch.randn(4, 4))  # moves both networks' running statistics
    target_before = snapshot(model.target_net.buffers())
    model.momentum_update()
    expected = (
        target_before if policy == 'keep' else list(model.online_net.buffers())
    )
    assert_all_equal(model.target_net.buffers(), expected)


MOVES = {
    'to(float64)': lambda model: model.to(torch.float64),
    'double()': lambda model: model.double(),
    'to(cpu, float64)': lambda model: model.to('cpu', torch.float64),
    'cuda()': pytest.param(lambda model: model.cuda(), marks=cuda_only),
}


@pytest.mark.parametrize('move', MOVES.values(), ids=MOVES.keys())
def test_moves_keep_values_and_the_update_follows(move):
    model = tiny_model()
    model.momentum = 0.5
    model.momentum_update()  # the target differs from the online network
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    identities = [id(p) for p in model.parameters()]
    values = snapshot(model.state_dict().values())
    assert move(model) is model
    assert [id(p) for p in model.parameters()] == identities
    for moved, before in zip(model.state_dict().values(), values):
        torch.testing.assert_close(
            moved.cpu(), before.to(moved.dtype), rtol=0, atol=0
        )
    # An optimizer built before the move still trains the same parameters,
    # and the update follows them to their new memory.
    dtype = params(model)[0].dtype
    reference = float64_copy(params(model.target_net))
    torch.manual_seed(1)
    optimizer.zero_grad()
    model(
        torch.randn(4, 4, dtype=dtype, device=params(model)[0].device)
    ).backward()
    optimizer.step()
    model.momentum_update()
    reference = ema_step(reference, params(model.online_net), 0.5)
    assert_matches_reference(params(model.target_net), reference, dtype)


def test_load_state_dict_loads_values_in_place():
    model, other = tiny_model(seed=0), tiny_model(seed=1)
    other.momentum = 0.5
    other(torch.randn(4, 4))
    other.momentum_update()
    pointers = [p.data_ptr() for p in model.parameters()]
    model.load_state_dict(other.state_dict())
    assert_all_equal(model.state_dict().values(), other.state_dict().values())
    assert [p.data_ptr() for p in model.parameters()] == pointers


def test_saved_state_dict_round_trip(tmp_path):
    model = tiny_model(seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(2):
        sgd_step(model, optimizer, seed=step)
        model.momentum_update()
    torch.save(model.state_dict(), tmp_path / 'model.pth')
    fresh = tiny_model(seed=1)
    assert not torch.equal(
        params(fresh.target_net)[0], params(model.target_net)[0]
    )
    fresh.load_state_dict(torch.load(tmp_path / 'model.pth'))
    assert_all_equal(fresh.state_dict().values(), model.state_dict().values())
    # Both go on identically from there.
    for each in (model, fresh):
        each.momentum = 0.9
        each.momentum_update()
    assert_all_equal(params(fresh.target_net), params(model.target_net))


@pytest.mark.parametrize(
    'duplicate',
    [copy.deepcopy, lambda model: pickle.loads(pickle.dumps(model))],
    ids=['deepcopy', 'pickle'],
)
def test_a_copy_updates_its_own_networks(duplicate):
    model = tiny_model()
    original_target = snapshot(model.target_net.parameters())
    clone = duplicate(model)
    assert_all_equal(clone.state_dict().values(), model.state_dict().values())
    with torch.no_grad():
        for param in clone.online_net.parameters():
            param.add_(1)
    clone.momentum = 0.5
    clone.momentum_update()
    assert_all_equal(params(model.target_net), original_target)
    assert_matches_reference(
        params(clone.target_net),
        ema_step(float64_copy(original_target), params(clone.online_net), 0.5),
    )


def record_online():
    """An mmcv hook that records, after the optimizer and momentum hooks, the
    online weights and the model's momentum of each iteration."""
    from mmcv.runner import Hook

    class RecordOnline(Hook):
        def __init__(self):
            self.online, self.momenta = [], []

        def after_train_iter(self, runner):
            self.online.append(snapshot(runner.model.online_net.parameters()))
            self.momenta.append(runner.model.momentum)

    return RecordOnline()


def make_runner(model, work_dir, max_iters):
    """A real IterBasedRunner: SGD with momentum, the optimizer hook and the
    momentum hook, as MMSelfSup's BYOL config registers them."""
    import mmcv
    from mmcv.runner import IterBasedRunner

    from momentum_hook.mmcv_hook import MomentumUpdateHook

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    runner = IterBasedRunner(
        model,
        optimizer=optimizer,
        work_dir=str(work_dir),
        logger=mmcv.utils.get_logger('test_model'),
        max_iters=max_iters,
    )
    runner.register_optimizer_hook(dict(grad_clip=None))
    runner.register_hook(MomentumUpdateHook(end_momentum=1.0))
    return runner


def batches(count=3):
    """``count`` batches of 4 samples; an epoch of the loader is ``count``
    iterations, so a run resumed at a multiple of it sees the same data."""
    torch.manual_seed(123)
    return DataLoader(list(torch.randn(count, 4, 4)), batch_size=None)


@pytest.mark.mmcv
def test_mixin_with_the_hook_on_a_real_runner(tmp_path):
    model = tiny_model(base_momentum=0.9)
    initial = snapshot(model.target_net.parameters())
    runner = make_runner(model, tmp_path, max_iters=5)
    recorder = record_online()
    runner.register_hook(recorder, priority='LOWEST')
    runner.run([batches()], [('train', 5)])
    momenta = [reference_momentum(k, 5, 0.9) for k in range(5)]
    assert recorder.momenta == pytest.approx(momenta, abs=1e-12)
    assert_matches_reference(
        params(model.target_net), replay_ema(initial, recorder.online, momenta)
    )
    assert not torch.equal(params(model.target_net)[0], initial[0])


@pytest.mark.mmcv
def test_checkpoint_resume_gives_the_uninterrupted_target(tmp_path):
    whole = tiny_model(seed=0)
    make_runner(whole, tmp_path / 'whole', max_iters=6).run(
        [batches()], [('train', 6)]
    )

    # The same run, interrupted after 3 iterations and checkpointed there.
    # (Not by CheckpointHook: mmcv 1.7.2 saves from after_train_iter with
    # meta['iter'] one short of the iterations done, so a resume would
    # repeat one.)
    from momentum_testing import InterruptBefore

    interrupted = tiny_model(seed=0)
    runner = make_runner(interrupted, tmp_path / 'first', max_iters=6)
    runner.register_hook(InterruptBefore(3), priority='HIGHEST')
    with pytest.raises(Interrupt):
        runner.run([batches()], [('train', 6)])
    runner.save_checkpoint(str(tmp_path / 'first'), 'interrupted.pth')

    resumed = tiny_model(seed=1)  # other weights, all to be overwritten
    runner = make_runner(resumed, tmp_path / 'resumed', max_iters=6)
    runner.resume(
        str(tmp_path / 'first' / 'interrupted.pth'), map_location='cpu'
    )
    assert runner.iter == 3
    assert_all_equal(
        resumed.state_dict().values(), interrupted.state_dict().values()
    )
    runner.run([batches()], [('train', 6)])

    assert not torch.equal(
        params(resumed.target_net)[0], params(interrupted.target_net)[0]
    )
    assert_all_equal(
        resumed.target_net.state_dict().values(),
        whole.target_net.state_dict().values(),
    )
    assert_all_equal(
        resumed.online_net.state_dict().values(),
        whole.online_net.state_dict().values(),
    )
    assert resumed.momentum == whole.momentum


def test_a_second_target_is_refused():
    model = TinyBYOL()
    with pytest.raises(RuntimeError, match='already has a momentum target'):
        model.init_momentum_target(model.online_net)


def _replace_parameter(model):
    layer = model.online_net[0]
    layer.weight = nn.Parameter(torch.full_like(layer.weight, 2.0))


def _replace_data(model):
    layer = model.online_net[0]
    layer.weight.data = torch.full_like(layer.weight, 3.0)


def _replace_layer(model):
    torch.manual_seed(7)
    model.online_net[3] = nn.Linear(3, 2)


def _assign_state(model):
    state = {k: v + 1 for k, v in model.state_dict().items()}
    model.load_state_dict(state, assign=True)


def _to_float64(model):
    model.double()


def _replace_buffer(model):
    norm = model.online_net[1]
    norm.running_mean = torch.full_like(norm.running_mean, 4.0)


@pytest.mark.parametrize(
    'change',
    [
        _replace_parameter,
        _replace_data,
        _replace_layer,
        _assign_state,
        _to_float64,
        _replace_buffer,
    ],
)
def test_planned_update_follows_changes_to_the_networks(change):
    """The mixin reuses its plan between calls; no change may make it stale.

    After each change the next update must use the networks' current
    tensors (buffers too, under the 'copy' policy), exactly as the
    stateless momentum_update_ does on a copy of the model.
    """
    model = tiny_model(buffers='copy')
    with torch.no_grad():  # the online network moves away from the target
        for param in model.online_net.parameters():
            param.add_(0.5)
    model.momentum = 0.9
    model.momentum_update()  # plans, and the plan is reused below
    model.momentum_update()

    change(model)
    expected = copy.deepcopy(model)
    momentum_hook.momentum_update_(
        expected.target_net, expected.online_net, 0.5, buffers='copy'
    )
    assert not all(
        map(
            torch.equal,
            expected.target_net.state_dict().values(),
            model.target_net.state_dict().values(),
        )
    )
    model.momentum = 0.5
    model.momentum_update()
    assert_all_equal(
        model.target_net.state_dict().values(),
        expected.target_net.state_dict().values(),
    )


class ConvBYOL(MomentumTargetMixin, nn.Module):
    """A convolutional online network with its target."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.online_net = nn.Sequential(
            nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)
        )
        self.target_net = self.init_momentum_target(self.online_net)


def test_channels_last_stays_channels_last():
    model = ConvBYOL().to(memory_format=torch.channels_last)
    reference = float64_copy(params(model.target_net))
    with torch.no_grad():
        for param in model.online_net.parameters():
            param.mul_(2)
    for momentum in (0.9, 0.5):
        model.momentum = momentum
        model.momentum_update()
        reference = ema_step(reference, params(model.online_net), momentum)
    for net in (model.online_net, model.target_net):
        for layer in (net[0], net[2]):
            assert layer.weight.is_contiguous(
                memory_format=torch.channels_last
            )
    assert_matches_reference(params(model.target_net), reference)


def saved_size(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    return buffer.tell()


def test_a_submodule_state_dict_saves_only_its_own_weights():
    """Exporting a backbone writes the backbone, not the whole network."""
    model = ConvBYOL()
    model.momentum_update()
    first = model.online_net[0]
    own_bytes = sum(
        t.numel() * t.element_size() for t in first.state_dict().values()
    )
    whole_bytes = sum(
        t.numel() * t.element_size() for t in model.state_dict().values()
    )
    assert own_bytes * 3 < whole_bytes
    assert saved_size(first.state_dict()) < own_bytes + 2048


def test_fsdp2_then_a_dtype_move(single_rank_group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = tiny_model()
    mesh = init_device_mesh('cpu', (1,))
    for net in (model.online_net, model.target_net):
        fully_shard(net, mesh=mesh)
    model.to(torch.float64)
    with torch.no_grad():
        for param in model.online_net.parameters():
            param.add_(1)
    # On one rank full_tensor() may alias the local shard: copy it.
    full = [p.full_tensor().clone() for p in model.target_net.parameters()]
    model.momentum = 0.5
    model.momentum_update()
    online = [p.full_tensor() for p in model.online_net.parameters()]
    target = [p.full_tensor() for p in model.target_net.parameters()]
    assert {t.dtype for t in target} == {torch.float64}
    assert_matches_reference(
        target, ema_step(float64_copy(full), online, 0.5), torch.float64
    )
