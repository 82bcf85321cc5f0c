"""Fit time of the recipes on a quiet machine and beside one busy process, for torch's default threads and for
microgpt's choice (``microgpt.threads``).

    python benchmarks/threads.py                                   # the issue's goals, about 15 minutes
    python benchmarks/threads.py --recipes names --max_steps 20 --rounds 1       # does it run end to end
    python benchmarks/threads.py --variant "1 thread:OMP_NUM_THREADS=1" \\
        --variant "2 passive:OMP_NUM_THREADS=2,OMP_WAIT_POLICY=PASSIVE"          # other settings, side by side

Each run is a fresh ``python -m microgpt fit --config configs/RECIPE.yaml`` (no progress bar, in a temporary
folder; the token stores are built once, untimed, before the rounds) and its time is the one the ``final:`` line
reports (``before_fit`` to the last validation). "busy" runs
start one other CPU-bound process (``python -c 'while True: pass'``) first and stop it after. Within a round, each
recipe and setting runs quiet then busy, so the two alternate; the table gives medians over ``--rounds``.

The settings compared, by default:

- ``today``: torch's default, one intra-op thread per core the process may use, OpenMP's default waiting (set
  as ``OMP_NUM_THREADS=<cores>``, which microgpt leaves alone);
- ``chosen``: nothing set, so microgpt chooses (the line it logs is shown under the table).

The goals (issue 30): busy at most 1.6x quiet for the seed, names-batched and names-best's first 300 steps, and
every recipe, quiet, no more than 5% slower than ``today``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ["names", "names-batched", "names-fast", "names-best", "names-best-adamw"]
MAX_STEPS = {"names-best": 300, "names-best-adamw": 300}  # their first 300 steps (of 5,000 and 7,000)
FINAL = re.compile(r"^final: .*\| ([0-9.]+) s$", re.MULTILINE)
CHOICE = re.compile(r"^threads: .*$", re.MULTILINE)
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


def cores() -> int:
    return len(os.sched_getaffinity(0))


def fit(recipe: str, max_steps: int | None, env: dict[str, str], busy: bool, cache: str) -> tuple[float, str]:
    """One fresh ``fit`` of ``recipe`` with the token-store cache ``cache``: its ``final:`` seconds, and its
    ``threads:`` line (or '')."""
    base = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
    base["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory() as folder:
        args = [sys.executable, "-m", "microgpt", "fit", "--config", str(ROOT / "configs" / f"{recipe}.yaml"),
                "--trainer.default_root_dir", folder, "--trainer.enable_progress_bar", "false"]
        if max_steps is not None:
            args += ["--trainer.max_steps", str(max_steps)]
        spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
        try:
            done = subprocess.run(args, check=False, env={**base, **env, "MICROGPT_CACHE": cache},
                                  cwd=folder, capture_output=True, text=True)
        finally:
            if spinner is not None:
                spinner.kill()
                spinner.wait()
    out = done.stdout + done.stderr
    found = FINAL.search(out)
    if done.returncode != 0 or found is None:
        raise SystemExit(f"{' '.join(args)} failed (exit {done.returncode}):\n{out[-3000:]}")
    choice = CHOICE.search(out)
    return float(found.group(1)), choice.group(0) if choice else ""


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    """``label:VAR=VALUE,VAR=VALUE`` (or ``label:`` for no setting)."""
    label, _, settings = text.partition(":")
    env = dict(pair.split("=", 1) for pair in settings.split(",") if pair)
    return label, env


def parse_steps(items: list[str]) -> dict[str | None, int | None]:
    """``N`` for every recipe, ``RECIPE=N`` for one; ``full`` (for N) runs the recipe's own steps."""
    steps: dict[str | None, int | None] = {}
    for item in items:
        recipe, _, n = item.rpartition("=")
        steps[recipe or None] = None if n == "full" else int(n)
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=RECIPES, help="recipes of configs/ (default: all)")
    parser.add_argument("--max_steps", nargs="+", default=[], metavar="[RECIPE=]N",
                        help="N steps for every recipe, or RECIPE=N for one; 'full' for a recipe's own "
                             "(default: names-best=300 names-best-adamw=300, the others in full)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each recipe, setting and load (median)")
    parser.add_argument("--variant", action="append", metavar="LABEL:VAR=VALUE,...",
                        help="a setting to compare (repeatable; default: today's threads and microgpt's choice)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # so that the busy process stops too
    variants = [parse_variant(v) for v in args.variant] if args.variant else [
        ("today", {"OMP_NUM_THREADS": str(cores())}), ("chosen", {})]
    given = parse_steps(args.max_steps)
    steps = {recipe: given.get(recipe, given.get(None, MAX_STEPS.get(recipe))) for recipe in args.recipes}
    times: dict[tuple[str, str, bool], list[float]] = {}
    choices: dict[tuple[str, str], set[str]] = {}
    print(f"{cores()} cores allowed; {args.rounds} rounds", flush=True)
    cache = tempfile.mkdtemp(prefix="threads-cache-")
    for recipe in args.recipes:  # the token stores, built once before anything is timed
        fit(recipe, 1, {}, False, cache)
    for round_ in range(args.rounds):
        for recipe in args.recipes:
            max_steps = steps[recipe]
            for label, env in variants:
                for busy in (False, True):
                    seconds, choice = fit(recipe, max_steps, env, busy, cache)
                    times.setdefault((recipe, label, busy), []).append(seconds)
                    if choice:
                        choices.setdefault((recipe, label), set()).add(choice)
                    print(f"round {round_ + 1} {recipe} {label} {'busy' if busy else 'quiet'}: {seconds:.1f} s",
                          file=sys.stderr, flush=True)
    shutil.rmtree(cache, ignore_errors=True)
    first = variants[0][0]
    print()
    print(f"| recipe (steps) | setting | quiet s | busy s | busy / quiet | quiet / {first} quiet |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for recipe in args.recipes:
        max_steps = steps[recipe]
        base = statistics.median(times[(recipe, first, False)])
        for label, _ in variants:
            quiet = statistics.median(times[(recipe, label, False)])
            busy = statistics.median(times[(recipe, label, True)])
            print(f"| {recipe} ({max_steps or 'all'}) | {label} | {quiet:.2f} | {busy:.2f} | {busy / quiet:.2f}x "
                  f"| {quiet / base:.2f}x |")
    for (recipe, label), lines in choices.items():
        for line in sorted(lines):
            print(f"{recipe}, {label}: {line}")


if __name__ == "__main__":
    main()
