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
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.online_net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
        self.target_net = self.init_momentum_target(self.online_net)
        with torch.no_grad():
            for param in self.target_net.parameters():
                param.add_(1.)
            self.target_net[1].running_mean.fill_(2.)


def expected_target():
    """The target's own state dict, written out from an unwrapped model."""
    return {key: value.clone() for key, value in
            Pair().target_net.state_dict().items()}


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
def test_export_writes_the_target_s_own_keys(tmp_path, single_rank_group,
                                             wrap):
    model = wrap(Pair())
    written = export_target(model, tmp_path / 'teacher.pth')
    assert_same(written, expected_target())
    assert_same(torch.load(tmp_path / 'teacher.pth'), expected_target())
    whole = full_state_dict(model)
    assert set(whole) == {f'{prefix}.{key}' for prefix in
                          ('online_net', 'target_net')
                          for key in expected_target()}


def test_export_without_a_process_group(tmp_path):
    written = export_target(Pair(), tmp_path / 'teacher.pth')
    assert_same(written, expected_target())
    teacher = copy.deepcopy(Pair().online_net)
    teacher.load_state_dict(torch.load(tmp_path / 'teacher.pth'))


def test_an_unknown_target_is_refused_before_anything_is_gathered(tmp_path):
    with pytest.raises(ValueError, match=r"no target network 'teacher'.*"
                       r"\['online_net', 'target_net'\]"):
        export_target(Pair(), tmp_path / 'x.pth', target='teacher')
    assert not (tmp_path / 'x.pth').exists()
