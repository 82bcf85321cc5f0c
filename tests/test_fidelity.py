"""The seed recipe through LightningCLI equals the hand-written plain-PyTorch loop in tests/helpers/seed_reference.py."""

from pathlib import Path

import lightning as L
import pytest
import torch
from helpers.seed_reference import train_seed

from microgpt.commands.cli import main

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "names.yaml")


class RecordLosses(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].item())


def fit_seed_recipe(names_file, root, *extra):
    """Build the CLI from configs/names.yaml, train with a loss recorder attached, return (cli, losses)."""
    cli = main(["--config", CONFIG, "--data.path", str(names_file), "--trainer.default_root_dir", str(root),
                "--trainer.enable_progress_bar", "false", *extra], run=False)
    record = RecordLosses()
    cli.trainer.callbacks.append(record)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli, record.losses


def test_seed_recipe_matches_plain_loop_float32(names_file, tmp_path, capsys):
    ref_losses, ref_val, ref_samples = train_seed(names_file)
    cli, losses = fit_seed_recipe(names_file, tmp_path)

    assert len(losses) == 500
    assert losses == pytest.approx(ref_losses, abs=1e-5)
    out = capsys.readouterr().out
    samples = [line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("sample ")]
    assert samples == ref_samples
    metrics = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    assert metrics["val/loss"] == pytest.approx(ref_val, abs=1e-5)


def test_seed_recipe_matches_spelled_out_formulas_float64(names_file, tmp_path):
    """In float64 the rounding of fused kernels vanishes: the formulas themselves must agree (50 steps of the
    recipe, its schedule over 50: the float32 test above covers the whole trajectory)."""
    ref_losses, ref_val, _ = train_seed(names_file, steps=50, num_samples=0, dtype=torch.float64, spelled_out=True)
    cli, losses = fit_seed_recipe(names_file, tmp_path, "--trainer.max_steps", "50", "--trainer.val_check_interval",
                                  "50", "--trainer.precision", "64-true",
                                  "--trainer.callbacks", "[]", "--trainer.logger", "false",
                                  "--trainer.enable_checkpointing", "false")
    assert len(losses) == 50 and losses == pytest.approx(ref_losses, abs=1e-9)
    metrics = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    # the metric accumulates in float32 (it must also run on devices without float64)
    assert metrics["val/loss"] == pytest.approx(ref_val, abs=1e-6)
