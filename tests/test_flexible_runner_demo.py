"""The demo on MMEngine's FlexibleRunner with FSDP and DeepSpeed, as a user
starts it.

One short run of ``torchrun --nproc_per_node=2 -m momentum_hook.demo
configs/byol_digits_fsdp.py --launcher pytorch`` and one of
``configs/byol_digits_deepspeed.py`` (ZeRO-3; 2 epochs of 2 iterations on
two gloo ranks each, ``DS_ACCELERATOR`` unset, as a user starts it on a
CPU-only machine), judged by what they write: the results in the
documented schema, the hook's momentum in MMEngine's scalar log against the
schedule's formula, and the exported target, an ordinary state dict of the
demo's target network, equal to the target in the strategy's own
checkpoint. The input errors of this path go through ``main(argv)``.
"""

import json
import os
import os.path as osp
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from momentum_testing import free_port, reference_momentum

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.mmcv,
    pytest.mark.mmengine,
    pytest.mark.deepspeed,
    pytest.mark.slow,
]
pytest.importorskip('mmcv')
pytest.importorskip('mmengine')
pytest.importorskip('deepspeed')
pytest.importorskip('sklearn', reason='the demo needs scikit-learn')
from momentum_hook.demo.__main__ import main
from momentum_hook.demo.data import DigitsTwoViews
from momentum_hook.demo.model import DigitsBYOL
from momentum_hook.demo.train import default_config_path

CONFIGS = {
    name: osp.join(
        osp.dirname(default_config_path()), f'byol_digits_{name}.py'
    )
    for name in ('fsdp', 'deepspeed')
}
CONFIG = CONFIGS['fsdp']
EPOCHS, BATCH, RANKS = 2, 256, 2
SHORT = [
    f'runner.max_epochs={EPOCHS}',
    'data.train.repeat=1',
    f'data.samples_per_gpu={BATCH}',
    'log_config.interval=1',
    'evaluation.episodes=3',
]


