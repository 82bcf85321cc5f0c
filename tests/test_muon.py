"""``--model.optimizer microgpt.training.optimizers.MuonWithAdamW``: the blocks' weight matrices take Muon's orthogonalised steps, the rest AdamW's."""

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import error_line

from microgpt.commands.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "names.yaml")
MUON_LR, MOMENTUM, MUON_DECAY, LR, DECAY = 0.05, 0.9, 2.0, 0.01, 0.5
STEPS = 3


def newton_schulz(g: torch.Tensor, steps: int) -> torch.Tensor:
    """The quintic Newton–Schulz iteration torch documents for Muon, in float64: scale to unit Frobenius norm
    (at least 1e-7; on the wide orientation), then ``steps`` times X <- aX + (bA + cA^2)X with A = XX^T."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.double()
    tall = x.size(0) > x.size(1)
    x = x.T if tall else x
    x = x / x.norm().clamp(min=1e-7)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


class Record(L.Callback):
    """Replaces every gradient by a random one just before the optimizer steps (a few names' gradients are
    nearly low-rank, which leaves their orthogonalisation to bfloat16 rounding), and records the parameters
    and gradients then and the parameters after the step."""

    def __init__(self):
        self.before, self.grads, self.after = [], [], []
        self.generator = torch.Generator().manual_seed(0)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        for p in pl_module.gpt.parameters():
            p.grad = torch.randn(p.shape, generator=self.generator)
        self.before.append({n: p.detach().clone() for n, p in pl_module.gpt.named_parameters()})
        self.grads.append({n: p.grad.clone() for n, p in pl_module.gpt.named_parameters()})

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.after.append({n: p.detach().clone() for n, p in pl_module.gpt.named_parameters()})


@pytest.mark.parametrize("ns_steps", [5, 3])
def test_muon_steps_match_newton_schulz_on_nesterov_momentum(tiny_names, tmp_path, ns_steps):
    """Two steps of a real fit: every block matrix moves by the documented Muon update (Nesterov momentum,
    Newton–Schulz, lr scaled by sqrt(max(1, rows/cols)), decoupled decay, the cosine schedule), computed
    here from the recorded gradients; the embeddings and the head take AdamW's first step."""
    cli = main(["--config", CONFIG, "--data.path", str(tiny_names), "--data.val_size", "2",
                "--data.batch_size", "4", "--model.n_embd", "16", "--model.optimizer", "microgpt.training.optimizers.MuonWithAdamW",
                "--model.optimizer.muon_lr", str(MUON_LR), "--model.optimizer.muon_momentum", str(MOMENTUM),
                "--model.optimizer.muon_weight_decay", str(MUON_DECAY), "--model.optimizer.lr", str(LR),
                "--model.optimizer.weight_decay", str(DECAY), "--model.optimizer.muon_ns_steps", str(ns_steps),
                "--trainer.max_steps", str(STEPS),
                "--trainer.limit_val_batches", "0", "--trainer.logger", "false", "--trainer.callbacks", "[]",
                "--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false",
                "--trainer.default_root_dir", str(tmp_path)], run=False)
    record = Record()
    cli.trainer.callbacks.append(record)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert len(record.after) == STEPS

    matrices = [n for n, p in cli.model.gpt.named_parameters() if n.startswith("blocks.") and p.dim() == 2]
    assert {n.split(".")[-2] for n in matrices} == {"q", "k", "v", "o", "fc1", "fc2"}
    for name in matrices:
        buffer = torch.zeros_like(record.grads[0][name], dtype=torch.float64)
        for step in range(STEPS):
            lr = MUON_LR * 0.5 * (1 + math.cos(math.pi * step / STEPS))  # cosine, no warmup, to 0
            grad = record.grads[step][name].double()
            buffer = MOMENTUM * buffer + grad
            orthogonal = newton_schulz(grad + MOMENTUM * buffer, ns_steps)
            rows, cols = grad.shape
            before = record.before[step][name].double()
            expected = before * lr * MUON_DECAY + lr * math.sqrt(max(1, rows / cols)) * orthogonal
            update = before - record.after[step][name].double()
            # torch iterates in bfloat16: within 2.1% here; without Nesterov, with momentum 0.95 or without
            # the decay at least 4% off by the last step
            assert (update - expected).norm() / expected.norm() < 0.03, (name, step)

    for name, decay in [("wte.weight", 0.0), ("wpe.weight", 0.0), ("lm_head.weight", DECAY)]:
        # AdamW's first step: m/sqrt(v) after bias correction is g/|g|
        grad, before = record.grads[0][name], record.before[0][name]
        expected = before * (1 - LR * decay) - LR * grad / (grad.abs() + 1e-8)
        assert torch.allclose(record.after[0][name], expected, rtol=0, atol=1e-7), name


def test_muon_without_torch_support_is_one_line(tiny_names, tmp_path, capsys, monkeypatch):
    monkeypatch.delattr(torch.optim, "Muon")
    line = error_line(["fit", "--config", CONFIG, "--data.path", str(tiny_names), "--data.val_size", "2",
                       "--model.optimizer", "microgpt.training.optimizers.MuonWithAdamW", "--trainer.max_steps", "1", "--trainer.logger", "false",
                       "--trainer.default_root_dir", str(tmp_path)], capsys)
    assert line == (f"microgpt: error: MuonWithAdamW needs torch.optim.Muon, which torch {torch.__version__} "
                    "lacks (torch 2.9 and later have it); upgrade torch or use --model.optimizer torch.optim.AdamW.")
