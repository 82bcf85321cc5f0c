"""Fine-tuning against training from scratch on a small list, at equal steps (configs/finetune.yaml).

    python benchmarks/finetune.py                          # pretrains names-best for 2000 steps first
    python benchmarks/finetune.py --init_from CKPT         # a names-best checkpoint you already have

Two small lists: makemore names that names-best never trains on (its 2,000 held-out names) ending in "a",
a list in the style of the training data; and 600 made-up fantasy names from a small syllable grammar (a
fixed seed; some have an apostrophe, a character makemore's names do not have), unlike it. Each is trained
on with ``--config configs/names-best-adamw.yaml --config configs/finetune.yaml`` from the checkpoint
(``--model.init_from``) and from scratch, and from scratch again at names-best's own peak lr. Prints the
final and the best validation loss of each run (its 50 held-out names) and the first samples.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ["--config", str(ROOT / "configs" / "names-best-adamw.yaml"), "--config", str(ROOT / "configs" / "finetune.yaml")]


def fantasy_names(count: int = 600, seed: int = 0) -> list[str]:
    """Distinct names of two or three syllables from a small fixed inventory; about one in six has an apostrophe."""
    rng = random.Random(seed)
    onsets = ["k", "th", "dr", "v", "z", "gr", "s", "l", "m", "n", "r", "x", "q", "y", "br", "kh"]
    vowels = ["a", "e", "i", "o", "u", "ae", "ia", "y", "ou"]
    codas = ["", "", "", "n", "r", "th", "l", "s", "x", "k"]
    names: set[str] = set()
    while len(names) < count:
        parts = [rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas) for _ in range(rng.choice([2, 2, 3]))]
        glue = "'" if rng.random() < 0.17 else ""
        names.add(parts[0] + glue + "".join(parts[1:]))
    ordered = sorted(names)
    rng.shuffle(ordered)
    return ordered


def held_out_names_ending_in_a() -> list[str]:
    """The names names-best holds out for validation and test (never trained on) that end in "a"."""
    sys.path.insert(0, str(ROOT))
    from microgpt.data.datamodule import NamesDataModule

    split = NamesDataModule(val_size=1000, test_size=1000, seed=42).split  # names-best's split
    held_out = split.store.decode(split.val_lines) + split.store.decode(split.test_lines)
    return [name for name in held_out if name.endswith("a")]


def best_val_loss(root: Path) -> float:
    """The lowest val/loss of a run, as its best.ckpt's ModelCheckpoint recorded it."""
    state = torch.load(root / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)["callbacks"]
    return min(float(s["best_model_score"]) for k, s in state.items() if "val/loss" in k)


def fit(root: Path, *args: str) -> tuple[float, list[str]]:
    """Run ``microgpt fit``; its final validation loss and the names it sampled at the end."""
    cmd = [sys.executable, "-m", "microgpt", "fit", *args, "--trainer.logger", "false",
           "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(root)]
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            check=False)
    if result.returncode:
        sys.exit(result.stderr[-3000:])
    final = re.search(r"final: .*\| val loss ([0-9.]+)", result.stdout + result.stderr)
    return float(final.group(1)), re.findall(r"^sample +\d+: (.*)$", result.stdout, flags=re.MULTILINE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--init_from", help="a checkpoint of names-best (default: pretrain one here)")
    parser.add_argument("--pretrain_steps", type=int, default=2000, help="steps of names-best when pretraining")
    parser.add_argument("--steps", type=int, default=100, help="steps of every run on the small list")
    parser.add_argument("--workdir", default=None, help="keep the runs here (default: a temporary folder)")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="finetune-"))
    work.mkdir(parents=True, exist_ok=True)
    start = args.init_from
    if start is None:
        fit(work / "pretrain", "--config", str(ROOT / "configs" / "names-best-adamw.yaml"),
            "--trainer.max_steps", str(args.pretrain_steps))
        start = str(work / "pretrain" / "checkpoints" / "last.ckpt")
    for label, names in [("held-out makemore names ending in a", held_out_names_ending_in_a()),
                         ("fantasy names", fantasy_names())]:
        path = work / (label.replace(" ", "-") + ".txt")
        path.write_text("\n".join(names) + "\n", encoding="utf-8")
        common = [*RECIPE, "--data.path", str(path), "--trainer.max_steps", str(args.steps)]
        runs = {
            "fine-tuned": ("--model.init_from", start),
            "from scratch": (),
            "from scratch, lr 2e-3": ("--model.optimizer.lr", "0.002", "--model.lr_scheduler.min_lr_ratio", "0.25"),
        }
        print(f"{label}: {len(names)} names, 50 held out; {args.steps} steps from {start}")
        print("| run | final val loss | best val loss | samples |")
        for run, extra in runs.items():
            root = work / f"{path.stem}-{args.steps}" / run.replace(" ", "-").replace(",", "")
            loss, samples = fit(root, *common, *extra)
            print(f"| {run} | {loss:.4f} | {best_val_loss(root):.4f} | {', '.join(samples[:6])} |", flush=True)


if __name__ == "__main__":
    main()
