"""Precision by flag: mixed precision trains, averages, predicts and samples; true half precision is refused."""

import json

import pytest
import torch
from conftest import ROOT, error_line

from microgpt.commands.cli import main
from microgpt.commands.sample import main as sample_main

CONFIG = str(ROOT / "configs" / "names-batched.yaml")


def args(tiny_names, root, *extra: str) -> list[str]:
    return ["--config", CONFIG, "--data.path", str(tiny_names), "--data.val_size", "4", "--data.test_size", "0",
            "--data.batch_size", "4", "--model.n_embd", "16", "--model.n_layer", "1", "--trainer.accelerator", "cpu",
            "--trainer.enable_progress_bar", "false", "--trainer.logger", "false",
            "--trainer.default_root_dir", str(root), *extra]


@pytest.mark.parametrize("pack", ["false", "true"])
@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_trains_averages_predicts_and_samples(tiny_names, tmp_path, capsys, precision, pack):
    ema = json.dumps({"class_path": "microgpt.callbacks.EMA", "init_args": {"decay": 0.9}})
    cli = main(["fit", *args(tiny_names, tmp_path, "--trainer.max_steps", "6", "--trainer.precision", precision,
                             "--data.pack", pack, f"--trainer.callbacks+={ema}")])
    capsys.readouterr()
    loss = cli.model.step_losses.summed_latest(cli.trainer)
    assert 0 < loss < 4  # finite, and below a uniform guess over the 23 characters (ln 23 = 3.1) plus slack
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, weights_only=True)
    # the average and the raw weights are kept in float32, and they differ (the average is not the weights)
    assert all(v.dtype == torch.float32 for v in saved["state_dict"].values())
    assert all(v.dtype == torch.float32 for v in saved["current_model_state"].values())
    assert not torch.equal(saved["state_dict"]["gpt.wte.weight"], saved["current_model_state"]["gpt.wte.weight"])
    assert cli.model.gpt.wte.weight.dtype == torch.float32

    main(["predict", *args(tiny_names, tmp_path, "--trainer.precision", precision, "--data.predict_size", "7",
                           "--ckpt_path", str(ckpt))])
    assert "wrote 7 names to" in capsys.readouterr().out
    sample_main(["--ckpt_path", str(ckpt), "--num_samples", "5", "--seed", "1"])
    assert len(capsys.readouterr().out.splitlines()) == 5


@pytest.mark.parametrize("precision", ["bf16-true", "16-true"])
def test_true_half_precision_is_refused_naming_the_mixed_flag(tiny_names, tmp_path, capsys, precision):
    line = error_line(["fit", *args(tiny_names, tmp_path, "--trainer.max_steps", "2", "--trainer.precision",
                                    precision)], capsys)
    assert f"--trainer.precision {precision}" in line and precision.replace("true", "mixed") in line


@pytest.mark.parametrize(("flag", "value"), [("accelerator", "gpu"), ("accelerator", "tpu"), ("strategy", "fsdp"),
                                             ("strategy", "nonsense"), ("devices", "0")])
def test_a_device_or_strategy_this_machine_cannot_run_is_one_line_naming_it(tiny_names, tmp_path, capsys, flag,
                                                                             value):
    line = error_line(["fit", *args(tiny_names, tmp_path, "--trainer.max_steps", "2", f"--trainer.{flag}", value)],
                      capsys)
    assert line.startswith("microgpt: error: ") and f"--trainer.{flag} {value}" in line
