"""A newcomer's first commands: the overview, sample without Lightning, curves in TensorBoard, best.ckpt,
old checkpoints, and the one-line refusals."""

import csv
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import error_line
from helpers.names_reference import split_names
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from microgpt.commands.cli import main
from microgpt.data.datamodule import NamesDataModule
from microgpt.data.rows import IGNORE_INDEX

ROOT = Path(__file__).resolve().parents[1]
BATCHED = str(ROOT / "configs" / "names-batched.yaml")
OLD_RUN = ROOT / "tests" / "data"  # a checkpoint written before best.ckpt and the TensorBoard logger existed


def run(*args, cwd=None, code=None):
    """``python -m microgpt ARGS`` (or ``python -c CODE``) in a fresh process, as a user runs it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = ["-c", code] if code else ["-m", "microgpt", *map(str, args)]
    return subprocess.run([sys.executable, *command], capture_output=True, text=True, cwd=cwd, env=env, timeout=240,
                          check=False)


def modules_after(argv: list[str]) -> set[str]:
    """The top-level packages imported by running ``microgpt ARGV`` in a fresh process."""
    code = ("import runpy, sys\n"
            f"sys.argv = ['microgpt', *{argv!r}]\n"
            "try:\n    runpy.run_module('microgpt', run_name='__main__')\n"
            "except SystemExit as stop:\n    assert not stop.code, stop.code\n"
            "print('MODULES', ' '.join(sorted({m.split('.')[0] for m in sys.modules})))\n")
    result = run(code=code)
    assert result.returncode == 0, result.stderr[-2000:]
    return set(result.stdout.split("MODULES ")[1].split())


@pytest.mark.parametrize("argv", [[], ["--help"], ["-h"]])
def test_the_overview_names_every_command_without_importing_torch(argv):
    result = run(*argv)
    assert result.returncode == 0
    for command in ("fit", "validate", "test", "predict", "sample"):
        assert re.search(rf"^  {command} +\S", result.stdout, flags=re.MULTILINE), command
    assert "microgpt fit --config names " in result.stdout  # a shipped recipe by name: no checkout needed
    assert "microgpt fit --help" in result.stdout and "microgpt sample --help" in result.stdout
    assert not {"torch", "lightning"} & modules_after(argv)


def test_subcommand_help_stays_lightnings_and_says_microgpt(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert "microgpt fit: train" in out and "--trainer.max_steps" in out


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """names-batched on a small file for 8 steps, validating every 2, logging every step, with its default logger."""
    tmp = tmp_path_factory.mktemp("first")
    names = tmp / "names.txt"
    names.write_text("\n".join(split_names(NamesDataModule())["all"][:400]) + "\n")
    result = run("fit", "--config", BATCHED, "--data.path", names, "--data.val_size", 40, "--data.test_size", 40,
                 "--model.n_embd", 16, "--model.n_layer", 1, "--trainer.max_steps", 8,
                 "--trainer.val_check_interval", 2, "--trainer.log_every_n_steps", 1,
                 "--trainer.default_root_dir", tmp / "root", "--trainer.enable_progress_bar", "false", cwd=tmp)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp, names, result


def test_fit_is_quiet_about_loggers_it_does_not_use(run_dir):
    _, _, result = run_dir
    output = result.stdout + result.stderr
    assert "final: step 8" in output  # microgpt's own lines still print
    assert "litlogger" not in output and "tensorboardX" not in output and "weights_only" not in output


def test_fit_records_its_curves_for_tensorboard(run_dir):
    tmp, names, _ = run_dir
    version = tmp / "root" / "lightning_logs" / "version_0"
    events = EventAccumulator(str(version), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "val/loss", "val/ppl", "val/bpc", "lr-AdamW/pg1",
            "train/tokens_per_sec", "train/names_per_sec"} <= scalars
    assert "hp_metric" not in scalars
    # Lightning logs a step's metrics at its 0-based index: validation after step 2 is at 1
    assert [e.step for e in events.Scalars("val/loss")] == [1, 3, 5, 7]
    # every step's tokens and names, counted here from the training batches themselves
    dm = NamesDataModule(path=str(names), block_size=16, batch_size=32, val_size=40, test_size=40)
    dm.setup("fit")
    batches = iter(dm.train_dataloader())
    for step, (tokens, names_) in enumerate(zip(events.Scalars("train/tokens_per_sec"),
                                                events.Scalars("train/names_per_sec"))):
        inputs, targets, *_ = next(batches)
        assert tokens.step == names_.step == step
        assert tokens.value / names_.value == pytest.approx((targets != IGNORE_INDEX).sum().item() / len(inputs))
    assert step == 7
    assert "samples/text_summary" in events.Tags()["tensors"]


@pytest.mark.parametrize("pack", [False, True])
def test_throughput_counts_every_batch_between_logging_steps(tiny_names, monkeypatch, pack):
    """Over 20 steps logged every 10: the logged rates are the names' own characters (plus the end token) and
    the names themselves, counted here from the names file."""
    from types import SimpleNamespace

    from microgpt.callbacks import Throughput
    from microgpt.callbacks import monitoring as callbacks

    names = tiny_names.read_text().split()
    data = NamesDataModule(path=str(tiny_names), block_size=8, batch_size=3, val_size=2, pack=pack)
    data.setup("fit")
    train = split_names(data)["train"]
    logged = []
    logger = SimpleNamespace(log_metrics=lambda metrics, step: logged.append((step, metrics)))
    trainer = SimpleNamespace(loggers=[logger], log_every_n_steps=10, global_step=0, is_global_zero=True,
                              datamodule=data, accumulate_grad_batches=1, num_training_batches=float("inf"))
    clock = iter(range(100))
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: float(next(clock)))  # each reading a second later
    throughput = Throughput()
    throughput.on_train_start(trainer, SimpleNamespace(device=torch.device("cpu")))
    batches = [batch for _ in range(4) for batch in data.train_dataloader()]  # 18 names: 6 batches a pass
    for step, batch in zip(range(1, 21), batches):
        trainer.global_step = step
        throughput.on_train_batch_end(trainer, None, None, batch, step - 1)
    assert [step for step, _ in logged] == [9, 19] and set(train) <= set(names)
    for i, (_, metrics) in enumerate(logged):
        batch_names = [train[p % len(train)] for p in range(30 * i, 30 * (i + 1))]  # 10 steps of 3 names
        tokens = sum(min(len(name) + 1, 8) for name in batch_names)
        # the clock is read at the start or the previous log (0, 2) and at this log (1, 3): one second
        assert metrics == {"train/tokens_per_sec": tokens, "train/names_per_sec": 30}


def test_best_checkpoint_holds_the_lowest_validation_loss(run_dir):
    tmp, names, _ = run_dir
    version = tmp / "root" / "lightning_logs" / "version_0"
    events = EventAccumulator(str(version), size_guidance={"scalars": 0})
    events.Reload()
    losses = {e.step: e.value for e in events.Scalars("val/loss")}
    best_step = min(losses, key=losses.get)
    best = torch.load(version / "checkpoints" / "best.ckpt", weights_only=True)
    assert best["global_step"] == best_step + 1
    assert torch.load(version / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 8
    result = run("validate", "--config", BATCHED, "--data.path", names, "--data.val_size", 40, "--data.test_size", 40,
                 "--ckpt_path", "best", "--trainer.default_root_dir", tmp / "root", "--trainer.logger", "false",
                 "--trainer.enable_progress_bar", "false", cwd=tmp)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = float(re.search(r"val/loss[\s│|]+(\d+\.\d+)", result.stdout).group(1))
    assert printed == pytest.approx(losses[best_step], abs=1e-4)
    sampled = run("sample", "--ckpt_path", "best", "--root_dir", tmp / "root", "--num_samples", 3, "--seed", 1)
    assert sampled.returncode == 0 and len(sampled.stdout.splitlines()) == 3, sampled.stderr


def test_sample_imports_neither_lightning_nor_torchmetrics(run_dir):
    tmp, _, _ = run_dir
    last = tmp / "root" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    loaded = modules_after(["sample", "--ckpt_path", str(last), "--num_samples", "3", "--prefix", "a"])
    assert "torch" in loaded and not {"lightning", "lightning_fabric", "pytorch_lightning", "torchmetrics"} & loaded


def test_a_checkpoint_from_before_best_ckpt_loads_samples_and_resumes(tmp_path):
    old = OLD_RUN / "old_format_last.ckpt"
    sampled = run("sample", "--ckpt_path", old, "--num_samples", 4, "--seed", 0)
    assert sampled.returncode == 0 and len(sampled.stdout.splitlines()) == 4, sampled.stderr
    shutil.copy(OLD_RUN / "old_names.txt", tmp_path / "names.txt")
    resumed = main(["fit", "--config", str(ROOT / "configs" / "names.yaml"), "--data.path", str(tmp_path / "names.txt"),
                    "--data.val_size", "4", "--model.n_embd", "8", "--model.n_head", "2", "--trainer.max_steps", "9",
                    "--ckpt_path", str(old), "--trainer.default_root_dir", str(tmp_path),
                    "--trainer.enable_progress_bar", "false"])
    assert resumed.trainer.global_step == 9
    assert torch.load(next(tmp_path.rglob("last.ckpt")), weights_only=True)["global_step"] == 9


@pytest.mark.parametrize("command", ["validate", "test", "predict"])
def test_scoring_or_sampling_an_untrained_model_is_refused(command, tmp_path, capsys):
    line = error_line([command, "--config", str(ROOT / "configs" / "names.yaml"),
                       "--trainer.default_root_dir", str(tmp_path)], capsys)
    assert line == f"microgpt: error: {command} needs a trained model: pass --ckpt_path FILE, last or best."
    assert not any(tmp_path.iterdir())


def test_best_without_a_best_checkpoint_is_one_line(tmp_path, capsys):
    line = error_line(["test", "--config", str(ROOT / "configs" / "names.yaml"), "--ckpt_path", "best",
                       "--trainer.default_root_dir", str(tmp_path)], capsys)
    assert line.startswith("microgpt: error: --ckpt_path best: no best.ckpt under")
    from microgpt.commands.sample import main as sample

    with pytest.raises(SystemExit) as stop:
        sample(["--ckpt_path", "best", "--root_dir", str(tmp_path)])
    assert stop.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("microgpt sample: error: --ckpt_path best: no best.ckpt under")


def test_a_log_path_that_is_a_file_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    line = error_line(["fit", "--config", str(ROOT / "configs" / "names.yaml"),
                       "--trainer.default_root_dir", str(blocker / "runs")], capsys)
    assert line.startswith("microgpt: error:") and line.endswith("choose another with --trainer.default_root_dir.")
    assert blocker.read_text() == "not a folder"


def test_csv_logger_still_available(tmp_path):
    """``--trainer.logger CSVLogger`` switches the curves to a metrics.csv."""
    main(["fit", "--config", str(ROOT / "configs" / "names.yaml"), "--trainer.max_steps", "3",
          "--trainer.val_check_interval", "3", "--trainer.log_every_n_steps", "1",
          "--trainer.logger", "CSVLogger", "--trainer.logger.save_dir", str(tmp_path),
          "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false"])
    with open(tmp_path / "lightning_logs" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert any(row.get("val/loss") for row in rows) and any(row.get("train/tokens_per_sec") for row in rows)


def test_the_python_api_page_runs_as_written(run_dir):
    tmp, _, _ = run_dir
    page = (ROOT / "docs" / "python-api.md").read_text()
    (code,) = re.findall(r"```python\n(.*?)```", page, flags=re.DOTALL)
    best = tmp / "root" / "lightning_logs" / "version_0" / "checkpoints" / "best.ckpt"
    check = "import sys\nassert not any(m.startswith('lightning') for m in sys.modules)\n"
    result = run(code=f"CHECKPOINT = {str(best)!r}\n{code}\n{check}")
    assert result.returncode == 0, result.stderr[-2000:]
    printed = result.stdout.splitlines()
    assert printed[0].startswith("['ma") and re.fullmatch(r"emma: \d+\.\d{3}", printed[1])


def test_score_names_averages_to_the_test_loss(run_dir):
    tmp, names, _ = run_dir
    from microgpt.checkpoints.loading import load_model
    from microgpt.model.names import score_names

    tested = main(["test", "--config", BATCHED, "--data.path", str(names), "--data.val_size", "40",
                   "--data.test_size", "40", "--ckpt_path", "best", "--trainer.default_root_dir", str(tmp / "root"),
                   "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"])
    test_loss = float(tested.trainer.callback_metrics["test/loss"])
    gpt, tokenizer = load_model(tmp / "root" / "lightning_logs" / "version_0" / "checkpoints" / "best.ckpt")
    test_names = split_names(NamesDataModule(path=str(names), block_size=16, val_size=40, test_size=40))["test"]
    scores = score_names(gpt, tokenizer, test_names)
    chars = [min(len(name) + 1, 16) for name in test_names]
    assert sum(s * n for s, n in zip(scores, chars)) / sum(chars) == pytest.approx(test_loss, abs=1e-4)
