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

ROOT = Path(__file__).resolve().parents[1]
SNIPPET = ROOT / 'configs' / 'mmengine_momentum_hook.py'
NAMES = ('MomentumUpdateHook', 'BYOLHook', 'momentum_hook.MomentumUpdateHook')


def run_hiding(hidden, code):
    """Run ``code`` in a fresh Python that cannot import ``hidden``.

    Returns:
        subprocess.CompletedProcess: With text stdout and stderr.
    """
    prelude = ''.join(f'sys.modules[{name!r}] = None\n' for name in hidden)
    source = 'import sys\n' + prelude + textwrap.dedent(code)
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS='ignore')
    return subprocess.run([sys.executable, '-c', source], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def report_of(process):
    """The JSON object the child printed last."""
    assert process.returncode == 0, process.stderr
    return json.loads(process.stdout.strip().splitlines()[-1])


def test_neither_framework_names_the_extras_to_install():
    process = run_hiding(['mmcv', 'mmengine'], 'import momentum_hook')
    assert process.returncode != 0
    last_line = process.stderr.strip().splitlines()[-1]
    assert last_line.startswith('ImportError: ')
    assert 'momentum_hook[mmcv]' in last_line
    assert 'momentum_hook[mmengine]' in last_line


@pytest.mark.parametrize('hidden, adapter, registry', [
    ('mmcv', 'momentum_hook.mmengine_hook', 'mmengine.registry'),
    ('mmengine', 'momentum_hook.mmcv_hook', 'mmcv.runner'),
], ids=['only_mmengine', 'only_mmcv'])
def test_one_framework_gets_its_own_adapter(hidden, adapter, registry):
    process = run_hiding([hidden], f'''
        import json, sys
        import momentum_hook
        from {registry} import HOOKS
        hook = momentum_hook.MomentumUpdateHook
        print(json.dumps(dict(
            module=hook.__module__,
            same_alias=momentum_hook.BYOLHook is hook,
            registered=[HOOKS.get(name) is hook for name in {NAMES!r}],
            loaded=sorted(m for m in sys.modules
                          if m.startswith('momentum_hook.') and
                          m.endswith('_hook')))))
    ''')
    report = report_of(process)
    assert report['module'] == adapter
    assert report['same_alias']
    assert report['registered'] == [True] * len(NAMES)
    assert report['loaded'] == [adapter]


def test_both_frameworks_register_both_adapters():
    from mmcv.runner import HOOKS as MMCV_HOOKS
    from mmengine.registry import HOOKS as MMENGINE_HOOKS

    import momentum_hook
    from momentum_hook import mmcv_hook, mmengine_hook
    assert momentum_hook.MomentumUpdateHook is mmcv_hook.MomentumUpdateHook
    for name in NAMES:
        assert MMCV_HOOKS.get(name) is mmcv_hook.MomentumUpdateHook
        assert MMENGINE_HOOKS.get(name) is mmengine_hook.MomentumUpdateHook


def test_custom_imports_in_an_mmengine_config_registers_the_hook():
    process = run_hiding([], f'''
        import json, sys
        from mmengine.config import Config
        from mmengine.registry import HOOKS
        before = 'momentum_hook' in sys.modules
        cfg = Config.fromfile({str(SNIPPET)!r})
        hook = HOOKS.build(cfg.custom_hooks[0])
        print(json.dumps(dict(before=before,
                              built=type(hook).__module__)))
    ''')
    report = report_of(process)
    assert report == dict(before=False, built='momentum_hook.mmengine_hook')
