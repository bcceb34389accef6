"""The float32 masters of a bfloat16 target in checkpoints, in the target's
own layout: FSDP2 through ``torch.distributed.checkpoint`` (DCP) on the same
and on another world size, FSDP1 through a full state dict and through DCP,
on two gloo ranks, against the uninterrupted run and a float64 EMA.

Each run trains a bfloat16 :class:`LayerNormBYOL` with plain SGD (no
optimizer state to carry), updating the target with momentum 0.99 after each
step: with masters that only round to the target, a resume that loses or
mixes them rounds differently from then on. Every resumed model starts from
other weights (all moved by 1), so that only what it loads can make it equal.
"""

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from momentum_testing import (
    SHARDED_WORLD_SIZE,
    free_port,
    launch_ranks,
    replay_ema,
    run_scenarios,
    set_rank_environment,
    sharded_batch,
)
from test_low_precision_sharded import BF16, build_bf16, probe
from test_sharded import fsdp1
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

from momentum_hook.export import full_state_dict
from momentum_hook.model import MASTER_KEY
from momentum_hook.sharding import fully_shard_pair

pytestmark = pytest.mark.distributed

BEFORE, AFTER = 5, 5  # the steps before and after the checkpoint
MOMENTUM = 0.99
FULL = StateDictOptions(full_state_dict=True)


# --- What every rank runs --------------------------------------------------


def fresh(moved=False):
    """A seeded bfloat16 model whose online network starts away from its
    target; ``moved``: every weight moved by 1 (a model that must load)."""
    model, online, target = build_bf16()
    model.to(BF16)
    with torch.no_grad():
        for param in model.parameters() if moved else online.parameters():
            param.add_(1.0 if moved else 0.25)
    return model, online, target


def sharded_fsdp2(moved=False):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model, online, target = fresh(moved)
    mesh = init_device_mesh('cpu', (SHARDED_WORLD_SIZE,))
    fully_shard_pair(
        online=online, target=target, submodules=nn.Linear, mesh=mesh
    )
    fully_shard(model, mesh=mesh)
    return model, model, model.target_net


def sharded_fsdp1(moved=False, use_orig_params=False):
    """FSDP1, each network a unit (with ``use_orig_params``, bfloat16
    parameters are aligned to 8 elements in the flat parameter, with
    padding between them)."""
    model, _, _ = fresh(moved)
    wrapped = fsdp1(model, use_orig_params, ModuleWrapPolicy({nn.Sequential}))
    return model, wrapped, model.target_net


def full_state(wrapped):
    """The whole state dict, on every rank (a collective), as plain CPU
    tensors."""
    return {
        key: value.detach().cpu().clone()
        for key, value in get_model_state_dict(wrapped, options=FULL).items()
    }


def train(model, wrapped, rank, steps):
    """SGD steps ``steps`` (their batches), each followed by an update; the
    online network's whole weights after each."""
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.1)
    history = []
    for step in steps:
        optimizer.zero_grad()
        wrapped(sharded_batch(rank, step).to(BF16)).backward()
        optimizer.step()
        model.momentum = MOMENTUM
        model.momentum_update()
        state = full_state(wrapped)
        history.append(
            [
                value
                for key, value in state.items()
                if key.startswith('online_net.')
            ]
        )
    return history


def ending(model, wrapped, rank, target):
    """Train the steps after the checkpoint; the state and what the target
    computes then."""
    history = train(model, wrapped, rank, range(BEFORE, BEFORE + AFTER))
    return dict(
        after=history,
        final=full_state(wrapped),
        forward=target(probe().to(BF16)).detach().clone(),
    )


def straight(rank, shard, save):
    """The uninterrupted run, checkpointed after ``BEFORE`` steps by
    ``save(model, wrapped)``."""
    model, wrapped, target = shard()
    initial = full_state(wrapped)
    history = train(model, wrapped, rank, range(BEFORE))
    checkpoint = full_state(wrapped)
    exported = full_state_dict(wrapped)  # CPU, on rank 0 (FSDP1: rank0_only)
    saved = save(model, wrapped)
    return dict(
        initial=initial,
        history=history,
        checkpoint=checkpoint,
        exported=exported,
        saved=saved,
        **ending(model, wrapped, rank, target),
    )


def dcp_save(directory):
    def save(model, wrapped):
        checkpointed(dcp.save, model.state_dict(), checkpoint_id=directory)

    return save


def checkpointed(function, *args, **kwargs):
    """DCP raises ``CheckpointException``, a BaseException that would end the
    rank: raise it as an error that the scenario records."""
    try:
        return function(*args, **kwargs)
    except dcp.api.CheckpointException as error:
        raise RuntimeError(f'DCP: {error}') from None


