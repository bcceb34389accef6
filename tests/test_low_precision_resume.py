"""The float32 masters of a bfloat16 target in checkpoints: a bf16 run
resumed at iteration k ends bit for bit equal to the uninterrupted one, on
mmcv's EpochBasedRunner, MMEngine's Runner and FlexibleRunner with a
DeepSpeed bf16 engine (ZeRO-2 and ZeRO-3, two gloo ranks; under ZeRO-3
each rank's partitions and masters); an older checkpoint without masters
restarts them from the loaded target.

Without the masters in the checkpoint, the resumed target restarts from
bfloat16 values and rounds differently from then on.
"""

import os.path as osp
from datetime import timedelta

import pytest
import torch

pytestmark = pytest.mark.mmengine
pytest.importorskip('mmengine')
from mmengine.model import BaseModel
from momentum_testing import (
    Interrupt,
    float64_copy,
    free_port,
    launch_ranks,
    params,
    run_scenarios,
    set_rank_environment,
)
from torch import nn

from momentum_hook import MomentumTargetMixin
from momentum_hook.export import full_state_dict

BF16 = torch.bfloat16
MASTER = 'momentum_target_master.'


def build_networks(model, seed):
    """Give ``model`` a bfloat16 online network and its target (m=0.99)."""
    torch.manual_seed(seed)
    model.online = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 2))
    model.target = model.init_momentum_target(model.online, 0.99)
    model.to(BF16)


class Bf16Model(MomentumTargetMixin, nn.Module):
    """A bfloat16 regression with a momentum target, for mmcv runners."""

    def __init__(self, seed=0):
        super().__init__()
        build_networks(self, seed)

    def loss(self, inputs):
        inputs = inputs.to(self.online[0].weight.dtype)
        goal = torch.cat(
            [3 * inputs[:, :1] - inputs[:, 1:], inputs.sin()[:, :1]], 1
        )
        return (self.online(inputs) - goal).pow(2).mean()

    def train_step(self, data, optimizer=None, **kwargs):
        loss = self.loss(data)
        return dict(
            loss=loss, log_vars=dict(loss=loss.item()), num_samples=len(data)
        )


def test_the_state_dict_holds_float32_masters_of_a_bf16_target_only():
    model = Bf16Model()
    with torch.no_grad():
        for param in model.online.parameters():
            param.add_(0.5)
    model.momentum_update()
    state = model.state_dict()
    masters = {
        key[len(MASTER) :]: value
        for key, value in state.items()
        if key.startswith(MASTER)
    }
    assert list(masters) == [
        name for name, _ in model.target.named_parameters()
    ]
    for param, master in zip(model.target.parameters(), masters.values()):
        assert master.dtype == torch.float32
        assert torch.equal(master.to(BF16), param)
        assert not torch.equal(master, param.float())  # more than bf16
    fp32 = Bf16Model().float()
    fp32.momentum_update()
    assert not any(key.startswith(MASTER) for key in fp32.state_dict())
    strict = Bf16Model(seed=1)
    strict.load_state_dict(state)  # strict: the masters are no strangers


def masters_of(state):
    return {
        key[len(MASTER) :]: value
        for key, value in state.items()
        if key.startswith(MASTER)
    }


def test_a_fresh_model_lists_its_masters_before_any_update():
    """So that a checkpointer that loads into the state dict in place (DCP)
    finds every master's key; each holds the target's values in float32,
    where the first update starts."""
    model = Bf16Model()
    masters = masters_of(model.state_dict())
    assert list(masters) == [
        name for name, _ in model.target.named_parameters()
    ]
    for (_, param), master in zip(
        model.target.named_parameters(), masters.values()
    ):
        assert master.dtype == torch.float32
        assert torch.equal(master, param.float())
    # What is loaded into those keys is what the first update starts from.
    saved = Bf16Model(seed=3)
    with torch.no_grad():
        for param in saved.online.parameters():
            param.add_(0.5)
    saved.momentum_update()
    state = model.state_dict()
    for key, value in saved.state_dict().items():
        state[key].copy_(value)  # in place, as DCP loads
    model.load_state_dict(state)
    assert masters_of(model.state_dict()).keys() == masters.keys()
    for mine, theirs in zip(
        masters_of(model.state_dict()).values(),
        masters_of(saved.state_dict()).values(),
    ):
        assert torch.equal(mine, theirs)
    saved.momentum_update()
    model.momentum_update()
    for mine, theirs in zip(
        model.state_dict().values(), saved.state_dict().values()
    ):
        assert torch.equal(mine, theirs)


