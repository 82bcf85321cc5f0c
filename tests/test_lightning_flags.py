"""Lightning's own flags and callbacks, passed the way a Lightning user passes them, mean what Lightning says."""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, StochasticWeightAveraging

from microgpt.commands.cli import main
from microgpt.commands.sample import main as sample_main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "names.yaml")


def fit(names, root, *flags):
    """The seed recipe on a small file: 3 validation names, 17 training names, one name per step."""
    return main(["fit", "--config", CONFIG, "--data.path", str(names), "--data.val_size", "3",
                 "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false", *flags])


def checkpoint(root, name):
    (path,) = Path(root).rglob(f"{name}.ckpt")
    return torch.load(path, weights_only=True)


def best_score(best: dict) -> float:
    (state,) = [v for k, v in best["callbacks"].items() if k.startswith("ModelCheckpoint")]
    return float(state["best_model_score"])


def test_fast_dev_run_writes_no_checkpoint(tiny_names, tmp_path):
    cli = fit(tiny_names, tmp_path, "--trainer.fast_dev_run", "true")
    assert cli.trainer.global_step == 1
    assert not list(tmp_path.rglob("*.ckpt"))


def test_a_run_shorter_than_its_validation_interval_keeps_its_final_validation_as_best(tiny_names, tmp_path):
    """names.yaml validates every 500 steps: a 7-step run validates once, at its end, inside the fit."""
    cli = fit(tiny_names, tmp_path, "--trainer.max_steps", "7")
    best = checkpoint(tmp_path, "best")
    assert best["global_step"] == 7
    assert best_score(best) == pytest.approx(float(cli.trainer.callback_metrics["val/loss"]))


def test_max_epochs_without_max_steps_trains_whole_epochs_and_validates_at_the_end(tiny_names, tmp_path):
    cli = fit(tiny_names, tmp_path, "--trainer.max_steps", "-1", "--trainer.max_epochs", "2")
    assert cli.trainer.global_step == 2 * 17
    assert checkpoint(tmp_path, "best")["global_step"] == 34 and checkpoint(tmp_path, "last")["global_step"] == 34


def test_limit_train_batches_cuts_every_epoch(tiny_names, tmp_path):
    cli = fit(tiny_names, tmp_path, "--trainer.max_steps", "-1", "--trainer.max_epochs", "3",
              "--trainer.limit_train_batches", "4")
    assert cli.trainer.global_step == 12
    assert checkpoint(tmp_path, "best")["global_step"] == 12


def test_early_stopping_by_its_short_name(tiny_names, tmp_path):
    """A threshold every loss is below stops the run at its first validation, after step 2."""
    cli = fit(tiny_names, tmp_path, "--trainer.max_steps", "10", "--trainer.val_check_interval", "2",
              "--trainer.callbacks+=EarlyStopping", "--trainer.callbacks.monitor=val/loss",
              "--trainer.callbacks.stopping_threshold=100")
    assert any(type(c) is EarlyStopping for c in cli.trainer.callbacks)
    assert cli.trainer.global_step == 2


def test_stochastic_weight_averaging_by_its_short_name(tiny_names, tmp_path):
    cli = fit(tiny_names, tmp_path, "--trainer.max_steps", "-1", "--trainer.max_epochs", "4",
              "--trainer.limit_train_batches", "3", "--trainer.callbacks+=StochasticWeightAveraging",
              "--trainer.callbacks.swa_lrs=0.005", "--trainer.callbacks.swa_epoch_start=2")
    (swa,) = [c for c in cli.trainer.callbacks if type(c) is StochasticWeightAveraging]
    assert cli.trainer.global_step == 12
    # swa_epoch_start counts epochs from 1 (Lightning's docs): the 2nd, 3rd and 4th epochs are averaged
    assert swa.n_averaged is not None and int(swa.n_averaged) == 3


def test_learning_rate_monitor_by_its_short_name_is_lightnings(tiny_names, tmp_path):
    cli = fit(tiny_names, tmp_path, "--trainer.max_steps", "2", "--trainer.callbacks+=LearningRateMonitor",
              "--trainer.callbacks.logging_interval=step")
    assert [type(c) for c in cli.trainer.callbacks if "LearningRate" in type(c).__name__][-1] is LearningRateMonitor


