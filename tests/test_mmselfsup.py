"""The real MMSelfSup 0.11 as a client, each case in a fresh interpreter.

Registries are process-global, so every import order gets its own process.
The MMSelfSup order is that of its ``tools/train.py``: MMSelfSup is imported
first (registering ``'MomentumUpdateHook'`` and ``'BYOLHook'``), then
``Config.fromfile`` runs the config's ``custom_imports``.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.mmselfsup,
    pytest.mark.mmcv,
    pytest.mark.mmengine,
    pytest.mark.slow,
]
pytest.importorskip('mmselfsup')
ROOT = Path(__file__).resolve().parents[1]

SELFSUP_HOOK = 'mmselfsup.core.hooks.momentum_update_hook.MomentumUpdateHook'
OURS = {
    'mmcv': 'momentum_hook.mmcv_hook.MomentumUpdateHook',
    'mmengine': 'momentum_hook.mmengine_hook.MomentumUpdateHook',
}


def run_python(code, tmp_path):
    """Run ``code`` in a fresh Python with warnings ignored, as log-only
    set-ups have them; return (the JSON it printed last, its stderr)."""
    env = dict(
        os.environ,
        PYTHONPATH=f'{ROOT}{os.pathsep}{ROOT / "tests"}',
        PYTHONWARNINGS='ignore',
        OMP_NUM_THREADS='1',
    )
    process = subprocess.run(
        [sys.executable, '-c', textwrap.dedent(code)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert process.returncode == 0, process.stderr
    return json.loads(process.stdout.strip().splitlines()[-1]), process.stderr


# The script's replacement fields hold quotes: kept as written.
# fmt: off
MMSELFSUP_ORDER = f'''
import glob, json, os, os.path as osp
import torch
torch.set_num_threads(1)
from mmselfsup.apis import train_model  # tools/train.py's imports first
from mmselfsup.core import DistOptimizerHook
from mmselfsup.core.hooks.momentum_update_hook import (
    MomentumUpdateHook as SelfSupHook)
from mmselfsup.models import build_algorithm
from mmcv import Config
from mmcv.parallel import MMDataParallel
from mmcv.runner import HOOKS, EpochBasedRunner, Hook, build_optimizer
from mmcv.utils import build_from_cfg, get_logger
from mmengine.registry import HOOKS as MMENGINE_HOOKS
from torch.utils.data import DataLoader

def name(cls):
    return f'{{cls.__module__}}.{{cls.__qualname__}}'

# 1. Every shipped config, loaded as MMSelfSup's tools/train.py loads one.
shipped = {{}}
for path in sorted(glob.glob({str(ROOT / 'configs' / '*.py')!r})):
    if osp.basename(path) in ('__init__.py', 'mmselfsup_dropin.py'):
        continue  # the drop-in itself is loaded below, last
    cfg = Config.fromfile(path)
    registry = MMENGINE_HOOKS if 'mmengine' in path else HOOKS
    hooks = [h for h in cfg.get('custom_hooks', [])]
    shipped[osp.basename(path)] = [
        name(type(registry.build(dict(h)))) for h in hooks]
plain_before = name(HOOKS.get('BYOLHook'))

# 2. The drop-in line with an MMSelfSup BYOL config; MMSelfSup's own
#    DistOptimizerHook accumulates gradients.
cfg = Config.fromfile({str(ROOT / 'tests' / 'configs' /
                           'mmselfsup_byol_accum2.py')!r})
hook_cfg = cfg.custom_hooks[0]

class Recorder(Hook):
    def __init__(self):
        self.momenta = []
    def after_train_iter(self, runner):
        self.momenta.append(runner.model.module.momentum)

torch.manual_seed(1)
images = torch.randn(8, 3, 16, 16)
data = [dict(img=[x, x.flip(-1) + 0.1 * torch.randn_like(x)])
        for x in images.split(2)]

def train(hook, work_dir, beside=None):
    os.makedirs(work_dir)
    torch.manual_seed(0)
    model = build_algorithm(cfg.model)
    model.init_weights()
    runner = EpochBasedRunner(
        MMDataParallel(model), optimizer=build_optimizer(model,
                                                         cfg.optimizer),
        work_dir=work_dir, max_epochs=cfg.runner.max_epochs,
        logger=get_logger(work_dir, log_file=osp.join(work_dir, 'run.log')))
    runner.register_training_hooks(
        lr_config=None,
        optimizer_config=DistOptimizerHook(**cfg.optimizer_config))
    runner.register_hook(hook)
    if beside is not None:
        runner.register_hook(beside)
    recorder = Recorder()
    runner.register_hook(recorder, priority='LOWEST')
    runner.run([DataLoader(data, batch_size=None)], [('train', 1)])
    with open(osp.join(work_dir, 'run.log')) as f:
        log = f.read()
    return model, recorder.momenta, log

ours = build_from_cfg(hook_cfg, HOOKS)
args = {{k: v for k, v in hook_cfg.items() if k != 'type'}}
model_ours, momenta_ours, log = train(ours, 'ours')
model_theirs, momenta_theirs, _ = train(SelfSupHook(**args), 'theirs')
try:  # MMSelfSup's hook would train on with the target off the steps
    train(build_from_cfg(dict(hook_cfg, update_interval=1), HOOKS), 'off')
    refused = None
except ValueError as error:
    refused = str(error)
try:  # the README's line added beside the config's own BYOLHook
    train(build_from_cfg(hook_cfg, HOOKS), 'both',
          beside=SelfSupHook(**args))
    both = None
except ValueError as error:
    both = str(error)
state_ours, state_theirs = (m.target_net.state_dict()
                            for m in (model_ours, model_theirs))
torch.manual_seed(0)  # seed 0 again: the initial weights
initial = build_algorithm(cfg.model)
initial.init_weights()
print(json.dumps(dict(
    shipped=shipped, plain_before=plain_before, built=name(type(ours)),
    refused=refused, both=both,
    momenta_ours=momenta_ours, momenta_theirs=momenta_theirs,
    targets_equal=all(torch.equal(state_ours[k], state_theirs[k])
                      for k in state_ours),
    target_moved=not all(
        torch.equal(v, initial.target_net.state_dict()[k])
        for k, v in state_ours.items() if v.is_floating_point()),
    max_iters=cfg.runner.max_epochs * len(data),
    hook_line=[line for line in log.splitlines()
               if 'momentum_hook.mmcv_hook.MomentumUpdateHook(' in line])))
'''
# fmt: on


@pytest.fixture(scope='module')
def mmselfsup_order(tmp_path_factory):
    return run_python(MMSELFSUP_ORDER, tmp_path_factory.mktemp('selfsup'))


def test_plain_import_tells_which_class_the_plain_names_build(mmselfsup_order):
    report, stderr = mmselfsup_order
    assert report['plain_before'] == SELFSUP_HOOK
    (message,) = {line for line in stderr.splitlines() if SELFSUP_HOOK in line}
    assert "type='MomentumUpdateHook' and type='BYOLHook'" in message
    assert "custom_imports = dict(imports=['momentum_hook_dropin']" in message


def test_every_shipped_config_builds_our_hook_in_an_mmselfsup_process(
    mmselfsup_order,
):
    report, _ = mmselfsup_order
    shipped = report['shipped']
    assert set(shipped) >= {
        'mmcv_momentum_hook.py',
        'mmcv_byol_fragment.py',
        'mmengine_momentum_hook.py',
        'mmengine_byol_fragment.py',
        'byol_digits.py',
    }
    for config, built in shipped.items():
        framework = 'mmengine' if 'mmengine' in config else 'mmcv'
        assert built == [OURS[framework]] * len(built), config
    assert sum(map(len, shipped.values())) >= 5


def test_dropin_gives_mmselfsup_momenta_and_targets_bit_for_bit(
    mmselfsup_order,
):
    from momentum_testing import reference_momentum

    report, _ = mmselfsup_order
    assert report['built'] == OURS['mmcv']
    max_iters = report['max_iters']
    # update_interval=2: the momentum changes before odd iterations only.
    expected, m = [], 0.99
    for k in range(max_iters):
        if (k + 1) % 2 == 0:
            m = reference_momentum(k, max_iters, 0.99)
        expected.append(m)
    assert report['momenta_theirs'] == expected
    assert report['momenta_ours'] == expected
    assert report['targets_equal'] and report['target_moved']


def test_dropin_refuses_an_interval_off_distoptimizerhook_steps(
    mmselfsup_order,
):
    report, _ = mmselfsup_order
    assert report['refused'].startswith(
        'update_interval=1 does not follow the optimizer, which steps every '
        '2 iterations (DistOptimizerHook accumulates over 2)'
    )


def test_our_hook_beside_mmselfsups_own_is_refused(mmselfsup_order):
    report, _ = mmselfsup_order
    message = report['both']
    assert message.startswith('the runner has 2 momentum hooks, ')
    assert f'{SELFSUP_HOOK}(end_momentum=1.0, update_interval=2)' in message
    keep = message[message.index('Keep one: ') :]
    assert keep.startswith('Keep one: keep runner.hooks[')
    assert (
        f'{OURS["mmcv"]}(end_momentum=1.0, update_interval=2) and '
        "delete the other package's hook" in keep
    )


def test_the_run_log_names_the_hook_and_its_arguments(mmselfsup_order):
    report, _ = mmselfsup_order
    (line,) = report['hook_line']
    assert (
        'MomentumUpdateHook(end_momentum=1.0, update_interval=2, '
        'reach_end_momentum=False) schedules the target momentum of BYOL '
        'from base_momentum=0.99 over 8 iterations'
    ) in line


def test_dropin_before_mmselfsup_keeps_mmselfsup_importable(tmp_path):
    report, stderr = run_python(
        """
        import json
        import momentum_hook_dropin
        from mmselfsup.apis import train_model  # no duplicate-name KeyError
        from mmselfsup.core import hooks
        from mmcv.runner import HOOKS
        from mmengine.registry import HOOKS as MMENGINE_HOOKS
        def name(cls):
            return f'{cls.__module__}.{cls.__qualname__}'
        print(json.dumps(dict(
            mmcv=[name(HOOKS.get(n)) for n in ('MomentumUpdateHook',
                                               'BYOLHook')],
            mmengine=[name(MMENGINE_HOOKS.get(n))
                      for n in ('MomentumUpdateHook', 'BYOLHook')],
            theirs=name(hooks.MomentumUpdateHook),
            replaced={k: {n: name(c) for n, c in v.items()}
                      for k, v in momentum_hook_dropin.REPLACED.items()})))
    """,
        tmp_path,
    )
    assert report['mmcv'] == [OURS['mmcv']] * 2
    assert report['mmengine'] == [OURS['mmengine']] * 2
    assert report['theirs'] == SELFSUP_HOOK
    assert report['replaced'] == {
        'momentum_hook.mmcv_hook': {
            'MomentumUpdateHook': SELFSUP_HOOK,
            'BYOLHook': SELFSUP_HOOK,
        },
        'momentum_hook.mmengine_hook': {},
    }
    assert SELFSUP_HOOK not in stderr  # no report of a fallback
