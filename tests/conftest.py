"""Shared test set-up.

Tiny models are dominated by per-op overhead: on a 2-core machine two intra-op threads make them slower, not
faster, and far slower when other processes compete for the cores. One thread keeps the suite fast and steady.
"""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
