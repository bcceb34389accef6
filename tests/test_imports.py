"""``import momentum_hook`` with mmcv 1.x, MMEngine, both or neither.

A framework is hidden from a fresh interpreter by ``sys.modules[name] =
None``: ``import name`` then raises ``ModuleNotFoundError`` and
``importlib.util.find_spec(name)`` returns None, as for a package that is not
installed.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # each test starts a fresh interpreter

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / 'configs'
SCOPED = ('momentum_hook.MomentumUpdateHook', 'momentum_hook.BYOLHook')


def run_hiding(hidden, code):
    """Run ``code`` in a fresh Python that cannot import ``hidden``.

    Returns:
        dict: The JSON object the child printed last.
    """
    prelude = ''.join(f'sys.modules[{name!r}] = None\n' for name in hidden)
    source = 'import sys\n' + prelude + textwrap.dedent(code)
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS='ignore')
    process = subprocess.run(
        [sys.executable, '-c', source],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert process.returncode == 0, process.stderr
    return json.loads(process.stdout.strip().splitlines()[-1])


def test_the_core_needs_only_torch():
    report = run_hiding(
        ['mmcv', 'mmengine'],
        """
        import json, sys
        import torch
        import momentum_hook
        from momentum_hook import (MomentumTargetMixin, cosine_momentum,
                                   momentum_update_)
        target, online = torch.zeros(3), torch.ones(3)
        momentum_update_([target], [online], 0.75)
        try:
            momentum_hook.MomentumUpdateHook
        except AttributeError as error:
            moved = str(error)
        try:
            import momentum_hook_dropin
        except ImportError as error:
            dropin = str(error)
        print(json.dumps(dict(
            target=target.tolist(),
            momentum=cosine_momentum(0, 10, 0.99, 1.),
            mixin=MomentumTargetMixin.__name__, moved=moved, dropin=dropin,
            loaded=sorted(m for m, module in sys.modules.items()
                          if module is not None and
                          m.split('.')[0] in ('mmcv', 'mmengine')))))
    """,
    )
    assert report['target'] == [0.25] * 3
    assert report['momentum'] == 0.99
    assert report['loaded'] == []
    assert 'momentum_hook.mmcv_hook.MomentumUpdateHook' in report['moved']
    assert 'momentum_hook.mmengine_hook.MomentumUpdateHook' in report['moved']
    assert 'pip install -e ".[mmengine]"' in report['dropin']
    assert 'pip install --no-build-isolation -e ".[mmcv]"' in report['dropin']


@pytest.mark.mmcv
def test_only_mmcv_registers_the_mmcv_hook():
    report = run_hiding(
        ['mmengine'],
        f"""
        import json, sys
        import momentum_hook
        from mmcv.runner import HOOKS
        print(json.dumps(dict(
            registered=[HOOKS.get(name).__module__ for name in {SCOPED!r}],
            loaded=sorted(m for m in sys.modules
                          if m.startswith('momentum_hook.') and
                          m.endswith('_hook')))))
    """,
    )
    assert report == dict(
        registered=['momentum_hook.mmcv_hook'] * 2,
        loaded=['momentum_hook.mmcv_hook'],
    )


@pytest.mark.mmengine
def test_only_mmengine_registers_through_custom_imports():
    report = run_hiding(
        ['mmcv'],
        f"""
        import json, sys
        from mmengine.config import Config
        from mmengine.registry import HOOKS
        before = 'momentum_hook' in sys.modules
        cfg = Config.fromfile({str(CONFIGS / 'mmengine_momentum_hook.py')!r})
        print(json.dumps(dict(
            before=before,
            built=type(HOOKS.build(cfg.custom_hooks[0])).__module__,
            registered=[HOOKS.get(name).__module__ for name in {SCOPED!r}],
            loaded=sorted(m for m in sys.modules
                          if m.startswith('momentum_hook.') and
                          m.endswith('_hook')))))
    """,
    )
    assert report == dict(
        before=False,
        built='momentum_hook.mmengine_hook',
        registered=['momentum_hook.mmengine_hook'] * 2,
        loaded=['momentum_hook.mmengine_hook'],
    )


@pytest.mark.mmcv
@pytest.mark.mmengine
def test_both_frameworks_register_their_own_adapter():
    from mmcv.runner import HOOKS as MMCV_HOOKS
    from mmengine.registry import HOOKS as MMENGINE_HOOKS

    from momentum_hook import mmcv_hook, mmengine_hook

    for name in SCOPED:
        assert MMCV_HOOKS.get(name) is mmcv_hook.MomentumUpdateHook
        assert MMENGINE_HOOKS.get(name) is mmengine_hook.MomentumUpdateHook
