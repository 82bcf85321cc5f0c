"""The moving average of the weights that names-best.yaml validates, tests, samples and saves."""

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from microgpt.callbacks import EMA
from microgpt.commands.cli import main
from microgpt.errors import UserError

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "names-batched.yaml")
DECAY = 0.5  # reached by the warm-up after 8 updates, within the test's 12


class RecordWeights(L.Callback):
    """The raw weights after every optimizer step."""

    def __init__(self):
        self.weights = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights.append({k: v.detach().double().clone() for k, v in pl_module.state_dict().items()})


def test_the_average_is_the_warmed_up_exponential_moving_average_of_the_raw_weights(tiny_names, tmp_path):
    ema = json.dumps([{"class_path": "microgpt.callbacks.EMA", "init_args": {"decay": DECAY}}])
    cli = main(["--config", CONFIG, "--data.path", str(tiny_names), "--data.val_size", "3", "--data.test_size", "3", "--data.batch_size", "4",
                "--trainer.max_steps", "12", "--trainer.callbacks", ema, "--trainer.logger", "false",
                "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path)], run=False)
    record = RecordWeights()
    cli.trainer.callbacks.insert(0, record)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert len(record.weights) == 12
    expected = dict(record.weights[0])  # the first update copies the weights
    decays = [2 / 11, 3 / 12, 4 / 13, 5 / 14, 6 / 15, 7 / 16, 8 / 17, 0.5, 0.5, 0.5, 0.5]  # (1 + n) / (10 + n) <= 0.5
    for decay, raw in zip(decays, record.weights[1:], strict=True):
        expected = {k: decay * expected[k] + (1 - decay) * raw[k] for k in expected}
    averaged = cli.model.state_dict()  # after fit, the model holds the average
    assert not torch.equal(averaged["gpt.wte.weight"].double(), record.weights[-1]["gpt.wte.weight"])
    for k, value in expected.items():
        torch.testing.assert_close(averaged[k].double(), value, rtol=0, atol=1e-6)


def test_a_decay_outside_0_1_is_refused():
    with pytest.raises(UserError, match="decay must be in"):
        EMA(decay=1.5)
