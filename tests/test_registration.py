"""Registration beside a package that holds the plain names (MMSelfSup 0.x).

Each case runs in a fresh interpreter, since registries are process-global.
The stand-in registers both names exactly as MMSelfSup 0.x does:
``@HOOKS.register_module(name=['BYOLHook', 'MomentumUpdateHook'])``.
"""
import json
import subprocess
import sys
import textwrap

import pytest

REGISTRIES = {
    'mmcv': 'from mmcv.runner import HOOKS, Hook',
    'mmengine': 'from mmengine.registry import HOOKS\n'
                'from mmengine.hooks import Hook',
}

PROBE = """
import importlib, json, warnings
warnings.simplefilter('always')
with warnings.catch_warnings(record=True) as caught:
    for name in {order!r}:
        importlib.import_module(name)
{registry}
def owner(name):
    return HOOKS.get(name).__module__
print(json.dumps(dict(
    plain={{n: owner(n) for n in ('MomentumUpdateHook', 'BYOLHook')}},
    scoped={{n: owner('momentum_hook.' + n)
             for n in ('MomentumUpdateHook', 'BYOLHook')}},
    built=type(HOOKS.build(dict(type='momentum_hook.BYOLHook',
                                end_momentum=0.99))).__module__,
    warnings=[str(w.message) for w in caught
              if 'momentum_hook leaves' in str(w.message)])))
"""


def probe(tmp_path, framework, order):
    (tmp_path / 'standin_selfsup.py').write_text(
        REGISTRIES[framework] + textwrap.dedent("""

            @HOOKS.register_module(name=['BYOLHook', 'MomentumUpdateHook'])
            class MomentumUpdateHook(Hook):
                pass
            """))
    code = PROBE.format(order=order, registry=REGISTRIES[framework])
    out = subprocess.run([sys.executable, '-c', code], cwd=tmp_path,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.splitlines()[-1])


OURS = {'mmcv': 'momentum_hook.mmcv_hook',
        'mmengine': 'momentum_hook.mmengine_hook'}


@pytest.mark.parametrize('framework', ['mmcv', 'mmengine'])
@pytest.mark.parametrize('order', [['standin_selfsup', 'momentum_hook'],
                                   ['momentum_hook', 'standin_selfsup']])
def test_plain_names_stay_with_the_other_package(tmp_path, framework, order):
    result = probe(tmp_path, framework, order)
    assert result['plain'] == {'MomentumUpdateHook': 'standin_selfsup',
                               'BYOLHook': 'standin_selfsup'}
    assert result['scoped'] == {'MomentumUpdateHook': OURS[framework],
                                'BYOLHook': OURS[framework]}
    assert result['built'] == OURS[framework]
    warning, = result['warnings']  # once, for both names
    assert "'BYOLHook'" in warning and "'MomentumUpdateHook'" in warning
    assert "type='momentum_hook.MomentumUpdateHook'" in warning


@pytest.mark.parametrize('framework', ['mmcv', 'mmengine'])
def test_plain_names_are_ours_when_free(tmp_path, framework):
    result = probe(tmp_path, framework, ['momentum_hook'])
    assert result['plain'] == {'MomentumUpdateHook': OURS[framework],
                               'BYOLHook': OURS[framework]}
    assert result['scoped'] == result['plain']
    assert result['warnings'] == []
