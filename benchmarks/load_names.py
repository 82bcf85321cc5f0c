"""How long a names file of a million lines takes to load, and how much memory it takes.

    python benchmarks/load_names.py [--lines 1000000] [--block-size 16]

Writes a file of random names (with a few accents and emoji), then times reading, the split and
vocabulary, and tokenizing into tensors, as ``NamesDataModule.setup("fit")`` does. Prints the
seconds of each phase and the process's peak resident memory before and after loading.
"""

from __future__ import annotations

import argparse
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from microgpt.data import NamesDataModule


def write_names(path: Path, lines: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz" * 4 + "éüñ山🙂"
    with path.open("w", encoding="utf-8") as f:
        for _ in range(lines):
            f.write("".join(rng.choices(letters, k=rng.randint(2, 15))) + "\n")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--block-size", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "names.txt"
        write_names(path, args.lines)
        size_mb = path.stat().st_size / 2**20
        before = peak_rss_mb()
        start = time.perf_counter()
        dm = NamesDataModule(path=str(path), block_size=args.block_size, val_size=1000)
        _ = dm.vocab  # read, split and vocabulary
        read = time.perf_counter()
        dm.setup("fit")  # tokenize into tensors
        done = time.perf_counter()
    print(f"{args.lines} lines ({size_mb:.1f} MiB, vocabulary of {len(dm.vocab)}): "
          f"read {read - start:.2f} s, tokenize {done - read:.2f} s, total {done - start:.2f} s; "
          f"peak resident memory {peak_rss_mb():.0f} MiB ({before:.0f} MiB before loading)")


if __name__ == "__main__":
    main()
