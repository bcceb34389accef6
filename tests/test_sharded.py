"""The momentum update under FSDP2 and FSDP1, on two gloo ranks (CPU).

One launch of two ranks runs every scenario (see ``SCENARIOS``): each trains
a :class:`TinyBYOL` wrapped one way, updating the target after every step,
and records the whole target and online parameters (gathered) and buffers.
The tests judge those records against a float64 EMA replayed from the
recorded online weights, and the failure scenarios by their errors.
"""

import functools
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from momentum_testing import (
    SHARDED_WORLD_SIZE,
    assert_trainings_match,
    build_sharded,
    free_port,
    launch_ranks,
    raised,
    record_sharded_training,
    run_scenarios,
    sharded_batch,
    sharded_results,
)
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, ShardingStrategy, fully_shard
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from torch.distributed.tensor import DTensor, Shard

from momentum_hook import momentum_update_
from momentum_hook.sharding import fully_shard_pair
from momentum_hook.zero import check_zero_config

pytestmark = pytest.mark.distributed

POLICIES = ('keep', 'copy', 'average')


def sgd_step(wrapped):
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.1, momentum=0.9)

    def train_step(batch):
        optimizer.zero_grad()
        wrapped(batch).backward()
        optimizer.step()

    return train_step


def buffers_of(network):
    return {
        name: buffer.detach().clone()
        for name, buffer in network.named_buffers()
    }


# --- FSDP2 -----------------------------------------------------------------


def gather_fsdp2(network):
    params = [
        param.full_tensor() if isinstance(param, DTensor) else param
        for param in network.parameters()
    ]
    return [param.detach().clone() for param in params], buffers_of(network)


def fsdp2_training(buffers, functional=False, rank=0):
    model, online, target = build_sharded(buffers)
    mesh = init_device_mesh('cpu', (SHARDED_WORLD_SIZE,))
    fully_shard_pair(
        online=online, target=target, submodules=nn.Linear, mesh=mesh
    )
    fully_shard(model, mesh=mesh)

    def update():
        momentum_update_(target, online, model.momentum, buffers)

    return record_sharded_training(
        rank,
        model,
        online,
        target,
        sgd_step(model),
        gather_fsdp2,
        update if functional else None,
    )


def fsdp2_mismatched_placements(rank):
    """Online rows sharded, target columns: no local element corresponds."""
    model, online, target = build_sharded('keep')
    mesh = init_device_mesh('cpu', (SHARDED_WORLD_SIZE,))
    fully_shard(online, mesh=mesh)
    fully_shard(
        target,
        mesh=mesh,
        shard_placement_fn=lambda param: (
            Shard(1) if param.ndim == 2 and param.shape[1] % 2 == 0 else None
        ),
    )
    model.momentum_update()


def fsdp2_online_only(rank):
    model, online, target = build_sharded('keep')
    fully_shard(online, mesh=init_device_mesh('cpu', (SHARDED_WORLD_SIZE,)))
    model.momentum_update()


def fsdp2_meta(rank):
    """Sharded on the meta device and never materialised."""
    with torch.device('meta'):
        model, online, target = build_sharded('keep')
    fully_shard_pair(
        online=online,
        target=target,
        mesh=init_device_mesh('cpu', (SHARDED_WORLD_SIZE,)),
    )
    model.momentum_update()


def fsdp2_meta_materialised(rank):
    """The FSDP2 large-model recipe: built on the meta device, sharded,
    materialised with to_empty() and initialised (both networks drawn
    anew), then planned before training as the hooks do: the target must
    start as the online network's copy on every rank."""
    with torch.device('meta'):
        model, online, target = build_sharded('keep')
    mesh = init_device_mesh('cpu', (SHARDED_WORLD_SIZE,))
    fully_shard_pair(
        online=online, target=target, submodules=nn.Linear, mesh=mesh
    )
    fully_shard(model, mesh=mesh)
    model.to_empty(device='cpu')
    torch.manual_seed(rank)
    for module in model.modules():
        if hasattr(module, 'reset_parameters'):
            module.reset_parameters()
    initial_online = gather_fsdp2(online)
    model.check_momentum_target()
    record = record_sharded_training(
        rank, model, online, target, sgd_step(model), gather_fsdp2
    )
    return dict(record, initial_online=initial_online)


