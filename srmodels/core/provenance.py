"""Where a result came from: the git commit of the code and a stable hash of the params that made it."""
from __future__ import annotations

import hashlib
import json
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
