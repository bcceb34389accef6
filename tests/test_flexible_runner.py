"""The momentum hook in MMEngine's ``FlexibleRunner``, FSDP and DeepSpeed.

One launch of two gloo ranks (CPU) runs every scenario of ``SCENARIOS``:
each builds real ``FlexibleRunner`` objects with ``FSDPStrategy`` or
``DeepSpeedStrategy`` (ZeRO-3), the hook in ``custom_hooks`` as a config
names it, and records the whole target and online weights (gathered with
torch's and DeepSpeed's own APIs) and the momenta. The tests judge the
records against a float64 EMA replayed from the recorded online weights and
the schedule's formula (``momentum_testing``), resumed runs against the
uninterrupted one, bit for bit (the target, and AdamW's ``exp_avg`` and
``exp_avg_sq`` under FSDP), and the errors by their messages. An in-process
test covers the export of a model without a process group.

MMEngine 0.10.7 and DeepSpeed 0.19.6 as installed, nothing stubbed: the
strategies are MMEngine's own ``FSDPStrategy`` and ``DeepSpeedStrategy``
and the package's ``momentum_hook.FSDPResumeStrategy``.

The ranks are spawned, not forked: forked after the MMEngine runners of
other test modules ran in this process, they hang.
"""

import functools
import os.path as osp
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from momentum_testing import (
    SHARDED_WORLD_SIZE,
    ZERO3_ON_GLOO,
    Interrupt,
    assert_matches_reference,
    free_port,
    gather_zero3,
    launch_ranks,
    raised,
    reference_momentum,
    replay_ema,
    run_scenarios,
    set_rank_environment,
)
from torch import nn
from torch.utils.data import Dataset

from momentum_hook import MomentumTargetMixin
from momentum_hook.export import export_target

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.mmengine,
    pytest.mark.deepspeed,
    pytest.mark.slow,
]
pytest.importorskip('mmengine')
pytest.importorskip('deepspeed')

HOOK = 'momentum_hook.MomentumUpdateHook'
RESUME_STRATEGY = 'momentum_hook.FSDPResumeStrategy'
BASE = 0.5
ITERS = 6


class Samples(Dataset):
    """``num_samples`` fixed random 2-vectors, ``dict(inputs=...)``."""

    def __init__(self, num_samples):
        self.inputs = torch.randn(
            num_samples, 2, generator=torch.Generator().manual_seed(0)
        )

    def __len__(self):
        return len(self.inputs)

    def __getitem__(self, index):
        return dict(inputs=self.inputs[index])


def build_model():
    """A BYOL-shaped regression with a momentum target, seeded alike on
    every rank; ``seen`` holds the momentum in each training forward."""
    from mmengine.model import BaseModel

    class FlexModel(MomentumTargetMixin, BaseModel):
        def __init__(self):
            super().__init__()
            self.online_net = nn.Sequential(
                nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1)
            )
            self.target_net = self.init_momentum_target(
                self.online_net, base_momentum=BASE
            )
            self.seen = []

        def forward(self, inputs, data_samples=None, mode='tensor'):
            with torch.no_grad():
                target = self.target_net(inputs.flip(1))
            output = self.online_net(inputs)
            self.seen.append(self.momentum)
            goal = 3 * inputs[:, :1] - inputs[:, 1:] + 0.1 * target
            return dict(loss=(output - goal).pow(2).mean())

    torch.manual_seed(0)
    return FlexModel()


def unwrapped(runner):
    """The user's model: under FSDP ``runner.model.module``, under DeepSpeed
    the engine's ``module`` (``runner.model.model.module``)."""
    model = runner.model
    if hasattr(model, 'model'):  # MMDeepSpeedEngineWrapper
        return model.model.module
    return model.module


