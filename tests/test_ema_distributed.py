"""The mixin under DistributedDataParallel, on two gloo ranks.

Each rank starts from other weights and trains on other data; DDP must
broadcast rank 0's weights into both networks in place and average the
gradients, so both ranks end with the same online and target networks, the
target equal to a float64 EMA replayed from the recorded online weights.

A plan made again on one rank alone (rank 0 swaps a parameter's storage
between updates, as code around a rank-0 save may) checks that rank alone:
it must not enter a collective that would meet DDP's next all-reduce.
"""

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from momentum_testing import (
    SHARDED_WORLD_SIZE,
    TinyBYOL,
    assert_all_equal,
    assert_matches_reference,
    free_port,
    launch_ranks,
    replay_ema,
    snapshot,
)
from torch.nn.parallel import DistributedDataParallel

pytestmark = pytest.mark.distributed

WORLD_SIZE = SHARDED_WORLD_SIZE
MOMENTA = [0.9, 0.99, 0.5]


def swap_storage_on_rank_0(rank, model):
    """``.data = .data.clone()`` of an online and a target parameter, on
    rank 0 only: their plan goes stale there alone."""
    if rank == 0:
        for param in (model.online_net[0].weight, model.target_net[3].bias):
            param.data = param.data.clone()


def load_a_target_on_rank_0(rank, model):
    """A target loaded on rank 0 only, unlike the online network, before
    DDP broadcasts rank 0's weights: no rank may then sync it."""
    if rank == 0:
        model.target_net.load_state_dict(
            {
                key: value + 1.0
                for key, value in model.target_net.state_dict().items()
            }
        )


def no_step(rank, model):
    """Nothing between the steps: the model still plans before training."""


def train_rank(rank, port, out_dir, between_steps=None, before_wrap=None):
    """One rank: DDP-wrap a mixin model, train, record what it saw.

    ``between_steps(rank, model)`` runs after each optimizer step, before the
    update; with it, the model plans first as the hooks do
    (``check_momentum_target()``, every rank at once).
    """
    torch.set_num_threads(1)
    # A rank left waiting in a collective gives up after 30 s.
    dist.init_process_group(
        'gloo',
        init_method=f'tcp://127.0.0.1:{port}',
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=timedelta(seconds=30),
    )
    try:
        torch.manual_seed(rank)  # other weights per rank until DDP syncs
        model = TinyBYOL()
        if before_wrap is not None:
            before_wrap(rank, model)
        ddp = DistributedDataParallel(model)
        if between_steps is not None:
            model.check_momentum_target()
        record = dict(
            initial_target=snapshot(model.target_net.parameters()),
            initial_online=snapshot(model.online_net.parameters()),
            online=[],
        )
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
        torch.manual_seed(100 + rank)  # other data per rank
        for momentum in MOMENTA:
            optimizer.zero_grad()
            ddp(torch.randn(4, 4)).backward()
            optimizer.step()
            if between_steps is not None:
                between_steps(rank, model)
            model.momentum = momentum
            ddp.module.momentum_update()
            record['online'].append(snapshot(model.online_net.parameters()))
        # Buffers are left out: plain BatchNorm's statistics are per rank.
        record.update(target=snapshot(model.target_net.parameters()))
        torch.save(record, out_dir / f'rank{rank}.pth')
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope='module')
def ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp('ddp')
    return launch_ranks(train_rank, (free_port(), out_dir), out_dir, 'spawn')


@pytest.fixture(scope='module')
def ranks_with_a_local_replan(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp('ddp_local_replan')
    return launch_ranks(
        train_rank,
        (free_port(), out_dir, swap_storage_on_rank_0),
        out_dir,
        'spawn',
    )


@pytest.fixture(scope='module')
def ranks_with_a_target_loaded_on_rank_0(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp('ddp_loaded_on_rank_0')
    return launch_ranks(
        train_rank,
        (free_port(), out_dir, no_step, load_a_target_on_rank_0),
        out_dir,
        'spawn',
    )


def test_a_target_loaded_on_rank_0_alone_is_kept_on_every_rank(
    ranks_with_a_target_loaded_on_rank_0,
):
    first, second = ranks_with_a_target_loaded_on_rank_0
    assert_all_equal(second['initial_target'], first['initial_target'])
    assert_all_equal(second['target'], first['target'])
    # The loaded target (online + 1 before DDP's broadcast), not a copy.
    for target, online in zip(
        first['initial_target'], first['initial_online']
    ):
        torch.testing.assert_close(target, online + 1.0)


@pytest.mark.parametrize('fixture', ['ranks', 'ranks_with_a_local_replan'])
def test_ranks_agree_and_the_target_matches_the_reference(fixture, request):
    ranks = request.getfixturevalue(fixture)
    first, second = ranks
    # DDP's broadcast reached both networks, so rank 1 started from rank 0.
    assert_all_equal(second['initial_target'], first['initial_target'])
    for step in range(len(MOMENTA)):
        assert_all_equal(second['online'][step], first['online'][step])
    assert_all_equal(second['target'], first['target'])
    assert not torch.equal(first['online'][0][0], first['online'][1][0])
    assert_matches_reference(
        first['target'],
        replay_ema(first['initial_target'], first['online'], MOMENTA),
    )
