import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

NAMES_FILE = Path(os.environ.get("MICROGPT_NAMES", ROOT.parent / "shared" / "data" / "names.txt"))


@pytest.fixture(scope="session")
def names_file() -> Path:
    """The real makemore names.txt; tests that need it skip when it is absent."""
    if not NAMES_FILE.is_file():
        pytest.skip(f"the real names file is not at {NAMES_FILE} (set MICROGPT_NAMES)")
    return NAMES_FILE


@pytest.fixture
def tiny_names(tmp_path) -> Path:
    """A small names file written by the test itself."""
    names = ["anna", "bob", "carla", "dave", "eve", "fiona", "greg", "hana", "ivan", "julia",
             "karl", "lena", "mona", "nils", "olga", "paul", "quinn", "rosa", "sven", "tina"]
    path = tmp_path / "names.txt"
    path.write_text("\n".join(names) + "\n", encoding="utf-8")
    return path
