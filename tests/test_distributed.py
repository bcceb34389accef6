"""The demo's training on two gloo ranks (CPU): ``MMDistributedDataParallel``
with a ``DistributedSampler``, the momentum hook on both.

Each rank runs the demo's own ``train()`` on the default config (shortened)
and saves what it ends with; the parent checks that the ranks agree and
that the momentum followed the cosine schedule on every iteration.
"""

import math
import os

import pytest
import torch
import torch.distributed as dist

pytestmark = [pytest.mark.distributed, pytest.mark.mmcv]
pytest.importorskip('mmcv')
pytest.importorskip('sklearn', reason='the demo needs scikit-learn')
from mmcv.runner import Hook
from momentum_testing import free_port, launch_ranks, reference_momentum

from momentum_hook.demo.train import (
    default_config_path,
    init_distributed,
    load_config,
    train,
)

WORLD_SIZE = 2
EPOCHS = 2
OPTIONS = [
    f'runner.max_epochs={EPOCHS}',
    'data.train.repeat=1',
    'data.samples_per_gpu=64',
    'log_config.interval=1',
]


class MomentumRecorder(Hook):
    """Records ``(runner.iter, model.momentum)`` after the hooks before an
    iteration have run (the demo registers it with the lowest priority)."""

    def __init__(self):
        self.seen = []

    def before_train_iter(self, runner):
        self.seen.append((runner.iter, runner.model.module.momentum))


def _rank(rank, port, work_dir, out_dir, options=OPTIONS):
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD_SIZE),
        MASTER_ADDR='127.0.0.1',
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    assert init_distributed('cpu') == (rank, WORLD_SIZE)  # gloo on CPU
    try:
        cfg = load_config(default_config_path(), options)
        recorder = MomentumRecorder()
        runner, initial = train(
            cfg, work_dir, device='cpu', distributed=True, hooks=[recorder]
        )
        model = runner.model.module
        torch.save(
            dict(
                wrapper=type(runner.model).__name__,
                sampler=type(runner.data_loader.sampler).__name__,
                max_iters=runner.max_iters,
                seen=recorder.seen,
                target={
                    k: v.clone()
                    for k, v in model.target_net.named_parameters()
                },
                online={
                    k: v.clone()
                    for k, v in model.online_net.named_parameters()
                },
                initial={
                    k: v.clone()
                    for k, v in initial.target_net.named_parameters()
                },
            ),
            os.path.join(out_dir, f'rank{rank}.pth'),
        )
    finally:
        dist.destroy_process_group()


def _train_on_ranks(tmp_path_factory, options=OPTIONS):
    work_dir = str(tmp_path_factory.mktemp('work'))
    out_dir = tmp_path_factory.mktemp('ranks')
    return launch_ranks(
        _rank, (free_port(), work_dir, out_dir, options), out_dir, 'spawn'
    )


@pytest.fixture(scope='module')
def ranks(tmp_path_factory):
    return _train_on_ranks(tmp_path_factory)


def test_ranks_train_with_mmddp_and_a_distributed_sampler(ranks):
    for result in ranks:
        assert result['wrapper'] == 'MMDistributedDataParallel'
        assert result['sampler'] == 'DistributedSampler'
    # 1,257 images over 2 ranks, 64 per batch, incomplete batch dropped
    assert ranks[0]['max_iters'] == EPOCHS * (math.ceil(1257 / 2) // 64)


def test_target_networks_are_identical_across_ranks(ranks):
    first, second = ranks
    for name, weight in first['target'].items():
        assert torch.equal(weight, second['target'][name]), name
        assert torch.equal(first['online'][name], second['online'][name])
        # the target moved away from its start, and is no copy of online
        assert not torch.equal(weight, first['initial'][name]), name
    assert any(
        not torch.equal(w, first['online'][n])
        for n, w in first['target'].items()
    )


def test_momentum_followed_the_cosine_schedule_on_every_rank(ranks):
    max_iters = ranks[0]['max_iters']
    expected = [
        (k, reference_momentum(k, max_iters, 0.99)) for k in range(max_iters)
    ]
    for result in ranks:
        iters = [k for k, _ in result['seen']]
        assert iters == list(range(max_iters))
        assert [m for _, m in result['seen']] == pytest.approx(
            [m for _, m in expected], abs=1e-12
        )


def test_base_batch_size_scales_the_momenta_by_the_global_batch(
    tmp_path_factory,
):
    """64 per rank x 2 ranks = 128 samples per update; base 512: kappa
    = 1/4 on every rank, and the ranks' targets still agree."""
    ranks = _train_on_ranks(
        tmp_path_factory, OPTIONS + ['custom_hooks.0.base_batch_size=512']
    )
    max_iters = ranks[0]['max_iters']
    expected = [
        reference_momentum(k, max_iters, 0.99) ** 0.25
        for k in range(max_iters)
    ]
    for result in ranks:
        assert [k for k, _ in result['seen']] == list(range(max_iters))
        assert [m for _, m in result['seen']] == pytest.approx(
            expected, rel=0, abs=1e-15
        )
    first, second = ranks
    for name, weight in first['target'].items():
        assert torch.equal(weight, second['target'][name]), name
