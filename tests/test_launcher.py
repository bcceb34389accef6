"""The two-rank launcher of the sharded tests stops a stalled launch whole.

A launch has no fixed deadline: it fails when its ranks stop making
progress, says which rank was still running and where, and kills every
process the ranks started.
"""

import subprocess
import sys
import time

import pytest
from momentum_testing import launch_ranks, note_progress

pytestmark = pytest.mark.distributed


def rank_main(rank, out_dir, child_pid_file):
    """Rank 0 finishes; rank 1 starts a child process and then hangs."""
    if rank == 1:
        note_progress(out_dir, rank, 'scenario "hangs"')
        child = subprocess.Popen(
            [sys.executable, '-c', 'import time; time.sleep(600)']
        )
        child_pid_file.write_text(str(child.pid))
        waits_forever()


def waits_forever():
    while True:
        time.sleep(0.1)


def test_a_stalled_launch_names_the_rank_and_kills_its_processes(tmp_path):
    child_pid_file = tmp_path / 'child.pid'
    started = time.monotonic()
    with pytest.raises(TimeoutError) as error:
        launch_ranks(
            rank_main,
            (tmp_path, child_pid_file),
            tmp_path,
            'fork',
            stall_floor=3,
        )
    assert time.monotonic() - started < 60
    message = str(error.value)
    assert 'no rank made progress for' in message
    assert 'rank 1 (pid' in message and 'at scenario "hangs"' in message
    assert 'waits_forever' in message  # its Python stack
    assert 'rank 0' not in message  # it had finished
    child = int(child_pid_file.read_text())
    for _ in range(50):  # the kill is asynchronous
        if not _alive(child):
            break
        time.sleep(0.1)
    assert not _alive(child)


def _alive(pid):
    try:
        with open(f'/proc/{pid}/stat') as stat:
            return stat.read().split()[2] != 'Z'  # a zombie is dead
    except FileNotFoundError:
        return False
