"""Data that travels: a run pushed to a DVC remote is pulled whole by a fresh clone, which then has nothing to
run; an experiment moves between two clones with `dvc exp push` / `dvc exp pull`. Against a directory remote and
an SSH remote (OpenSSH on 127.0.0.1 with a throwaway key, stopped afterwards).
"""
from __future__ import annotations

import getpass
import hashlib
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from . import procs
from .helpers import DVC, copy_checkout, minimal_params, ran_stages, stale_stages

pytestmark = pytest.mark.slow
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "GIT_"))}
    env.update(HOME=str(home), GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t", SRMODELS_PARAMS="params.yaml")
    return env


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> str:
    done = procs.run(cmd, cwd=cwd, env=env, timeout=timeout, check=True)
    return done.stdout + done.stderr


def _digests(repo: Path) -> dict[str, str]:
    """sha256 of every file under data/ that DVC tracks (git-ignored outputs), by path."""
    out = {}
    for path in sorted((repo / "data").rglob("*")):
        rel = path.relative_to(repo).as_posix()
        if path.is_file() and not rel.startswith(("data/runs/", "data/.work/")) and path.name != ".gitignore":
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _pushed(out: str) -> int:
    """How many files a `dvc push` says it moved."""
    found = re.search(r"(\d+) files? pushed", out)
    assert found, out
    return int(found[1])


def _cache_intact(repo: Path) -> None:
    """Every object in the repository's DVC cache still hashes to its name: no output written in place reached
    the files the workspace shares with the cache."""
    objects = [p for p in (repo / ".dvc/cache/files/md5").rglob("*") if p.is_file()]
    assert objects
    for path in objects:
        name = path.parent.name + path.name.removesuffix(".dir")
        assert hashlib.md5(path.read_bytes()).hexdigest() == name, path


def _shares_files_with_cache(repo: Path) -> None:
    """The workspace's DVC outputs are the cache's files (cache.type: hardlinks here), not second copies."""
    cache = {p.stat().st_ino for p in (repo / ".dvc/cache/files/md5").rglob("*") if p.is_file()}
    outputs = [p for p in (repo / "data").rglob("*.png") if p.is_file()] + list((repo / "data").rglob("*.npy"))
    copies = [str(p) for p in outputs if p.stat().st_ino not in cache]
    assert outputs and not copies, copies[:3]


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A repository on the minimal profile after `dvc repro`, committed and pushed to a bare git repository.
    Returns (origin, bare, env, tmp)."""
    tmp = tmp_path_factory.mktemp("remote")
    env = _env(tmp)
    origin = tmp / "origin"
    copy_checkout(origin, outputs=False)
    (origin / "params.yaml").write_text(yaml.safe_dump(minimal_params(), sort_keys=False))
    _run(["git", "init", "-q", "-b", "main"], origin, env)
    _run(["git", "add", "-A"], origin, env)
    _run(["git", "commit", "-qm", "minimal profile"], origin, env)
    _run([DVC, "repro"], origin, env, timeout=900)
    _run(["git", "add", "-A"], origin, env)
    _run(["git", "commit", "-qm", "a run"], origin, env)
    bare = tmp / "hub.git"
    _run(["git", "init", "-q", "--bare", "-b", "main", str(bare)], tmp, env)
    _run(["git", "remote", "add", "hub", str(bare)], origin, env)
    _run(["git", "push", "-q", "hub", "main"], origin, env)
    return origin, bare, env, tmp


def _clone(bare: Path, dst: Path, env: dict[str, str]) -> Path:
    _run(["git", "clone", "-q", str(bare), str(dst)], dst.parent, env)
    return dst


def _pull_and_check(origin: Path, clone: Path, env: dict[str, str], remote: str) -> None:
    """`dvc pull` restores every output of origin's run byte for byte, and nothing is left to run."""
    _run([DVC, "pull", "-r", remote], clone, env)
    assert _digests(clone) == _digests(origin)
    assert stale_stages(clone, env) == set()
    assert ran_stages(_run([DVC, "repro"], clone, env)) == set()


def test_directory_remote_moves_a_run_and_an_experiment(hub, tmp_path):
    origin, bare, env, _ = hub
    store = tmp_path / "store"  # an NFS mount on a lab's machines
    _run([DVC, "remote", "add", "--local", "-f", "shared", str(store)], origin, env)
    first = _pushed(_run([DVC, "push", "-r", "shared"], origin, env))
    assert "Everything is up to date" in _run([DVC, "push", "-r", "shared"], origin, env)  # only what changed

    clone = _clone(bare, tmp_path / "clone", env)
    _run([DVC, "remote", "add", "--local", "shared", str(store)], clone, env)  # each machine names its mount
    _pull_and_check(origin, clone, env, "shared")
    _shares_files_with_cache(clone)

    # An experiment made in one clone, fetched and applied in the other.
    _run([DVC, "remote", "default", "--local", "shared"], origin, env)
    _run([DVC, "exp", "run", "-n", "two-epochs", "-S", "fusion.epochs=2"], origin, env, timeout=600)
    made = (origin / "data/fusion/metrics.json").read_bytes()
    # The stages replaced shared files by staging and swapping: the cache holds both runs, intact.
    _cache_intact(origin)
    # Only the experiment's new outputs travel (the fusion's, test's, score's and ensemble's).
    assert 0 < _pushed(_run([DVC, "push", "-r", "shared"], origin, env)) < first
    _run([DVC, "exp", "push", "hub", "two-epochs"], origin, env)
    _run(["git", "checkout", "--", "."], origin, env)  # origin's workspace back at its commit, for later tests
    _run([DVC, "checkout"], origin, env)
    assert stale_stages(origin, env) == set()
    _run([DVC, "remote", "default", "--local", "shared"], clone, env)
    _run([DVC, "exp", "pull", "origin", "two-epochs"], clone, env)
    _run([DVC, "exp", "apply", "two-epochs"], clone, env)
    assert (clone / "data/fusion/metrics.json").read_bytes() == made
    assert stale_stages(clone, env) == set()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def sshd(tmp_path):
    """OpenSSH on 127.0.0.1: a throwaway host key and client key, this user only, stopped afterwards."""
    if not Path(SSHD).exists():
        pytest.skip("OpenSSH server not installed (Debian's openssh-server; .ci/run installs it)")
    pytest.importorskip("dvc_ssh", reason="DVC's SSH remotes need dvc-ssh (pip install -e '.[remote]')")
    keys = tmp_path / "keys"
    keys.mkdir()
    for name in ("host", "client"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / name)], check=True,
                       timeout=30)
    (keys / "authorized_keys").write_text((keys / "client.pub").read_text())
    port = _free_port()
    config = keys / "sshd_config"
    config.write_text(f"Port {port}\nListenAddress 127.0.0.1\nHostKey {keys / 'host'}\n"
                      f"PidFile {keys / 'sshd.pid'}\nAuthorizedKeysFile {keys / 'authorized_keys'}\n"
                      "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n"
                      "StrictModes no\nUsePAM no\nSubsystem sftp internal-sftp\n")
    Path("/run/sshd").mkdir(exist_ok=True) if os.geteuid() == 0 else None  # privilege separation, as root
    log = (keys / "sshd.log").open("w")
    server = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"sshd did not start: {(keys / 'sshd.log').read_text()}")
                time.sleep(0.2)
        yield {"port": port, "key": keys / "client", "user": getpass.getuser(), "log": keys / "sshd.log"}
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def test_ssh_remote_moves_a_run(hub, sshd, tmp_path):
    origin, bare, env, _ = hub
    url = f"ssh://{sshd['user']}@127.0.0.1:{sshd['port']}{tmp_path / 'store'}"
    for repo in (origin, _clone(bare, tmp_path / "clone", env)):
        _run([DVC, "remote", "add", "--local", "-f", "lab", url], repo, env)
        # Credentials stay out of git: .dvc/config.local is ignored.
        _run([DVC, "remote", "modify", "--local", "lab", "keyfile", str(sshd["key"])], repo, env)
        assert "keyfile" not in (repo / ".dvc/config").read_text()
    # A key the server does not accept: DVC's one error line, nothing moves.
    stranger = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True, timeout=30)
    _run([DVC, "remote", "modify", "--local", "lab", "keyfile", str(stranger)], origin, env)
    done = procs.run([DVC, "push", "-r", "lab"], cwd=origin, env=env, timeout=120, check=False)
    errors = [line for line in done.stderr.splitlines() if line.startswith("ERROR")]
    assert done.returncode != 0 and len(errors) == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "store" / "files").exists()
    _run([DVC, "remote", "modify", "--local", "lab", "keyfile", str(sshd["key"])], origin, env)
    out = _run([DVC, "push", "-r", "lab"], origin, env)
    assert "pushed" in out, f"{out}\nsshd: {sshd['log'].read_text()}"
    _pull_and_check(origin, tmp_path / "clone", env, "lab")


def test_an_unreachable_remote_fails_and_changes_nothing(hub, tmp_path):
    pytest.importorskip("dvc_ssh", reason="DVC's SSH remotes need dvc-ssh (pip install -e '.[remote]')")
    origin, _, env, _ = hub
    before = _digests(origin)
    _run([DVC, "remote", "add", "--local", "-f", "gone", f"ssh://nobody@127.0.0.1:{_free_port()}/x"], origin, env)
    done = procs.run([DVC, "push", "-r", "gone"], cwd=origin, env=env, timeout=120, check=False)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1 and "127.0.0.1" in errors[0] and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert _digests(origin) == before
