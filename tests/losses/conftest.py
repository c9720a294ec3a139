"""Shared fixtures of the loss tests."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    # These tests run many small ops: intra-op threads only add synchronisation, and on a loaded 2-core
    # machine an OpenMP barrier can cost milliseconds per op. Restored after each module.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
