"""The GPU check: the recipes on one GPU with no host sync in their quiet steps, mixed precision with and
without ``torch.compile``, step time against the plain loop, and ``names-best`` to the end.

    python benchmarks/gpu_check.py                                 # one GPU, about 8 minutes at most
    python benchmarks/gpu_check.py --accelerator cpu --quick       # the short CPU form that the tests run

Every fit is a fresh ``python -m microgpt fit`` process with the shipped config, as a user runs it, plus the
``SyncGuard`` callback below: on CUDA it turns ``torch.cuda.set_sync_debug_mode("error")`` on for every
training step that neither logs, validates nor saves, so any host sync there fails the run, naming the
operation. It writes what it saw to a JSON file that this script reads. The plain loop is
``benchmarks/train_speed.py``'s, run in this process on the same device. Figures are printed as a markdown
table (the one in ``docs/speed.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
import yaml

BENCHMARKS = Path(__file__).resolve().parent
ROOT = BENCHMARKS.parent


class SyncGuard(L.Callback):
    """Fails any host sync in a quiet training step (CUDA only), and records how many steps it guarded and
    the mean milliseconds per step after the first ``warmup`` steps.

    Args:
        out: JSON file to write the record to at the end of training.
        warmup: Steps not timed (compiling, allocator warm-up).
    """

    def __init__(self, out: str, warmup: int = 20):
        self.out, self.warmup = out, warmup
        self.guarded = 0

    def quiet(self, trainer: L.Trainer) -> bool:
        step = trainer.global_step + 1  # the step about to be trained
        every = trainer.log_every_n_steps
        val_every = trainer.val_check_interval if isinstance(trainer.val_check_interval, int) else 0
        return (step % every != 0 and (not val_every or step % val_every != 0) and step != trainer.max_steps
                and step > 1)  # the first step builds Adam's state and the compiled graph

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.warmup:
            if pl_module.device.type == "cuda":
                torch.cuda.synchronize()
            self.started = time.perf_counter()
        self.guarding = self.quiet(trainer) and pl_module.device.type == "cuda"
        if self.guarding:
            torch.cuda.set_sync_debug_mode("error")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.guarding:
            torch.cuda.set_sync_debug_mode("default")
            self.guarded += 1

    def on_train_end(self, trainer, pl_module):
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        steps = trainer.global_step - self.warmup
        record = {"guarded_steps": self.guarded, "steps": trainer.global_step,
                  "ms_per_step": 1000 * (time.perf_counter() - self.started) / steps if steps > 0 else None}
        Path(self.out).write_text(json.dumps(record))


def fit(config: str, accelerator: str, steps: int, *flags: str, warmup: int = 20) -> dict:
    """One fresh ``microgpt fit`` with the sync guard; its record, wall time and final line."""
    with tempfile.TemporaryDirectory() as tmp:
        record = Path(tmp) / "record.json"
        guard = json.dumps({"class_path": "gpu_check.SyncGuard", "init_args": {"out": str(record), "warmup": warmup}})
        command = [sys.executable, "-m", "microgpt", "fit", "--config", str(ROOT / "configs" / config),
                   "--trainer.accelerator", accelerator, "--trainer.devices", "1", "--trainer.max_steps", str(steps),
                   "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", tmp,
                   f"--trainer.callbacks+={guard}", *flags]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(BENCHMARKS)])}
        start = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
        wall = time.perf_counter() - start
        if result.returncode != 0:
            raise SystemExit(f"{config} {' '.join(flags)} failed:\n{result.stderr[-3000:]}")
        final = re.search(r"^final: .*$", result.stdout + result.stderr, flags=re.MULTILINE)
        return {**json.loads(record.read_text()), "wall": wall, "final": final.group(0) if final else ""}


def plain_ms_per_step(device: str, batch_size: int, n_embd: int, n_layer: int, block_size: int, steps: int) -> float:
    """Milliseconds per step of train_speed.py's plain loop on ``device``, after a tenth of warm-up steps."""
    sys.path.insert(0, str(BENCHMARKS))
    from train_speed import PlainSteps

    from microgpt.data.datamodule import NamesDataModule
    from microgpt.data.rows import NameRows
    from microgpt.model.tokenizer import CharTokenizer

    store = NamesDataModule(val_size=0).split.store  # the bundled names, all of them in the file's order
    tokenizer = CharTokenizer(store.chars)
    rows = NameRows(store, np.arange(len(store)), tokenizer, block_size)
    encoded = rows.cut(torch.arange(len(rows)))
    loop = PlainSteps(encoded, tokenizer.vocab_size, batch_size, n_embd, 4, n_layer, block_size, steps, device=device)
    loop.run(max(steps // 10, 1))
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    loop.run(steps - max(steps // 10, 1))
    if device == "cuda":
        torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - start) / (steps - max(steps // 10, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accelerator", default="gpu", help="gpu (default) or cpu")
    parser.add_argument("--quick", action="store_true", help="a few steps of the seed recipe, no compile: the CPU form")
    args = parser.parse_args()
    device = "cuda" if args.accelerator in ("gpu", "cuda") else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here; run with --accelerator cpu --quick for the CPU form.")
    steps = 12 if args.quick else 300
    rows = []
    recipes = ["names.yaml"] if args.quick else ["names.yaml", "names-batched.yaml", "names-best.yaml"]
    for config in recipes:
        rows.append((config, "32-true", fit(config, args.accelerator, steps, warmup=min(20, steps // 3))))
    if not args.quick:
        for config in ("names-batched.yaml", "names-best.yaml"):
            for compile_ in ("false", "true"):
                record = fit(config, args.accelerator, steps, "--trainer.precision", "bf16-mixed",
                             "--model.compile", compile_, warmup=50)
                rows.append((config, f"bf16-mixed, compile {compile_}", record))
    print("| recipe | precision | steps | guarded quiet steps (no host sync) | ms/step | wall s | final line |")
    print("| --- | --- | ---: | ---: | ---: | ---: | --- |")
    for config, precision, r in rows:
        ms = f"{r['ms_per_step']:.2f}" if r["ms_per_step"] else "n/a"
        print(f"| {config} | {precision} | {r['steps']} | {r['guarded_steps']} | {ms} | {r['wall']:.1f} | {r['final']} |")
    sizes = {"names.yaml": (1, 16, 1, 8), "names-batched.yaml": (32, 64, 2, 16), "names-best.yaml": (64, 128, 4, 16)}
    print("\n| size | Lightning ms/step (fit, 32-true) | plain loop ms/step | ratio |")
    print("| --- | ---: | ---: | ---: |")
    for config, precision, r in rows:
        if precision == "32-true" and r["ms_per_step"]:
            plain = plain_ms_per_step(device, *sizes[config], steps=steps)
            print(f"| {config} | {r['ms_per_step']:.2f} | {plain:.2f} | {r['ms_per_step'] / plain:.2f}x |")
    if not args.quick:
        full = yaml.safe_load((ROOT / "configs" / "names-best.yaml").read_text())["trainer"]["max_steps"]
        record = fit("names-best.yaml", args.accelerator, full)
        print(f"\nnames-best to the end: {record['final']} (process wall time {record['wall']:.1f} s)")
    print(f"\ndevice: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, torch {torch.__version__}, "
          f"lightning {L.__version__}")


if __name__ == "__main__":
    main()
