"""The refusals of a ZeRO-3 parameter's partition that an engine on two CPU
ranks cannot produce (quantized and offloaded partitions need ZeRO++ qwZ or
NVMe), on parameters that carry DeepSpeed's ZeRO-3 attributes, which is all
the update reads of them (``momentum_hook._compat.deepspeed``). The engines
themselves are in ``test_sharded_deepspeed.py``.
"""

import pytest
import torch
from torch import nn

from momentum_hook import momentum_update_
from momentum_hook.zero import QUANTIZED


def zero3_pair(quantized=None, partition=True):
    """A target and an online network of one ZeRO-3-like parameter each."""
    pair = []
    for _ in range(2):
        param = nn.Parameter(torch.empty(0), requires_grad=False)
        param.ds_tensor = torch.zeros(6) if partition else None
        param.ds_shape, param.ds_numel = torch.Size((3, 4)), 12
        pair.append(param)
    if quantized is not None:
        pair[0].ds_tensor = torch.zeros(6, dtype=torch.int8)
        pair[0].ds_tensor.ds_quant_scale = torch.ones(1)
    return pair


def test_a_quantized_partition_is_refused_with_the_fix():
    target, online = zero3_pair(quantized=True)
    online.requires_grad_(True)
    with pytest.raises(ValueError) as error:
        momentum_update_([target], [online], 0.9)
    message = str(error.value)
    assert 'stored quantized to torch.int8' in message
    assert message.endswith(QUANTIZED)
    assert torch.equal(target.ds_tensor, torch.zeros(6, dtype=torch.int8))


def test_a_partition_not_in_memory_is_refused():
    target, online = zero3_pair(partition=False)
    online.requires_grad_(True)
    with pytest.raises(ValueError, match='partition is not in memory'):
        momentum_update_([target], [online], 0.9)