def fsdp2_one_rank_differs(rank):
    """Rank 1 shards its target's 2-D weights by columns, rank 0 like the
    online network, by rows: only rank 1's shards do not correspond.

    Plans as the hooks do before training, then trains as a run would.
    Returns the error, with the seconds from planning to the error, or
    ``'trained'``.
    """
    model, online, target = build_sharded('keep')
    mesh = init_device_mesh('cpu', (SHARDED_WORLD_SIZE,))
    fully_shard(online, mesh=mesh)
    fully_shard(
        target,
        mesh=mesh,
        shard_placement_fn=lambda param: (
            Shard(1)
            if rank == 1 and param.ndim == 2 and param.shape[1] % 2 == 0
            else None
        ),
    )
    start = time.monotonic()
    try:
        model.check_momentum_target()
        train_step = sgd_step(model)
        for step in range(2):
            train_step(sharded_batch(rank, step))
            model.momentum_update()
    except Exception as error:
        return (
            'raised',
            type(error).__name__,
            str(error),
            time.monotonic() - start,
        )
    return 'trained'


# --- FSDP1 -----------------------------------------------------------------


def fsdp1(model, use_orig_params, policy, mmengine=False):
    """FSDP1, or the wrapper MMEngine's FSDPStrategy builds from
    ``model_wrapper=dict(auto_wrap_policy=policy)``."""
    if mmengine:
        from mmengine.model.wrappers import MMFullyShardedDataParallel

        return MMFullyShardedDataParallel(
            model,
            device_id=torch.device('cpu'),
            auto_wrap_policy=policy,
            use_orig_params=use_orig_params,
        )
    return FSDP(
        model,
        device_id=torch.device('cpu'),
        use_orig_params=use_orig_params,
        auto_wrap_policy=policy,
    )


def fsdp1_training(
    buffers, use_orig_params, layers=(nn.Sequential,), mmengine=False, rank=0
):
    model, online, target = build_sharded(buffers)
    wrapped = fsdp1(
        model, use_orig_params, ModuleWrapPolicy(set(layers)), mmengine
    )

    def gather(network):
        with FSDP.summon_full_params(wrapped, writeback=False):
            params = [param.detach().clone() for param in network.parameters()]
        return params, buffers_of(network)

    return record_sharded_training(
        rank, model, online, target, sgd_step(wrapped), gather
    )


def fsdp1_shared_unit(use_orig_params, layers, mmengine=False, rank=0):
    """Both networks (or some of their layers) in one unit of the root."""
    model, online, target = build_sharded('keep')
    if not use_orig_params:  # else FSDP1 refuses a frozen target in the unit
        target.requires_grad_(True)
    policy = ModuleWrapPolicy(set(layers)) if layers else None
    fsdp1(model, use_orig_params, policy, mmengine)
    model.momentum_update()


def fsdp1_mismatched_strategy(rank):
    """Online fully sharded, target replicated (NO_SHARD)."""
    model, online, target = build_sharded('keep')
    model.online_net = FSDP(online, device_id=torch.device('cpu'))
    model.target_net = FSDP(
        target,
        device_id=torch.device('cpu'),
        sharding_strategy=ShardingStrategy.NO_SHARD,
    )
    model.momentum_update()


#: The training scenarios and their buffer policies.
TRAININGS = {
    **{
        f'fsdp2 {policy}': (policy, functools.partial(fsdp2_training, policy))
        for policy in POLICIES
    },
    'fsdp2 momentum_update_': (
        'average',
        functools.partial(fsdp2_training, 'average', True),
    ),
    'fsdp2 meta, materialised': ('keep', fsdp2_meta_materialised),
    **{
        f'fsdp1 networks orig={orig} {policy}': (
            policy,
            functools.partial(fsdp1_training, policy, orig),
        )
        for orig in (False, True)
        for policy in POLICIES
    },
    **{
        f'fsdp1 layers orig={orig}': (
            'average',
            functools.partial(
                fsdp1_training, 'average', orig, (nn.Linear, nn.BatchNorm1d)
            ),
        )
        for orig in (False, True)
    },
    'mmengine FSDP wrapper, ModuleWrapPolicy': (
        'copy',
        functools.partial(fsdp1_training, 'copy', True, mmengine=True),
    ),
}

