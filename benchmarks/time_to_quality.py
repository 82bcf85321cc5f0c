"""Time to quality: validation NLL against wall seconds of ``fit`` for each shipped recipe, and its test NLL.

    pip install -e '.[bench]'                      # matplotlib, for the picture
    python benchmarks/time_to_quality.py           # every shipped recipe: about 15 minutes on a 2-core CPU
    python benchmarks/time_to_quality.py configs/names-batched.yaml --max_steps_scale 0.05 --docs /tmp/ttq

The bundled names.txt is split once into ``--test_size`` test names, drawn with ``--split_seed`` (a seed the
project's own splits never use), and the rest, in their original order. Each recipe then runs, one at a time
and each as a fresh process, the real command line: ``python -m microgpt fit --config RECIPE --data.path
train.txt --data.test_size 0`` (the recipe holds out its own validation names from train.txt; its test
names are the separate file), validating every ``max_steps / --points`` steps, then ``python -m microgpt
test --data.test_path test.txt --ckpt_path .../last.ckpt``. The points are the ``val/loss`` scalars of the
fit's TensorBoard log, timed by their wall-clock stamps from the start of ``fit`` (the clock of its
``final:`` line, which says how many seconds fit took). The extra validations are part of the times.

Each ``--pairs`` recipe is also fitted twice at once, as the README's two-model average is (seeds 42 and 43, one
thread each, both started together); its row's seconds are the later ``final:`` line's, and its one point is the
pair's ``val/loss`` from ``validate --model.ensemble``, then ``test --model.ensemble`` scores it. The picture also
marks ``--reference`` (by default makemore's own training loop after 10 minutes, as issue 30 measured it on a
held-out split of its own: the figure this project measures itself against; makemore is not run here).

Writes ``time-to-quality.md`` (the table behind the picture, with the commands) and ``time-to-quality.png``
(validation NLL against seconds, log-scaled time, one line per recipe) into ``--docs``; the runs go to
``--out``. matplotlib is needed only here (the ``bench`` extra), never by the package.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import random
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ["configs/names.yaml", "configs/names-batched.yaml", "configs/names-fast.yaml", "configs/names-best.yaml",
           "configs/names-best-adamw.yaml"]
PAIRS = ["configs/names-best.yaml"]
PAIR_SEEDS = (42, 43)
REFERENCE = "makemore's own loop, 10 min (issue 30, its own split):600:1.989"
FINAL = re.compile(r"^final: step (\d+) \| .* \| ([\d.]+) s$")


@dataclass
class Result:
    """One recipe's run: its commands, the (seconds since fit start, step, val/loss) points and the test NLL."""

    recipe: str
    steps: int
    fit_command: list[str]
    test_command: list[str]
    fit_seconds: float = 0.0
    points: list[tuple[float, int, float]] = field(default_factory=list)
    test_loss: float = float("nan")
    label: str = ""
    extra: list[list[str]] = field(default_factory=list)  # commands run between fit and test

    @property
    def name(self) -> str:
        return self.label or f"`{self.recipe}`"


def split_names(names: Path, folder: Path, test_size: int, seed: int) -> tuple[Path, Path]:
    """Write ``train.txt`` (the names not drawn, in their order) and ``test.txt`` (``test_size`` drawn ones)."""
    lines = names.read_text(encoding="utf-8").splitlines()
    drawn = set(random.Random(seed).sample(range(len(lines)), test_size))
    folder.mkdir(parents=True, exist_ok=True)
    train, test = folder / "train.txt", folder / "test.txt"
    train.write_text("".join(line + "\n" for i, line in enumerate(lines) if i not in drawn), encoding="utf-8")
    test.write_text("".join(lines[i] + "\n" for i in sorted(drawn)), encoding="utf-8")
    return train, test


