"""Fixtures and hooks shared by the test modules. Plain helper functions and constants are in tests/helpers.py;
no test imports this file."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from .helpers import write_sr_data


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)
    yield


@pytest.fixture(scope="session")
def empty_mlflow_db(tmp_path_factory) -> Path:
    """An MLflow sqlite store with its tables made and nothing logged. Making the tables runs MLflow's migrations
    (seconds); a test module copies this file to start its own store."""
    mlflow = pytest.importorskip("mlflow")
    path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    mlflow.MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments(max_results=1)
    return path


@pytest.fixture(scope="module")
def sr_data(tmp_path_factory) -> dict:
    """test_train's and test_ema's fine-tuning data (helpers.write_sr_data), written once per module."""
    return write_sr_data(tmp_path_factory.mktemp("sr"))


@pytest.fixture
def cli(capsys, monkeypatch):
    """``srmodels`` main() in-process: (exit code, stdout, stderr); SRMODELS_DEBUG unset so errors are one line."""
    from srmodels.cli import main

    monkeypatch.delenv("SRMODELS_DEBUG", raising=False)

    def run(*args):
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err
    return run


@pytest.fixture
def read_only_folder(tmp_path, monkeypatch):
    """An empty folder in which no file can be made: mode 0o555. Root passes the permission bits, so when this
    process could still write there, making a file in it (``os.open`` with O_CREAT, what ``tempfile`` calls) is
    refused with EACCES, as the kernel refuses it to anyone else, or to root on a read-only mount."""
    import errno

    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):
        real_open = os.open

        def refusing_open(path, flags, *args, **kwargs):
            if flags & os.O_CREAT and Path(os.path.abspath(path)).is_relative_to(folder):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(os, "open", refusing_open)
    yield folder
    folder.chmod(0o755)
