"""Fixtures shared by several test modules."""

from __future__ import annotations

import shutil

import pytest
import torch

from rankkit.tasks.base import data_dir


@pytest.fixture
def one_thread():
    """Run the test on one torch thread, then restore the previous count.

    The models under test are tiny: one thread is fastest, and the test machine may be
    shared (several processes each spinning two OpenMP threads on two cores run ~10x
    slower). A module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def data_copy(tmp_path, monkeypatch):
    """A private copy of data/ that the tasks read instead of the real one."""
    shutil.copytree(data_dir(), tmp_path / "data")
    monkeypatch.setenv("RANKKIT_DATA_DIR", str(tmp_path / "data"))
    return tmp_path / "data"
