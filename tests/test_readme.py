"""The README's plain-PyTorch example runs as printed and does what it says."""
import copy
from pathlib import Path

import torch
from momentum_testing import reference_momentum, run_doc_example

README = Path(__file__).resolve().parents[1] / 'README.md'


def test_the_plain_loop_example_schedules_and_averages():
    namespace = run_doc_example(README, 'Without a runner')
    target, online = namespace['target'], namespace['online']
    assert namespace['m'] == reference_momentum(99, 100, 0.99)
    # The initial weights again: the same seed, the same initialisation.
    initial = copy.deepcopy(online)
    torch.manual_seed(0)
    for layer in initial:
        if hasattr(layer, 'reset_parameters'):
            layer.reset_parameters()
    for t, o, start in zip(target.parameters(), online.parameters(),
                           initial.parameters()):
        assert not t.requires_grad
        assert not torch.equal(t, start)  # the target followed
        assert not torch.equal(t, o)  # slowly: it is no copy
