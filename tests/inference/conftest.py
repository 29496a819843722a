"""One intra-op torch thread for the inference tests.

The models here are small: with several intra-op threads on a shared, busy machine,
batched steps spend their time in thread hand-offs (a 4-row decode step of the tiny model
measured ~250 ms with 2 threads against ~3 ms with 1). Results do not depend on it.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="package", autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