def fsdp2_resumed(rank, directory, planned):
    """A fresh FSDP2 model that loads the DCP checkpoint: through
    ``model.state_dict()`` after planning, or through torch's
    ``get_model_state_dict``/``set_model_state_dict`` before."""
    model, wrapped, target = sharded_fsdp2(moved=True)
    if planned:
        model.check_momentum_target()
        state = model.state_dict()
        checkpointed(dcp.load, state, checkpoint_id=directory)
        model.load_state_dict(state)
    else:
        state = get_model_state_dict(model)
        checkpointed(dcp.load, state, checkpoint_id=directory)
        set_model_state_dict(model, state)
    return dict(
        loaded=full_state(wrapped), **ending(model, wrapped, rank, target)
    )


def fsdp2_loads_one_process(rank, directory):
    """A fresh FSDP2 model that loads a one-process checkpoint, then takes
    one update of momentum 0.9 towards its loaded online network."""
    model, wrapped, target = sharded_fsdp2(moved=True)
    state = model.state_dict()
    checkpointed(dcp.load, state, checkpoint_id=directory)
    model.load_state_dict(state)
    loaded = full_state(wrapped)
    model.momentum = 0.9
    model.momentum_update()
    return dict(
        loaded=loaded,
        updated=full_state(wrapped),
        forward=target(probe().to(BF16)).detach().clone(),
    )


def fsdp1_full_save(model, wrapped):
    return full_state(wrapped)


def dcp_save_sharded(directory):
    """Save torch's sharded state dict (FSDP1: ``SHARDED_STATE_DICT``)."""

    def save(model, wrapped):
        checkpointed(
            dcp.save, get_model_state_dict(wrapped), checkpoint_id=directory
        )

    return save


def fsdp1_dcp_resumed(rank, directory):
    """A fresh FSDP1 model that loads the sharded DCP checkpoint."""
    model, wrapped, target = sharded_fsdp1(moved=True)
    state = get_model_state_dict(wrapped)
    checkpointed(dcp.load, state, checkpoint_id=directory)
    set_model_state_dict(wrapped, state)
    return dict(
        loaded=full_state(wrapped), **ending(model, wrapped, rank, target)
    )


def fsdp1_resumed(rank, saved, use_orig_params):
    """A fresh FSDP1 model that loads the straight run's full state dict."""
    model, wrapped, target = sharded_fsdp1(True, use_orig_params)
    set_model_state_dict(wrapped, saved, options=FULL)
    return dict(
        loaded=full_state(wrapped), **ending(model, wrapped, rank, target)
    )


def rank_main(rank, port, out_dir, directory):
    set_rank_environment(rank, port)
    dist.init_process_group('gloo', timeout=timedelta(seconds=60))
    fsdp2_dir, single_dir = str(directory / 'fsdp2'), str(directory / 'single')
    fsdp1_dir = str(directory / 'fsdp1')
    results = {}

    def fsdp1_straight(orig):
        def run(rank):
            results[orig] = straight(
                rank, lambda: sharded_fsdp1(False, orig), fsdp1_full_save
            )
            return results[orig]

        return run

    run_scenarios(
        rank,
        {
            'fsdp2 straight': lambda rank: straight(
                rank, sharded_fsdp2, dcp_save(fsdp2_dir)
            ),
            'fsdp2 resumed, planned': lambda rank: fsdp2_resumed(
                rank, fsdp2_dir, True
            ),
            'fsdp2 resumed, not planned': lambda rank: fsdp2_resumed(
                rank, fsdp2_dir, False
            ),
            'fsdp2 loads one process': lambda rank: fsdp2_loads_one_process(
                rank, single_dir
            ),
            **{
                f'fsdp1{suffix} {run}': (
                    fsdp1_straight(orig)
                    if run == 'straight'
                    else lambda rank, orig=orig: fsdp1_resumed(
                        rank, results[orig]['saved'], orig
                    )
                )
                for orig, suffix in ((False, ''), (True, ' orig'))
                for run in ('straight', 'resumed')
            },
            'fsdp1 dcp straight': lambda rank: straight(
                rank, sharded_fsdp1, dcp_save_sharded(fsdp1_dir)
            ),
            'fsdp1 dcp resumed': lambda rank: fsdp1_dcp_resumed(
                rank, fsdp1_dir
            ),
        },
        out_dir,
    )


# --- The tests -------------------------------------------------------------


def one_process_model():
    """A plain bfloat16 model after 5 updates towards moving weights, with
    masters that only round to its target."""
    model, online, _ = fresh()
    for step in range(5):
        with torch.no_grad():
            for param in online.parameters():
                param.add_(0.01 * (step + 1))
        model.momentum = MOMENTUM
        model.momentum_update()
    return model


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp('masters_checkpoint')
    single = one_process_model()
    dcp.save(single.state_dict(), checkpoint_id=str(base / 'single'))
    out_dir = base / 'ranks'
    out_dir.mkdir()
    ranks = launch_ranks(
        rank_main, (free_port(), out_dir, base), out_dir, 'spawn'
    )
    return base, single, ranks


