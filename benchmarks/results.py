"""The README's results table, from fresh fits: every figure in it is written by this script.

    python benchmarks/results.py                                # every row (about 20 minutes on 2 cores)
    python benchmarks/results.py --rows names names-batched     # only these rows; the others stay as they are
    python benchmarks/results.py --rows names --check           # re-run, compare with the README, change nothing
    python benchmarks/results.py --rows names-batched --keep_times   # new figures, the README's wall times

Each row is run as a user runs it, in a fresh folder and fresh processes:

    python -m microgpt fit --config configs/R.yaml --trainer.default_root_dir DIR
    python -m microgpt test --config configs/R.yaml --ckpt_path DIR/lightning_logs/version_0/checkpoints/last.ckpt

and its cells come from what they print and save: the parameters from the checkpoint, steps and batch
from the run's ``config.yaml``, the wall time from ``fit``'s ``final:`` line, ``test/loss`` and ``ppl``
from ``test``'s metrics, the share of new names and the first five samples from ``fit``'s samples, which
checkpoint was scored from the steps ``last.ckpt`` and ``best.ckpt`` hold. The ``ensemble`` row fits
``names-best-adamw`` twice at once (seeds 42 and 43, one thread each), tests the pair with
``--model.ensemble`` and takes its names from ``predict``. ``--check`` exits 1, naming each cell that
differs (wall times excepted: they depend on the machine); without it the README's table is rewritten.
Wall times are meant for a quiet machine: on a busy one, pass ``--keep_times``.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's package, for reading checkpoints
README = ROOT / "README.md"
START = "| recipe | params | steps × batch | fit time | test/loss | ppl | new | a few samples |"
LAST = "checkpoints/last.ckpt"


@dataclass
class Row:
    """A row of the table: its recipe and how it is described."""

    config: str
    label: str
    bold: bool = False  # the table's best figures
    ensemble: bool = False


ROWS = {
    "names": Row("names", "`names` (the seed: 16-dim, 1 layer)"),
    "names-batched": Row("names-batched", "`names-batched` (64-dim, 2 layers)"),
    "names-fast": Row("names-fast", "`names-fast` (128-dim, 2 layers, Muon)"),
    "names-best": Row("names-best", "`names-best` (128-dim, 4 layers, Muon, EMA)", bold=True),
    "names-best-adamw": Row("names-best-adamw", "`names-best-adamw` (as names-best, AdamW)"),
    "ensemble": Row("names-best-adamw", "two `names-best-adamw` at once, averaged", bold=True, ensemble=True),
}
TIME = 3  # the column of the wall time


def microgpt(args: list[str], cwd: Path, threads: str | None = None, background: bool = False):
    """``python -m microgpt ARGS`` in ``cwd``, with this checkout's package; stdout and stderr together."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if threads:
        env["OMP_NUM_THREADS"] = threads
    command = [sys.executable, "-m", "microgpt", *args, "--trainer.enable_progress_bar", "false"]
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if background:
        return process
    return finished(process, args)


def finished(process: subprocess.Popen, args: list[str]) -> str:
    out, _ = process.communicate()
    if process.returncode:
        sys.exit(f"results: microgpt {' '.join(args)} failed (exit {process.returncode}):\n{out[-3000:]}")
    return out


def found(pattern: str, text: str, what: str) -> re.Match:
    match = re.search(pattern, text, flags=re.MULTILINE)
    if match is None:
        sys.exit(f"results: no {what} in the output:\n{text[-3000:]}")
    return match


def fit(config: str, folder: Path, extra: list[str] = (), threads: str | None = None, background: bool = False):
    args = ["fit", "--config", str(ROOT / "configs" / f"{config}.yaml"), "--trainer.default_root_dir", str(folder),
            *extra]
    folder.mkdir(parents=True, exist_ok=True)
    return microgpt(args, folder, threads, background), args


def test_metrics(config: str, checkpoint: Path, folder: Path, extra: list[str] = ()) -> tuple[float, float]:
    folder.mkdir(parents=True, exist_ok=True)
    out = microgpt(["test", "--config", str(ROOT / "configs" / f"{config}.yaml"), "--ckpt_path", str(checkpoint),
                    "--trainer.default_root_dir", str(folder / "test"), *extra], folder)
    return (float(found(r"test/loss\s+([\d.]+)", out, "test/loss").group(1)),
            float(found(r"test/ppl\s+([\d.]+)", out, "test/ppl").group(1)))


def run_facts(folder: Path) -> dict:
    """What a fit left in ``folder``: parameters, steps, batch size, and the steps of last.ckpt and best.ckpt."""
    import torch
    import yaml

    from microgpt.checkpoints.loading import load_model

    version = folder / "lightning_logs" / "version_0"
    config = yaml.safe_load((version / "config.yaml").read_text())
    gpt, _ = load_model(version / LAST)
    best = version / "checkpoints" / "best.ckpt"
    return {"params": sum(p.numel() for p in gpt.parameters()),
            "steps": config["trainer"]["max_steps"], "batch": config["data"]["batch_size"],
            "step": torch.load(version / LAST, weights_only=True)["global_step"],
            "best": torch.load(best, weights_only=True)["global_step"] if best.exists() else None}


