"""User hooks and ZeRO++ options in MMEngine's ``FlexibleRunner`` + ZeRO-3.

Two launches of two gloo ranks (CPU), one ``DeepSpeedStrategy`` each (MMEngine
0.10.7 builds one per process), with ``test_flexible_runner``'s runner:

- a run whose user hook reads the online weights with
  ``deepspeed.zero.GatheredParameters`` after each optimizer step and before
  the momentum update (which releases the online network's persistent
  gathered copies), judged against a float64 replay: the target's forward
  in every training iteration, and its final weights;
- a ``DeepSpeedStrategy`` config with ZeRO++ quantized weights, refused by
  the momentum hook's ``before_train``. DeepSpeed cannot build such an
  engine without CUDA, so the runner runs the hooks' ``before_train`` as
  ``train()`` would once the engine is built.
"""

import os.path as osp

import pytest
import torch
from momentum_testing import (
    assert_matches_reference,
    gather_zero3,
    init_deepspeed_rank,
    launch_each,
    raised,
    reference_momentum,
    replay_ema,
    run_scenarios,
)

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.mmengine,
    pytest.mark.deepspeed,
    pytest.mark.slow,
]
pytest.importorskip('mmengine')
deepspeed = pytest.importorskip('deepspeed')
from test_flexible_runner import (
    BASE,
    ITERS,
    build_model,  # noqa: E402
    build_runner,
    deepspeed_strategy,
    unwrapped,
)


def online_reader(record):
    """A user's hook that reads the online weights after each optimizer
    step, before the momentum hook (priority ABOVE_NORMAL) updates the
    target, gathering them all at once as a logger or a probe would; it
    keeps a copy in ``record``."""
    from mmengine.hooks import Hook

    class OnlineReader(Hook):
        priority = 'ABOVE_NORMAL'

        def after_train_iter(
            self, runner, batch_idx, data_batch=None, outputs=None
        ):
            online = unwrapped(runner).online_net
            with deepspeed.zero.GatheredParameters(list(online.parameters())):
                norm = sum(param.norm() for param in online.parameters())
            assert torch.isfinite(norm)
            record.append(gather_zero3(online.parameters()))

    return OnlineReader()


def user_gathers_online(work_dir, rank):
    """A ZeRO-3 run (every parameter persistent, DeepSpeed's default
    threshold) with the user's hook: the target's forward passes, the
    online weights each update used, and the final target."""
    online = []
    runner = build_runner(
        work_dir, deepspeed_strategy(), [online_reader(online)]
    )
    model = runner.model  # the user's model, until train() wraps it
    initial = [
        param.detach().clone() for param in model.target_net.parameters()
    ]
    forwards = []
    model.target_net.register_forward_hook(
        lambda module, args, output: forwards.append(
            (args[0].detach().clone(), output.detach().clone())
        )
    )
    runner.train()
    return dict(
        initial=initial,
        online=online,
        forwards=forwards,
        final=gather_zero3(unwrapped(runner).target_net.parameters()),
    )


#: ZeRO++ quantized weights (qwZ) options.
QUANTIZED = ('zero_quantized_weights', 'zero_quantized_nontrainable_weights')


def quantized_weights(work_dir, rank):
    """The hooks' ``before_train`` for a strategy with each ZeRO++ quantized
    weights option: ``{option: the error it raised}``. One runner (one
    strategy per process); its strategy's config, the dict it hands to
    ``deepspeed.initialize``, gets one option at a time."""
    runner = build_runner(work_dir, deepspeed_strategy(), [])
    errors = {}
    for option in QUANTIZED:
        runner.strategy.config['zero_optimization'] = {
            'stage': 3,
            option: True,
        }
        try:
            runner.call_hook('before_train')
        except ValueError as error:
            errors[option] = ('raised', 'ValueError', str(error))
        else:
            errors[option] = 'accepted'
    return errors


def launches(out_dir):
    """The scenarios of each launch (one DeepSpeedStrategy per process)."""

    def work_dir(name):
        return osp.join(out_dir, name.replace(' ', '_'))

    return [
        {
            'user hook gathers the online network': lambda rank: (
                user_gathers_online(work_dir('gathers'), rank)
            ),
        },
        {
            'quantized weights': lambda rank: quantized_weights(
                work_dir('quantized'), rank
            ),
        },
    ]


def rank_main(rank, port, out_dir, launch):
    init_deepspeed_rank(rank, port)
    run_scenarios(rank, launches(str(out_dir.parent))[launch], out_dir)


@pytest.fixture(scope='module')
def results(tmp_path_factory):
    """``results[name]``: the two ranks' results of scenario ``name``."""
    base = tmp_path_factory.mktemp('flexible_zero3')
    return launch_each(rank_main, base, launches(str(base)))


def test_a_user_hook_gathering_the_online_network_keeps_the_target_right(
    results,
):
    momenta = [reference_momentum(k, ITERS, BASE) for k in range(ITERS)]
    network = build_model().target_net.double()
    names = [name for name, _ in network.named_parameters()]
    for record in results['user hook gathers the online network']:
        assert isinstance(record, dict), record  # the run did not die
        assert len(record['online']) == len(record['forwards']) == ITERS
        assert not torch.equal(
            record['online'][0][0], record['online'][-1][0]
        )  # it trained
        # The forward of iteration k uses the target after k updates.
        for k, (inputs, output) in enumerate(record['forwards']):
            weights = replay_ema(
                record['initial'], record['online'][:k], momenta[:k]
            )
            expected = torch.func.functional_call(
                network, dict(zip(names, weights)), (inputs.double(),)
            )
            torch.testing.assert_close(
                output.double(),
                expected,
                rtol=1e-5,
                atol=1e-6,
                msg=f'forward {k}',
            )
        assert_matches_reference(
            record['final'],
            replay_ema(record['initial'], record['online'], momenta),
        )


@pytest.mark.parametrize('option', QUANTIZED)
def test_zero_plus_plus_quantized_weights_are_refused(results, option):
    for errors in results['quantized weights']:
        assert isinstance(errors, dict), errors
        message = raised(errors[option])
        assert f'the DeepSpeed config sets {option}=True' in message
        assert 'int8' in message
        assert (
            'zero_quantized_weights=False, '
            'zero_quantized_nontrainable_weights=False'
        ) in message
