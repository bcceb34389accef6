"""The few private torch attributes the shard lookup reads, and what happens
on a torch that lacks one: an error naming it and the torch version, never a
lookup that silently finds nothing.

One gloo process; FSDP1 units built for real, then one attribute removed,
as a torch outside the tested range would lack it.
"""

import re

import pytest
import torch
from momentum_testing import TinyBYOL
from torch import nn


def fsdp1_pair(policy=True):
    """A TinyBYOL in FSDP1: the networks as separate units, or (without a
    policy) one root unit for both, which needs ``use_orig_params``."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    torch.manual_seed(0)
    model = TinyBYOL()
    wrapped = FSDP(
        model,
        device_id=torch.device('cpu'),
        use_orig_params=not policy,
        auto_wrap_policy=(
            ModuleWrapPolicy({nn.Sequential}) if policy else None
        ),
    )
    return model, wrapped


def test_an_fsdp1_pair_plans_with_the_internals_present(single_rank_group):
    model, _ = fsdp1_pair()
    online = model.online_net._flat_param
    target = model.target_net._flat_param
    with torch.no_grad():
        online.add_(1.0)
    expected = 0.5 * target.detach().double() + 0.5 * online.detach().double()
    model.momentum = 0.5
    model.momentum_update()
    torch.testing.assert_close(target.detach().double(), expected)


def test_a_missing_flat_parameter_attribute_names_it_and_the_version(
    single_rank_group,
):
    model, _ = fsdp1_pair()
    flat = model.online_net._flat_param
    del flat._fqns  # as a torch that renamed it would lack it
    with pytest.raises(
        RuntimeError,
        match=(
            r"reads torch's \w*Parameter\._fqns, which torch "
            f'{re.escape(torch.__version__)} does not have: '
            r'.*torch>=2\.14,<2\.16'
        ),
    ):
        model.check_momentum_target()


def test_a_missing_flattening_test_is_an_error_not_a_silent_no(
    single_rank_group, monkeypatch
):
    from torch.distributed.fsdp import _common_utils

    model, _ = fsdp1_pair(policy=False)  # one root unit: refused today
    with pytest.raises(ValueError, match='is flattened into an FSDP1 unit'):
        model.check_momentum_target()
    monkeypatch.delattr(_common_utils, '_is_fsdp_flattened')
    with pytest.raises(
        RuntimeError,
        match=r'_is_fsdp_flattened, which '
        f'torch {re.escape(torch.__version__)} does not have',
    ):
        model.check_momentum_target()
