import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="session", autouse=True)
def token_store_cache(tmp_path_factory) -> Iterator[Path]:
    """One token-store cache for the whole session (subprocesses inherit it), never the user's."""
    cache = tmp_path_factory.mktemp("cache")
    patch = pytest.MonkeyPatch()
    patch.setenv("MICROGPT_CACHE", str(cache))
    yield cache
    patch.undo()


@pytest.fixture(scope="session")
def names_file() -> Path:
    """The real makemore names.txt, as it ships inside the package."""
    from microgpt.data import BUNDLED_NAMES

    return BUNDLED_NAMES


@pytest.fixture
def tiny_names(tmp_path) -> Path:
    """A small names file written by the test itself."""
    names = ["anna", "bob", "carla", "dave", "eve", "fiona", "greg", "hana", "ivan", "julia",
             "karl", "lena", "mona", "nils", "olga", "paul", "quinn", "rosa", "sven", "tina"]
    path = tmp_path / "names.txt"
    path.write_text("\n".join(names) + "\n", encoding="utf-8")
    return path
