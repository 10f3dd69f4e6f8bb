"""tests/procs.py: a child that hangs fails its test in bounded time, saying what was awaited, and leaves no
process behind (its grandchildren included)."""
from __future__ import annotations

import os
import sys
import time

import pytest

from . import procs

# Starts a grandchild that writes its pid, then both sleep far past the timeout.
HANG = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
print(child.pid, flush=True)
time.sleep(60)
"""


def test_a_hanging_child_fails_in_time_naming_what_was_awaited_and_its_group_is_killed():
    start = time.monotonic()
    with pytest.raises(pytest.fail.Exception) as failure:
        procs.run([sys.executable, "-c", HANG], timeout=1, what="the queue to drain")
    assert time.monotonic() - start < 20
    message = str(failure.value)
    assert "timed out after 1 s waiting for: the queue to drain" in message
    grandchild = int(message.split("--- stdout ---\n")[1].split()[0])
    deadline = time.monotonic() + 5
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(grandchild)


def _alive(pid: int) -> bool:
    """Running (a killed process that waits to be reaped is a zombie, not alive)."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def test_check_shows_the_output_of_a_failed_command():
    with pytest.raises(pytest.fail.Exception, match="exit 3"):
        procs.run([sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], timeout=30, check=True)
    done = procs.run([sys.executable, "-c", "print('ok')"], timeout=30)
    assert done.returncode == 0 and done.stdout == "ok\n"


def test_wait_until_reports_what_it_waited_for():
    with pytest.raises(pytest.fail.Exception, match="waiting for: a flag\nstatus: stuck"):
        procs.wait_until(lambda: False, timeout=0.2, what="a flag", report=lambda: "status: stuck", interval=0.05)


# Leaves a daemon behind (its own session, our output inherited) and exits at once, as `dvc queue start` does.
DAEMON = """
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], start_new_session=True)
print(child.pid, flush=True)
"""


def test_a_daemon_left_behind_does_not_hold_the_wait():
    start = time.monotonic()
    done = procs.run([sys.executable, "-c", DAEMON], timeout=20, check=True)
    try:
        assert time.monotonic() - start < 10  # the command's end, not the daemon's
    finally:
        os.kill(int(done.stdout.split()[0]), 9)
