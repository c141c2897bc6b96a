"""bench/timing.cpu_load: background busy processes for latency under contention, never left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgedistill.bench.timing import cpu_load

ROOT = Path(__file__).resolve().parent.parent


def _state(pid: int) -> str | None:
    """The kernel's state letter of ``pid`` (R, S, Z...), None once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _running(pid: int) -> bool:
    return _state(pid) not in (None, "Z", "X")  # a zombie no longer runs (an orphan waits for init to reap it)


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def _wait_until(predicate, deadline_s: float = 30.0) -> bool:
    """Poll ``predicate`` until it holds or the deadline passes (a deadline, not a timing assertion)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_the_load_runs_while_the_block_does_and_is_reaped_after():
    with cpu_load(2) as pids:
        assert len(set(pids)) == 2 and all(_running(p) for p in pids)
        assert all(Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")[-2] == str(os.getpid()).encode()
                   for p in pids)  # each watches this process
        assert _wait_until(lambda: all(_cpu_ticks(p) > 0 for p in pids))  # they burn CPU, not sleep
    assert all(_state(p) is None for p in pids)  # killed and reaped: not even a zombie left


def test_an_exception_in_the_block_still_ends_the_load():
    with pytest.raises(RuntimeError, match="boom"):
        with cpu_load(1) as pids:
            raise RuntimeError("boom")
    assert _state(pids[0]) is None


def test_no_load_starts_nothing_and_a_negative_count_is_refused():
    with cpu_load(0) as pids:
        assert pids == []
    with pytest.raises(ValueError):
        with cpu_load(-1):
            pass


_HOLDER = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
from edgedistill.bench.timing import cpu_load
with cpu_load(2) as pids:
    print(json.dumps(pids), flush=True)
    time.sleep(120)
"""


def _holder() -> tuple[subprocess.Popen, list[int]]:
    """A process inside ``cpu_load(2)``, and the pids of its load."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(ROOT)], stdout=subprocess.PIPE, text=True)
    pids = json.loads(proc.stdout.readline())
    assert len(pids) == 2 and all(_running(p) for p in pids)
    return proc, pids


def test_the_commands_the_tests_start_hear_ctrl_c():
    """The premise of every Ctrl-C test: a command started here handles SIGINT, even where pytest itself was started
    with SIGINT ignored (a shell's background job); tests/conftest.py sees to it."""
    probe = "import signal; print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip() == "True"


def test_ctrl_c_ends_the_load_with_the_command():
    proc, pids = _holder()
    try:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) != 0  # KeyboardInterrupt
        assert all(_state(p) is None for p in pids)  # killed and reaped before the holder exited
    finally:
        proc.kill()
        proc.wait()


def test_a_killed_parent_leaves_no_load_spinning():
    """SIGKILL runs no cleanup: the workers notice they were orphaned and end themselves."""
    proc, pids = _holder()
    proc.kill()
    proc.wait()
    try:
        assert _wait_until(lambda: not any(_running(p) for p in pids))
    finally:
        for p in pids:  # do not leave them to burn the CI machine if the assertion failed
            if _running(p):
                os.kill(p, signal.SIGKILL)
