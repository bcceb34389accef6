"""Helpers shared by the EMA, mixin and distributed tests; not a test module.

The checks here are written independently of ``momentum_hook.ema``: the
reference EMA is float64 arithmetic spelled out, and the reference momentum
the schedule's formula, so that the code under test never judges itself.
"""

import math
import os
import socket
import time
from datetime import timedelta

import pytest
import torch
from doc_snippets import code_block
from torch import nn

from momentum_hook import MomentumTargetMixin

#: Tests that need a CUDA device; ``pytest -m cuda`` runs only those, and
#: without a device they are skipped (see ``conftest.py``).
cuda_only = pytest.mark.cuda


def run_doc_example(path, heading):
    """Run the first ```python block under ``heading`` (of any level) of the
    markdown file ``path``, after ``torch.manual_seed(0)``; its namespace.

    The block must run with torch alone: it may not name mmcv or mmengine.
    """
    code = code_block(path, heading)
    assert 'mmcv' not in code and 'mmengine' not in code
    torch.manual_seed(0)
    namespace = {}
    exec(compile(code, str(path), 'exec'), namespace)
    return namespace


def free_port():
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def reference_momentum(k, max_iters, base, end=1.0):
    """The cosine schedule written out independently of the package.

    ``m_k = end - (end - base) * (cos(pi * k / K) + 1) / 2`` in MMSelfSup
    0.x's order of floating-point operations, so that it is bit-identical.
    """
    return (
        end - (end - base) * (math.cos(math.pi * k / float(max_iters)) + 1) / 2
    )


def float64_copy(tensors):
    """Detached float64 copies of ``tensors``."""
    return [tensor.detach().to(torch.float64, copy=True) for tensor in tensors]


def ema_step(reference, online, momentum):
    """One reference step in float64: ``m * reference + (1 - m) * online``."""
    return [
        momentum * ref
        + (1 - momentum) * new.detach().to(ref.device, torch.float64)
        for ref, new in zip(reference, online)
    ]


def replay_ema(initial_target, online_history, momenta):
    """The float64 target after one reference step per recorded online state.

    Args:
        initial_target (list[Tensor]): The target before the first update.
        online_history (list[list[Tensor]]): The online tensors after each
            optimizer step.
        momenta (list[float]): The momentum of each update.
    """
    assert len(online_history) == len(momenta)
    reference = float64_copy(initial_target)
    for online, momentum in zip(online_history, momenta):
        reference = ema_step(reference, online, momentum)
    return reference


def assert_matches_reference(actual, reference, dtype=torch.float32):
    """``actual`` equals the float64 ``reference`` to ``dtype`` rounding."""
    assert len(actual) == len(reference)
    for tensor, expected in zip(actual, reference):
        torch.testing.assert_close(
            tensor.detach().to(torch.float64), expected, **tolerance(dtype)
        )


def tolerance(dtype):
    """``assert_close`` tolerances for a result stored in ``dtype``."""
    if dtype == torch.float64:
        return dict(rtol=1e-7, atol=1e-7)
    if dtype == torch.float32:
        return dict(rtol=1.3e-6, atol=1e-5)
    # A low-precision result is compared with a reference rounded to dtype
    # after each step; lerp rounds once from float, so at most about an ulp.
    eps = torch.finfo(dtype).eps
    return dict(rtol=eps, atol=eps)


class TinyBYOL(MomentumTargetMixin, nn.Module):
    """A BYOL-shaped model of a few parameters built on the mixin.

    ``forward(x)`` returns the loss between the online network on ``x`` and
    the target network on a second "view" of ``x``; ``train_step`` is the
    mmcv 1.x runner's entry point.
    """

    def __init__(self, base_momentum=0.99, buffers='keep'):
        super().__init__()
        self.online_net = nn.Sequential(
            nn.Linear(4, 3), nn.BatchNorm1d(3), nn.ReLU(), nn.Linear(3, 2)
        )
        self.target_net = self.init_momentum_target(
            self.online_net, base_momentum=base_momentum, buffers=buffers
        )

    def forward(self, x):
        with torch.no_grad():
            target = self.target_net(x.roll(1, dims=1))
        return (self.online_net(x) - target).pow(2).mean()

    def train_step(self, data_batch, optimizer, **kwargs):
        loss = self(data_batch)
        return dict(
            loss=loss,
            log_vars=dict(loss=loss.item()),
            num_samples=len(data_batch),
        )


def params(module):
    """``module``'s parameters as a list, in order."""
    return list(module.parameters())


def snapshot(tensors):
    """Detached clones of ``tensors`` (parameters or buffers)."""
    return [tensor.detach().clone() for tensor in tensors]


