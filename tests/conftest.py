import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

# One thread per process, here and in every process a test starts (they inherit the variable), as a user's own
# OMP_NUM_THREADS, which microgpt.threads honours: the tests' models are all small enough that microgpt would
# choose one thread anyway, and the numbers a test compares come from runs that all use the same number of threads
# (MKL rounds some small products differently on two). tests/test_threads.py unsets it where it tests the choice.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session", autouse=True)
def token_store_cache(tmp_path_factory) -> Iterator[Path]:
    """One token-store cache for the whole session (subprocesses inherit it), never the user's."""
    cache = tmp_path_factory.mktemp("cache")
    patch = pytest.MonkeyPatch()
    patch.setenv("MICROGPT_CACHE", str(cache))
    # a test that unsets MICROGPT_CACHE to try the default still lands in a temporary folder
    patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
    yield cache
    patch.undo()


def error_line(args: list[str], capsys) -> str:
    """Run the command line in this process: it must exit with status 2, without a traceback, and its
    last line on stderr (Lightning's own start-up lines may come before it) says what was wrong."""
    from microgpt.commands.cli import main

    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    return err.splitlines()[-1]


@pytest.fixture(scope="session")
def names_file() -> Path:
    """The real makemore names.txt, as it ships inside the package."""
    from microgpt.data.datamodule import BUNDLED_NAMES

    return BUNDLED_NAMES


@pytest.fixture
def tiny_names(tmp_path) -> Path:
    """A small names file written by the test itself."""
    names = ["anna", "bob", "carla", "dave", "eve", "fiona", "greg", "hana", "ivan", "julia",
             "karl", "lena", "mona", "nils", "olga", "paul", "quinn", "rosa", "sven", "tina"]
    path = tmp_path / "names.txt"
    path.write_text("\n".join(names) + "\n", encoding="utf-8")
    return path


def same_batch(a, b) -> bool:
    """Whether two batches hold equal fields: tensors element for element, the rest (None, counts) by value."""
    return len(a) == len(b) and all(
        torch.equal(x, y) if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) else x == y
        for x, y in zip(a, b))
