import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the scripts live at the top level


@pytest.fixture(autouse=True)
def one_thread():
    """The models in the tests are tiny: more threads gain nothing, and on a busy machine
    OpenMP threads waiting for each other made them several times slower. Restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
