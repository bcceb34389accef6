"""export_target and full_state_dict in one process: a plain model, DDP and
FSDP2 on a one-rank gloo group. The sharded runs on two ranks are in
test_flexible_runner.py (FSDP1 and ZeRO-3 under MMEngine's FlexibleRunner)."""

import copy

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from momentum_hook import MomentumTargetMixin
from momentum_hook.export import export_target, full_state_dict
from momentum_hook.sharding import fully_shard_pair


class Pair(MomentumTargetMixin, nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        torch.manual_seed(0)
        self.online_net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
        self.target_net = self.init_momentum_target(self.online_net)
        with torch.no_grad():
            for param in self.target_net.parameters():
                param.add_(1.0)
            self.target_net[1].running_mean.fill_(2.0)
        self.to(dtype)


def expected_target(dtype=torch.float32):
    """The target's own state dict, written out from an unwrapped model."""
    return {
        key: value.clone()
        for key, value in Pair(dtype).target_net.state_dict().items()
    }


def updated_bf16_pair():
    """A bfloat16 :class:`Pair` after updates, its masters more than its
    target holds; and its target's weights as a float64 EMA."""
    model = Pair(torch.bfloat16)
    expected = [param.double() for param in model.target_net.parameters()]
    for _ in range(3):
        with torch.no_grad():
            for param in model.online_net.parameters():
                param.add_(0.1)
        model.momentum = 0.99
        model.momentum_update()
        expected = [
            0.99 * ref + 0.01 * online.double()
            for ref, online in zip(expected, model.online_net.parameters())
        ]
    return model, expected


def assert_same(state, expected):
    assert list(state) == list(expected)
    for key, value in expected.items():
        assert state[key].device.type == 'cpu'
        torch.testing.assert_close(state[key], value, rtol=0, atol=0)


def plain(model):
    return model


def ddp(model):
    return DistributedDataParallel(model)


def fsdp2(model):
    fully_shard_pair(online=model.online_net, target=model.target_net)
    return model


@pytest.mark.parametrize('wrap', [plain, ddp, fsdp2])
def test_export_writes_the_target_s_own_keys(
    tmp_path, single_rank_group, wrap
):
    model = wrap(Pair())
    written = export_target(model, tmp_path / 'teacher.pth')
    assert_same(written, expected_target())
    assert_same(torch.load(tmp_path / 'teacher.pth'), expected_target())
    whole = full_state_dict(model)
    assert set(whole) == {
        f'{prefix}.{key}'
        for prefix in ('online_net', 'target_net')
        for key in expected_target()
    }


def test_export_without_a_process_group(tmp_path):
    written = export_target(Pair(), tmp_path / 'teacher.pth')
    assert_same(written, expected_target())
    teacher = copy.deepcopy(Pair().online_net)
    teacher.load_state_dict(torch.load(tmp_path / 'teacher.pth'))


def test_an_unknown_target_is_refused_before_anything_is_gathered(tmp_path):
    with pytest.raises(
        ValueError,
        match=r"no target network 'teacher'.*"
        r"\['online_net', 'target_net'\]",
    ):
        export_target(Pair(), tmp_path / 'x.pth', target='teacher')
    assert not (tmp_path / 'x.pth').exists()


@pytest.mark.parametrize('wrap', [plain, ddp, fsdp2])
def test_a_bf16_target_exports_its_weights_and_a_full_state_dict_its_masters(
    tmp_path, single_rank_group, wrap
):
    """The export holds the target's bfloat16 weights only, under their
    plain names, and loads into a plain network (no mixin); the full state
    dict holds the masters whole, the float64 EMA to float32 rounding."""
    model, expected = updated_bf16_pair()
    names = [name for name, _ in model.target_net.named_parameters()]
    wrapped = wrap(model)
    written = export_target(wrapped, tmp_path / 'teacher.pth')
    assert list(written) == list(expected_target())
    teacher = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).to(
        torch.bfloat16
    )
    teacher.load_state_dict(torch.load(tmp_path / 'teacher.pth'))
    for param, ref in zip(teacher.parameters(), expected):
        assert param.dtype == torch.bfloat16
        torch.testing.assert_close(param.double(), ref, rtol=2**-8, atol=0)
    whole = full_state_dict(wrapped)
    masters = {
        key: value
        for key, value in whole.items()
        if key.startswith('momentum_target_master.')
    }
    assert list(masters) == [
        f'momentum_target_master.{name}' for name in names
    ]
    for name, ref in zip(names, expected):
        master = masters[f'momentum_target_master.{name}']
        assert master.dtype == torch.float32
        torch.testing.assert_close(master.double(), ref, rtol=1e-6, atol=0)
        assert torch.equal(
            master.to(torch.bfloat16), whole[f'target_net.{name}']
        )
