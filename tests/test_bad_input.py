"""Bad input is one line naming the file and the problem; unusual but valid files train correctly."""

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import error_line
from helpers.names_reference import split_names

from microgpt.commands.cli import main
from microgpt.errors import UserError
from microgpt.training.module import MicroGPT
from microgpt.training.optimizers import MuonWithAdamW, WarmupCosine, parameter_groups

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "names.yaml")


def fit_args(names: Path, root: Path, *extra) -> list[str]:
    return ["fit", "--config", CONFIG, "--data.path", str(names), "--data.val_size", "2",
            "--trainer.max_steps", "2", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", str(root), *extra]


@pytest.mark.parametrize("content, problem", [
    (b"", "contains no names (the file is empty or only blank lines)."),
    (b"\n  \r\n\t\n", "contains no names (the file is empty or only blank lines)."),
    (b"anna\nbob\nz\xf6e\ncarla\n", "line 3 is not valid UTF-8."),
])
def test_unusable_names_file(tmp_path, capsys, content, problem):
    names = tmp_path / "names.txt"
    names.write_bytes(content)
    assert error_line(fit_args(names, tmp_path), capsys) == f"microgpt: error: {names}: {problem}"


def test_directory_instead_of_file_through_the_real_command_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "microgpt", *fit_args(tmp_path, tmp_path)], capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=240, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"microgpt: error: {tmp_path}: is a directory, not a file of names."
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("flags, message", [
    (["--model.n_embd", "10", "--model.n_head", "4"], "--model.n_embd (10) must be divisible by --model.n_head (4)."),
    (["--model.n_embd", "0"], "--model.n_embd must be a positive integer, got 0."),
    (["--model.block_size", "0"], "--data.block_size must be a positive integer, got 0."),
    (["--data.batch_size", "0"], "--data.batch_size must be a positive integer, got 0."),
    (["--data.val_size", "-1"], "--data.val_size must be zero or more, got -1."),
    (["--trainer.max_steps", "0"], "--trainer.max_steps must be a positive integer (or -1 for no limit), got 0."),
    (["--trainer.callbacks", '[{"class_path": "microgpt.callbacks.SampleNames", "init_args": {"temperature": 0}}]'],
     "temperature must be positive, got 0.0."),
])
def test_out_of_range_settings(tiny_names, tmp_path, capsys, flags, message):
    assert error_line(fit_args(tiny_names, tmp_path, *flags), capsys) == f"microgpt: error: {message}"


def test_trainer_flags_that_contradict_the_recipe_are_one_line(tiny_names, tmp_path, capsys):
    # names.yaml's callbacks include a ModelCheckpoint, which Lightning refuses alongside this flag
    line = error_line(fit_args(tiny_names, tmp_path, "--trainer.enable_checkpointing", "false"), capsys)
    assert line.startswith("microgpt: error: ") and "enable_checkpointing=False" in line


@pytest.mark.parametrize("setting, message", [
    ({"n_head": -1}, "--model.n_head must be a positive integer, got -1."),
    ({"n_layer": 0}, "--model.n_layer must be a positive integer, got 0."),
    ({"dropout": 1.0}, "--model.dropout must be in [0, 1), got 1.0."),
])
def test_out_of_range_model_settings_through_the_api(setting, message):
    with pytest.raises(UserError) as error:
        MicroGPT(vocab="abc", **setting)
    assert str(error.value) == message


@pytest.mark.parametrize("make, message", [
    (lambda groups: WarmupCosine(torch.optim.AdamW(groups), 10, warmup_steps=-5),
     "warmup_steps must be zero or more, got -5."),
    (lambda groups: MuonWithAdamW(groups, muon_lr=0.0), "muon_lr must be positive, got 0.0."),
    (lambda groups: MuonWithAdamW(groups, muon_momentum=1.0), "muon_momentum must be in [0, 1), got 1.0."),
    (lambda groups: MuonWithAdamW(groups, muon_weight_decay=-0.1), "muon_weight_decay must be zero or more, got -0.1."),
    (lambda groups: MuonWithAdamW(groups, muon_ns_steps=0), "muon_ns_steps must be a positive integer, got 0."),
])
def test_out_of_range_optimizer_settings_through_the_api(make, message):
    with pytest.raises(UserError) as error:
        make(parameter_groups(MicroGPT(vocab="abc").gpt))
    assert str(error.value) == message


def test_val_size_that_leaves_nothing_to_train_on(tmp_path, capsys):
    names = tmp_path / "names.txt"
    names.write_text("anna\nbob\ncarla\n")
    assert error_line(fit_args(names, tmp_path, "--data.val_size", "3"), capsys) == (
        f"microgpt: error: {names}: --data.val_size 3 and --data.test_size 0 leave no training names "
        "(the file has 3); pass smaller sizes, or --data.val_size 0 to train on all of them without validation."
    )


def test_a_file_of_a_single_name_trains_with_val_size_zero(tmp_path, capsys):
    names = tmp_path / "names.txt"
    names.write_text("zoë\n")
    assert "--data.val_size 1000 and --data.test_size 0 leave no training names (the file has 1)" in error_line(
        fit_args(names, tmp_path, "--data.val_size", "1000"), capsys)

    cli = main(fit_args(names, tmp_path, "--data.val_size", "0"))
    assert cli.trainer.global_step == 2
    assert split_names(cli.datamodule)["train"] == ["zoë"] and split_names(cli.datamodule)["val"] == []
    out = capsys.readouterr().out
    samples = re.findall(r"^sample +\d+: (.*)$", out, flags=re.MULTILINE)
    assert len(samples) == 20 and all(set(s) <= set("zoë") for s in samples)


def test_unusual_but_valid_lines_are_read_and_trained_on(tmp_path, capsys):
    lines = ["\ufeffJosé", "  Zoë\t", "", "山田", "Ana🙂", "José", "Bartholomew-Alexander", "Ng"]
    names = tmp_path / "names.txt"
    names.write_bytes("\r\n".join(lines).encode("utf-8") + b"\r\n")  # Windows line endings, a byte-order mark
    expected = ["José", "Zoë", "山田", "Ana🙂", "José", "Bartholomew-Alexander", "Ng"]  # duplicates kept

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = main(fit_args(names, tmp_path, "--model.block_size", "6"))
    dm = cli.datamodule
    assert sorted(split_names(dm)["all"]) == sorted(expected)
    assert dm.vocab == "".join(sorted(set("".join(expected))))  # characters, not bytes
    assert "🙂" in dm.vocab and "山" in dm.vocab and "\ufeff" not in dm.vocab and "\r" not in dm.vocab

    too_long = [str(w.message) for w in caught if "longer than the context" in str(w.message)]
    cut = sum(len(n) + 1 > 6 for n in expected)  # n characters need n + 1 positions
    assert too_long == [(f"{names}: {cut} of 7 names are longer than the context and were cut; "
                         "--model.block_size 22 keeps them whole.")]

    assert cli.trainer.global_step == 2
    samples = re.findall(r"^sample +\d+: (.*)$", capsys.readouterr().out, flags=re.MULTILINE)
    assert len(samples) == 20 and all(set(s) <= set(dm.vocab) for s in samples)
    assert all(len(s) <= 6 for s in samples)


def test_names_that_fit_give_no_warning(tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("anna\nbob\ncarla\ndave\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(fit_args(names, tmp_path, "--model.block_size", "6"))  # "carla" needs 6 positions
    assert not [w for w in caught if "longer than the context" in str(w.message)]