def test_masters_exist_only_while_the_target_is_low_precision():
    """After ``.float()``, or once a float32 model loaded a bfloat16
    checkpoint, no master is saved, and the next update is the float32
    EMA of the target as it is."""
    bf16 = Bf16Model()
    with torch.no_grad():
        for param in bf16.online.parameters():
            param.add_(0.5)
    bf16.momentum_update()
    checkpoint = bf16.state_dict()
    assert masters_of(checkpoint)
    for model in (bf16.float(), Bf16Model(seed=1).float()):
        if model is not bf16:
            model.load_state_dict(checkpoint)  # strict
        assert not masters_of(model.state_dict())
        reference = float64_copy(params(model.target))
        model.momentum_update()
        assert not masters_of(model.state_dict())
        reference = [
            0.99 * ref + 0.01 * online.double()
            for ref, online in zip(reference, params(model.online))
        ]
        for param, ref in zip(params(model.target), reference):
            assert param.dtype == torch.float32
            torch.testing.assert_close(
                param.double(), ref, rtol=1e-6, atol=1e-7
            )


def test_a_model_built_on_the_meta_device_loads_its_masters_by_assign():
    """``load_state_dict(..., assign=True)`` into a model built under
    ``torch.device('meta')`` keeps the masters until the target has values,
    and the next update continues them bit for bit."""
    saved = Bf16Model()
    with torch.no_grad():
        for param in saved.online.parameters():
            param.add_(0.5)
    saved.momentum_update()
    checkpoint = {
        key: value.clone() for key, value in saved.state_dict().items()
    }
    with torch.device('meta'):
        model = Bf16Model(seed=1)
    assert not masters_of(model.state_dict())  # nothing to list yet
    model.load_state_dict(checkpoint, assign=True)
    for mine, theirs in zip(
        masters_of(model.state_dict()).values(),
        masters_of(checkpoint).values(),
    ):
        assert torch.equal(mine, theirs)
    saved.momentum_update()
    model.momentum_update()
    for mine, theirs in zip(
        model.state_dict().items(), saved.state_dict().items()
    ):
        assert mine[0] == theirs[0] and torch.equal(mine[1], theirs[1])


def checkpointed_linears(model):
    """``model`` with each Linear in a ``checkpoint_wrapper``, whose
    ``_checkpoint_wrapped_module.`` its state-dict keys leave out."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing,
    )

    apply_activation_checkpointing(
        model, check_fn=lambda module: isinstance(module, nn.Linear)
    )
    return model


@pytest.mark.parametrize(
    'wrap',
    [lambda model: model, checkpointed_linears],
    ids=['plain', 'checkpoint_wrapper'],
)
def test_torch_s_state_dict_functions_carry_the_masters(wrap):
    """``get_model_state_dict`` and ``set_model_state_dict`` (full or not)
    round-trip a bfloat16 model with its masters, bit for bit, under the
    target's own state-dict names."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        set_model_state_dict,
    )

    saved = wrap(Bf16Model())
    with torch.no_grad():
        for param in saved.online.parameters():
            param.add_(0.5)
    for _ in range(3):
        saved.momentum_update()
    names = list(saved.target.state_dict())
    assert names == ['0.weight', '0.bias', '2.weight', '2.bias']
    for full in (False, True):
        options = StateDictOptions(full_state_dict=full)
        state = get_model_state_dict(saved, options=options)
        assert state.keys() == saved.state_dict().keys()
        assert list(masters_of(state)) == names
        model = wrap(Bf16Model(seed=1))
        set_model_state_dict(model, state, options=options)
        for mine, theirs in zip(
            model.state_dict().items(), saved.state_dict().items()
        ):
            assert mine[0] == theirs[0] and torch.equal(mine[1], theirs[1])


