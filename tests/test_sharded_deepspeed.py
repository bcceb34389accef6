"""The momentum update under DeepSpeed ZeRO-1, 2 and 3, on two CPU ranks.

``DS_ACCELERATOR=cpu`` makes DeepSpeed run on the CPU over gloo. One launch
of two ranks runs every scenario (``SCENARIOS``), as in ``test_sharded.py``.
Under ZeRO-3 a parameter is a 0-element placeholder whose values live in
each rank's partition (``ds_tensor``), and a *persistent* one (below
``stage3_param_persistence_threshold``) also keeps a gathered copy between
steps; the target is checked both ways: gathered by DeepSpeed, and rebuilt
here from the ranks' partitions.
"""

import functools

import pytest
import torch
from momentum_testing import (
    SHARDED_WORLD_SIZE,
    ZERO3_ON_GLOO,
    TinyBYOL,
    assert_trainings_match,
    build_sharded,
    gather_zero3,
    init_deepspeed_rank,
    raised,
    record_sharded_training,
    replay_ema,
    run_scenarios,
    sharded_results,
)

from momentum_hook import momentum_update_

pytestmark = [pytest.mark.distributed, pytest.mark.deepspeed]
deepspeed = pytest.importorskip('deepspeed')


def config(stage, **zero):
    if stage == 3:  # see ZERO3_ON_GLOO
        zero = {**ZERO3_ON_GLOO, **zero}
    return dict(
        train_micro_batch_size_per_gpu=4,
        optimizer=dict(type='SGD', params=dict(lr=0.1, momentum=0.9)),
        zero_optimization=dict(stage=stage, **zero),
        zero_allow_untested_optimizer=True,
    )


def engine(model, stage, **zero):
    return deepspeed.initialize(model=model, config=config(stage, **zero))[0]


def partitions(network):
    """``network``'s ZeRO-3 parameters rebuilt from every rank's partition."""
    rebuilt = []
    for param in network.parameters():
        pieces = [
            torch.empty_like(param.ds_tensor)
            for _ in range(SHARDED_WORLD_SIZE)
        ]
        torch.distributed.all_gather(pieces, param.ds_tensor.detach())
        rebuilt.append(
            torch.cat(pieces)[: param.ds_numel].view(param.ds_shape)
        )
    return rebuilt


def gather(network):
    return gather_zero3(network.parameters()), {
        name: buffer.detach().clone()
        for name, buffer in network.named_buffers()
    }


def record_forward(network):
    """``network``'s forward passes: a list of ``(input, output)``."""
    calls = []
    network.register_forward_hook(
        lambda module, args, output: calls.append(
            (args[0].detach().clone(), output.detach().clone())
        )
    )
    return calls


def training(
    stage,
    buffers,
    functional=False,
    zero_init=False,
    read_online=False,
    rank=0,
    **zero,
):
    """Train and record (``record_sharded_training``), with the target's
    forward passes. ``read_online``: gather the online network between each
    optimizer step and the update, as a user's hook may (which releases the
    gathered copies of its persistent parameters)."""
    if zero_init:  # partitioned as built: the target copies placeholders
        with deepspeed.zero.Init(config_dict_or_path=config(stage, **zero)):
            model, online, target = build_sharded(buffers)
    else:
        model, online, target = build_sharded(buffers)
    forwards = record_forward(target)
    wrapped = engine(model, stage, **zero)

    def train_step(batch):
        wrapped.backward(wrapped(batch))
        wrapped.step()
        if read_online:
            with deepspeed.zero.GatheredParameters(list(online.parameters())):
                pass

    def update():
        momentum_update_(target, online, model.momentum, buffers)

    initial_online = gather(online)
    record = record_sharded_training(
        rank,
        model,
        online,
        target,
        train_step,
        gather,
        update if functional else None,
    )
    record['initial_online'] = initial_online
    if stage == 3:
        record['partitions'] = partitions(target)
    record['forwards'] = forwards
    return record


def target_outside_the_engine(rank):
    """A ZeRO-3 online network and a target DeepSpeed never partitioned."""
    model, online, target = build_sharded('keep')
    engine(model, 3)
    momentum_update_(TinyBYOL().target_net, online, 0.9)


def persistence_differs(rank):
    """The model's persistence budget (29 elements) holds the online network
    alone: its parameters stay gathered between steps, the target's not."""
    model, online, target = build_sharded('keep')
    engine(
        model,
        3,
        stage3_param_persistence_threshold=100,
        stage3_model_persistence_threshold=29,
    )
    model.momentum_update()


