"""The one reach into Lightning's private code (``microgpt.training.sigterm_broadcast``, Lightning issue #21487):
the per-batch SIGTERM broadcast under DDP is left out only on the Lightning whose broadcast is known, and any
other Lightning keeps its own. tests/test_ddp.py checks that a quiet DDP step then makes no collective.

What the command line adds to Lightning's trainer shows in its config and can be replaced there."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop

from microgpt.callbacks import AtomicCheckpointIO, RunLogger
from microgpt.commands.cli import main
from microgpt.training import sigterm_broadcast

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "names.yaml")


def trainer(world_size: int = 2, received_sigterm: bool = False) -> SimpleNamespace:
    return SimpleNamespace(world_size=world_size, received_sigterm=received_sigterm,
                           fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace()))


def test_this_lightning_broadcasts_the_known_way():
    """Fails the day Lightning changes its broadcast or stops calling it (issue #21487 fixed): then revisit
    microgpt.training.sigterm_broadcast, which meanwhile leaves Lightning's loop as it ships."""
    assert sigterm_broadcast.method_digest() == sigterm_broadcast.KNOWN_METHOD


def test_the_broadcast_is_left_out_for_several_processes_and_put_back():
    run = trainer()
    put_back = sigterm_broadcast.quiet(run)
    assert run.fit_loop.epoch_loop._broadcast_sigterm_tensor() is None
    put_back()
    assert "_broadcast_sigterm_tensor" not in vars(run.fit_loop.epoch_loop)


@pytest.mark.parametrize("run", [trainer(world_size=1), trainer(received_sigterm=True)])
def test_one_process_or_a_sigterm_already_received_keeps_lightnings_loop(run):
    sigterm_broadcast.quiet(run)
    assert "_broadcast_sigterm_tensor" not in vars(run.fit_loop.epoch_loop)


def test_a_changed_broadcast_is_left_alone(monkeypatch):
    original = _TrainingEpochLoop._broadcast_sigterm_tensor

    def with_more(loop):  # a Lightning whose broadcast does something more
        return original(loop)

    monkeypatch.setattr(_TrainingEpochLoop, "_broadcast_sigterm_tensor", with_more)
    run = trainer()
    sigterm_broadcast.quiet(run)
    assert "_broadcast_sigterm_tensor" not in vars(run.fit_loop.epoch_loop)


def test_a_lightning_that_no_longer_calls_the_broadcast_is_left_alone(monkeypatch):
    monkeypatch.setattr(_TrainingEpochLoop, "advance", lambda self, data_fetcher: None)
    assert sigterm_broadcast.method_digest() is None
    run = trainer()
    sigterm_broadcast.quiet(run)
    assert "_broadcast_sigterm_tensor" not in vars(run.fit_loop.epoch_loop)


def test_the_command_lines_trainer_defaults_show_and_can_be_replaced(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", CONFIG, "--print_config"])
    printed = capsys.readouterr().out
    assert "class_path: microgpt.callbacks.RunLogger" in printed
    assert "class_path: microgpt.callbacks.AtomicCheckpointIO" in printed
    cli = main(["--config", CONFIG, "--trainer.default_root_dir", str(tmp_path)], run=False)
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert isinstance(cli.trainer.logger, RunLogger) and cli.trainer.logger.save_dir == str(tmp_path)
    plugin = {"class_path": "lightning.fabric.plugins.TorchCheckpointIO"}
    cli = main(["--config", CONFIG, "--trainer.default_root_dir", str(tmp_path),
                "--trainer.plugins", json.dumps(plugin)], run=False)
    assert type(cli.trainer.strategy.checkpoint_io).__name__ == "TorchCheckpointIO"
