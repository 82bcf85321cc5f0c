"""Time and memory of training on a large names file, as a user runs it: the first run builds the token store, later runs reuse it.

    python benchmarks/load_names.py 5000000 [--runs 2] [--steps 20] [--ddp] [--keep DIR]

Writes a file of N names drawn from makemore's names.txt (some reversed, some with two digits added;
5,000,000 lines is about 38 MB), then runs, each in a fresh process,

    python -m microgpt fit --config configs/names-batched.yaml --data.path big.txt --trainer.max_steps 20

with its outputs and its token-store cache (--data.cache_dir) in a temporary folder, under
``/usr/bin/time -v``. The first run starts from an empty cache and builds the store; the later ones
reuse it. Prints, per run, the wall seconds and the peak resident memory (the largest of the run's
processes), and the build's own lines. With ``--ddp`` it also runs 2 CPU processes
(``--trainer.devices 2 --trainer.strategy ddp``) and prints the proportional set size (PSS) of
the store mapping in each, read from /proc while they train: a shared map is counted once in total.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "names-batched.yaml"


def write_names(path: Path, lines: int, seed: int = 0) -> None:
    """``lines`` names drawn from the bundled names: 30% reversed, 20% with a number below 100 added."""
    names = (ROOT / "microgpt" / "names.txt").read_text().split()
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as f:
        for start in range(0, lines, 1_000_000):
            out = []
            for _ in range(min(1_000_000, lines - start)):
                name, r = rng.choice(names), rng.random()
                out.append(name[::-1] if r < 0.3 else f"{name}{rng.randrange(100)}" if r < 0.5 else name)
            f.write("\n".join(out) + "\n")


def fit(names: Path, work: Path, steps: int, *extra: str) -> subprocess.CompletedProcess:
    """One ``fit`` in a fresh process under /usr/bin/time -v; outputs and the cache stay in ``work``."""
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "microgpt", "fit", "--config", str(CONFIG),
           "--data.path", str(names), "--trainer.max_steps", str(steps),
           "--data.cache_dir", str(work / "cache"), "--trainer.default_root_dir", str(work / "run"),
           "--trainer.enable_progress_bar", "false", *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, check=False, cwd=work)


def report(label: str, result: subprocess.CompletedProcess, seconds: float) -> None:
    if result.returncode != 0:
        sys.exit(f"{label} failed:\n{result.stderr[-3000:]}")
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr).group(1))
    cpu = sum(float(re.search(rf"{kind} time \(seconds\): ([\d.]+)", result.stderr).group(1)) for kind in ("User", "System"))
    print(f"{label}: {seconds:.1f} s wall, {cpu:.1f} s CPU (user + system, all processes), "
          f"peak resident memory {peak_kb / 1024:.0f} MiB")
    for line in result.stderr.splitlines():
        if line.startswith(("microgpt: ", "final: ")):
            print(f"    {line}")


def store_pss(stop: threading.Event, cache: Path, seen: dict[int, int]) -> None:
    """While ``stop`` is unset: the largest PSS (KiB) of the store mapping in each process that maps it."""
    while not stop.wait(0.2):
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                smaps = Path(f"/proc/{pid}/smaps").read_text()
            except OSError:
                continue
            pss = sum(int(m) for m in re.findall(rf"^\S+ \S+ \S+ \S+ \S+ +{re.escape(str(cache))}/\S+\.tokens\n"
                                                   r"(?:.*\n)*?Pss: +(\d+) kB", smaps, flags=re.MULTILINE))
            if pss:
                seen[int(pid)] = max(seen.get(int(pid), 0), pss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lines", type=int, help="names in the generated file")
    parser.add_argument("--runs", type=int, default=2, help="runs in all: the first builds the store")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--ddp", action="store_true", help="also 2 DDP processes on CPU sharing the store")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        names = work / "big.txt"
        if not names.exists():
            write_names(names, args.lines)
        print(f"{args.lines} names, {names.stat().st_size / 1e6:.1f} MB, names-batched, {args.steps} steps, "
              f"{os.cpu_count()} CPUs")
        for run in range(args.runs):
            start = time.perf_counter()
            result = fit(names, work, args.steps)
            report("first run (store built)" if run == 0 else f"run {run + 1} (store reused)", result,
                   time.perf_counter() - start)
        if args.ddp:
            stop, seen = threading.Event(), {}
            watcher = threading.Thread(target=store_pss, args=(stop, work / "cache", seen))
            watcher.start()
            start = time.perf_counter()
            result = fit(names, work, args.steps, "--trainer.accelerator", "cpu", "--trainer.devices", "2",
                         "--trainer.strategy", "ddp")
            stop.set()
            watcher.join()
            report("2 DDP processes (store reused)", result, time.perf_counter() - start)
            size = sum(p.stat().st_size for p in (work / "cache").glob("*.tokens")) / 2**20
            print(f"    store file {size:.0f} MiB; mapped by {len(seen)} processes, largest PSS of the mapping "
                  + ", ".join(f"{kb / 1024:.1f} MiB" for kb in seen.values()) + " (PSS splits a page among its mappers)")


if __name__ == "__main__":
    main()
