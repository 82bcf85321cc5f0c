"""The command line, driven as a user drives it."""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import error_line

from microgpt.commands.cli import main
from microgpt.training.module import MicroGPT

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "names.yaml")


def microgpt(*args, cwd=None):
    """Run ``python -m microgpt ARGS`` in a fresh process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "microgpt", *map(str, args)], check=False, capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=240)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """One short run of the seed recipe on a tiny file, through the real command line."""
    tmp = tmp_path_factory.mktemp("fit")
    names = tmp / "names.txt"
    names.write_text("anna\nbob\ncarla\ndave\neve\nfiona\ngreg\nhana\nivan\njulia")
    result = microgpt("fit", "--config", CONFIG, "--data.path", names, "--data.val_size", 3,
                      "--trainer.max_steps", 7, "--trainer.default_root_dir", tmp / "run")
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp, names, result


def test_fit_prints_samples_and_summary(fitted):
    _, _, result = fitted
    samples = re.findall(r"^sample +(\d+): (.*)$", result.stdout, flags=re.MULTILINE)
    assert [int(i) for i, _ in samples] == list(range(1, 21))
    assert all(set(name) <= set("abcdefghijklnortuv") for _, name in samples)
    summary = re.findall(r"^final: step (\d+) \| train loss (\d+\.\d{4}) \| val loss (\d+\.\d{4}) \| ([\d.]+) s$",
                         result.stdout + result.stderr, flags=re.MULTILINE)
    assert len(summary) == 1 and summary[0][0] == "7"


def test_fit_writes_checkpoints_config_and_samples(fitted):
    tmp, _, result = fitted
    version = tmp / "run" / "lightning_logs" / "version_0"
    assert (version / "checkpoints" / "last.ckpt").is_file()
    assert (version / "config.yaml").is_file()
    saved = (version / "samples.txt").read_text().splitlines()
    printed = re.findall(r"^sample +\d+: (.*)$", result.stdout, flags=re.MULTILINE)
    assert saved == printed


def test_checkpoint_alone_rebuilds_model_and_vocabulary(fitted):
    tmp, names, _ = fitted
    ckpt = tmp / "run" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    model = MicroGPT.load_from_checkpoint(ckpt, map_location="cpu")
    assert model.tokenizer.chars == "".join(sorted(set(names.read_text().replace("\n", ""))))
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)
    assert state["gpt.blocks.0.attn.o.weight"].abs().sum() > 0  # it was trained


def test_validate_and_test_report_the_held_out_loss(fitted, capsys):
    tmp, names, _ = fitted
    ckpt = tmp / "run" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    common = ["--config", CONFIG, "--data.path", str(names), "--data.val_size", "3", "--ckpt_path", str(ckpt),
              "--trainer.default_root_dir", str(tmp / "eval"), "--trainer.logger", "false"]
    val = main(["validate", *common]).trainer.callback_metrics["val/loss"]
    test = main(["test", *common]).trainer.callback_metrics["test/loss"]
    assert float(val) == pytest.approx(float(test))
    assert 0 < float(val) < 10


def test_block_size_is_one_setting_and_vocab_is_linked(tiny_names, tmp_path):
    cli = main(["--config", CONFIG, "--data.path", str(tiny_names), "--data.val_size", "2",
                "--model.block_size", "4", "--trainer.default_root_dir", str(tmp_path)], run=False)
    assert cli.model.gpt.block_size == 4 and cli.datamodule.block_size == 4
    assert cli.model.tokenizer.chars == cli.datamodule.vocab
    assert cli.model.hparams.vocab == cli.datamodule.vocab


def test_print_config_shows_the_recipe(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", CONFIG, "--print_config"])
    assert exit_info.value.code == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["trainer"]["max_steps"] == 500
    assert config["model"]["n_embd"] == 16 and config["model"]["block_size"] == 8
    assert "block_size" not in config["data"]  # linked from --model.block_size


def test_missing_data_file_is_one_line_and_exit_code_2(tmp_path, capsys):
    line = error_line(["fit", "--config", CONFIG, "--data.path", str(tmp_path / "nope.txt"),
                       "--trainer.default_root_dir", str(tmp_path)], capsys)
    assert line == f"microgpt: error: {tmp_path / 'nope.txt'}: no such file."


def test_test_path_with_characters_outside_the_checkpoint_vocabulary_is_one_line(fitted, tmp_path, capsys):
    tmp, names, _ = fitted
    ckpt = tmp / "run" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    other = tmp_path / "other.txt"
    other.write_text("anna\nzoë\n", encoding="utf-8")
    with pytest.raises(SystemExit) as exit_info:
        main(["test", "--config", CONFIG, "--data.path", str(names), "--data.val_size", "3", "--ckpt_path", str(ckpt),
              "--data.test_path", str(other), "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false"])
    assert exit_info.value.code == 2
    known = "".join(sorted(set(names.read_text().replace("\n", ""))))
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"microgpt: error: {other}: characters outside the model's vocabulary: 'zë' (the model knows {known!r})."
    )


@pytest.mark.parametrize("recipe", ["names-batched.yaml", "names-best.yaml", "names-fast.yaml", "names-best-adamw.yaml"])
def test_recipes_parse_and_train_a_few_steps(recipe, tiny_names, tmp_path):
    cli = main(["fit", "--config", str(ROOT / "configs" / recipe), "--data.path", str(tiny_names),
                "--data.val_size", "3", "--data.test_size", "3", "--trainer.max_steps", "3",
                "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false"])
    assert cli.trainer.global_step == 3
    assert math.isfinite(float(cli.trainer.callback_metrics["val/loss"]))
    assert (tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt").is_file()


def test_a_misspelt_flag_is_one_line_naming_the_closest(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", CONFIG, "--trainer.max_stpes", "10"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "microgpt: error: unrecognized arguments: --trainer.max_stpes 10; did you mean --trainer.max_steps?"]


def test_an_abbreviated_flag_is_refused(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", CONFIG, "--trainer.max_step", "10"])
    assert stop.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("microgpt: error: unrecognized arguments: --trainer.max_step 10")


def test_fit_help_has_one_way_to_choose_an_optimizer_and_says_what_ckpt_path_takes(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    out = capsys.readouterr().out
    assert "--model.optimizer OPTIMIZER" in out and "--model.lr_scheduler LR_SCHEDULER" in out
    assert not re.search(r"^  --(optimizer|lr_scheduler) ", out, flags=re.MULTILINE)
    ckpt_help = " ".join(out.split("--ckpt_path CKPT_PATH\n", 1)[1].split("--", 1)[0].split())
    assert "'last' / 'best'" in ckpt_help and "hpc" not in ckpt_help


def test_the_saved_config_runs_again_to_the_same_weights(tiny_names, tmp_path):
    first = main(["fit", "--config", CONFIG, "--data.path", str(tiny_names), "--data.val_size", "3",
                  "--trainer.max_steps", "5", "--trainer.default_root_dir", str(tmp_path / "a"),
                  "--trainer.enable_progress_bar", "false"])
    saved = tmp_path / "a" / "lightning_logs" / "version_0" / "config.yaml"
    config = yaml.safe_load(saved.read_text())
    assert config["trainer"]["logger"]["class_path"] == "microgpt.callbacks.RunLogger"
    assert config["trainer"]["plugins"] == [{"class_path": "microgpt.callbacks.AtomicCheckpointIO"}]
    assert config["model"]["optimizer"]["class_path"] == "torch.optim.AdamW"
    again = main(["fit", "--config", str(saved), "--trainer.default_root_dir", str(tmp_path / "b")])
    for a, b in zip(first.model.state_dict().values(), again.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("command", ["validate", "predict"])
def test_a_checkpoint_with_the_old_optimizer_settings_is_scored_and_sampled(command, tmp_path):
    """tests/data/old_format_last.ckpt keeps lr, betas, warmup_steps... among its hyper-parameters, which
    LightningCLI reads back with --ckpt_path; the recipe chooses the optimizer."""
    old = ROOT / "tests" / "data"
    cli = main([command, "--config", CONFIG, "--data.path", str(old / "old_names.txt"), "--data.val_size", "4",
                "--model.n_embd", "8", "--model.n_head", "2", "--ckpt_path", str(old / "old_format_last.ckpt"),
                "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false",
                "--trainer.enable_progress_bar", "false"])
    if command == "validate":
        assert math.isfinite(float(cli.trainer.callback_metrics["val/loss"]))
    else:
        assert len((tmp_path / "predictions.txt").read_text().splitlines()) == 20
