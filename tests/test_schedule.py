"""The cosine schedule and the update-iteration rule, table-driven."""

import math

import pytest
from momentum_testing import reference_momentum as mmselfsup_formula

from momentum_hook import MomentumUpdater, cosine_momentum


@pytest.mark.parametrize(
    'cur_iter, max_iters, base, end, expected',
    [
        (0, 4, 0.99, 1.0, 0.99),  # first iteration: the base momentum
        (2, 4, 0.99, 1.0, 0.995),  # middle: halfway
        (3, 4, 0.99, 1.0, 1 - 0.01 * (1 - math.sqrt(0.5)) / 2),  # last: < end
        (4, 4, 0.99, 1.0, 1.0),  # k = K: the end momentum
        (9, 4, 0.99, 1.0, 1.0),  # past the end: stays at the end momentum
        (0, 1, 0.5, 0.9, 0.5),  # a one-iteration run
        (1, 2, 0.996, 0.996, 0.996),  # flat schedule
        (1, 2, 0.9, 0.5, 0.7),  # a falling schedule is allowed
    ],
)
def test_cosine_momentum_values(cur_iter, max_iters, base, end, expected):
    value = cosine_momentum(
        cur_iter=cur_iter,
        max_iters=max_iters,
        base_momentum=base,
        end_momentum=end,
    )
    assert type(value) is float
    assert value == pytest.approx(expected, abs=1e-15)


@pytest.mark.parametrize('max_iters', [1, 7, 100, 1250])
@pytest.mark.parametrize('base, end', [(0.99, 1.0), (0.996, 1.0), (0.9, 0.99)])
def test_cosine_momentum_is_bit_identical_to_mmselfsup(max_iters, base, end):
    for k in range(max_iters):
        assert cosine_momentum(k, max_iters, base, end) == mmselfsup_formula(
            k, max_iters, base, end
        )


def test_default_never_reaches_end_momentum():
    last = cosine_momentum(
        cur_iter=99, max_iters=100, base_momentum=0.99, end_momentum=1.0
    )
    assert 0.99 < last < 1.0


@pytest.mark.parametrize(
    'kwargs, error, match',
    [
        (
            dict(cur_iter=-1),
            ValueError,
            'cur_iter must be a non-negative int, got -1',
        ),
        (dict(cur_iter=1.0), TypeError, 'cur_iter .* got 1.0'),
        (
            dict(max_iters=0),
            ValueError,
            'max_iters must be a positive int, got 0',
        ),
        (dict(max_iters=None), TypeError, 'max_iters .* got None'),
        (dict(base_momentum=1.5), ValueError, r'base_momentum .* got 1.5'),
        (
            dict(end_momentum=float('nan')),
            ValueError,
            'end_momentum .* got nan',
        ),
        (dict(end_momentum='1'), TypeError, "end_momentum .* got '1'"),
        (dict(end_momentum=True), TypeError, 'end_momentum .* got True'),
    ],
)
def test_cosine_momentum_rejects(kwargs, error, match):
    args = dict(cur_iter=0, max_iters=10, base_momentum=0.99, end_momentum=1.0)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        cosine_momentum(**args)


@pytest.mark.parametrize(
    'update_interval, max_iters, updates',
    [
        (1, 5, [0, 1, 2, 3, 4]),
        (2, 5, [1, 3]),
        (3, 9, [2, 5, 8]),
        (4, 3, []),
    ],
)
def test_update_iterations_follow_the_interval(
    update_interval, max_iters, updates
):
    updater = MomentumUpdater(update_interval=update_interval)
    assert [
        k for k in range(max_iters) if updater.is_update_iter(k)
    ] == updates


@pytest.mark.parametrize(
    'update_interval, max_iters, last',
    [(1, 10, 9), (4, 10, 7), (5, 10, 9), (10, 10, 9), (1, 1, 0), (3, 4, 2)],
)
def test_reach_end_momentum_uses_end_on_the_last_update(
    update_interval, max_iters, last
):
    updater = MomentumUpdater(
        end_momentum=1.0,
        update_interval=update_interval,
        reach_end_momentum=True,
    )
    assert updater.momentum_at(last, max_iters, 0.99) == 1.0
    if last > 0:  # iteration 0 still has the base momentum
        assert updater.momentum_at(0, max_iters, 0.99) == 0.99
    if last % 2 == 0 and last > 0:  # and the middle of the updates, halfway
        assert updater.momentum_at(
            last // 2, max_iters, 0.99
        ) == pytest.approx(0.995)


@pytest.mark.parametrize(
    'update_interval, first',
    [
        (1, 0.99),  # k = 0: the base momentum
        (2, 1 - 0.01 * (math.cos(math.pi / 9) + 1) / 2),  # k = 1 of K' = 9
    ],
)
def test_reach_end_momentum_first_update(update_interval, first):
    """docs/semantics.md: the first update, at k = update_interval - 1, uses
    base_momentum only for update_interval = 1; with 2 and K = 10, 0.99030."""
    updater = MomentumUpdater(
        end_momentum=1.0,
        update_interval=update_interval,
        reach_end_momentum=True,
    )
    k = update_interval - 1
    assert updater.is_update_iter(k)
    assert updater.momentum_at(k, 10, 0.99) == pytest.approx(first, abs=1e-15)
    if update_interval == 2:
        assert round(updater.momentum_at(k, 10, 0.99), 5) == 0.99030


def test_reach_end_momentum_schedule_between():
    # Updates after iterations 3 and 7 of 10: the last one is k' = 7.
    updater = MomentumUpdater(
        end_momentum=1.0, update_interval=4, reach_end_momentum=True
    )
    assert updater.momentum_at(3, 10, 0.9) == pytest.approx(
        mmselfsup_formula(3, 7, 0.9, 1.0), abs=1e-15
    )


def test_default_schedule_with_interval_matches_mmselfsup():
    updater = MomentumUpdater(end_momentum=1.0, update_interval=4)
    assert updater.momentum_at(7, 10, 0.9) == mmselfsup_formula(7, 10, 0.9, 1)


@pytest.mark.parametrize(
    'kwargs, error, match',
    [
        (dict(end_momentum=1.5), ValueError, 'end_momentum .* got 1.5'),
        (dict(end_momentum=-0.1), ValueError, 'end_momentum .* got -0.1'),
        (
            dict(end_momentum=float('nan')),
            ValueError,
            'end_momentum .* got nan',
        ),
        (dict(end_momentum='0.9'), TypeError, "end_momentum .* got '0.9'"),
        (dict(end_momentum=True), TypeError, 'end_momentum .* got True'),
        (dict(end_momentum=None), TypeError, 'end_momentum .* got None'),
        (dict(update_interval=0), ValueError, 'update_interval .* got 0'),
        (dict(update_interval=-2), ValueError, 'update_interval .* got -2'),
        (dict(update_interval=2.0), TypeError, 'update_interval .* got 2.0'),
        (dict(update_interval=True), TypeError, 'update_interval .* got True'),
        (
            dict(reach_end_momentum='yes'),
            TypeError,
            "reach_end_momentum .* got 'yes'",
        ),
    ],
)
def test_updater_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        MomentumUpdater(**kwargs)
