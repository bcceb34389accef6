"""Shared fixtures."""
import types

import pytest
import torch


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
