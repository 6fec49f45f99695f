import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the scripts live at the top level

from prepared import write_prepared  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """The models in the tests are tiny: more threads gain nothing, and on a busy machine
    OpenMP threads waiting for each other made them several times slower. Restored after;
    OMP_NUM_THREADS=1 keeps models.fit_threads (and the scripts the tests start) at one."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def prepared(tmp_path):
    """prepared(name, **settings) writes a tiny prepared folder tmp_path/name (see
    prepared.write_prepared for the settings) and returns its path."""
    return lambda name, **settings: write_prepared(tmp_path / name, **settings)
