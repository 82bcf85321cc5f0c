"""What ``microgpt fit`` spends before its first training step, phase by phase, in a fresh process.

    python benchmarks/startup.py                      # the seed recipe, configs/names.yaml
    python benchmarks/startup.py --config configs/names-best.yaml

Phases: importing ``microgpt.commands.cli`` (torch, Lightning, torchmetrics, jsonargparse), building and running the
command-line parser, reading and splitting the names, building the model, building the Trainer, and
``Trainer.fit`` up to the first training batch (callbacks' setup, the loaders, the sanity validation).
Run it with ``python -X importtime`` to see which imports dominate. Run it twice: the first run after
installing pays for Python compiling the packages' bytecode.
"""

import time

START = time.perf_counter()

import argparse
import functools
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "names.yaml"))
    args = parser.parse_args()

    imported = time.perf_counter()
    import lightning as L
    from lightning.pytorch.cli import LightningCLI

    import microgpt.commands.cli
    import microgpt.data.datamodule
    from microgpt.training.module import MicroGPT

    phases: dict[str, float] = defaultdict(float)
    phases["import microgpt.commands.cli (torch, Lightning, torchmetrics, jsonargparse)"] = time.perf_counter() - imported

    def timed(owner, name: str, label: str) -> None:
        original = getattr(owner, name)

        @functools.wraps(original)  # keeps the signature that the parser reads
        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return original(*a, **k)
            finally:
                phases[label] += time.perf_counter() - start

        setattr(owner, name, wrapper)

    timed(LightningCLI, "setup_parser", "command line: build the parser")
    timed(LightningCLI, "parse_arguments", "command line: parse the recipe and flags")
    timed(microgpt.data.datamodule, "ensure_store", "data: encode the names file into its token store (or open it)")
    timed(microgpt.data.datamodule, "seeded_order", "data: the seeded order of the names (computed once, then mapped)")
    timed(MicroGPT, "__init__", "model: build")
    timed(L.Trainer, "__init__", "Trainer: build")

    class FirstStep(L.Callback):
        def on_fit_start(self, trainer, pl_module):
            self.fit_start = time.perf_counter()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if not hasattr(self, "at"):
                self.at = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        built = time.perf_counter()
        cli = microgpt.commands.cli.main(["--config", args.config, "--trainer.max_steps", "1", "--trainer.default_root_dir",
                                 tmp, "--trainer.enable_progress_bar", "false"], run=False)
        phases["the rest of LightningCLI (instantiating, linking)"] = time.perf_counter() - built - sum(
            v for k, v in phases.items() if not k.startswith("import"))
        first = FirstStep()
        cli.trainer.callbacks.append(first)
        fit_called = time.perf_counter()
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        phases["Trainer.fit: setup, loaders, sanity check, up to the first batch"] = first.at - fit_called
    total = first.at - START
    print(f"{'python start-up, before this script ran its first line':<72} (not counted)")
    for label, seconds in phases.items():
        print(f"{label:<72} {seconds:6.2f} s")
    print(f"{'from the script start to the first training step':<72} {total:6.2f} s")


if __name__ == "__main__":
    main()
