"""Lightning's hook calls pass by the hooks that do nothing, and only those: every hook a callback or the module
overrides still runs on every batch, a profiler the user asks for is kept, and training is unchanged."""

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.profilers import SimpleProfiler

from microgpt.cli import main
from microgpt.data import NamesDataModule
from microgpt.hooks import CALLBACK_BATCH_HOOKS, MODULE_BATCH_HOOKS, QuietProfiler, skip_idle_hooks
from microgpt.module import MicroGPT

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "names.yaml")


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
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[counter],
                        profiler=QuietProfiler() if skip else None)
    if skip:
        skip_idle_hooks(trainer, model)
    trainer.fit(model, datamodule=data)
    return model, counter


def test_skipping_idle_hooks_keeps_the_overridden_ones_and_every_number(tiny_names):
    plain_model, plain_counter = fit(tiny_names, skip=False)
    model, counter = fit(tiny_names, skip=True)
    # the overridden hooks ran on every step; the others were switched off on the instances only
    assert counter.calls == plain_counter.calls == {"on_before_backward": 6, "on_train_batch_end": 6}
    assert model.backward_calls == plain_model.backward_calls == 6
    assert counter.on_after_backward is None and model.on_after_backward is None
    assert model.on_before_backward is not None and callable(counter.on_before_backward)
    assert callable(CountHooks().on_after_backward)  # the class is untouched
    for a, b in zip(model.parameters(), plain_model.parameters()):
        assert torch.equal(a, b)


def test_the_cli_switches_off_exactly_the_inherited_no_ops(tmp_path):
    cli = main(["--config", CONFIG, "--trainer.default_root_dir", str(tmp_path)], run=False)
    trainer = cli.trainer
    assert isinstance(trainer.profiler, QuietProfiler)
    for callback in trainer.callbacks:
        for name in CALLBACK_BATCH_HOOKS:
            inherited = getattr(type(callback), name) is getattr(L.Callback, name)
            assert (getattr(callback, name) is None) == inherited, (type(callback).__name__, name)
    assert any(c.on_train_batch_end is not None for c in trainer.callbacks)  # e.g. the checkpoints
    for name in MODULE_BATCH_HOOKS:
        assert getattr(cli.model, name) is None
    assert callable(cli.model.on_before_optimizer_step)  # MicroGPT's own, for accumulation


def test_a_profiler_asked_for_is_kept_and_sees_the_hooks_that_run(tmp_path, capsys):
    cli = main(["--config", CONFIG, "--trainer.default_root_dir", str(tmp_path), "--trainer.max_steps", "3",
                "--trainer.val_check_interval", "3", "--trainer.profiler", "simple",
                "--trainer.enable_progress_bar", "false"], run=False)
    assert isinstance(cli.trainer.profiler, SimpleProfiler)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    actions = set(cli.trainer.profiler.recorded_durations)
    assert "[Callback]SampleNames.on_train_batch_end" in actions
    assert "[Callback]SampleNames.on_before_backward" not in actions
    assert "[LightningModule]MicroGPT.on_before_optimizer_step" in actions


@pytest.mark.parametrize("hook", ["on_before_backward", "on_train_batch_start"])
def test_a_hook_a_subclass_overrides_is_never_switched_off(hook):
    class Override(L.Callback):
        pass

    setattr(Override, hook, lambda self, *args: None)
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[Override()])
    skip_idle_hooks(trainer)
    callback = trainer.callbacks[0]
    assert callable(getattr(callback, hook))
    assert all(getattr(callback, name) is None for name in CALLBACK_BATCH_HOOKS if name != hook)


def test_hooks_set_on_the_instance_are_kept(tiny_names):
    """Lightning's ``LambdaCallback`` sets the hooks it is given on the instance: those still run every step."""
    from lightning.pytorch.callbacks import LambdaCallback

    ends = []
    callback = LambdaCallback(on_train_batch_end=lambda trainer, *args: ends.append(trainer.global_step))
    data = NamesDataModule(path=str(tiny_names), block_size=8, batch_size=4, val_size=4)
    model = MicroGPT(data.vocab, n_embd=16, n_head=4, n_layer=1, block_size=8)
    trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[callback])
    skip_idle_hooks(trainer, model)
    assert callback.on_before_backward is None and callable(callback.on_train_batch_end)
    trainer.fit(model, datamodule=data)
    assert ends == [1, 2, 3]
