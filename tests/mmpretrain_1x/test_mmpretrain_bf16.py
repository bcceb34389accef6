"""mmpretrain's BYOL with a bfloat16 teacher: FlexibleRunner with a
DeepSpeed ``bf16`` engine on 2 gloo ranks, from mmpretrain's own config.

With the hook, the teacher is the float64 replay of the bfloat16 online
network rounded to bfloat16 (its float32 masters carry the small steps),
and a run resumed from a checkpoint ends bit for bit equal to the
uninterrupted one: the masters travel in the checkpoint's message hub,
each rank's in its own file under ZeRO-3, rank 0's under ZeRO-2.
mmpretrain alone (ZeRO-2, whose parameters are whole on every rank)
averages the bfloat16 teacher in bfloat16, and rounding leaves it away
from that replay.
"""

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip('mmpretrain')
pytest.importorskip('deepspeed')

from mmengine.hooks import Hook  # noqa: E402
from test_mmpretrain import (  # noqa: E402
    HOOK,
    MODELS,
    ZeRO3Recorder,
    _momenta,
    deepspeed_byol,
    init_deepspeed_rank,
    launch_byol,
    replay,
    save_record,
    shrunk_config,
    train,
)

from momentum_hook.mmpretrain import MASTERS_KEY  # noqa: E402

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.deepspeed,
    pytest.mark.mmengine,
    pytest.mark.slow,
]

BF16 = torch.bfloat16


def _bf16_rank(rank, port, tmp_path, out_dir, hook, stage, resume):
    """One rank of a bf16 BYOL run: the whole run (``resume`` False,
    saving a checkpoint after each epoch), or a new run resumed from the
    whole run's checkpoint of epoch 1 (``'without_rank_1'``: rank 1 finds
    no masters in it)."""
    from mmengine.runner._flexible_runner import FlexibleRunner

    init_deepspeed_rank(rank, port)
    work = f'bf16_{stage}_{hook}'
    cfg = deepspeed_byol(
        tmp_path,
        work,
        HOOK if hook else (),
        dict(stage=stage, stage3_param_persistence_threshold=0),
        # A data worker: augmentations seeded per epoch, the same on resume.
        workers=1,
        # DeepSpeed 0.19.6 keeps buffers in float32 unless told, and
        # BatchNorm needs its running statistics in the input's dtype.
        config=dict(data_types=dict(buffer_dtype='bf16')),
        bf16=dict(enabled=True),
        inputs_to_half=['inputs'],
    )
    if resume:
        cfg.work_dir = str(tmp_path / f'{work}_resumed_{resume}')
        cfg.resume = True
        cfg.load_from = str(tmp_path / work / 'epoch_1.pth')
    drop = resume == 'without_rank_1' and rank == 1
    runner, recorder = train(
        cfg,
        MODELS['byol'][1],
        FlexibleRunner,
        ZeRO3Recorder,
        [DropMasters()] if drop else [],
    )
    model = runner.model.model.module
    save_record(
        runner,
        recorder,
        model.target_net,
        out_dir / f'rank{rank}.pth',
        dtype=model.target_net.module[0].conv1.weight.dtype,
        local={
            name: getattr(param, 'ds_tensor', param).detach().clone()
            for name, param in model.named_parameters()
        },
        masters=runner.message_hub.state_dict()['runtime_info'].get(
            MASTERS_KEY
        ),
        iter=runner.iter,
    )


class DropMasters(Hook):
    """Before the momentum hook: the resumed message hub holds no masters
    (as a checkpoint saved without the hook)."""

    priority = 'HIGHEST'

    def before_train(self, runner):
        runner.message_hub.pop_info(MASTERS_KEY)


def _launch(tmp_path, hook, stage, resume=False):
    out = tmp_path / f'out_{hook}_{stage}_{resume}'
    return launch_byol(_bf16_rank, tmp_path, hook, stage, resume, out=out)


def ulps_off(actual, expected):
    """How many bfloat16 ulps (of ``expected``) ``actual`` is from it."""
    ulp = torch.finfo(BF16).eps * torch.exp2(
        torch.floor(torch.log2(expected.abs().clamp_min(2.0**-100)))
    )
    return (actual - expected).abs() / ulp


