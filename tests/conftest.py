from pathlib import Path

import pytest

# ../shared sits beside the repository (in CI too): real data for tests and examples.
SHARED = Path(__file__).resolve().parents[2] / "shared"
REAL_TACS = SHARED / "data" / "kmap_uexplorer_fdg" / "tacs.tsv"


@pytest.fixture
def real_tacs_path():
    if not REAL_TACS.exists():
        pytest.fail(f"{REAL_TACS} is missing: the shared data folder must sit beside the repo")
    return REAL_TACS
