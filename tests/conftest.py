import os

import pytest
import torch

# Tests are small; one thread per worker keeps `pytest -n 2` from oversubscribing the 2 cores.
torch.set_num_threads(int(os.environ.get("SENET_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