def records(runs, name):
    """Both ranks' records of scenario ``name``."""
    found = [rank[name] for rank in runs[2]]
    for record in found:
        assert isinstance(record, dict), record  # not an error
    return found


def masters_of(state):
    return {
        key: value
        for key, value in state.items()
        if key.startswith(MASTER_KEY)
    }


def assert_states_equal(actual, expected):
    assert list(actual) == list(expected)
    for key, value in expected.items():
        assert actual[key].dtype == value.dtype, key
        assert torch.equal(actual[key], value), key


def assert_masters_are_the_ema(record):
    """The full state dict's masters, every rank's part of them, are the
    float64 EMA of the recorded online weights to float32 rounding, and the
    target is them rounded."""
    names = [
        key[len('target_net.') :]
        for key in record['initial']
        if key.startswith('target_net.')
    ]
    initial = [record['initial'][f'target_net.{name}'] for name in names]
    reference = replay_ema(
        initial, record['history'], [MOMENTUM] * len(record['history'])
    )
    state = record['checkpoint']
    assert list(masters_of(state)) == [MASTER_KEY + name for name in names]
    for name, ref in zip(names, reference):
        master = state[MASTER_KEY + name]
        assert master.dtype == torch.float32 and master.shape == ref.shape
        torch.testing.assert_close(master.double(), ref, rtol=1e-6, atol=1e-6)
        assert torch.equal(master.to(BF16), state[f'target_net.{name}'])
    # more than bfloat16: the masters carry what the target cannot hold
    assert any(
        not torch.equal(
            state[MASTER_KEY + name], state[MASTER_KEY + name].to(BF16).float()
        )
        for name in names
    )


@pytest.mark.parametrize(
    'name', ['fsdp2 straight', 'fsdp1 straight', 'fsdp1 orig straight']
)
def test_a_full_state_dict_holds_every_rank_s_masters_whole(runs, name):
    for rank, record in enumerate(records(runs, name)):
        assert_masters_are_the_ema(record)
        # momentum_hook's full_state_dict: the same, on rank 0 alone
        if rank == 0:
            assert_states_equal(record['exported'], record['checkpoint'])
        else:
            assert record['exported'] == {}


@pytest.mark.parametrize(
    'name',
    [
        'fsdp2 resumed, planned',
        'fsdp2 resumed, not planned',
        'fsdp1 resumed',
        'fsdp1 orig resumed',
        'fsdp1 dcp resumed',
    ],
)
def test_a_resume_on_the_same_world_size_is_bit_for_bit(runs, name):
    straight_name = name.split(' resumed')[0] + ' straight'
    for expected, resumed in zip(
        records(runs, straight_name), records(runs, name)
    ):
        assert masters_of(expected['final'])
        assert_states_equal(resumed['loaded'], expected['checkpoint'])
        assert_states_equal(resumed['final'], expected['final'])
        assert torch.equal(resumed['forward'], expected['forward'])


@pytest.mark.parametrize(
    'name,checkpoint',
    [
        ('fsdp2 straight', 'fsdp2'),
        ('fsdp1 dcp straight', 'fsdp1'),
        ('fsdp1 straight', None),
        ('fsdp1 orig straight', None),
    ],
)
def test_a_two_rank_checkpoint_loads_in_one_process_resharded(
    runs, name, checkpoint
):
    """Two ranks' checkpoint (DCP, or FSDP1's full state dict) into a plain
    model in one process without a process group; the same updates then
    give the same target bit for bit, and the same forward."""
    expected = records(runs, name)[0]
    model, online, target = fresh(moved=True)
    if checkpoint is None:
        model.load_state_dict(expected['saved'])
    else:
        state = model.state_dict()
        dcp.load(state, checkpoint_id=str(runs[0] / checkpoint))
        model.load_state_dict(state)
    assert_states_equal(model.state_dict(), expected['checkpoint'])
    for weights in expected['after']:
        with torch.no_grad():
            for param, weight in zip(online.parameters(), weights):
                param.copy_(weight)
        model.momentum = MOMENTUM
        model.momentum_update()
    final = model.state_dict()
    for key, value in expected['final'].items():
        if not key.startswith('online_net.'):
            assert torch.equal(final[key], value), key
    assert masters_of(final)
    assert torch.equal(target(probe().to(BF16)), expected['forward'])


def test_a_one_process_checkpoint_loads_on_two_ranks_resharded(runs):
    single = runs[1]
    expected = {
        key: value.detach().clone()
        for key, value in single.state_dict().items()
    }
    assert any(
        not torch.equal(
            master, expected['target_net.' + key[len(MASTER_KEY) :]].float()
        )
        for key, master in masters_of(expected).items()
    )
    single.momentum = 0.9
    single.momentum_update()
    updated = single.state_dict()
    for record in records(runs, 'fsdp2 loads one process'):
        assert_states_equal(record['loaded'], expected)
        assert_states_equal(record['updated'], updated)
        assert torch.equal(
            record['forward'], single.target_net(probe().to(BF16))
        )