def assert_all_equal(actual, expected):
    """Bit-identical tensors, pair by pair."""
    actual, expected = list(actual), list(expected)
    assert len(actual) == len(expected)
    for index, (a, b) in enumerate(zip(actual, expected)):
        assert a.dtype == b.dtype, index
        assert torch.equal(a, b), index


class Interrupt(Exception):
    """Stands for a crash."""


def _interrupt_before():
    from mmcv.runner import Hook

    class InterruptBefore(Hook):
        """Interrupts a run before iteration ``k``, once ``k`` are done."""

        def __init__(self, k):
            self.k = k

        def before_train_iter(self, runner):
            if runner.iter == self.k:
                raise Interrupt

    return InterruptBefore


def __getattr__(name):
    # An mmcv 1.x hook, built on first use, so that this module (and the
    # tests that need only torch) import without mmcv.
    if name == 'InterruptBefore':
        globals()[name] = _interrupt_before()
        return globals()[name]
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


#: The ZeRO-3 options of every DeepSpeed run in the tests. DeepSpeed 0.19.6
#: (the newest with which MMEngine 0.10.7's DeepSpeedStrategy builds) gathers
#: several parameters at once without waiting for all of its gloo
#: all-gathers: the persistent parameters it re-gathers after each optimizer
#: step, for one, may still be in flight when the next computation reads
#: them. One at a time, each gather completes (fixed in DeepSpeed 0.19.8).
ZERO3_ON_GLOO = dict(stage3_allgather_sequential=True)


def gather_zero3(params):
    """Whole copies of ZeRO-3 ``params``, gathered one at a time.

    DeepSpeed 0.19.6 waits only for the last of the all-gathers it issues for
    a ``GatheredParameters`` of several parameters; on gloo the others may
    still be in flight, and their values are then read unfinished (fixed in
    DeepSpeed 0.19.8). A single parameter is gathered synchronously.
    """
    import deepspeed

    copies = []
    for param in params:
        with deepspeed.zero.GatheredParameters([param]):
            copies.append(param.detach().clone())
    return copies


# --- Sharded training (tests/test_sharded*.py) -----------------------------
#
# Each engine's test launches two ranks once; every rank runs a list of
# scenarios and saves what each returned (or the error it raised) to a file,
# which the tests then judge against a float64 reference replayed here.

SHARDED_WORLD_SIZE = 2
#: The momentum of each update in a sharded training scenario.
SHARDED_MOMENTA = [0.9, 0.5, 0.99, 0.7]


def build_sharded(buffers):
    """A seeded :class:`TinyBYOL` (the same on every rank), target in eval.

    Returns:
        tuple: ``(model, online, target)``, the networks as built.
    """
    torch.manual_seed(0)
    model = TinyBYOL(buffers=buffers)
    model.target_net.eval()  # its forward must not move its statistics
    return model, model.online_net, model.target_net


def sharded_batch(rank, step):
    """The batch of ``rank`` at ``step``: other data on every rank."""
    generator = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(4, 4, generator=generator)


def record_sharded_training(
    rank,
    model,
    online,
    target,
    train_step,
    gather,
    update=None,
    momenta=SHARDED_MOMENTA,
):
    """Train a wrapped :class:`TinyBYOL`, updating the target after each step.

    Args:
        rank (int): This rank, for the data.
        model (TinyBYOL): The model, already wrapped by the engine.
        online (nn.Module): The online network as built, before wrapping.
        target (nn.Module): The target network as built, before wrapping.
        train_step (Callable): ``train_step(batch)``: one optimizer step.
        gather (Callable): ``gather(network)``: ``(params, buffers)``, the
            network's whole parameters (a list, in order) and buffers (a
            dict), gathered from every rank; a collective.
        update (Callable): The momentum update; defaults to
            ``model.momentum_update()``.
        momenta (list[float]): The momentum of each update.

    Returns:
        dict: ``initial`` and ``final`` (the target's ``gather``) and
        ``online`` (the online network's after each step), detached copies.
    """
    initial, history = gather(target), []
    for step, momentum in enumerate(momenta):
        train_step(sharded_batch(rank, step))
        model.momentum = momentum
        (update or model.momentum_update)()
        history.append(gather(online))
    return dict(
        initial=initial,
        online=history,
        final=gather(target),
        momenta=list(momenta),
    )