def test_an_older_checkpoint_restarts_the_masters_from_the_loaded_target():
    """A checkpoint without masters (or with masters of other weights) is
    loaded strictly, and the next update starts from the loaded target."""
    saved = Bf16Model(seed=3)
    with torch.no_grad():
        for param in saved.target.parameters():
            param.add_(1)
    older = {key: value for key, value in saved.state_dict().items()}
    model = Bf16Model()
    with torch.no_grad():
        for param in model.online.parameters():
            param.add_(0.5)
    for momentum in (0.9, 0.99):  # masters of other weights now
        model.momentum = momentum
        model.momentum_update()
    model.load_state_dict(older)
    reference = float64_copy(params(saved.target))
    model.momentum = 0.99
    model.momentum_update()
    reference = [
        0.99 * ref + 0.01 * online.double()
        for ref, online in zip(reference, params(model.online))
    ]
    for param, ref in zip(params(model.target), reference):
        assert torch.equal(param, ref.to(BF16))


# --- mmcv ------------------------------------------------------------------


@pytest.mark.mmcv
def test_mmcv_epoch_runner_bf16_resume_is_bit_for_bit(tmp_path):
    from mmcv.runner import EpochBasedRunner
    from momentum_testing import InterruptBefore
    from torch.utils.data import DataLoader

    from momentum_hook.mmcv_hook import MomentumUpdateHook

    def runner(name, stop=None, model=None):
        model = model or Bf16Model()
        result = EpochBasedRunner(
            model,
            optimizer=torch.optim.SGD(
                model.online.parameters(), lr=0.05, momentum=0.9
            ),
            work_dir=str(tmp_path / name),
            max_epochs=6,
            logger=__import__('logging').getLogger('bf16_resume'),
        )
        result.register_optimizer_hook(dict(grad_clip=None))
        result.register_hook(MomentumUpdateHook())
        result.register_checkpoint_hook(dict(interval=1))
        if stop is not None:
            result.register_hook(InterruptBefore(stop), priority='LOWEST')
        return result, model

    data = DataLoader(
        torch.randn(8, 2, generator=torch.Generator().manual_seed(0)),
        batch_size=2,
        shuffle=False,
    )
    straight, model_a = runner('a')
    straight.run([data], [('train', 1)])
    first, _ = runner('b', stop=12)  # mid-run, after epoch 3
    with pytest.raises(Interrupt):
        first.run([data], [('train', 1)])
    resumed, model_c = runner('c', model=Bf16Model(seed=1))
    resumed.resume(str(tmp_path / 'b' / 'epoch_3.pth'), map_location='cpu')
    resumed.run([data], [('train', 1)])
    assert resumed.iter == straight.iter
    for mine, theirs in zip(
        model_c.state_dict().items(), model_a.state_dict().items()
    ):
        assert mine[0] == theirs[0] and torch.equal(mine[1], theirs[1]), mine[
            0
        ]


# --- MMEngine Runner -------------------------------------------------------


class Bf16EngineModel(MomentumTargetMixin, BaseModel):
    """:class:`Bf16Model` for MMEngine."""

    def __init__(self, seed=0):
        super().__init__()
        build_networks(self, seed)

    loss = Bf16Model.loss

    def forward(self, inputs, data_samples=None, mode='tensor'):
        return dict(loss=self.loss(inputs))


def test_mmengine_runner_bf16_resume_is_bit_for_bit(tmp_path, monkeypatch):
    from test_hook_mmengine import build_runner

    monkeypatch.setenv('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD', '1')
    model_cls = Bf16EngineModel
    hook = dict(type='momentum_hook.MomentumUpdateHook')
    full = build_runner(
        tmp_path / 'full', model_cls(), [hook], iters=10, checkpoint_interval=5
    )
    full.train()
    resumed = build_runner(
        tmp_path / 'resumed',
        model_cls(seed=1),
        [hook],
        iters=10,
        load_from=str(tmp_path / 'full' / 'iter_5.pth'),
        resume=True,
    )
    resumed.train()
    for mine, theirs in zip(
        resumed.model.state_dict().items(), full.model.state_dict().items()
    ):
        assert mine[0] == theirs[0] and torch.equal(mine[1], theirs[1]), mine[
            0
        ]


