"""Lightning's hook calls pass by the hooks that do nothing, and only those: every hook a callback or the module
overrides still runs on every batch, a profiler the user asks for is kept, and training is unchanged. Both
shortcuts past Lightning's documented API (``None`` hooks, the SIGTERM broadcast under DDP) stand on a start-up
check of this Lightning, and a Lightning that behaves otherwise gets its own hook loop and broadcast back."""

import json
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import LambdaCallback
from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop
from lightning.pytorch.profilers import SimpleProfiler
from lightning.pytorch.trainer import call

from microgpt.training import lightning_checks
from microgpt.callbacks import AtomicCheckpointIO, RunCheckpoint
from microgpt.commands.cli import main
from microgpt.data.datamodule import NamesDataModule
from microgpt.training.hooks import QuietProfiler, skip_idle_hooks
from microgpt.training.module import MicroGPT

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "names.yaml")


@pytest.fixture
def fresh_checks():
    """The start-up checks run again in this test (and once more, on the real Lightning, after it)."""
    lightning_checks.skips_none_hooks.cache_clear()
    lightning_checks.sigterm_broadcast_is_the_flag_alone.cache_clear()
    yield
    lightning_checks.skips_none_hooks.cache_clear()
    lightning_checks.sigterm_broadcast_is_the_flag_alone.cache_clear()


class CountHooks(L.Callback):
    """Counts the calls of the two hooks it overrides."""

    def __init__(self):
        self.calls = {"on_before_backward": 0, "on_train_batch_end": 0}

    def on_before_backward(self, trainer, pl_module, loss):
        self.calls["on_before_backward"] += 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.calls["on_train_batch_end"] += 1


class ModuleCountingBackward(MicroGPT):
    def on_before_backward(self, loss):
        self.backward_calls = getattr(self, "backward_calls", 0) + 1


def fit(names, skip: bool, steps: int = 6):
    torch.manual_seed(0)
    data = NamesDataModule(path=str(names), block_size=8, batch_size=4, val_size=4)
    model = ModuleCountingBackward(data.vocab, n_embd=16, n_head=4, n_layer=1, block_size=8)
    counter = CountHooks()
    ends = []
    on_instance = LambdaCallback(on_train_batch_end=lambda trainer, *args: ends.append(trainer.global_step))
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[counter, on_instance],
                        profiler=QuietProfiler() if skip else None)
    if skip:
        assert skip_idle_hooks(trainer, model)
    trainer.fit(model, datamodule=data)
    return model, counter, ends


def test_skipping_idle_hooks_keeps_every_hook_that_does_something_and_every_number(tiny_names):
    plain_model, plain_counter, plain_ends = fit(tiny_names, skip=False)
    model, counter, ends = fit(tiny_names, skip=True)
    # hooks a class overrides, and hooks set on the instance (LambdaCallback's), ran on every step
    assert counter.calls == plain_counter.calls == {"on_before_backward": 6, "on_train_batch_end": 6}
    assert model.backward_calls == plain_model.backward_calls == 6
    assert ends == plain_ends == [1, 2, 3, 4, 5, 6]
    for a, b in zip(model.parameters(), plain_model.parameters()):
        assert torch.equal(a, b)


def test_a_profiler_asked_for_is_kept_and_sees_the_hooks_that_run(tmp_path):
    cli = main(["--config", CONFIG, "--trainer.default_root_dir", str(tmp_path), "--trainer.max_steps", "3",
                "--trainer.val_check_interval", "3", "--trainer.profiler", "simple",
                "--trainer.enable_progress_bar", "false"], run=False)
    assert isinstance(cli.trainer.profiler, SimpleProfiler)
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)  # the command line's default
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    actions = set(cli.trainer.profiler.recorded_durations)
    assert "[Callback]SampleNames.on_train_batch_end" in actions
    assert "[Callback]SampleNames.on_before_backward" not in actions  # an inherited no-op: not called
    assert "[LightningModule]MicroGPT.on_before_optimizer_step" in actions
    assert (tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt").is_file()


def test_a_checkpoint_io_the_recipe_brings_is_kept(tmp_path):
    plugin = {"class_path": "lightning.fabric.plugins.TorchCheckpointIO"}
    cli = main(["--config", CONFIG, "--trainer.default_root_dir", str(tmp_path),
                "--trainer.plugins", json.dumps(plugin)], run=False)
    assert type(cli.trainer.strategy.checkpoint_io).__name__ == "TorchCheckpointIO"


def test_this_lightning_passes_by_none_hooks_and_broadcasts_only_the_sigterm_flag(fresh_checks):
    """Fails on a Lightning that changed either behaviour: the shortcuts would then be left out silently."""
    assert lightning_checks.skips_none_hooks()
    assert lightning_checks.sigterm_broadcast_is_the_flag_alone()


def test_a_lightning_that_calls_none_hooks_gets_its_own_hook_loop(tmp_path, monkeypatch, fresh_checks):
    def calling_none_too(trainer, hook_name, *args, **kwargs):
        if any(getattr(callback, hook_name) is None for callback in trainer.callbacks):
            raise TypeError("'NoneType' object is not callable")  # as a call without the callable() check would
        return original(trainer, hook_name, *args, **kwargs)

    original = call._call_callback_hooks
    monkeypatch.setattr(call, "_call_callback_hooks", calling_none_too)
    assert not lightning_checks.skips_none_hooks()
    cli = main(["--config", CONFIG, "--trainer.default_root_dir", str(tmp_path), "--trainer.max_steps", "3",
                "--trainer.val_check_interval", "3", "--trainer.enable_progress_bar", "false"], run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)  # a user's run still works
    assert cli.trainer.global_step == 3


def test_a_changed_sigterm_broadcast_is_left_alone(monkeypatch, fresh_checks):
    def with_more(loop):
        torch.distributed.all_reduce(torch.zeros(1))  # a collective the shortcut would drop
        return original(loop)

    def quieted(trainer) -> bool:
        callback = RunCheckpoint()
        callback._quiet_sigterm_broadcast(trainer)
        return "_broadcast_sigterm_tensor" in vars(trainer.fit_loop.epoch_loop)

    original = _TrainingEpochLoop._broadcast_sigterm_tensor
    two_processes = lambda: SimpleNamespace(world_size=2, received_sigterm=False,
                                            fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace()))
    assert quieted(two_processes())
    lightning_checks.sigterm_broadcast_is_the_flag_alone.cache_clear()
    monkeypatch.setattr(_TrainingEpochLoop, "_broadcast_sigterm_tensor", with_more)
    assert not lightning_checks.sigterm_broadcast_is_the_flag_alone()
    assert not quieted(two_processes())
