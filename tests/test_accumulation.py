"""Gradient accumulation: N micro-batches make the same update as one batch holding all their names."""

import os
import subprocess
import sys

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT

from microgpt.cli import main
from microgpt.data import IGNORE_INDEX, NamesDataModule
from microgpt.module import MicroGPT


class MeanOfMeans(MicroGPT):
    """What accumulation does by default: every micro-batch's mean loss, averaged with equal weights."""

    def training_step(self, batch, batch_idx):
        logits, targets = self.logits(batch)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)

    def on_before_optimizer_step(self, optimizer):
        pass


def train(names_file, batch_size: int, accumulate: int, pack: bool, module=MicroGPT, steps: int = 3) -> MicroGPT:
    """A few steps in float64: Adam divides each gradient by its root mean square plus 1e-8, so gradients near
    1e-8 (the zero-initialized output projections at step 1) magnify float32 rounding of the summation order."""
    L.seed_everything(0, verbose=False)
    data = NamesDataModule(path=str(names_file), block_size=16, batch_size=batch_size, val_size=0, shuffle=True,
                           pack=pack)
    model = module(data.vocab, n_embd=32, n_head=4, n_layer=2, block_size=16, lr=1e-2, warmup_steps=1)
    trainer = L.Trainer(max_steps=steps, accumulate_grad_batches=accumulate, accelerator="cpu", devices=1,
                        precision="64-true", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)
    trainer.fit(model, datamodule=data)
    assert trainer.global_step == steps
    return model


def largest_difference(a: MicroGPT, b: MicroGPT) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("pack", [False, True])
def test_four_micro_batches_of_16_update_like_one_batch_of_64(names_file, pack):
    """Micro-batches 4k..4k+3 of 16 names hold exactly the names of batch k of 64, so each optimizer step must
    see the same mean loss over all their characters, and move the weights the same way."""
    whole = train(names_file, batch_size=64, accumulate=1, pack=pack)
    split = train(names_file, batch_size=16, accumulate=4, pack=pack)
    assert abs(float(split.last_train_loss - whole.last_train_loss)) < 1e-6
    assert largest_difference(split, whole) < 1e-6
    # the check can fail: the mean of the micro-batches' means weights their characters unequally
    assert largest_difference(train(names_file, 16, 4, pack, module=MeanOfMeans), whole) > 1e-4


def test_two_processes_accumulating_update_like_one_process_with_the_whole_batch(tmp_path):
    """DDP on CPU, 2 processes x 2 micro-batches of 4 names: each optimizer step sees names 8k..8k+7, as one
    process with batches of 8 does; the global token count scales the summed gradients on both."""



    names = tmp_path / "names.txt"
    names.write_text("\n".join(a + b for a in ("ka", "lo", "mi", "ne", "su", "ta")
                               for b in ("ra", "li", "no", "bel", "x", "dana")) + "\n")

    def args(root: str, batch_size: int, accumulate: int) -> list[str]:
        return ["--config", str(ROOT / "configs" / "names-batched.yaml"), "--data.path", str(names),
                "--data.val_size", "4", "--data.test_size", "0", "--data.batch_size", str(batch_size),
                "--trainer.accumulate_grad_batches", str(accumulate), "--trainer.max_steps", "3",
                "--trainer.accelerator", "cpu", "--trainer.precision", "64-true",  # as above: Adam magnifies float32
                "--trainer.logger", "false", "--trainer.enable_progress_bar",
                "false", "--trainer.default_root_dir", str(tmp_path / root)]

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    ddp = subprocess.run([sys.executable, "-m", "microgpt", "fit", *args("ddp", 4, 2), "--trainer.devices", "2",
                          "--trainer.strategy", "ddp"], capture_output=True, text=True, env=env, timeout=300,
                         check=False)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = main(["fit", *args("single", 8, 1)]).model.state_dict()
    trained = torch.load(tmp_path / "ddp" / "checkpoints" / "last.ckpt", weights_only=True)
    assert trained["global_step"] == 3
    for key, value in single.items():
        torch.testing.assert_close(trained["state_dict"][key], value, rtol=0, atol=1e-9)
