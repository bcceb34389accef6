"""What the wheel ships, read from pyproject.toml and the source tree.

``make test-wheel`` runs the suite against the built wheel installed in a
torch-only venv, with ``MOMENTUM_HOOK_FROM_WHEEL=1``; the test that needs
it checks that the package really comes from there, with its license.
"""

import importlib.metadata
import importlib.util
import os
import re
from pathlib import Path

import pytest

import momentum_hook
from momentum_hook import _compat

tomllib = pytest.importorskip('tomllib')  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / 'pyproject.toml').read_text('utf-8'))


def test_every_package_of_the_tree_is_listed():
    packages = {
        '.'.join(path.parent.relative_to(ROOT).parts)
        for path in (ROOT / 'momentum_hook').rglob('__init__.py')
    }
    listed = set(PYPROJECT['tool']['setuptools']['packages'])
    assert listed == packages | {'momentum_hook.configs'}
    assert (ROOT / 'configs' / '__init__.py').is_file()
    mapped = PYPROJECT['tool']['setuptools']['package-dir']
    assert mapped == {'momentum_hook.configs': 'configs'}


def test_the_version_has_one_source():
    dynamic = PYPROJECT['tool']['setuptools']['dynamic']['version']
    assert dynamic == {'attr': 'momentum_hook.version.__version__'}
    assert 'version' in PYPROJECT['project']['dynamic']
    assert re.fullmatch(r'\d+\.\d+\.\d+', momentum_hook.__version__)


def test_the_tested_ranges_are_read_from_the_metadata():
    try:
        importlib.metadata.requires('momentum_hook')
    except importlib.metadata.PackageNotFoundError:
        pytest.skip('momentum_hook is not installed')
    assert _compat.tested_range('torch') == '>=2.14,<2.16'
    assert PYPROJECT['project']['dependencies'] == [
        'torch>=2.14,<2.16',
        'numpy',
    ]


@pytest.mark.skipif(
    not os.environ.get('MOMENTUM_HOOK_FROM_WHEEL'),
    reason='make test-wheel: the suite against the wheel',
)
def test_the_suite_runs_against_the_installed_wheel():
    for name in ('momentum_hook', 'momentum_hook_dropin'):
        origin = Path(importlib.util.find_spec(name).origin)
        assert 'site-packages' in origin.parts, origin
        assert not origin.is_relative_to(ROOT / 'momentum_hook'), origin
        assert origin != ROOT / 'momentum_hook_dropin.py', origin
    distribution = importlib.metadata.distribution('momentum_hook')
    files = {str(path) for path in distribution.files}
    assert 'momentum_hook/py.typed' in files
    assert any(path.endswith('licenses/LICENSE') for path in files)
    assert 'momentum_hook/configs/byol_digits.py' in files
    assert distribution.metadata['License-Expression'] == 'Apache-2.0'