def replay_distance(result, tmp_path, late=0):
    """The largest distance, in bfloat16 ulps, of the teacher after each
    iteration from the float64 replay of the online network, and the
    fraction of the teacher's parameter elements, over all iterations,
    that are more than half an ulp from it (not the replay rounded). With
    ``late=1`` the teacher after iteration ``k + 1`` is compared with the
    replay after ``k`` (mmpretrain alone updates at the start of the next
    iteration)."""
    mu, mu_end = _momenta('byol', shrunk_config('byol', tmp_path, 'x').model)
    recorder = SimpleNamespace(**result)
    worst, off_count, count = 0.0, 0, 0
    replayed = replay(recorder, result['params'], 4, mu, mu_end)
    for k, expected in enumerate(replayed[: len(replayed) - late]):
        teacher = recorder.teacher[k + late]
        off = torch.cat(
            [
                ulps_off(teacher[key], expected[key]).flatten()
                for key in result['params']
            ]
        )
        worst = max(worst, float(off.max()))
        off_count += int((off > 0.5 + 2**-8).sum())  # beyond float32 noise
        count += off.numel()
    return worst, off_count / count


@pytest.mark.parametrize('stage', [2, 3])
def test_bf16_teacher_follows_replay_and_resumes_bit_for_bit(stage, tmp_path):
    """bf16 under ZeRO-2 (rank 0 writes the one checkpoint every rank
    reads) and ZeRO-3 with every parameter partitioned (each rank its own):
    the teacher is the float64 replay rounded to bfloat16, and a run
    resumed at epoch 1 ends with each rank's parameters (ZeRO-3: its
    partitions) and masters of the whole run, bit for bit."""
    whole = _launch(tmp_path, True, stage)
    resumed = _launch(tmp_path, True, stage, resume=True)
    for rank, (straight, again) in enumerate(zip(whole, resumed)):
        assert straight['dtype'] == BF16
        assert straight['iter'] == again['iter'] == 4
        assert straight['steps'] == again['steps'] == 5
        worst, rounded_off = replay_distance(straight, tmp_path)
        assert worst <= 1.0 and rounded_off == 0, (rank, worst, rounded_off)
        masters = straight['masters']['masters']
        assert masters and masters.keys() == again['masters']['masters'].keys()
        for name, master in masters.items():
            assert master.dtype == torch.float32
            assert torch.equal(master, again['masters']['masters'][name])
        assert straight['local'].keys() == again['local'].keys()
        for name, value in straight['local'].items():
            assert torch.equal(value, again['local'][name]), (rank, name)
    if stage == 2:
        return
    # Rank 1 finds no masters: rank 0's log says so for it.
    _launch(tmp_path, True, stage, resume='without_rank_1')
    log = next(
        (tmp_path / 'bf16_3_True_resumed_without_rank_1').glob('*/*.log')
    ).read_text()
    count = len(whole[1]['masters']['masters'])
    assert (
        'rank 1: momentum_hook: no float32 master in the resumed checkpoint '
        f'rounds to {count} of the {count} low-precision tensors of '
        "BYOL.target_net (first '0.conv1.weight'): it holds none"
    ) in log
    assert 'rank 0: momentum_hook' not in log


@pytest.mark.parametrize('stage', [2, 3])
def test_mmpretrain_alone_leaves_a_bf16_teacher_off_the_replay(
    stage, tmp_path
):
    """bf16 without the hook: under ZeRO-2 (whole parameters on each rank)
    mmpretrain averages the bfloat16 teacher itself, and rounding leaves it
    further from the float64 replay than one rounding; under ZeRO-3 it
    averages 0-element placeholders, as in float32, and the teacher stays
    at its random start. With the hook, within one rounding under both."""
    alone = _launch(tmp_path, False, stage)
    hooked = _launch(tmp_path, True, stage)
    for result in alone:
        assert result['dtype'] == BF16 and result['masters'] is None
        # mmpretrain updates at the start of the next iteration: its
        # teacher after iteration k + 1 is the replay's after k.
        worst, rounded_off = replay_distance(result, tmp_path, late=1)
        print(f'alone: worst {worst:.1f} ulps, {rounded_off:.3%} rounded off')
        assert worst > 1.0
    for result in hooked:
        worst, rounded_off = replay_distance(result, tmp_path)
        print(f'hook: worst {worst:.1f} ulps, {rounded_off:.3%} rounded off')
        assert worst <= 1.0 and rounded_off == 0
