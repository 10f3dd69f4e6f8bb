"""Where a result came from: the git commit of the code, a stable hash of the params that made it, and the key
that tells which stage processes form one pipeline run.

The key is ``$DVC_EXP_NAME``; else, under ``dvc repro``, the commit (without ``+dirty``: DVC rewrites tracked
files between stages) and the ``dvc`` process's pid, start time and boot; else the commit and the params hash.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any, Mapping


# DVC rewrites these tracked files between the stages of one run; they must not make the tree look "dirty".
_BOOKKEEPING_PATHSPEC = (":(exclude,glob)**/dvc.lock", ":(exclude,glob)**/.gitignore")


def git_commit(cwd: str | Path | None = None) -> str:
    """HEAD's commit, '+dirty' for uncommitted tracked changes other than DVC's bookkeeping; 'unknown' outside git."""
    def git(*args: str) -> str | None:
        try:
            res = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return res.stdout.strip() if res.returncode == 0 else None

    sha = git("rev-parse", "HEAD")
    if not sha:
        return "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".", *_BOOKKEEPING_PATHSPEC)
    return sha + ("+dirty" if dirty else "")


def params_hash(params: Mapping[str, Any]) -> str:
    """Short stable hash of a params mapping (key order independent)."""
    blob = json.dumps(params, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def is_dvc_command(argv: list[str]) -> bool:
    """``dvc ...``, ``python .../dvc ...`` (a shebang), ``python -m dvc ...``."""
    names = [os.path.basename(a) for a in argv[:2]]
    return names[:1] == ["dvc"] or names[1:2] == ["dvc"] or argv[1:3] == ["-m", "dvc"]


def dvc_invocation() -> str | None:
    """``<pid>.<start ticks>.<boot id>`` of the nearest ``dvc`` ancestor: one per ``dvc repro``."""
    pid = os.getppid()
    try:
        while pid > 1:
            stat = Path(f"/proc/{pid}/stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()  # the command name before ")" may hold spaces
            if is_dvc_command(Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")):
                boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8]
                return f"{pid}.{fields[19]}.{boot}"
            pid = int(fields[1])
    except (OSError, ValueError, IndexError):  # no /proc, or a process that ended meanwhile
        pass
    return None


def pipeline_key(code: str, phash: str) -> str:
    """The pipeline run a stage process belongs to (see the module docstring); ``code``: :func:`git_commit`."""
    dvc = dvc_invocation()
    return os.environ.get("DVC_EXP_NAME") or (f"{code.split('+')[0]}-dvc-{dvc}" if dvc else f"{code}-{phash}")