def wall(out: str) -> float:
    return float(found(r"^final: step \d+ .*\| ([\d.]+) s$", out, "final: line").group(1))


def samples(out: str, pattern: str) -> tuple[int, list[str]]:
    """The share of new names (a whole percent) and the names."""
    new = int(found(pattern, out, "share of new names").group(1))
    return new, re.findall(r"^sample +\d+: (.*)$", out, flags=re.MULTILINE)


def measure(key: str, work: Path) -> list[str]:
    """The cells of row ``key``, from fresh runs in ``work``."""
    row = ROWS[key]
    if row.ensemble:
        return measure_ensemble(row, work)
    folder = work / key
    out = fit(row.config, folder)[0]
    facts = run_facts(folder)
    loss, ppl = test_metrics(row.config, folder / "lightning_logs" / "version_0" / LAST, folder)
    new, names = samples(out, r"^samples: (\d+)% new")
    if facts["best"] is not None and facts["best"] != facts["step"]:
        sys.exit(f"results: {key}: best.ckpt holds step {facts['best']}, last.ckpt step {facts['step']}: the "
                 "table scores last.ckpt and says it is also best.ckpt; describe this row anew.")
    return [row.label, f"{facts['params']:,}", f"{facts['steps']:,} × {facts['batch']:,}", f"{wall(out):.1f} s",
            figure(loss, row.bold), f"{ppl:.2f}", f"{new}%", ", ".join(names[:5])]


def measure_ensemble(row: Row, work: Path) -> list[str]:
    folders = [work / f"ensemble-{seed}" for seed in (42, 43)]
    started = [fit(row.config, folder, ["--seed_everything", str(seed)], threads="1", background=True)
               for folder, seed in zip(folders, (42, 43))]
    outs = [finished(process, args) for process, args in started]
    facts = [run_facts(folder) for folder in folders]
    first, second = (folder / "lightning_logs" / "version_0" / LAST for folder in folders)
    pair = ["--model.ensemble", f"[{second}]"]
    loss, ppl = test_metrics(row.config, first, work / "ensemble", pair)
    out = microgpt(["predict", "--config", str(ROOT / "configs" / f"{row.config}.yaml"), "--ckpt_path", str(first),
                    *pair, "--trainer.default_root_dir", str(work / "ensemble" / "predict")], work)
    new = int(found(r"^predictions: (\d+)% new", out, "share of new names").group(1))
    written = Path(found(r"^wrote \d+ names to (.*)$", out, "predictions file").group(1))
    names = written.read_text(encoding="utf-8").split("\n")
    f = facts[0]
    return [row.label, f"2 × {f['params']:,}", f"2 × {f['steps']:,} × {f['batch']:,}",
            f"{max(map(wall, outs)):.1f} s", figure(loss, row.bold), f"{ppl:.2f}", f"{new}%", ", ".join(names[:5])]


def figure(loss: float, bold: bool) -> str:
    return f"**{loss:.4f}**" if bold else f"{loss:.4f}"


def cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def table(text: str) -> tuple[int, list[list[str]]]:
    """The line number where the README's results table starts, and its rows' cells."""
    lines = text.splitlines()
    start = lines.index(START)
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(cells(line))
    return start, rows


def key_of(label: str) -> str:
    return next(key for key, row in ROWS.items() if row.label == label)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS), help="the rows to run again")
    parser.add_argument("--check", action="store_true", help="compare with the README's table instead of writing it")
    parser.add_argument("--keep_times", action="store_true", help="keep the README's wall times (a busy machine)")
    parser.add_argument("--work", type=Path, help="keep the runs in this folder (default: a temporary one)")
    args = parser.parse_args(argv)
    text = README.read_text(encoding="utf-8")
    start, rows = table(text)
    by_key = {key_of(row[0]): row for row in rows}
    differences = []
    with tempfile.TemporaryDirectory(prefix="results-") as tmp:
        for key in args.rows:
            new = measure(key, args.work or Path(tmp))
            old = by_key.get(key)
            if old is not None and (args.check or args.keep_times):
                new[TIME] = old[TIME]
            print(f"{key}: " + " | ".join(new[1:]), flush=True)
            if old != new:
                differences.append(f"{key}: README says {' | '.join(old[1:]) if old else 'nothing'}; "
                                   f"the runs give {' | '.join(new[1:])}")
            by_key[key] = new
    if args.check:
        if differences:
            sys.exit("results: the README's table does not reproduce:\n" + "\n".join(differences))
        print("results: every re-run figure matches the README's table")
        return
    lines = text.splitlines()
    body = ["| " + " | ".join(by_key[key]) + " |" for key in ROWS if key in by_key]
    lines[start + 2 : start + 2 + len(rows)] = body
    README.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"results: wrote {len(body)} rows into {README}")


if __name__ == "__main__":
    main()