def assert_sharded_record_matches(record, buffers):
    """The target of :func:`record_sharded_training` equals the reference.

    The parameters must equal a float64 EMA replayed from the recorded
    online parameters; the buffers what the ``buffers`` policy makes of the
    recorded online buffers (the target stays in eval mode, so its own
    forward passes leave its statistics alone).
    """
    (initial, initial_buffers), (final, final_buffers) = (
        record['initial'],
        record['final'],
    )
    momenta = record['momenta']
    online = [params for params, _ in record['online']]
    assert not torch.equal(online[0][0], online[-1][0])  # it trained
    assert_matches_reference(final, replay_ema(initial, online, momenta))
    online_buffers = [buffers_ for _, buffers_ in record['online']]
    assert final_buffers.keys() == initial_buffers.keys()
    for name, final_buffer in final_buffers.items():
        if buffers == 'keep':
            expected = initial_buffers[name]
        elif buffers == 'copy' or not final_buffer.is_floating_point():
            expected = online_buffers[-1][name]
        else:  # 'average'
            expected = replay_ema(
                [initial_buffers[name]],
                [[step[name]] for step in online_buffers],
                momenta,
            )[0].to(final_buffer.dtype)
        torch.testing.assert_close(final_buffer, expected, msg=name)
    if buffers != 'keep':  # the statistics moved, so the check can fail
        assert any(
            not torch.equal(initial_buffers[name], final_buffers[name])
            for name in final_buffers
        )


def set_rank_environment(rank, port, **extra):
    """One torch thread and the environment DeepSpeed (on the CPU) and
    ``env://`` rendezvous read, for ``rank`` of two."""
    torch.set_num_threads(1)
    os.environ.update(
        DS_ACCELERATOR='cpu',
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(SHARDED_WORLD_SIZE),
        MASTER_ADDR='127.0.0.1',
        MASTER_PORT=str(port),
        **extra,
    )


def run_scenarios(rank, scenarios, out_dir):
    """Run every ``scenarios[name](rank=rank)``; save this rank's results.

    A scenario that raises is recorded as ``('raised', type name,
    message)``, so that a failure test can judge the error and one broken
    scenario does not hide the others. Before each scenario the rank notes
    its name in its progress file (see :func:`launch_ranks`). The process
    group, set up by the caller, is torn down at the end.
    """
    import torch.distributed as dist

    results = {}
    try:
        for name, scenario in scenarios.items():
            note_progress(out_dir, rank, f'scenario {name!r}')
            try:
                results[name] = scenario(rank=rank)
            except Exception as error:  # judged by the tests
                results[name] = ('raised', type(error).__name__, str(error))
        note_progress(out_dir, rank, 'saving its results')
        # Written whole or not at all: the launcher trusts a file it finds.
        partial = out_dir / f'rank{rank}.pth.partial'
        torch.save(results, partial)
        os.replace(partial, out_dir / f'rank{rank}.pth')
    finally:
        dist.destroy_process_group()


#: A launch fails when no rank has made progress for this many seconds, or
#: for ``STALL_FACTOR`` times its slowest step so far, whichever is longer.
#: The floor covers a rank's start (imports, the process group); a machine
#: busy with other work slows every step alike, so the window widens with it.
STALL_FLOOR = 180
STALL_FACTOR = 10


def note_progress(out_dir, rank, step):
    """Record that ``rank`` is now at ``step`` (one line per step)."""
    with open(out_dir / f'rank{rank}.progress', 'a') as progress:
        progress.write(f'{time.time():.3f} {step}\n')


def _progress(out_dir, rank):
    """``[(time, step), ...]`` that ``rank`` noted so far."""
    try:
        with open(out_dir / f'rank{rank}.progress') as progress:
            lines = progress.read().splitlines()
    except FileNotFoundError:
        return []
    return [
        (float(when), step)
        for when, step in (line.split(' ', 1) for line in lines if ' ' in line)
    ]


def _rank_entry(rank, out_dir, function, *args):
    """Run one rank in a process group of its own, so that the launcher can
    stop it with every process it started (a compiler, say); on SIGUSR1 it
    writes every thread's Python stack to ``rank{rank}.stack``."""
    import faulthandler
    import signal

    os.setpgid(0, 0)
    stack = open(out_dir / f'rank{rank}.stack', 'w')
    faulthandler.register(signal.SIGUSR1, file=stack, all_threads=True)
    note_progress(out_dir, rank, 'starting')
    function(rank, *args)


def _stalled(out_dir, started, now, floor):
    """Why the launch has stalled, or None while it makes progress."""
    times = [started]
    for rank in range(SHARDED_WORLD_SIZE):
        times += [when for when, _ in _progress(out_dir, rank)]
    times.sort()
    slowest = max(map(float.__sub__, times[1:], times[:-1]), default=0.0)
    window = max(floor, STALL_FACTOR * slowest)
    if now - times[-1] > window:
        return (
            f'no rank made progress for {now - times[-1]:.0f} s (the '
            f'limit: {window:.0f} s, {STALL_FACTOR}x the slowest step '
            f'so far, {slowest:.1f} s, or at least {floor} s)'
        )
    return None