def scalars(log_dir: Path, tag: str) -> list[tuple[float, int, float]]:
    """(wall time, step, value) of every ``tag`` scalar in the TensorBoard event files of ``log_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return [(e.wall_time, e.step, e.value) for e in events.Scalars(tag)] if tag in events.Tags()["scalars"] else []


def run_timed(command: list[str], log: Path, env: dict | None = None) -> list[tuple[float, str]]:
    """Run ``command`` (with ``env`` added to the environment); return its output lines (stdout and stderr), each
    with the wall time it arrived."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1", **(env or {})}
    lines = []
    with subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True) as proc, open(log, "w") as out:
        for line in proc.stdout:
            lines.append((time.time(), line.rstrip("\n")))
            out.write(line)
    if proc.returncode != 0:
        tail = "\n".join(text for _, text in lines[-20:])
        sys.exit(f"time_to_quality: {shlex.join(command)} failed with exit status {proc.returncode}:\n{tail}")
    return lines


def fit_command(recipe: str, train: Path, run: Path, steps: int, every: int, extra: list[str] = ()) -> list[str]:
    return [sys.executable, "-m", "microgpt", "fit", "--config", recipe, "--data.path", str(train),
            "--data.test_size", "0", "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(every),
            "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(run), *extra]


def scored(command: list[str], folder: Path, tag: str, what: str) -> float:
    """Run ``validate`` or ``test`` (``command``) with its logs under ``folder``; the last ``tag`` it logged."""
    run_timed([*command, "--trainer.default_root_dir", str(folder)], folder.with_suffix(".log"))
    values = scalars(folder / "lightning_logs" / "version_0", tag)
    if not values:
        sys.exit(f"time_to_quality: {shlex.join(command)} logged no {tag} (see {folder.with_suffix('.log')}).")
    return values[-1][2]


def fit_seconds(lines: list[tuple[float, str]], run: Path) -> tuple[float, float]:
    """The seconds of the fit's ``final:`` line, and the wall time at which that clock started."""
    finals = [(stamp, FINAL.match(text)) for stamp, text in lines if FINAL.match(text)]
    if not finals:
        sys.exit(f"time_to_quality: {run}: the fit printed no 'final:' line (see {run / 'fit.log'}).")
    stamp, final = finals[-1]
    return float(final.group(2)), stamp - float(final.group(2))


def run_recipe(recipe: str, train: Path, test: Path, out: Path, points: int, scale: float) -> Result:
    """Fit ``recipe`` on ``train`` with about ``points`` validations, then test its ``last.ckpt`` on ``test``."""
    config = yaml.safe_load((ROOT / recipe).read_text())
    steps = max(1, round(config["trainer"]["max_steps"] * scale))
    run = out / Path(recipe).stem
    if run.exists():
        sys.exit(f"time_to_quality: {run} exists; remove it or pass another --out.")
    fit = fit_command(recipe, train, run, steps, max(1, round(steps / points)))
    ckpt = run / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    test_run = [sys.executable, "-m", "microgpt", "test", "--config", recipe, "--data.path", str(train),
                "--data.test_path", str(test), "--ckpt_path", str(ckpt), "--trainer.default_root_dir", str(run / "test")]
    result = Result(recipe, steps, fit, test_run)
    run.mkdir(parents=True)
    print(f"time_to_quality: {shlex.join(fit)}", flush=True)
    lines = run_timed(fit, run / "fit.log")
    result.fit_seconds, started = fit_seconds(lines, run)
    # Lightning logs a validation during fit at the 0-based index of the step just taken, and the one after
    # fit (when the last step was not validated) at the number of steps: both become steps taken
    result.points = [(wall - started, min(step + 1, steps), value)
                     for wall, step, value in scalars(run / "lightning_logs" / "version_0", "val/loss")]
    print(f"time_to_quality: {shlex.join(test_run)}", flush=True)
    run_timed(test_run, run / "test.log")
    tested = scalars(run / "test" / "lightning_logs" / "version_0", "test/loss")
    if not tested:
        sys.exit(f"time_to_quality: {recipe}: the test logged no test/loss (see {run / 'test.log'}).")
    result.test_loss = tested[-1][2]
    return result


def run_pair(recipe: str, train: Path, test: Path, out: Path, scale: float) -> Result:
    """Fit ``recipe`` twice at once (``PAIR_SEEDS``, one thread each), then validate and test the pair's average."""
    config = yaml.safe_load((ROOT / recipe).read_text())
    steps = max(1, round(config["trainer"]["max_steps"] * scale))
    runs = [out / f"{Path(recipe).stem}-pair-{seed}" for seed in PAIR_SEEDS]
    if any(run.exists() for run in runs):
        sys.exit(f"time_to_quality: {runs[0]} exists; remove it or pass another --out.")
    fits = [fit_command(recipe, train, run, steps, steps, ["--seed_everything", str(seed)])
            for run, seed in zip(runs, PAIR_SEEDS)]
    for run, fit in zip(runs, fits):
        run.mkdir(parents=True)
        print(f"time_to_quality: OMP_NUM_THREADS=1 {shlex.join(fit)} &", flush=True)
    with concurrent.futures.ThreadPoolExecutor(len(fits)) as pool:
        outputs = list(pool.map(lambda job: run_timed(job[1], job[0] / "fit.log", {"OMP_NUM_THREADS": "1"}),
                                zip(runs, fits)))
    seconds = max(fit_seconds(lines, run)[0] for lines, run in zip(outputs, runs))
    ckpts = [run / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt" for run in runs]
    pair = ["--config", recipe, "--data.path", str(train), "--data.test_size", "0", "--ckpt_path", str(ckpts[0]),
            "--model.ensemble", f"[{ckpts[1]}]"]
    validate = [sys.executable, "-m", "microgpt", "validate", *pair]
    test_run = [sys.executable, "-m", "microgpt", "test", *pair, "--data.test_path", str(test)]
    result = Result(recipe, steps, fits[0], test_run, seconds, label=f"two `{recipe}` at once, averaged")
    result.points = [(seconds, steps, scored(validate, runs[0] / "pair-validate", "val/loss", "validate"))]
    result.test_loss = scored(test_run, runs[0] / "pair-test", "test/loss", "test")
    result.extra = [fits[1], validate]
    return result


def relative(command: list[str]) -> str:
    """``command`` as a user would type it in the repository root."""
    parts = ["python" if part == sys.executable else part for part in command]
    return shlex.join(os.path.relpath(p, ROOT) if os.path.isabs(p) and p.startswith(str(ROOT)) else p for p in parts)


def write_table(results: list[Result], path: Path, command: str, split: str, reference: tuple) -> None:
    lines = [
        "# Time to quality",
        "",
        f"Written by `{command}` (threads: {os.environ.get('OMP_NUM_THREADS', 'torch default')}).",
        "",
        (f"{split} Each recipe is a fresh `fit` on `train.txt`; `val/loss` is the NLL per character of the "
        "recipe's own 1,000 validation names (drawn from `train.txt`), `test/loss` that of `last.ckpt` on "
        "`test.txt`. Seconds count from the start of `fit`, as its `final:` line does; they include the "
        "validations that draw the curve."),
        "",
        "| recipe | steps | fit seconds | final `val/loss` | `test/loss` |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        final_val = f"{r.points[-1][2]:.4f}" if r.points else "n/a"
        lines.append(f"| {r.name} | {r.steps:,} | {r.fit_seconds:.1f} | {final_val} | {r.test_loss:.4f} |")
    lines += ["", f"The picture's reference: {reference[0]}, test NLL {reference[2]} after {reference[1]:g} s.", "",
              "## Commands", ""]
    for r in results:
        lines += [f"- {'`OMP_NUM_THREADS=1` each, at once: ' if r.extra else ''}`{relative(r.fit_command)}`"]
        lines += [f"  and `{relative(command)}`" for command in r.extra]
        lines += [f"  then `{relative(r.test_command)}`"]
    lines += ["", "## Points", "", "| recipe | step | seconds | `val/loss` |", "| --- | ---: | ---: | ---: |"]
    for r in results:
        lines += [f"| {r.name} | {step:,} | {seconds:.1f} | {value:.4f} |" for seconds, step, value in r.points]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def draw(results: list[Result], path: Path, reference: tuple) -> None:
    try:
        import matplotlib
    except ImportError:
        sys.exit("time_to_quality: the picture needs matplotlib: pip install -e '.[bench]'.")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for r in results:
        seconds, _, values = zip(*r.points)
        name = f"two {Path(r.recipe).stem}, averaged" if r.extra else Path(r.recipe).stem
        ax.plot(seconds, values, marker="*" if r.extra else "o", markersize=9 if r.extra else 3,
                label=f"{name} (test {r.test_loss:.3f})")
    label, seconds, value = reference
    ax.plot([seconds], [value], marker="X", markersize=9, color="black", linestyle="none", label=f"{label}: test {value}")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    for budget in (30, 600):
        ax.axvline(budget, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("seconds since the start of fit (log scale; dotted: 30 s and 10 minutes)")
    ax.set_ylabel("validation NLL per character (nats)")
    ax.set_title("Time to quality: microgpt's recipes on a held-out split of names.txt")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("recipes", nargs="*", help="recipe files (default: the shipped ones that exist)")
    parser.add_argument("--out", default="runs/time-to-quality", help="folder for the split and the runs")
    parser.add_argument("--docs", default="docs", help="folder for time-to-quality.md and .png")
    parser.add_argument("--points", type=int, default=15, help="validations per recipe, about")
    parser.add_argument("--test_size", type=int, default=1000, help="test names drawn from names.txt")
    parser.add_argument("--split_seed", type=int, default=7919, help="seed of the draw of the test names")
    parser.add_argument("--pairs", nargs="*", default=None,
                        help="recipes also fitted twice at once and averaged (default: the shipped names-best)")
    parser.add_argument("--reference", default=REFERENCE,
                        help="LABEL:SECONDS:NLL, a point the picture marks for comparison (default: makemore's)")
    parser.add_argument("--max_steps_scale", type=float, default=1.0,
                        help="run this fraction of each recipe's steps (a quick check of the script, not a result)")
    args = parser.parse_args()
    recipes = args.recipes or [r for r in RECIPES if (ROOT / r).exists()]
    sys.path.insert(0, str(ROOT))
    from microgpt.data.datamodule import BUNDLED_NAMES
    from microgpt.data.store import default_cache_dir, ensure_store, store_path

    out, docs = (ROOT / args.out).resolve(), (ROOT / args.docs).resolve()
    train, test = split_names(BUNDLED_NAMES, out / "split", args.test_size, args.split_seed)
    for names in (train, test):  # encoded before any clock starts, so that no recipe pays for it
        ensure_store(names, store_path(names, default_cache_dir()))
    label, seconds, value = args.reference.rsplit(":", 2)
    reference = (label, float(seconds), float(value))
    pairs = PAIRS if args.pairs is None else args.pairs
    results = [run_recipe(recipe, train, test, out, args.points, args.max_steps_scale) for recipe in recipes]
    results += [run_pair(recipe, train, test, out, args.max_steps_scale) for recipe in pairs]
    docs.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "benchmarks/time_to_quality.py", *sys.argv[1:]])
    split = (f"The {args.test_size:,} test names are drawn from the bundled `names.txt` with "
             f"`random.Random({args.split_seed}).sample`; `train.txt` is the rest.")
    write_table(results, docs / "time-to-quality.md", command, split, reference)
    draw(results, docs / "time-to-quality.png", reference)
    for r in results:
        print(f"time_to_quality: {r.name}: {r.fit_seconds:.1f} s, val/loss {r.points[-1][2]:.4f}, "
              f"test/loss {r.test_loss:.4f}")
    print(f"time_to_quality: wrote {docs / 'time-to-quality.md'} and {docs / 'time-to-quality.png'}")


if __name__ == "__main__":
    main()
