"""Registration in fresh mmcv 1.x and MMEngine registries, in process.

Each test builds its own root ``Registry('hook')``, so nothing here depends
on what the process imported before. The stand-in registers the plain names
exactly as MMSelfSup 0.x does:
``@HOOKS.register_module(name=['BYOLHook', 'MomentumUpdateHook'])``.
The real MMSelfSup 0.11 in a real process is tested in ``test_mmselfsup.py``.
"""

import logging

import pytest

pytestmark = [pytest.mark.mmcv, pytest.mark.mmengine]
pytest.importorskip('mmcv')
pytest.importorskip('mmengine')
import mmcv.utils
import mmengine.registry

from momentum_hook import mmcv_hook, mmengine_hook
from momentum_hook.registration import (
    DROPIN_LINE,
    register_hook_class,
    take_plain_names,
)

FRAMEWORKS = {
    'mmcv': (mmcv.utils.Registry, mmcv_hook.MomentumUpdateHook),
    'mmengine': (mmengine.registry.Registry, mmengine_hook.MomentumUpdateHook),
}
PLAIN = ('MomentumUpdateHook', 'BYOLHook')
SCOPED = tuple(f'momentum_hook.{name}' for name in PLAIN)


@pytest.fixture(params=sorted(FRAMEWORKS))
def framework(request):
    """``(a fresh root registry, our hook class, a stand-in registrar)``."""
    registry_cls, ours = FRAMEWORKS[request.param]
    root = registry_cls('hook')

    def register_standin():
        @root.register_module(name=['BYOLHook', 'MomentumUpdateHook'])
        class StandinHook(ours.__mro__[-2]):  # the framework's Hook
            pass

        return StandinHook

    return root, ours, register_standin


def built(root, name):
    return type(
        root.build(dict(type=name, end_momentum=0.999, update_interval=4))
    )


def test_import_registers_the_scoped_names_only(framework, caplog):
    root, ours, _ = framework
    register_hook_class(root, ours)
    assert [root.get(name) for name in SCOPED] == [ours, ours]
    assert [root.get(name) for name in PLAIN] == [None, None]
    hook = root.build(
        dict(
            type='momentum_hook.BYOLHook', end_momentum=0.9, update_interval=4
        )
    )
    assert (type(hook), hook.end_momentum, hook.update_interval) == (
        ours,
        0.9,
        4,
    )
    assert not caplog.records


def test_a_later_package_registers_the_plain_names_as_usual(framework):
    root, ours, register_standin = framework
    register_hook_class(root, ours)
    standin = register_standin()  # no KeyError: the names were free
    assert [root.get(name) for name in PLAIN] == [standin, standin]
    assert [root.get(name) for name in SCOPED] == [ours, ours]


def test_plain_names_held_by_another_package_are_reported(framework, caplog):
    root, ours, register_standin = framework
    standin = register_standin()
    with caplog.at_level(logging.WARNING, logger='momentum_hook'):
        register_hook_class(root, ours)
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    message = record.getMessage()
    assert f'{standin.__module__}.{standin.__qualname__}' in message
    assert DROPIN_LINE in message
    assert "type='momentum_hook.MomentumUpdateHook'" in message
    assert [root.get(name) for name in PLAIN] == [standin, standin]
    assert built(root, 'momentum_hook.MomentumUpdateHook') is ours


def test_the_dropin_takes_the_plain_names_and_says_from_whom(
    framework, caplog
):
    root, ours, register_standin = framework
    standin = register_standin()
    register_hook_class(root, ours)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger='momentum_hook'):
        replaced = take_plain_names(root, ours)
    assert replaced == {'MomentumUpdateHook': standin, 'BYOLHook': standin}
    assert [built(root, name) for name in PLAIN + SCOPED] == [ours] * 4
    assert [
        standin.__qualname__ in r.getMessage() for r in caplog.records
    ] == [True, True]


def test_the_dropin_on_free_names_replaces_nothing(framework):
    root, ours, _ = framework
    register_hook_class(root, ours)
    assert take_plain_names(root, ours) == {}
    assert [built(root, name) for name in PLAIN] == [ours, ours]