def gather(runner, network):
    """The whole parameters of ``network`` (a list), from every rank."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    params = list(network.parameters())
    if hasattr(params[0], 'ds_tensor'):
        return gather_zero3(params)
    with FSDP.summon_full_params(runner.model, writeback=False):
        return [param.detach().clone() for param in network.parameters()]


def recorder():
    """A hook recording the gathered online weights after each iteration,
    and the initial target."""
    from mmengine.hooks import Hook

    class Recorder(Hook):
        priority = 'LOWEST'

        def __init__(self):
            self.online, self.initial = {}, None

        def before_train(self, runner):
            self.initial = gather(runner, unwrapped(runner).target_net)

        def after_train_iter(
            self, runner, batch_idx, data_batch=None, outputs=None
        ):
            self.online[runner.iter] = gather(
                runner, unwrapped(runner).online_net
            )

    return Recorder()


def interrupter(k):
    from mmengine.hooks import Hook

    class InterruptBefore(Hook):
        def before_train_iter(self, runner, batch_idx, data_batch=None):
            if runner.iter == k:
                raise Interrupt

    return InterruptBefore()


def fsdp_strategy(policy=True, cls='FSDPStrategy', **options):
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    wrapper = dict(type='MMFullyShardedDataParallel', device_id='cpu')
    if policy:  # online and target: separate units
        wrapper['auto_wrap_policy'] = ModuleWrapPolicy({nn.Sequential})
    return dict(type=cls, model_wrapper=wrapper, **options)


def optimizer_state(runner):
    """This rank's optimizer state under FSDP (``{index: {'step',
    'exp_avg', 'exp_avg_sq'}}``, the shards this rank holds), copied; None
    under DeepSpeed."""
    if hasattr(runner.model, 'model'):  # MMDeepSpeedEngineWrapper
        return None
    return {
        index: {key: value.clone() for key, value in state.items()}
        for index, state in runner.optim_wrapper.optimizer.state_dict()[
            'state'
        ].items()
    }


def deepspeed_strategy(accumulation=1, stage=3, sequential=True):
    zero = dict(stage=stage)
    if stage == 3 and sequential:
        zero.update(ZERO3_ON_GLOO)
    return dict(
        type='DeepSpeedStrategy',
        config=dict(zero_allow_untested_optimizer=True),
        zero_optimization=zero,
        gradient_accumulation_steps=accumulation,
        train_micro_batch_size_per_gpu=2,
    )


def build_runner(
    work_dir,
    strategy,
    hooks,
    by_epoch=False,
    accumulation=1,
    update_interval=None,
    checkpoint=None,
    resume_from=None,
):
    """A real FlexibleRunner of ``ITERS`` iterations (2 epochs of 3 by
    epoch) on batches of 2 per rank, with a stateful optimizer, so that a
    resume must restore it: AdamW under FSDP (two moments per parameter,
    which torch's full optimizer state dict mixes up on the CPU), SGD with
    momentum under DeepSpeed."""
    from mmengine.runner._flexible_runner import FlexibleRunner

    if strategy['type'] == 'DeepSpeedStrategy':
        optim_wrapper = dict(
            type='DeepSpeedOptimWrapper',
            optimizer=dict(type='SGD', lr=0.1, momentum=0.5),
        )
    else:
        optim_wrapper = dict(
            optimizer=dict(type='AdamW', lr=0.05),
            accumulative_counts=accumulation,
        )
    train_cfg = (
        dict(by_epoch=True, max_epochs=2)
        if by_epoch
        else dict(by_epoch=False, max_iters=ITERS)
    )
    samples = ITERS * 2 * SHARDED_WORLD_SIZE // (2 if by_epoch else 1)
    hook = dict(type=HOOK, update_interval=update_interval or accumulation)
    return FlexibleRunner(
        model=build_model(),
        work_dir=work_dir,
        strategy=strategy,
        experiment_name=osp.basename(work_dir),
        train_dataloader=dict(
            dataset=Samples(samples),
            batch_size=2,
            sampler=dict(type='DefaultSampler', shuffle=False),
            collate_fn=dict(type='default_collate'),
        ),
        optim_wrapper=optim_wrapper,
        train_cfg=train_cfg,
        default_hooks=dict(
            logger=dict(type='LoggerHook', interval=1),
            checkpoint=checkpoint
            and dict(
                type='CheckpointHook', interval=checkpoint, by_epoch=False
            ),
        ),
        log_processor=dict(by_epoch=by_epoch),
        custom_hooks=[hook, *hooks],
        load_from=resume_from,
        resume=resume_from is not None,
    )


def log_text(runner):
    with open(osp.join(runner.log_dir, f'{runner.timestamp}.log')) as f:
        return f.read()


def training(work_dir, strategy, rank, **options):
    """Train to the end; the record of what the target and the hook did."""
    record, directory = recorder(), work_dir()
    runner = build_runner(directory, strategy, [record], **options)
    runner.train()
    model = unwrapped(runner)
    logged = runner.message_hub.get_scalar('train/target_momentum')
    return dict(
        initial=record.initial,
        online=record.online,
        seen=model.seen,
        final=gather(runner, model.target_net),
        logged=logged.data[0].tolist(),
        optimizer=optimizer_state(runner),
        log=log_text(runner) if rank == 0 else None,
        export=export_and_reload(runner, directory, rank),
    )


def export_and_reload(runner, directory, rank):
    """What export_target wrote, read back on rank 0; its return value on
    the other ranks, and whether they wrote a file."""
    # Rank 1 names a file of its own, to see that it writes nothing.
    path = osp.join(directory, f'teacher{rank}.pth')
    returned = export_target(runner.model, path)
    if rank != 0:
        return dict(returned=returned, wrote=osp.exists(path))
    return dict(loaded=torch.load(path, weights_only=True))


def refused(work_dir, strategy, rank, **options):
    """A run that must stop before iteration 1: its error, and whether any
    forward pass ran."""
    runner = build_runner(work_dir(), strategy, [], **options)
    try:
        runner.train()
    except ValueError as error:
        seen = unwrapped(runner).seen
        return ('raised', 'ValueError', str(error), len(seen))
    return 'trained'


def interrupted_and_resumed(
    work_dir, strategy, rank, resume_strategy=None, stop=4, accumulation=1
):
    """Save at iteration ``stop``, crash before it, resume in a new runner.

    Returns the resumed run's momenta in training forward passes, the
    final target, gathered, and this rank's optimizer state.
    """
    directory = work_dir()
    first = build_runner(
        directory,
        strategy,
        [interrupter(stop)],
        checkpoint=stop,
        accumulation=accumulation,
    )
    try:
        first.train()
    except Interrupt:
        pass
    return resumed(directory, resume_strategy or strategy, stop, accumulation)


def resumed(directory, strategy, stop, accumulation, rank=0):
    """A new runner resumed from ``directory``'s ``iter_{stop}.pth``."""
    runner = build_runner(
        directory,
        strategy,
        [],
        accumulation=accumulation,
        resume_from=osp.join(directory, f'iter_{stop}.pth'),
    )
    runner.train()
    model = unwrapped(runner)
    return dict(
        seen=model.seen,
        final=gather(runner, model.target_net),
        optimizer=optimizer_state(runner),
    )


def resumed_by_mmengine_fsdp(work_dir, strategy, rank):
    """MMEngine 0.10.7's own FSDP resume: its error."""
    try:
        interrupted_and_resumed(work_dir, strategy, rank, stop=2)
    except TypeError as error:
        return ('raised', 'TypeError', str(error))
    return 'resumed'


def saved_by_mmengine_fsdp_full(work_dir, strategy, rank):
    """A checkpoint of MMEngine's ``FSDPStrategy`` with
    ``state_dict_cfg='full'``, resumed by ``FSDPResumeStrategy``: whether
    its Adam moments are corrupted as saved, and the resume's error."""
    directory = work_dir()
    first = build_runner(
        directory,
        fsdp_strategy(state_dict_cfg='full'),
        [interrupter(2)],
        checkpoint=2,
    )
    try:
        first.train()
    except Interrupt:
        pass
    dist.barrier()  # rank 0 has written the file
    saved = torch.load(
        osp.join(directory, 'iter_2.pth'),
        weights_only=False,
        map_location='cpu',
    )['optimizer']['state']
    corrupted = all(
        torch.equal(state['exp_avg'], state['exp_avg_sq'])
        for state in saved.values()
    )
    try:
        resumed(directory, strategy, 2, 1)
    except ValueError as error:
        return dict(corrupted=corrupted, error=str(error))
    return dict(corrupted=corrupted, error=None)


#: The directory of the DeepSpeed run whose checkpoint launch 2 resumes.
ZERO3_RUN = 'zero3_by_iter_accumulation_2'


def launches(out_dir):
    """The scenarios of each launch. MMEngine 0.10.7 builds one
    ``DeepSpeedStrategy`` per process (a second one raises ``KeyError:
    'DeepSpeedCPUAdam is already registered'``), so each launch has one."""

    def work_dir(name):
        return lambda: osp.join(
            out_dir, name.replace(' ', '_').replace(',', '')
        )

    fsdp, zero = fsdp_strategy, deepspeed_strategy
    table = [
        {
            'fsdp by iter, accumulation 2': functools.partial(
                training, strategy=fsdp(), accumulation=2
            ),
            'zero3 by iter, accumulation 2': functools.partial(
                training, strategy=zero(2), accumulation=2, checkpoint=4
            ),
            'fsdp root only': functools.partial(
                refused, strategy=fsdp(policy=False)
            ),
            'fsdp accumulation 2, update_interval 1': functools.partial(
                refused, strategy=fsdp(), accumulation=2, update_interval=1
            ),
        },
        {
            'zero3 resumed, accumulation 2': lambda rank: resumed(
                osp.join(out_dir, ZERO3_RUN), zero(2), 4, 2
            ),
            'fsdp resumed by MMEngine': functools.partial(
                resumed_by_mmengine_fsdp, strategy=fsdp()
            ),
            'fsdp full checkpoint of MMEngine, resumed': functools.partial(
                saved_by_mmengine_fsdp_full,
                strategy=fsdp(cls=RESUME_STRATEGY, state_dict_cfg='full'),
            ),
        },
        {
            'zero2 by epoch': functools.partial(
                training, strategy=zero(stage=2), by_epoch=True
            ),
            'fsdp by epoch': functools.partial(
                training, strategy=fsdp(), by_epoch=True
            ),
        },
        {
            'zero3 accumulation 2, update_interval 1': functools.partial(
                refused, strategy=zero(2), update_interval=1
            ),
            'fsdp resumed, full state dict': functools.partial(
                interrupted_and_resumed,
                strategy=fsdp(cls=RESUME_STRATEGY, state_dict_cfg='full'),
                accumulation=2,
            ),
            'fsdp resumed, local state dict': functools.partial(
                interrupted_and_resumed,
                strategy=fsdp(cls=RESUME_STRATEGY),
                accumulation=2,
            ),
        },
        {
            'zero3 gathering all at once on gloo': functools.partial(
                refused, strategy=zero(sequential=False)
            ),
        },
    ]
    return [
        {
            name: functools.partial(scenario, work_dir(name))
            if isinstance(scenario, functools.partial)
            else scenario
            for name, scenario in launch.items()
        }
        for launch in table
    ]


def rank_main(rank, port, out_dir, launch):
    set_rank_environment(rank, port, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD='1')
    import deepspeed

    import momentum_hook.mmengine_strategies  # noqa: F401, registers it

    deepspeed.init_distributed(
        dist_backend='gloo', timeout=timedelta(seconds=60)
    )
    scenarios = launches(str(out_dir.parent))[launch]
    run_scenarios(rank, scenarios, out_dir)


@pytest.fixture(scope='module')
def results(tmp_path_factory):
    """``results[name]``: the two ranks' results of scenario ``name``."""
    base = tmp_path_factory.mktemp('flexible')
    results = {}
    for launch, scenarios in enumerate(launches(str(base))):
        out_dir = base / f'launch{launch}'
        out_dir.mkdir()
        ranks = launch_ranks(
            rank_main, (free_port(), out_dir, launch), out_dir, 'spawn'
        )
        results.update(
            {name: [rank[name] for rank in ranks] for name in scenarios}
        )
    return results


#: The trainings: (update_interval, by_epoch).
TRAININGS = {
    'fsdp by iter, accumulation 2': 2,
    'fsdp by epoch': 1,
    'zero3 by iter, accumulation 2': 2,
    'zero2 by epoch': 1,
}


def expected_momenta(update_interval):
    """``{k: m_k}`` for the iterations that update the target."""
    return {
        k: reference_momentum(k, ITERS, BASE)
        for k in range(ITERS)
        if (k + 1) % update_interval == 0
    }


@pytest.mark.parametrize('name', TRAININGS)
def test_the_target_follows_the_schedule_and_the_reference(results, name):
    momenta = expected_momenta(TRAININGS[name])
    for record in results[name]:
        assert isinstance(record, dict), record
        online = [record['online'][k] for k in momenta]
        assert not torch.equal(online[0][0], online[-1][0])  # it trained
        assert_matches_reference(
            record['final'],
            replay_ema(record['initial'], online, list(momenta.values())),
        )
        # What the model held in each forward: the last momentum written.
        current, seen = BASE, []
        for k in range(ITERS):
            current = momenta.get(k, current)
            seen.append(current)
        assert record['seen'] == seen
        assert record['logged'] == list(momenta.values())


@pytest.mark.parametrize('name', TRAININGS)
def test_the_log_says_which_hook_was_built(results, name):
    log = results[name][0]['log']
    assert (
        'momentum_hook.mmengine_hook.MomentumUpdateHook(end_momentum=1.0,'
        f' update_interval={TRAININGS[name]}, reach_end_momentum=False) '
        'schedules the target momentum of FlexModel from '
        f'base_momentum={BASE} over {ITERS} iterations'
    ) in log
    first = next(iter(expected_momenta(TRAININGS[name]).values()))
    assert f'target_momentum: {first:.4f}' in log


@pytest.mark.parametrize('name', TRAININGS)
def test_export_writes_the_full_target_on_rank_0(results, name):
    first, second = results[name]
    loaded = first['export']['loaded']
    assert list(loaded) == ['0.weight', '0.bias', '2.weight', '2.bias']
    for tensor, expected in zip(loaded.values(), first['final']):
        assert tensor.device.type == 'cpu'
        assert torch.equal(tensor, expected)
    assert second['export'] == dict(returned=None, wrote=False)


@pytest.mark.parametrize(
    'name, resumed_from',
    [
        ('fsdp resumed, full state dict', 'fsdp by iter, accumulation 2'),
        ('fsdp resumed, local state dict', 'fsdp by iter, accumulation 2'),
        ('zero3 resumed, accumulation 2', 'zero3 by iter, accumulation 2'),
    ],
)
def test_a_resumed_run_ends_with_the_uninterrupted_target(
    results, name, resumed_from
):
    for resumed, whole in zip(results[name], results[resumed_from]):
        assert isinstance(resumed, dict), resumed
        stop = ITERS - len(resumed['seen'])
        assert stop == 4
        # The momenta of the update iterations k = 5 (m is written before
        # the forward of an update iteration; the others see what the
        # model's attribute holds, which no checkpoint keeps).
        updates = [k for k in range(stop, ITERS) if (k + 1) % 2 == 0]
        assert (
            [resumed['seen'][k - stop] for k in updates]
            == [whole['seen'][k] for k in updates]
            == [reference_momentum(k, ITERS, BASE) for k in updates]
        )
        for a, b in zip(resumed['final'], whole['final']):
            assert torch.equal(a, b)
        if whole['optimizer'] is not None:  # FSDP: this rank's AdamW state
            assert_same_adam_state(resumed['optimizer'], whole['optimizer'])


def assert_same_adam_state(resumed, whole):
    """Both moments of every parameter shard, bit for bit; and the moments
    are not degenerate (``exp_avg`` and ``exp_avg_sq`` differ)."""
    assert resumed.keys() == whole.keys() and whole
    for index, state in whole.items():
        assert state.keys() >= {'step', 'exp_avg', 'exp_avg_sq'}
        for key, value in state.items():
            assert torch.equal(resumed[index][key], value), (index, key)
        if state['exp_avg'].numel():
            assert not torch.equal(state['exp_avg'], state['exp_avg_sq'])


@pytest.mark.parametrize(
    'name, fragments',
    [
        (
            'fsdp root only',
            (
                'is flattened into an FSDP1 unit that is not inside the '
                'network',
                'In this FlexibleRunner with FSDPStrategy, set strategy=dict('
                "type='FSDPStrategy', model_wrapper=dict("
                "type='MMFullyShardedDataParallel', "
                'auto_wrap_policy=ModuleWrapPolicy(',
            ),
        ),
        (
            'fsdp accumulation 2, update_interval 1',
            (
                'update_interval=1 does not follow the optimizer, which '
                'steps every '
                '2 iterations (optim_wrapper has accumulative_counts=2)',
                'set update_interval=2',
            ),
        ),
        (
            'zero3 accumulation 2, update_interval 1',
            (
                'update_interval=1 does not follow the optimizer, which '
                'steps every '
                '2 iterations (DeepSpeed has gradient_accumulation_steps=2: '
                "strategy=dict(type='DeepSpeedStrategy', "
                'gradient_accumulation_steps=2))',
                'set update_interval=2',
            ),
        ),
    ],
)
def test_an_unusable_set_up_stops_before_iteration_1(results, name, fragments):
    for result in results[name]:
        message = raised(result)
        for fragment in fragments:
            assert fragment in message
        assert result[3] == 0  # no forward pass ran


def test_mmengine_fsdp_resume_fails_on_the_optimizer_state(results):
    # What momentum_hook.FSDPResumeStrategy works around (MMEngine 0.10.7
    # calls FSDP.optim_state_dict_to_load with the old argument order).
    for result in results['fsdp resumed by MMEngine']:
        assert raised(result, TypeError) == "unhashable type: 'dict'"


def test_a_corrupted_full_checkpoint_of_mmengine_is_refused(results):
    # MMEngine's FSDPStrategy, state_dict_cfg='full', saves AdamW's
    # exp_avg_sq as exp_avg too (torch 2.14's full optimizer state dict on
    # the CPU); FSDPResumeStrategy refuses to resume from it.
    for result in results['fsdp full checkpoint of MMEngine, resumed']:
        assert isinstance(result, dict), result
        assert result['corrupted']
        assert result['error'].startswith('the optimizer state of ') and (
            'is corrupted: every exp_avg equals its exp_avg_sq'
            in result['error']
        )
        assert "type='momentum_hook.FSDPResumeStrategy'" in result['error']


def test_export_of_an_unwrapped_model_and_of_a_wrong_name(tmp_path):
    model = build_model()
    path = tmp_path / 'teacher.pth'
    returned = export_target(model, str(path))
    expected = model.target_net.state_dict()
    for saved in (returned, torch.load(path, weights_only=True)):
        assert list(saved) == list(expected)
        assert all(torch.equal(saved[key], expected[key]) for key in saved)
    with pytest.raises(
        ValueError,
        match=r"no target network 'teacher': "
        r'pass target=<its attribute path>, one of '
        r"\['data_preprocessor', 'online_net', 'target_net'\]",
    ):
        export_target(model, str(tmp_path / 'other.pth'), target='teacher')
    assert not (tmp_path / 'other.pth').exists()


def test_the_resume_strategy_has_its_scoped_name_only():
    from mmengine.registry import STRATEGIES

    from momentum_hook.mmengine_strategies import FSDPResumeStrategy

    assert STRATEGIES.get(RESUME_STRATEGY) is FSDPResumeStrategy
    assert 'FSDPResumeStrategy' not in STRATEGIES.module_dict


def test_only_equal_adam_moments_are_refused():
    from momentum_hook.mmengine_strategies import check_adam_state

    moments = torch.tensor([0.1, -0.2]), torch.tensor([0.001, 0.004])
    fine = [
        {'exp_avg': moments[0], 'exp_avg_sq': moments[1], 'step': 1},
        {'exp_avg': torch.zeros(2), 'exp_avg_sq': torch.zeros(2)},  # no step
        {'momentum_buffer': moments[0]},  # SGD
    ]
    for state in fine:
        check_adam_state(dict(state={'w': state}, param_groups=[]), 'x')
    corrupted = dict(
        state={
            'w': {'exp_avg': moments[1], 'exp_avg_sq': moments[1].clone()},
            'b': {'exp_avg': torch.zeros(1), 'exp_avg_sq': torch.zeros(1)},
        }
    )
    with pytest.raises(
        ValueError,
        match=r'^the optimizer state of ckpt\.pth '
        r'is corrupted: every exp_avg equals its exp_avg_sq',
    ):
        check_adam_state(corrupted, 'ckpt.pth')
    # One parameter with distinct moments: a real state, accepted.
    corrupted['state']['v'] = fine[0]
    check_adam_state(corrupted, 'ckpt.pth')
