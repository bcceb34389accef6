"""Shared fixtures, and the skips of the tests whose requirements are
missing."""

import importlib.util
import types

import pytest
import torch
import torch.distributed as dist
from momentum_testing import free_port


@pytest.fixture
def single_rank_group():
    """A one-process gloo group (FSDP2 and DDP need one), torn down after."""
    dist.init_process_group(
        'gloo',
        rank=0,
        world_size=1,
        init_method=f'tcp://127.0.0.1:{free_port()}',
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


#: The markers of tests that need a framework beside torch, with the module
#: that framework installs and the line that installs it.
FRAMEWORKS = {
    'mmcv': ('mmcv', 'pip install --no-build-isolation -e ".[mmcv]"'),
    'mmengine': ('mmengine', 'pip install -e ".[mmengine]"'),
    'deepspeed': (
        'deepspeed',
        'DS_BUILD_OPS=0 pip install --no-build-isolation -e ".[deepspeed]"',
    ),
    'mmselfsup': (
        'mmselfsup',
        'pip install --no-deps -r requirements/mmselfsup.txt',
    ),
}


def _installed(module):
    return importlib.util.find_spec(module) is not None


def pytest_collection_modifyitems(config, items):
    """Skip the tests marked ``cuda`` on a machine without a CUDA device, and
    those marked with a framework (``FRAMEWORKS``) where it is not installed.

    A test module that imports a framework at its top skips itself first
    (``pytest.importorskip``); the markers cover the tests that import it
    inside.
    """
    skips = {}
    if not torch.cuda.is_available():
        skips['cuda'] = pytest.mark.skip(reason='cuda: needs a CUDA device')
    for marker, (module, install) in FRAMEWORKS.items():
        if not _installed(module):
            skips[marker] = pytest.mark.skip(
                reason=f'{marker}: needs {module}, not installed ({install})'
            )
    for item in items:
        for marker, skip in skips.items():
            if marker in item.keywords:
                item.add_marker(skip)
                break


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
