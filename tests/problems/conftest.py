"""Fixtures of the problem-suite tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """Run each test on one intra-op thread and restore the setting afterwards.

    The solvers work on many small tensors; on a shared 2-core machine, two OpenMP threads that
    compete with other processes made the same test 10-40x slower (measured). One thread keeps the
    timings stable; the values do not depend on it.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
