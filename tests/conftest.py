"""Shared fixtures."""
import types

import pytest
import torch
import torch.distributed as dist
from momentum_testing import free_port


@pytest.fixture
def single_rank_group():
    """A one-process gloo group (FSDP2 and DDP need one), torn down after."""
    dist.init_process_group('gloo', rank=0, world_size=1,
                            init_method=f'tcp://127.0.0.1:{free_port()}')
    try:
        yield
    finally:
        dist.destroy_process_group()


def pytest_collection_modifyitems(config, items):
    """Skip the tests marked ``cuda`` on a machine without a CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason='cuda: needs a CUDA device')
    for item in items:
        if 'cuda' in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def no_runner_sleeps(monkeypatch):
    """Skip the 1-2 s ``time.sleep`` calls mmcv 1.x runners make per epoch.

    Only the runner modules' name ``time`` is replaced; nothing under test
    sleeps, and the runners behave the same without the pauses.
    """
    try:
        from mmcv.runner import epoch_based_runner, iter_based_runner
    except ImportError:
        return
    fake_time = types.SimpleNamespace(sleep=lambda seconds: None)
    for module in (epoch_based_runner, iter_based_runner):
        monkeypatch.setattr(module, 'time', fake_time)
