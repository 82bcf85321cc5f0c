"""Gradient accumulation: N micro-batches make the same update as one batch holding all their names."""

import lightning as L
import pytest
import torch.nn.functional as F

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