SCENARIOS = {
    **{name: scenario for name, (_, scenario) in TRAININGS.items()},
    'fsdp2 mismatched placements': fsdp2_mismatched_placements,
    'fsdp2 online only': fsdp2_online_only,
    'fsdp2 meta': fsdp2_meta,
    **{
        f'fsdp1 root only orig={orig}': functools.partial(
            fsdp1_shared_unit, orig, ()
        )
        for orig in (False, True)
    },
    **{
        f'fsdp1 linear units, batchnorm in root orig={orig}': (
            functools.partial(fsdp1_shared_unit, orig, (nn.Linear,))
        )
        for orig in (False, True)
    },
    'fsdp1 mismatched strategy': fsdp1_mismatched_strategy,
    # MMEngine's FSDPStrategy default: no auto_wrap_policy, use_orig_params.
    'mmengine FSDP wrapper, default': functools.partial(
        fsdp1_shared_unit, True, (), mmengine=True
    ),
}


def by_name(names):
    """Test parameters, those on MMEngine's wrapper marked ``mmengine`` (their
    scenarios raise ImportError without it, and the tests skip)."""
    return [
        pytest.param(name, marks=pytest.mark.mmengine)
        if name.startswith('mmengine')
        else name
        for name in names
    ]


def rank_main(rank, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group(
        'gloo',
        init_method=f'tcp://127.0.0.1:{port}',
        rank=rank,
        world_size=SHARDED_WORLD_SIZE,
        timeout=timedelta(seconds=60),
    )
    run_scenarios(rank, SCENARIOS, out_dir)


@pytest.fixture(scope='module')
def results(tmp_path_factory):
    """``results[name]``: the two ranks' results of scenario ``name``."""
    return sharded_results(
        rank_main, tmp_path_factory.mktemp('sharded'), SCENARIOS
    )


@pytest.mark.parametrize('name', by_name(TRAININGS))
def test_the_sharded_target_matches_the_reference(results, name):
    assert_trainings_match(results, TRAININGS, name)


def test_a_materialised_meta_target_starts_as_the_online_network(results):
    """Drawn anew, the target differed from the online network; the first
    plan, decided on both ranks at once, made it a copy."""
    for record in results['fsdp2 meta, materialised']:
        assert isinstance(record, dict), record  # not an error
        (online, _), (target, _) = record['initial_online'], record['initial']
        assert len(online) == len(target) == 6
        for online_param, target_param in zip(online, target):
            assert torch.equal(online_param, target_param)


SHARED_UNIT = (
    'is flattened into an FSDP1 unit that is not inside',
    'auto_wrap_policy=ModuleWrapPolicy',
    'model_wrapper=dict(auto_wrap_policy=',
)
#: Scenarios that every rank must refuse, and what the message must say.
REFUSALS = {
    'fsdp2 mismatched placements': (
        'parameters 0 differs between target (0.weight',
        'Shard(dim=1)',
        'fully_shard_pair',
    ),
    'fsdp2 online only': (
        'parameters 0 differs between target (0.weight: tensor (3, 4))',
        'fully_shard_pair',
    ),
    'fsdp2 meta': ("'0.weight' is a meta tensor", 'materialise'),
    'fsdp1 root only orig=False': SHARED_UNIT,
    'fsdp1 root only orig=True': SHARED_UNIT,
    'fsdp1 linear units, batchnorm in root orig=False': SHARED_UNIT,
    'fsdp1 linear units, batchnorm in root orig=True': SHARED_UNIT,
    'mmengine FSDP wrapper, default': SHARED_UNIT,
    'fsdp1 mismatched strategy': (
        "parameters 0 differs between target (FSDP unit '<root>'",
        'separate units with the same auto_wrap_policy',
    ),
}


@pytest.mark.parametrize('name', by_name(REFUSALS))
def test_unlike_or_unusable_shards_are_refused(results, name):
    for result in results[name]:
        message = raised(result)
        for fragment in REFUSALS[name]:
            assert fragment in message


def one_rank_differs_main(rank, port, out_dir):
    torch.set_num_threads(1)
    # A rank left waiting in a collective would give up after 30 s.
    dist.init_process_group(
        'gloo',
        init_method=f'tcp://127.0.0.1:{port}',
        rank=rank,
        world_size=SHARDED_WORLD_SIZE,
        timeout=timedelta(seconds=30),
    )
    run_scenarios(rank, {'one rank differs': fsdp2_one_rank_differs}, out_dir)


def test_every_rank_refuses_a_shard_that_differs_on_one_rank(tmp_path):
    """Only rank 1 sees the mismatch; both raise its error at plan time,
    within seconds, instead of rank 0 training into a collective that
    rank 1 never joins."""
    ranks = launch_ranks(
        one_rank_differs_main, (free_port(), tmp_path), tmp_path, 'fork'
    )
    messages = []
    for rank, result in enumerate(ranks):
        result = result['one rank differs']
        assert result[:2] == ('raised', 'ValueError'), (rank, result)
        assert result[3] < 10, (rank, result)  # seconds to the verdict
        messages.append(result[2])
    assert messages[0] == messages[1]
    assert messages[0].startswith(
        'rank 1 of 2 refused the momentum target (rank 0 found nothing '
        'wrong: the layout differs between ranks): parameters 0 differs '
        'between target (0.weight: DTensor (3, 4), (Shard(dim=1),)'
    )
    assert 'fully_shard_pair' in messages[0]


# --- fully_shard_pair's own checks, before anything is sharded -------------


@pytest.mark.parametrize(
    'target,match',
    [
        (
            nn.Sequential(nn.Linear(4, 2)),
            r'parameters 0 differs .* tensor \(2, 4\)',
        ),
        (None, 'share memory'),
    ],
)
def test_fully_shard_pair_refuses_unlike_networks(target, match):
    online = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(ValueError, match=match):
        fully_shard_pair(
            online=online, target=online if target is None else target
        )
    assert not isinstance(online, FSDPModule)  # left unsharded


@pytest.mark.parametrize(
    'online,submodules,error,match',
    [
        (
            nn.Linear(2, 2),
            'Linear',
            TypeError,
            'submodules must be .* got str',
        ),
        ('net', None, TypeError, 'online must be an nn.Module, got str'),
    ],
)
def test_fully_shard_pair_checks_its_arguments(
    online, submodules, error, match
):
    with pytest.raises(error, match=match):
        fully_shard_pair(
            online=online, target=nn.Linear(2, 2), submodules=submodules
        )


# --- ZeRO++ options, from a DeepSpeed config --------------------------------


@pytest.mark.parametrize(
    'config',
    [
        None,
        {},
        dict(zero_optimization=None),
        dict(
            zero_optimization=dict(
                stage=3,
                zero_hpz_partition_size=8,
                zero_quantized_gradients=True,
                zero_quantized_weights=False,
            )
        ),
    ],
)
def test_check_zero_config_accepts_what_the_update_handles(config):
    check_zero_config(config)


@pytest.mark.parametrize(
    'options',
    [
        ('zero_quantized_weights',),
        ('zero_quantized_nontrainable_weights',),
        ('zero_quantized_weights', 'zero_quantized_nontrainable_weights'),
    ],
)
def test_check_zero_config_refuses_quantized_weights(options):
    config = dict(
        zero_optimization=dict(stage=3, **dict.fromkeys(options, True))
    )
    with pytest.raises(ValueError) as error:
        check_zero_config(config)
    assert str(error.value).startswith(
        f'the DeepSpeed config sets {" and ".join(options)}=True: '
    )
    assert (
        'zero_quantized_weights=False, '
        'zero_quantized_nontrainable_weights=False'
    ) in str(error.value)
