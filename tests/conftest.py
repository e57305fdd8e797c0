from pathlib import Path

import pytest
import torch

# Real measured curves shipped with the tests (tests/data/kmap_uexplorer_fdg/README.md).
DATA = Path(__file__).resolve().parent / "data"
REAL_TACS = DATA / "kmap_uexplorer_fdg" / "tacs.tsv"


@pytest.fixture
def real_tacs_path():
    if not REAL_TACS.exists():
        pytest.fail(f"{REAL_TACS} is missing: it is part of the repository (tests/data/)")
    return REAL_TACS


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module: on a shared, oversubscribed 2-core machine, OpenMP
    threads that wait for each other make many small tensor operations ~10x slower."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