# --- FlexibleRunner, DeepSpeed bf16 (ZeRO-2/3), two gloo ranks --------------


def bf16_zero(stage):
    from test_flexible_runner import deepspeed_strategy

    return dict(
        deepspeed_strategy(stage=stage),
        bf16=dict(enabled=True),
        inputs_to_half=['inputs'],
    )


def flexible_run(out_dir, rank, resume, stage):
    """Launch 0: the whole run, saving at iteration 4; launch 1: a new
    runner resumed from that checkpoint. Both return the final state."""
    from test_flexible_runner import build_runner, unwrapped

    directory = osp.join(out_dir, 'run')
    runner = build_runner(
        directory,
        bf16_zero(stage),
        [],
        checkpoint=None if resume else 4,
        resume_from=osp.join(directory, 'iter_4.pth') if resume else None,
    )
    runner.train()
    model = unwrapped(runner)
    # The whole model as rank 0 gathers it (a collective; {} on rank 1).
    exported = {
        f'exported.{key}': value
        for key, value in full_state_dict(runner.model).items()
    }
    if stage == 3:  # each rank's partitions, as each rank holds them
        return (
            {
                name: param.ds_tensor.detach().clone()
                for name, param in model.named_parameters()
            }
            | {
                key: value.detach().clone()
                for key, value in model.state_dict().items()
                if key.startswith(MASTER)
            }
            | exported
        )
    return {
        key: value.detach().clone()
        for key, value in model.state_dict().items()
    } | exported


def flexible_main(rank, port, out_dir, resume, stage):
    set_rank_environment(rank, port, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD='1')
    import deepspeed

    deepspeed.init_distributed(
        dist_backend='gloo', timeout=timedelta(seconds=60)
    )
    run_scenarios(
        rank,
        {
            'run': lambda rank: flexible_run(
                str(out_dir.parent), rank, resume, stage
            )
        },
        out_dir,
    )


@pytest.mark.distributed
@pytest.mark.deepspeed
@pytest.mark.parametrize('stage', [2, 3])
def test_flexible_runner_deepspeed_bf16_resume_is_bit_for_bit(tmp_path, stage):
    pytest.importorskip('deepspeed')
    finals = []
    for resume in (False, True):
        out_dir = tmp_path / f'launch{int(resume)}'
        out_dir.mkdir()
        ranks = launch_ranks(
            flexible_main,
            (free_port(), out_dir, resume, stage),
            out_dir,
            'spawn',
        )
        finals.append([rank['run'] for rank in ranks])
    for rank, (straight, resumed) in enumerate(zip(*finals)):
        assert isinstance(straight, dict) and isinstance(resumed, dict), (
            straight,
            resumed,
        )
        assert straight.keys() == resumed.keys()
        assert any(key.startswith(MASTER) for key in straight)
        # full_state_dict: whole masters under ZeRO-2, none under ZeRO-3
        # (each rank's are partitions, which travel in its own file).
        exported = [key for key in straight if key.startswith('exported.')]
        assert bool(exported) == (rank == 0)
        exported_masters = [
            key for key in exported if key.startswith('exported.' + MASTER)
        ]
        if stage == 3:
            assert not exported_masters
            # A persistent parameter's gathered copy, which the export
            # reads, restarts its master on resume (docs/precision.md): it
            # may differ from the uninterrupted run's by one rounding.
            for key in exported:
                del straight[key], resumed[key]
        elif rank == 0:
            assert exported_masters == [
                f'exported.{key}' for key in straight if key.startswith(MASTER)
            ]
        assert straight['target_net.0.weight'].dtype == BF16
        assert not torch.equal(
            straight['target_net.0.weight'], straight['online_net.0.weight']
        )
        for key in straight:
            assert torch.equal(straight[key], resumed[key]), key