def _where(out_dir, process, rank):
    """Where a rank that is still running is: its last step and stack."""
    import signal

    try:
        os.kill(process.pid, signal.SIGUSR1)
        time.sleep(1)
    except ProcessLookupError:
        pass
    steps = _progress(out_dir, rank)
    step = steps[-1][1] if steps else 'not started'
    try:
        stack = (out_dir / f'rank{rank}.stack').read_text().strip()
    except FileNotFoundError:
        stack = ''
    return f'rank {rank} (pid {process.pid}) is still running, at {step}' + (
        f'; its Python stack:\n{stack}' if stack else ''
    )


def _stop(processes):
    """Kill every rank's process group: the ranks and all they started."""
    import signal

    for process in processes:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            if process.is_alive():
                process.kill()
    for process in processes:
        process.join(5)


def launch_ranks(
    function, args, out_dir, start_method, stall_floor=STALL_FLOOR
):
    """Start ``function(rank, *args)`` on two ranks; their saved results.

    Each rank runs in a process group of its own. The launch has no fixed
    deadline: it fails when it stops making progress (see
    :data:`STALL_FLOOR`, :data:`STALL_FACTOR`), judged from the steps the
    ranks note (:func:`note_progress`; :func:`run_scenarios` notes each
    scenario).

    Raises:
        TimeoutError: If the launch stalls. The message names each rank
            that was still running, its last step and its Python stack;
            every rank's process group is killed.
    """
    import torch.multiprocessing as mp

    started = time.time()
    context = mp.start_processes(
        _rank_entry,
        args=(out_dir, function, *args),
        nprocs=SHARDED_WORLD_SIZE,
        join=False,
        start_method=start_method,
    )
    files = [out_dir / f'rank{rank}.pth' for rank in range(SHARDED_WORLD_SIZE)]
    try:
        while not context.join(1):  # raises if a rank failed
            stalled = _stalled(out_dir, started, time.time(), stall_floor)
            if stalled:
                running = [
                    _where(out_dir, process, rank)
                    for rank, process in enumerate(context.processes)
                    if process.is_alive()
                ]
                raise TimeoutError('\n'.join([stalled, *running]))
    except mp.ProcessExitedException:
        # A signal after every rank saved its results is torch's teardown
        # (now and then gloo aborts with "terminate called without an
        # active exception" as the process group is destroyed), not the
        # code under test: nothing of ours runs after the save.
        if not all(map(os.path.exists, files)):
            raise
    finally:
        _stop(context.processes)
    return [torch.load(path, weights_only=False) for path in files]


def sharded_results(rank_main, out_dir, scenarios, start_method='spawn'):
    """Launch ``rank_main(rank, port, out_dir)`` on two ranks.

    Returns:
        dict: ``results[name]``, the two ranks' results of scenario ``name``.
    """
    ranks = launch_ranks(
        rank_main, (free_port(), out_dir), out_dir, start_method
    )
    return {name: [rank[name] for rank in ranks] for name in scenarios}


def launch_each(rank_main, base, launches, start_method='spawn'):
    """Launch ``rank_main(rank, port, out_dir, index)`` on two ranks once per
    scenario table of ``launches``, in ``base/launch<index>``.

    Returns:
        dict: ``results[name]``, the two ranks' results of scenario ``name``.
    """
    results = {}
    for index, scenarios in enumerate(launches):
        out_dir = base / f'launch{index}'
        out_dir.mkdir()
        ranks = launch_ranks(
            rank_main, (free_port(), out_dir, index), out_dir, start_method
        )
        results.update(
            {name: [rank[name] for rank in ranks] for name in scenarios}
        )
    return results


def init_deepspeed_rank(rank, port):
    """Make this process rank ``rank`` of a two-rank DeepSpeed run on the
    CPU (``DS_ACCELERATOR=cpu``, gloo)."""
    set_rank_environment(rank, port)
    import deepspeed

    deepspeed.init_distributed(
        dist_backend='gloo', timeout=timedelta(seconds=60)
    )


def assert_trainings_match(results, trainings, name):
    """Both ranks' records of training ``name`` match the reference.

    Args:
        results (dict): From :func:`sharded_results`.
        trainings (dict): ``name -> (buffer policy, scenario)``.
        name (str): The scenario.

    Returns:
        list[dict]: The records.
    """
    for record in results[name]:
        assert isinstance(record, dict), record  # not an error
        assert_sharded_record_matches(record, trainings[name][0])
    return results[name]


def raised(result, error=ValueError):
    """The message of a scenario result that must be a raised ``error``."""
    assert isinstance(result, tuple) and result[0] == 'raised', result
    assert result[1] == error.__name__, result
    return result[2]
