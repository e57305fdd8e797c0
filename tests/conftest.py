from pathlib import Path

import pytest

# Real measured curves shipped with the tests (tests/data/kmap_uexplorer_fdg/README.md).
DATA = Path(__file__).resolve().parent / "data"
REAL_TACS = DATA / "kmap_uexplorer_fdg" / "tacs.tsv"


@pytest.fixture
def real_tacs_path():
    if not REAL_TACS.exists():
        pytest.fail(f"{REAL_TACS} is missing: it is part of the repository (tests/data/)")
    return REAL_TACS
