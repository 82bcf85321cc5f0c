"""Gradient accumulation: N micro-batches make the same update as one batch holding all their names."""

import json
from functools import partial
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT
from helpers.names_reference import split_names

from microgpt.commands.cli import main
from microgpt.data.datamodule import NamesDataModule
from microgpt.data.rows import IGNORE_INDEX
from microgpt.training.module import MicroGPT
from microgpt.training.optimizers import WarmupCosine


class MeanOfMeans(MicroGPT):
    """What accumulation does by default: every micro-batch's mean loss, averaged with equal weights."""

    def training_step(self, batch, batch_idx):
        logits, targets = self(batch.inputs, batch.positions), batch.targets
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)


def train(names_file, batch_size: int, accumulate: int, pack: bool, module=MicroGPT, steps: int = 3,
          clip: float | None = None) -> MicroGPT:
    """A few steps in float64: Adam divides each gradient by its root mean square plus 1e-8, so gradients near
    1e-8 (the zero-initialized output projections at step 1) magnify float32 rounding of the summation order."""
    L.seed_everything(0, verbose=False)
    data = NamesDataModule(path=str(names_file), block_size=16, batch_size=batch_size, val_size=0, shuffle=True,
                           pack=pack)
    model = module(data.vocab, n_embd=32, n_head=4, n_layer=2, block_size=16,
                   optimizer=partial(torch.optim.AdamW, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0),
                   lr_scheduler=partial(WarmupCosine, warmup_steps=1))
    trainer = L.Trainer(max_steps=steps, accumulate_grad_batches=accumulate, accelerator="cpu", devices=1,
                        precision="64-true", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, gradient_clip_val=clip)
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
    assert abs(float(split.step_losses.latest - whole.step_losses.latest)) < 1e-6
    assert largest_difference(split, whole) < 1e-6
    # the check can fail: the mean of the micro-batches' means weights their characters unequally
    assert largest_difference(train(names_file, 16, 4, pack, module=MeanOfMeans), whole) > 1e-4


def test_clipping_sees_the_gradients_of_the_whole_batch(names_file):
    """A clip threshold well below the gradient norm binds on every step: it must act on the summed, rescaled
    gradients of the four micro-batches exactly as on the one batch's."""
    whole = train(names_file, batch_size=64, accumulate=1, pack=False, clip=0.05)
    split = train(names_file, batch_size=16, accumulate=4, pack=False, clip=0.05)
    assert largest_difference(split, whole) < 1e-6
    assert largest_difference(whole, train(names_file, batch_size=64, accumulate=1, pack=False)) > 1e-4  # it binds


class RecordSteps(L.Callback):
    """The names of every micro-batch (padded rows of names that fit the context), and the optimizer step
    count after each."""

    def __init__(self):
        self.names, self.steps = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        tokenizer = pl_module.tokenizer
        self.names.append([tokenizer.decode(row[row != IGNORE_INDEX][:-1].tolist()) for row in batch.targets])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append(trainer.global_step)


def fit_tiny(tiny_names, root, steps: int, ckpt_path=None) -> RecordSteps:
    """20 names, 3 a batch: 7 batches an epoch, 4 optimizer steps of 2, 2, 2 and 1 micro-batches."""
    cli = main(["--config", str(ROOT / "configs" / "names.yaml"), "--data.path", str(tiny_names),
                "--data.val_size", "0", "--data.batch_size", "3", "--trainer.accumulate_grad_batches", "2",
                "--trainer.max_steps", str(steps), "--trainer.logger", "false", "--trainer.enable_progress_bar",
                "false", "--trainer.default_root_dir", str(root)], run=False)
    record = RecordSteps()
    cli.trainer.callbacks.append(record)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
    record.order = split_names(cli.datamodule)["train"]
    return record


def test_accumulating_over_epochs_trains_every_name_in_order_and_resumes_in_place(tiny_names, tmp_path):
    whole = fit_tiny(tiny_names, tmp_path / "whole", steps=10)
    order = whole.order
    assert len(order) == 20
    # micro-batch m holds stream positions 3m .. 3m+2, name p % 20 of the training order: 7 batches an epoch,
    # none skipped at an epoch's end (the old window jumped over the batches of the epoch's short last step)
    expected = [[order[p % 20] for p in range(3 * m, 3 * m + 3)] for m in range(len(whole.names))]
    assert whole.names == expected
    assert whole.steps == [0, 1, 1, 2, 2, 3, 4, 4, 5, 5, 6, 6, 7, 8, 8, 9, 9, 10]  # epoch ends step after 1 batch
    # stopped after step 6 (mid-epoch, after an epoch whose last step took one micro-batch), then resumed
    first = fit_tiny(tiny_names, tmp_path / "first", steps=6)
    resumed = fit_tiny(tiny_names, tmp_path / "resumed", steps=10,
                       ckpt_path=str(tmp_path / "first" / "checkpoints" / "last.ckpt"))
    assert first.names + resumed.names == whole.names


# Two processes accumulating: tests/test_finetune.py's 2-process run checks them with its fine-tuning start.


class ListLogger(L.pytorch.loggers.Logger):
    """Keeps what is logged: metrics by step, and rounds of sampled names by step."""

    name, version = "list", 0

    def __init__(self, save_dir):
        super().__init__()
        self.metrics, self.samples = [], []
        self._save_dir = save_dir

    @property
    def save_dir(self):
        return self._save_dir

    @property
    def log_dir(self):
        return self._save_dir

    @property
    def experiment(self):
        return SimpleNamespace(add_text=lambda tag, text, step: self.samples.append(step))

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.metrics.append((step, dict(metrics)))


def test_callbacks_act_once_per_optimizer_step_not_per_micro_batch(tiny_names, tmp_path):
    logger = ListLogger(str(tmp_path))
    sampler = json.dumps({"class_path": "microgpt.callbacks.SampleNames",
                          "init_args": {"num_samples": 2, "every_n_steps": 2}})
    cli = main(["--config", str(ROOT / "configs" / "names.yaml"), "--data.path", str(tiny_names),
                "--data.val_size", "0", "--data.batch_size", "3", "--trainer.accumulate_grad_batches", "2",
                "--trainer.max_steps", "8", "--trainer.log_every_n_steps", "2", "--trainer.enable_progress_bar",
                "false", "--trainer.callbacks", json.dumps([{"class_path": "microgpt.callbacks.Throughput"}]),
                f"--trainer.callbacks+={sampler}", "--trainer.default_root_dir", str(tmp_path)], run=False)
    cli.trainer.loggers = [logger]
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    throughput_steps = [step for step, m in logger.metrics if "train/names_per_sec" in m]
    assert throughput_steps == [1, 3, 5, 7]  # Lightning's 0-based index of optimizer steps 2, 4, 6, 8
    # sampled every 2 optimizer steps during training (once each), then once at the end of fit
    assert logger.samples == [2, 4, 6, 8, 8]
