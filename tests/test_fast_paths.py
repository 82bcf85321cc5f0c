"""The fast paths (fused attention, torch.compile, sync-free steps) equal the plain computations."""

import math
import os
import sys

import lightning as L
import pytest
import torch
from conftest import ROOT
from torch import nn

from microgpt.commands.cli import main
from microgpt.data.datamodule import NamesDataModule
from microgpt.model.gpt import GPT, CausalSelfAttention
from microgpt.training.module import MicroGPT


def masked_softmax_attention(q, k, v):
    """Causal attention spelled out: scores, -inf above the diagonal, softmax, weighted sum."""
    T = q.size(-2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))
    future = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
    return scores.masked_fill(future, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("n_embd,n_head,T", [(16, 4, 8), (64, 4, 16), (12, 3, 1), (12, 1, 5)])
def test_attention_equals_explicit_masked_softmax_in_float64(n_embd, n_head, T):
    torch.manual_seed(n_embd + T)
    attn = CausalSelfAttention(n_embd, n_head).double()
    for p in attn.parameters():
        nn.init.normal_(p, 0, 0.5)
    x = torch.randn(3, T, n_embd, dtype=torch.float64)

    hs = n_embd // n_head
    q, k, v = (x @ lin.weight.T for lin in (attn.q, attn.k, attn.v))
    q, k, v = (t.view(3, T, n_head, hs).transpose(1, 2) for t in (q, k, v))
    expected = masked_softmax_attention(q, k, v).transpose(1, 2).reshape(3, T, n_embd) @ attn.o.weight.T
    torch.testing.assert_close(attn(x), expected, rtol=0, atol=1e-12)


class StepLosses(L.Callback):
    """Each step's training loss, and how many graphs had been compiled when the first step ended."""

    def __init__(self, compiled: list):
        self.compiled, self.losses, self.after_first_step = compiled, [], None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(pl_module.step_losses.latest))
        if self.after_first_step is None:
            self.after_first_step = len(self.compiled)


@pytest.mark.parametrize("pack", ["false", "true"])
def test_the_compiled_step_compiles_once_and_changes_no_loss(names_file, tmp_path, monkeypatch, pack):
    """A counting backend stands in for inductor (whose compile takes tens of seconds here): every graph dynamo
    hands it is one compile. Over 12 steps with 3 validations and samples, all of them happen in the first
    step, and the losses are the eager run's (static shapes only add padding that no loss sees)."""
    compiled = []

    def counting_backend(graph, example_inputs):
        compiled.append([tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor)])
        return graph.forward

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, **{**kw, "backend": counting_backend}))
    torch._dynamo.reset()
    runs = {}
    for flag in ("false", "true"):
        cli = main(["--config", str(ROOT / "configs" / "names-batched.yaml"), "--data.path", str(names_file),
                    "--model.n_embd", "16", "--model.n_layer", "1", "--data.pack", pack, "--trainer.max_steps", "12",
                    "--trainer.val_check_interval", "4", "--data.val_size", "50", "--model.compile", flag,
                    "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
                    "--trainer.default_root_dir", str(tmp_path / flag)], run=False)
        record = StepLosses(compiled)
        cli.trainer.callbacks.append(record)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        runs[flag] = record
    assert runs["false"].after_first_step == 0 and runs["true"].after_first_step >= 1
    assert len(compiled) == runs["true"].after_first_step, compiled  # no recompile after the first step
    assert runs["true"].losses == pytest.approx(runs["false"].losses, abs=1e-5)
    assert MicroGPT("abc", compile=True).state_dict().keys() == MicroGPT("abc").state_dict().keys()


@pytest.mark.skipif(not os.environ.get("MICROGPT_SLOW_TESTS"),
                    reason="compiling takes about 30 s on a 2-core CPU; set MICROGPT_SLOW_TESTS=1")
def test_compiled_loss_and_gradients_equal_eager():
    torch.manual_seed(0)
    eager = GPT(vocab_size=27, n_embd=32, n_head=4, n_layer=2, block_size=8)
    for p in eager.parameters():
        nn.init.normal_(p, 0, 0.2)
    compiled = GPT(vocab_size=27, n_embd=32, n_head=4, n_layer=2, block_size=8)
    compiled.load_state_dict(eager.state_dict())
    compiled.compile()
    idx, targets = torch.randint(0, 27, (4, 8)), torch.randint(0, 27, (4, 8))
    losses = []
    for model in (eager, compiled):
        loss = nn.functional.cross_entropy(model(idx).flatten(0, 1), targets.flatten())
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=1e-5)
    for p_eager, p_compiled in zip(eager.parameters(), compiled.parameters()):
        torch.testing.assert_close(p_compiled.grad, p_eager.grad, rtol=1e-4, atol=1e-6)


def count_host_syncs(monkeypatch) -> list[str]:
    """Record the calls that copy a tensor's value to the host (``item``, ``float``, ``int``, ``bool``,
    ``tolist``, ``.cpu()``) made from now on by code outside torch itself; torch's own (Adam's step counter,
    the loader's seed) are made on CPU tensors, by a plain loop too."""
    calls = []
    torch_dir = os.path.dirname(torch.__file__)
    for name in ("item", "__float__", "__int__", "__bool__", "__index__", "tolist", "cpu"):
        original = getattr(torch.Tensor, name)

        def patched(tensor, _original=original, _name=name):
            caller = sys._getframe(1).f_code.co_filename
            if not caller.startswith(torch_dir):
                calls.append(f"{_name} from {caller}")
            return _original(tensor)

        monkeypatch.setattr(torch.Tensor, name, patched)
    return calls


class CountSyncsInSteps(L.Callback):
    """Counts the host syncs made between the start of a training step and the end of its callbacks' work,
    excluding the steps that log (every ``log_every_n_steps``) or save a checkpoint."""

    def __init__(self, monkeypatch, skip_steps: set[int]):
        self.calls, self.counting, self.skip_steps = count_host_syncs(monkeypatch), False, skip_steps
        self.per_step: dict[int, list[str]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.calls.clear()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step not in self.skip_steps:
            self.per_step[trainer.global_step] = list(self.calls)


@pytest.mark.parametrize("pack", [False, True])
def test_training_steps_make_no_host_sync_without_logging(tiny_names, tmp_path, monkeypatch, pack):
    """The recipes' own callbacks, logger and all: a step that neither logs nor saves never waits for the device."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger

    from microgpt.callbacks import EMA, LearningRateMonitor, RunCheckpoint, SampleNames, Throughput

    data = NamesDataModule(path=str(tiny_names), block_size=8, batch_size=4, val_size=4, pack=pack)
    model = MicroGPT(data.vocab, n_embd=16, n_head=4, n_layer=1, block_size=8)
    counter = CountSyncsInSteps(monkeypatch, skip_steps={3, 6, 8})
    callbacks = [ModelCheckpoint(monitor="val/loss", filename="best"), RunCheckpoint(every_n_train_steps=6),
                 LearningRateMonitor(), Throughput(), EMA(), SampleNames(num_samples=2), counter]
    trainer = L.Trainer(max_steps=8, logger=TensorBoardLogger(tmp_path), log_every_n_steps=3,
                        enable_progress_bar=False, enable_model_summary=False, val_check_interval=8,
                        check_val_every_n_epoch=None, callbacks=callbacks, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=data)
    assert trainer.global_step == 8
    assert sorted(counter.per_step) == [1, 2, 4, 5, 7]
    assert counter.per_step == {step: [] for step in [1, 2, 4, 5, 7]}
