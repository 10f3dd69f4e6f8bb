"""Child processes in tests, bounded in time: a test that waits on a subprocess, `dvc queue` or a server fails
after its timeout, saying what it waited for and what the child printed, instead of hanging CI.

Each child runs in its own session, so a timeout kills the whole process group (DVC's stage processes, torchrun's
workers), not only the command the test started.
"""
from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import pytest


def _tail(text: str | bytes | None, limit: int = 4000) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return (text or "")[-limit:]


def run(cmd: Sequence[str], *, timeout: float, cwd: str | Path | None = None,
        env: Mapping[str, str] | None = None, check: bool = False, what: str | None = None,
        input: str | None = None) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True)`` that cannot hang: after ``timeout`` seconds the
    process group is killed and the test fails naming ``what`` (default: the command) and the output so far.
    ``check``: a non-zero exit fails the test with the command's output."""
    what = what or " ".join(map(str, cmd))
    # Output goes to files, not pipes: a daemon the command leaves behind (`dvc queue start`'s workers) would
    # hold a pipe open, and waiting for its end would wait for the daemon, not for the command.
    with tempfile.TemporaryFile("w+") as out_file, tempfile.TemporaryFile("w+") as err_file:
        proc = subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=None if env is None else dict(env), text=True,
                                stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                                stdout=out_file, stderr=err_file, start_new_session=True)
        if input is not None:
            proc.stdin.write(input)
            proc.stdin.close()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            proc.wait()
            pytest.fail(f"timed out after {timeout:.0f} s waiting for: {what}\n--- stdout ---\n"
                        f"{_tail(_read(out_file))}\n--- stderr ---\n{_tail(_read(err_file))}", pytrace=False)
        out, err = _read(out_file), _read(err_file)
    done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    if check and done.returncode != 0:
        pytest.fail(f"{what} failed (exit {done.returncode}):\n--- stdout ---\n{_tail(out)}\n"
                    f"--- stderr ---\n{_tail(err)}", pytrace=False)
    return done


def _read(file) -> str:
    file.seek(0)
    return file.read()


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc`` and everything in its process group (it was started with ``start_new_session``)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()


def wait_until(done: Callable[[], bool], *, timeout: float, what: str, report: Callable[[], str] = lambda: "",
               interval: float = 2.0) -> None:
    """Poll ``done()`` until it holds; after ``timeout`` seconds fail, naming ``what`` and printing ``report()``
    (e.g. a queue's status and logs)."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for: {what}\n{report()}", pytrace=False)
        time.sleep(interval)
