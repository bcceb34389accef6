"""The README and docs/: their examples run as printed and do what they say,
and every link between them resolves."""

import copy
import re
import runpy

import pytest
import torch
from doc_snippets import (
    PAGES,
    ROOT,
    anchors,
    code_block,
    relative_links,
    section,
)
from momentum_testing import reference_momentum, run_doc_example
from torch import nn

from momentum_hook import check_momentum_contract


def test_the_plain_loop_example_schedules_and_averages():
    namespace = run_doc_example(ROOT / 'README.md', 'A plain PyTorch loop')
    target, online = namespace['target'], namespace['online']
    assert namespace['m'] == reference_momentum(99, 100, 0.99)
    # The initial weights again: the same seed, the same initialisation.
    initial = copy.deepcopy(online)
    torch.manual_seed(0)
    for layer in initial:
        if hasattr(layer, 'reset_parameters'):
            layer.reset_parameters()
    for t, o, start in zip(
        target.parameters(), online.parameters(), initial.parameters()
    ):
        assert not t.requires_grad
        assert not torch.equal(t, start)  # the target followed
        assert not torch.equal(t, o)  # slowly: it is no copy


def config_lines(code):
    """The names a config snippet defines, as a config file would."""
    namespace = {}
    exec(compile(code, 'snippet', 'exec'), namespace)
    return {
        key: value
        for key, value in namespace.items()
        if not key.startswith('__')
    }


@pytest.mark.parametrize(
    'page, heading, config',
    [
        (
            'README.md',
            'An MMEngine or mmcv 1.x config',
            'configs/mmengine_momentum_hook.py',
        ),
        ('docs/mmengine.md', 'Runner', 'configs/mmengine_momentum_hook.py'),
        (
            'README.md',
            'MMSelfSup 0.x: one line',
            'configs/mmselfsup_dropin.py',
        ),
        (
            'docs/migrating.md',
            'The one-line drop-in',
            'configs/mmselfsup_dropin.py',
        ),
        (
            'docs/migrating.md',
            'Without the drop-in',
            'configs/mmcv_momentum_hook.py',
        ),
    ],
)
def test_config_snippets_are_the_shipped_configs(page, heading, config):
    """The snippets say what the shipped configs say; the configs are built
    and trained by test_hook_mmcv.py and test_hook_mmengine.py."""
    shipped = runpy.run_path(str(ROOT / config))
    shipped = {
        key: value
        for key, value in shipped.items()
        if not key.startswith('__')
    }
    snippet = config_lines(code_block(page, heading))
    assert snippet == {key: shipped[key] for key in snippet}
    assert set(snippet) >= {'custom_imports'}


@pytest.mark.parametrize('page', PAGES, ids=lambda path: path.name)
def test_every_relative_link_resolves(page):
    links = relative_links(page)
    for file, anchor in links:
        target = (page.parent / file).resolve() if file else page
        assert target.exists(), f'{page.name}: {file} does not exist'
        assert ROOT in target.parents or target == ROOT, file
        if anchor:
            assert target.suffix == '.md', f'{page.name}: {file}#{anchor}'
            assert anchor in anchors(target), (
                f'{page.name}: {file or page.name} has no heading '
                f'#{anchor}; it has {sorted(anchors(target))}'
            )


def test_the_readme_is_a_front_page():
    text = (ROOT / 'README.md').read_text(encoding='utf-8')
    assert len(text.splitlines()) <= 250


def test_the_module_map_matches_the_tree():
    listed = set(
        re.findall(
            r'^  (\S+)', section('docs/development.md', 'Module map'), re.M
        )
    )
    package = ROOT / 'momentum_hook'
    actual = {
        path.name
        for path in package.glob('*.py')
        if path.name != '__init__.py'
    }
    actual |= {
        path.name + '/'
        for path in package.iterdir()
        if (path / '__init__.py').exists()
    }
    assert listed == actual


def test_the_mixin_example_meets_the_hook_s_contract():
    namespace = run_doc_example(
        ROOT / 'README.md', 'The model contract and the mixin'
    )
    model = namespace['BYOL'](
        nn.Linear(3, 4), nn.Linear(4, 2), nn.Linear(2, 2)
    )
    check_momentum_contract(model)
    assert model.base_momentum == model.momentum == 0.99
    assert not any(p.requires_grad for p in model.target_net.parameters())
    with torch.no_grad():
        for param in model.online_net.parameters():
            param.add_(1.0)
    before = [p.clone() for p in model.target_net.parameters()]
    model.momentum_update()
    for old, new, online in zip(
        before, model.target_net.parameters(), model.online_net.parameters()
    ):
        torch.testing.assert_close(new, 0.99 * old + 0.01 * online)