@pytest.fixture(scope='module', params=sorted(CONFIGS))
def sharded_run(request, tmp_path_factory):
    """``(work_dir, process, strategy name)`` of a short run."""
    work_dir = str(tmp_path_factory.mktemp(f'{request.param}_run'))
    torchrun = osp.join(osp.dirname(sys.executable), 'torchrun')
    env = dict(os.environ, OMP_NUM_THREADS='1')
    env.pop('DS_ACCELERATOR', None)  # DeepSpeed finds the CPU itself
    proc = subprocess.run(
        [
            torchrun,
            f'--nproc_per_node={RANKS}',
            f'--master_port={free_port()}',
            '-m',
            'momentum_hook.demo',
            CONFIGS[request.param],
            '--launcher',
            'pytorch',
            '--device',
            'cpu',
            '--work-dir',
            work_dir,
            '--cfg-options',
            *SHORT,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return work_dir, proc, request.param


def checkpointed_state(work_dir, strategy):
    """The whole model's weights as the strategy's own checkpoint after the
    last epoch holds them: FSDPStrategy's full state dict (gathered by
    MMEngine), or DeepSpeed's ZeRO-3 partitions put together by DeepSpeed's
    ``zero_to_fp32``."""
    path = osp.join(work_dir, f'epoch_{EPOCHS}.pth')
    if strategy == 'fsdp':
        return torch.load(path, weights_only=False)['state_dict']
    from deepspeed.utils.zero_to_fp32 import (
        get_fp32_state_dict_from_zero_checkpoint,
    )

    return get_fp32_state_dict_from_zero_checkpoint(
        work_dir, tag=osp.basename(path)
    )


def test_the_sharded_run_writes_results_and_plot(sharded_run):
    work_dir, proc, _ = sharded_run
    results = json.loads(Path(work_dir, 'results.json').read_text())
    metrics = {'1-shot', '5-shot', 'knn'}  # the single-process schema
    assert {name: set(scores) for name, scores in results.items()} == dict(
        byol=metrics, random_init=metrics, pixels=metrics
    )
    assert results['byol'] != results['random_init']  # it trained
    assert 'BYOL encoder' in proc.stdout
    with open(osp.join(work_dir, 'momentum_and_loss.png'), 'rb') as f:
        assert f.read(8) == b'\x89PNG\r\n\x1a\n'


def test_the_sharded_run_logs_the_scheduled_momentum(sharded_run):
    work_dir, _, _ = sharded_run
    per_epoch = len(DigitsTwoViews(repeat=1)) // (BATCH * RANKS)
    max_iters = EPOCHS * per_epoch
    (scalars,) = [
        osp.join(root, 'scalars.json')
        for root, _, files in os.walk(work_dir)
        if 'scalars.json' in files
    ]
    with open(scalars) as f:
        records = [json.loads(line) for line in f]
    assert [r['step'] for r in records] == list(range(1, max_iters + 1))
    for record in records:  # MMEngine's log rounds to 4 decimals
        assert record['target_momentum'] == pytest.approx(
            reference_momentum(record['step'] - 1, max_iters, 0.99), abs=1e-4
        )


def test_the_exported_target_is_the_demo_target_network(sharded_run):
    work_dir, _, strategy = sharded_run
    exported = torch.load(
        osp.join(work_dir, 'target_net.pth'), weights_only=True
    )
    target = DigitsBYOL(widths=(16, 32, 64)).target_net
    assert list(exported) == list(target.state_dict())
    target.load_state_dict(exported)  # strict: every key and shape
    # The strategy's own checkpoint holds the same target, bit for bit.
    state = checkpointed_state(work_dir, strategy)
    for key, value in exported.items():
        assert torch.equal(value, state[f'target_net.{key}'])
    assert not torch.equal(
        exported['0.0.0.weight'], state['online_net.0.0.0.weight']
    )


def test_the_deepspeed_engine_steps_every_iteration(sharded_run):
    # DeepSpeed's engine steps (its optimizer, gradient accumulation and
    # clipping) only through MMEngine's DeepSpeedOptimWrapper, and counts
    # samples by the micro batch the demo gives it.
    work_dir, _, strategy = sharded_run
    if strategy != 'deepspeed':
        pytest.skip('DeepSpeed only')
    max_iters = EPOCHS * (len(DigitsTwoViews(repeat=1)) // (BATCH * RANKS))
    states = torch.load(
        osp.join(
            work_dir,
            f'epoch_{EPOCHS}.pth',
            'zero_pp_rank_0_mp_rank_00_model_states.pt',
        ),
        weights_only=False,
        map_location='cpu',
    )
    assert states['global_steps'] == max_iters
    assert states['global_samples'] == max_iters * BATCH * RANKS


@pytest.mark.parametrize(
    'extra, fragment',
    [
        ([], 'start it with torchrun --nproc_per_node=2'),
        (
            ['--launcher', 'pytorch', '--resume-from', '{ckpt}'],
            'the FlexibleRunner configs do not resume',
        ),
    ],
)
def test_the_sharded_path_errors_are_one_line(
    tmp_path, capsys, monkeypatch, extra, fragment
):
    checkpoint = tmp_path / 'ckpt.pth'
    checkpoint.write_bytes(b'')
    # A one-process gloo group through the launcher's environment.
    monkeypatch.setenv('RANK', '0')
    monkeypatch.setenv('WORLD_SIZE', '1')
    monkeypatch.setenv('MASTER_ADDR', '127.0.0.1')
    monkeypatch.setenv('MASTER_PORT', str(free_port()))
    threads = torch.get_num_threads()
    try:
        status = main(
            [
                CONFIG,
                '--device',
                'cpu',
                '--work-dir',
                str(tmp_path / 'w'),
                *[arg.format(ckpt=checkpoint) for arg in extra],
            ]
        )
    finally:
        torch.set_num_threads(threads)
    assert status == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and fragment in err
