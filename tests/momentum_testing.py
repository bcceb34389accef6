"""Helpers shared by the EMA, mixin and distributed tests; not a test module.

The checks here are written independently of ``momentum_hook.ema``: the
reference EMA is float64 arithmetic spelled out, and the reference momentum
the schedule's formula, so that the code under test never judges itself.
"""
import math

import pytest
import torch
from mmcv.runner import Hook
from torch import nn

from momentum_hook import MomentumTargetMixin

#: Tests that need a CUDA device; ``pytest -m cuda`` runs only those, and
#: without a device they are skipped (see ``conftest.py``).
cuda_only = pytest.mark.cuda


def reference_momentum(k, max_iters, base, end=1.):
    """The cosine schedule written out independently of the package.

    ``m_k = end - (end - base) * (cos(pi * k / K) + 1) / 2`` in MMSelfSup
    0.x's order of floating-point operations, so that it is bit-identical.
    """
    return end - (end - base) * (math.cos(math.pi * k / float(max_iters)) +
                                 1) / 2


def float64_copy(tensors):
    """Detached float64 copies of ``tensors``."""
    return [tensor.detach().to(torch.float64, copy=True) for tensor in tensors]


def ema_step(reference, online, momentum):
    """One reference step in float64: ``m * reference + (1 - m) * online``."""
    return [
        momentum * ref + (1 - momentum) * new.detach().to(ref.device,
                                                          torch.float64)
        for ref, new in zip(reference, online)
    ]


def replay_ema(initial_target, online_history, momenta):
    """The float64 target after one reference step per recorded online state.

    Args:
        initial_target (list[Tensor]): The target before the first update.
        online_history (list[list[Tensor]]): The online tensors after each
            optimizer step.
        momenta (list[float]): The momentum of each update.
    """
    assert len(online_history) == len(momenta)
    reference = float64_copy(initial_target)
    for online, momentum in zip(online_history, momenta):
        reference = ema_step(reference, online, momentum)
    return reference


def assert_matches_reference(actual, reference, dtype=torch.float32):
    """``actual`` equals the float64 ``reference`` to ``dtype`` rounding."""
    assert len(actual) == len(reference)
    for tensor, expected in zip(actual, reference):
        torch.testing.assert_close(tensor.detach().to(torch.float64),
                                   expected, **tolerance(dtype))


def tolerance(dtype):
    """``assert_close`` tolerances for a result stored in ``dtype``."""
    if dtype == torch.float64:
        return dict(rtol=1e-7, atol=1e-7)
    if dtype == torch.float32:
        return dict(rtol=1.3e-6, atol=1e-5)
    # A low-precision result is compared with a reference rounded to dtype
    # after each step; lerp rounds once from float, so at most about an ulp.
    eps = torch.finfo(dtype).eps
    return dict(rtol=eps, atol=eps)


class TinyBYOL(MomentumTargetMixin, nn.Module):
    """A BYOL-shaped model of a few parameters built on the mixin.

    ``forward(x)`` returns the loss between the online network on ``x`` and
    the target network on a second "view" of ``x``; ``train_step`` is the
    mmcv 1.x runner's entry point.
    """

    def __init__(self, base_momentum=0.99, buffers="keep"):
        super().__init__()
        self.online_net = nn.Sequential(
            nn.Linear(4, 3), nn.BatchNorm1d(3), nn.ReLU(), nn.Linear(3, 2))
        self.target_net = self.init_momentum_target(
            self.online_net, base_momentum=base_momentum, buffers=buffers)

    def forward(self, x):
        with torch.no_grad():
            target = self.target_net(x.roll(1, dims=1))
        return (self.online_net(x) - target).pow(2).mean()

    def train_step(self, data_batch, optimizer, **kwargs):
        loss = self(data_batch)
        return dict(loss=loss, log_vars=dict(loss=loss.item()),
                    num_samples=len(data_batch))


def params(module):
    """``module``'s parameters as a list, in order."""
    return list(module.parameters())


def snapshot(tensors):
    """Detached clones of ``tensors`` (parameters or buffers)."""
    return [tensor.detach().clone() for tensor in tensors]


def assert_all_equal(actual, expected):
    """Bit-identical tensors, pair by pair."""
    actual, expected = list(actual), list(expected)
    assert len(actual) == len(expected)
    for index, (a, b) in enumerate(zip(actual, expected)):
        assert a.dtype == b.dtype, index
        assert torch.equal(a, b), index


class Interrupt(Exception):
    """Stands for a crash."""


class InterruptBefore(Hook):
    """Interrupts a run before iteration ``k``, once ``k`` are done."""

    def __init__(self, k):
        self.k = k

    def before_train_iter(self, runner):
        if runner.iter == self.k:
            raise Interrupt
