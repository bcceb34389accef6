"""A DeepSpeed run resumed inside an accumulation window, on two gloo ranks.

``FlexibleRunner`` with MMEngine's own ``DeepSpeedStrategy`` (ZeRO-2,
``gradient_accumulation_steps=2``) saves ``iter_3.pth``, one iteration into a
window. DeepSpeed does not restore its micro-step counter, so the resumed
run's optimizer steps after iteration 4 (not 3 and 5): the target must be
updated after that real step only, and the log must say why the run is not
the uninterrupted one. The reference: the online weights recorded after each
iteration (the optimizer stepped where they changed) and a float64 EMA.

Two launches, since MMEngine 0.10.7 builds one ``DeepSpeedStrategy`` per
process.
"""

import os.path as osp
from datetime import timedelta

import pytest
import torch
from momentum_testing import (
    assert_matches_reference,
    free_port,
    launch_ranks,
    reference_momentum,
    replay_ema,
    run_scenarios,
    set_rank_environment,
)

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.mmengine,
    pytest.mark.deepspeed,
]
pytest.importorskip('mmengine')
pytest.importorskip('deepspeed')

import test_flexible_runner as flex  # noqa: E402 (after the skip)

RUN = 'zero2_accumulation_2'


def first_run(directory, rank):
    """Train, saving ``iter_3.pth``, and stop before iteration 3."""
    record = flex.recorder()
    runner = flex.build_runner(
        directory,
        flex.deepspeed_strategy(2, stage=2),
        [record, flex.interrupter(3)],
        accumulation=2,
        checkpoint=3,
    )
    try:
        runner.train()
    except flex.Interrupt:
        pass
    return dict(online=record.online)


def resumed_run(directory, rank):
    """Resume ``iter_3.pth`` in a new runner and train to the end."""
    record = flex.recorder()
    runner = flex.build_runner(
        directory,
        flex.deepspeed_strategy(2, stage=2),
        [record],
        accumulation=2,
        resume_from=osp.join(directory, 'iter_3.pth'),
    )
    runner.train()
    model = flex.unwrapped(runner)
    return dict(
        initial=record.initial,
        online=record.online,
        final=flex.gather(runner, model.target_net),
        logged=runner.message_hub.get_scalar('train/target_momentum')
        .data[0]
        .tolist(),
        log=flex.log_text(runner) if rank == 0 else None,
    )


def rank_main(rank, port, out_dir, launch):
    set_rank_environment(rank, port, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD='1')
    import deepspeed

    deepspeed.init_distributed(
        dist_backend='gloo', timeout=timedelta(seconds=60)
    )
    directory = osp.join(str(out_dir.parent), RUN)
    scenario = (first_run, resumed_run)[launch]
    run_scenarios(rank, {RUN: lambda rank: scenario(directory, rank)}, out_dir)


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp('ledger_deepspeed')
    runs = []
    for launch in range(2):
        out_dir = base / f'launch{launch}'
        out_dir.mkdir()
        ranks = launch_ranks(
            rank_main, (free_port(), out_dir, launch), out_dir, 'spawn'
        )
        runs.append([rank[RUN] for rank in ranks])
    return runs


def test_the_resumed_target_follows_deepspeeds_real_steps(runs):
    first, resumed = runs
    for before, after in zip(first, resumed):
        assert isinstance(after, dict), after
        online = {2: before['online'][2], **after['online']}
        stepped = [
            k
            for k in range(3, flex.ITERS)
            if not all(
                torch.equal(a, b) for a, b in zip(online[k - 1], online[k])
            )
        ]
        assert stepped == [4]  # not 3 and 5: a new window from iteration 3
        momenta = [
            reference_momentum(k, flex.ITERS, flex.BASE) for k in stepped
        ]
        assert after['logged'][-len(momenta) :] == momenta
        assert_matches_reference(
            after['final'],
            replay_ema(
                after['initial'], [online[k] for k in stepped], momenta
            ),
        )
    log = resumed[0]['log']
    assert (
        log.count(
            'resumed at iteration 3, inside a gradient-accumulation '
            'window of 2 '
            'iterations'
        )
        == 1
    )
    assert (
        'DeepSpeed does not restore its micro-step counter: its '
        'optimizer now steps after iterations 4, 6, ...'
    ) in log