def test_the_recipes_learning_rate_curve_has_one_point_per_step_under_accumulation(tiny_names, tmp_path):
    """3 micro-batches a step, logged every step: one learning rate per optimizer step, the step's own."""
    cli = fit(tiny_names, tmp_path, "--trainer.max_steps", "4", "--trainer.accumulate_grad_batches", "3",
              "--trainer.log_every_n_steps", "1", "--trainer.logger", "CSVLogger",
              "--trainer.logger.save_dir", str(tmp_path))
    with open(next(tmp_path.rglob("metrics.csv"))) as f:
        rows = [row for row in csv.DictReader(f) if row.get("lr-AdamW/pg1")]
    assert [int(row["step"]) for row in rows] == [0, 1, 2, 3]
    peak = cli.model.trainer.optimizers[0].param_groups[0]["initial_lr"]
    expected = [peak * 0.5 * (1 + math.cos(math.pi * step / 4)) for step in range(4)]  # the recipe's cosine
    assert [float(row["lr-AdamW/pg1"]) for row in rows] == pytest.approx(expected)


def run(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "microgpt", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=240, check=False)


def test_no_validation_names_end_with_val_loss_n_a(tiny_names, tmp_path):
    result = run("fit", "--config", CONFIG, "--data.path", tiny_names, "--data.val_size", 0, "--trainer.max_steps", 3,
                 "--trainer.default_root_dir", tmp_path, "--trainer.enable_progress_bar", "false")
    assert result.returncode == 0, result.stderr[-2000:]
    (final,) = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("final:")]
    assert "| val loss n/a |" in final


def test_a_refused_precision_writes_nothing(tiny_names, tmp_path):
    result = run("fit", "--config", CONFIG, "--data.path", tiny_names, "--data.val_size", 3,
                 "--trainer.precision", "bf16-true", "--trainer.default_root_dir", tmp_path / "root")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("microgpt: error: --trainer.precision bf16-true ")
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and p.parent != tmp_path]


def test_sample_settings_are_one_line_without_usage(tmp_path, capsys):
    for flags, message in [(["--temperature", "0"], "argument --temperature: must be positive, got 0"),
                           (["--top_p", "2"], "argument --top_p: must be in (0, 1], got 2"),
                           (["--num_sample", "3"], "unrecognized arguments: --num_sample 3")]:  # no abbreviation
        with pytest.raises(SystemExit) as stop:
            sample_main(["--ckpt_path", str(tmp_path / "x.ckpt"), *flags])
        assert stop.value.code == 2
        assert capsys.readouterr().err.strip().splitlines() == [f"microgpt sample: error: {message}"]


def test_callback_class_paths_of_older_recipes_still_work(tiny_names, tmp_path):
    monitor = json.dumps([{"class_path": "microgpt.callbacks.LearningRateMonitor"}])
    cli = fit(tiny_names, tmp_path, "--trainer.max_steps", "2", "--trainer.callbacks", monitor)
    assert [type(c).__name__ for c in cli.trainer.callbacks if "LearningRate" in type(c).__name__] == [
        "LearningRateCurves"]


def test_resuming_with_another_optimizer_is_one_line(tiny_names, tmp_path, capsys):
    fit(tiny_names, tmp_path, "--trainer.max_steps", "2", "--trainer.logger", "false")
    last = tmp_path / "checkpoints" / "last.ckpt"
    with pytest.raises(SystemExit) as stop:
        fit(tiny_names, tmp_path, "--trainer.max_steps", "4", "--trainer.logger", "false", "--ckpt_path", "last",
            "--model.optimizer", "microgpt.training.optimizers.MuonWithAdamW")
    assert stop.value.code == 2
    # one block: AdamW's 6 matrices and the head decayed, 2 embeddings not; Muon takes the 6 matrices
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"microgpt: error: {last}: its optimizer state holds parameter groups of [7, 2] parameters, and this run's "
        "MuonWithAdamW has [6, 1, 2]; resume with the optimizer the run was trained with (--model.optimizer).")