#: The training scenarios and their buffer policies.
TRAININGS = {
    'zero1 keep': ('keep', functools.partial(training, 1, 'keep')),
    'zero2 copy': ('copy', functools.partial(training, 2, 'copy')),
    # Small parameters persistent (bias, BatchNorm, the 2x3 Linear), the
    # first Linear's weight (12 elements) partitioned only.
    'zero3 average, some persistent': (
        'average',
        functools.partial(
            training, 3, 'average', stage3_param_persistence_threshold=10
        ),
    ),
    'zero3 keep, all persistent': (
        'keep',
        functools.partial(training, 3, 'keep'),
    ),
    'zero3 average, built under zero.Init': (
        'average',
        functools.partial(
            training,
            3,
            'average',
            zero_init=True,
            stage3_param_persistence_threshold=10,
        ),
    ),
    'zero3 copy, none persistent, momentum_update_': (
        'copy',
        functools.partial(
            training, 3, 'copy', True, stage3_param_persistence_threshold=0
        ),
    ),
    # ZeRO++ hpZ: frozen parameters are gathered from secondary partitions.
    'zero3 hpz, none persistent': (
        'keep',
        functools.partial(
            training,
            3,
            'keep',
            zero_hpz_partition_size=2,
            stage3_param_persistence_threshold=0,
        ),
    ),
    'zero3 hpz, some persistent': (
        'keep',
        functools.partial(
            training,
            3,
            'keep',
            zero_hpz_partition_size=2,
            stage3_param_persistence_threshold=10,
        ),
    ),
    'zero3 all persistent, online read before the update': (
        'keep',
        functools.partial(training, 3, 'keep', read_online=True),
    ),
    'zero3 hpz, some persistent, online read before the update': (
        'average',
        functools.partial(
            training,
            3,
            'average',
            read_online=True,
            zero_hpz_partition_size=2,
            stage3_param_persistence_threshold=10,
        ),
    ),
    'zero3 hpz, momentum_update_': (
        'keep',
        functools.partial(
            training,
            3,
            'keep',
            True,
            zero_hpz_partition_size=2,
            stage3_param_persistence_threshold=0,
        ),
    ),
}

SCENARIOS = {
    **{name: scenario for name, (_, scenario) in TRAININGS.items()},
    'zero3 target outside the engine': target_outside_the_engine,
    'zero3 persistence differs': persistence_differs,
}


def rank_main(rank, port, out_dir):
    init_deepspeed_rank(rank, port)
    run_scenarios(rank, SCENARIOS, out_dir)


@pytest.fixture(scope='module')
def results(tmp_path_factory):
    """``results[name]``: the two ranks' results of scenario ``name``."""
    out_dir = tmp_path_factory.mktemp('sharded_deepspeed')
    return sharded_results(rank_main, out_dir, SCENARIOS)


@pytest.mark.parametrize('name', TRAININGS)
def test_the_zero_target_matches_the_reference(results, name):
    records = assert_trainings_match(results, TRAININGS, name)
    for record in records:
        if 'partitions' in record:  # the partitions hold the same values
            final = record['final'][0]
            for rebuilt, gathered in zip(record['partitions'], final):
                torch.testing.assert_close(rebuilt, gathered)


@pytest.mark.parametrize('name', TRAININGS)
def test_the_target_starts_as_the_online_network(results, name):
    # Under zero.Init the target is copied from gathered partitions.
    for record in results[name]:
        assert isinstance(record, dict), record
        for target, online in zip(
            record['initial'][0], record['initial_online'][0]
        ):
            assert torch.equal(target, online)


def replayed_forward(record, steps, buffers):
    """The target's forward input of training step ``steps`` through a
    float64 copy of the target after ``steps`` replayed updates, its
    buffers as the ``buffers`` policy made them."""
    momenta = record['momenta'][:steps]
    weights = replay_ema(
        record['initial'][0],
        [params for params, _ in record['online'][:steps]],
        momenta,
    )
    network = TinyBYOL().target_net.double().eval()
    names = [name for name, _ in network.named_parameters()]
    state = dict(zip(names, weights))
    for name, initial in record['initial'][1].items():
        history = [[online[name]] for _, online in record['online'][:steps]]
        if buffers == 'keep':
            state[name] = initial
        elif buffers == 'copy' or not initial.is_floating_point():
            state[name] = history[-1][0]
        else:  # 'average'
            state[name] = replay_ema([initial], history, momenta)[0]
        if state[name].is_floating_point():
            state[name] = state[name].double()
    inputs = record['forwards'][steps][0]
    return torch.func.functional_call(network, state, (inputs.double(),))


@pytest.mark.parametrize('name', TRAININGS)
def test_the_target_forward_uses_the_updated_weights(results, name):
    """What the model computes with the target, after each update, against a
    float64 replay of the forward itself (ZeRO++ hpZ gathers from other
    tensors than GatheredParameters reads)."""
    for record in results[name]:
        assert isinstance(record, dict), record  # not an error
        forwards = record['forwards']
        assert len(forwards) == len(record['momenta'])  # one per step
        for steps in range(1, len(forwards)):
            torch.testing.assert_close(
                forwards[steps][1].double(),
                replayed_forward(record, steps, TRAININGS[name][0]),
                rtol=1e-5,
                atol=1e-6,
                msg=f'{name}: forward {steps}',
            )


def test_a_target_outside_the_engine_is_refused(results):
    for result in results['zero3 target outside the engine']:
        message = raised(result)
        assert (
            'parameters 0 differs between target (0.weight: tensor '
            '(3, 4)) and online (0.weight: ZeRO-3 partition'
        ) in message
        assert 'DeepSpeed' in message


def test_a_target_kept_partitioned_while_online_persists_is_refused(results):
    for result in results['zero3 persistence differs']:
        message = raised(result)
        assert (
            'parameters 0 differs between target (0.weight: ZeRO-3 '
            'partition (3, 4), 12, 6' in message
        )
        assert 'partitioned) and online' in message
        assert 'persistent)' in message
        assert 'persistence thresholds' in message
