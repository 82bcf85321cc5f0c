"""The fast paths (fused attention, torch.compile, sync-free steps) equal the plain computations."""

import math
import os
import sys

import lightning as L
import pytest
import torch
from torch import nn

from microgpt.data import NamesDataModule
from microgpt.model import GPT, CausalSelfAttention
from microgpt.module import MicroGPT


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


def test_compile_flag_compiles_the_gpt_and_keeps_checkpoint_names():
    plain, compiled = MicroGPT("abc"), MicroGPT("abc", compile=True)
    assert compiled.gpt._compiled_call_impl is not None and plain.gpt._compiled_call_impl is None
    assert list(compiled.state_dict()) == list(plain.state_dict())


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
    """Record the ``Tensor.item`` and ``float(tensor)`` calls (both copy a value to the host) made from now on
    by code outside torch itself; torch's own (Adam's step counter, the loader's seed) are made on CPU
    tensors, by a plain loop too."""
    calls = []
    torch_dir = os.path.dirname(torch.__file__)
    for name in ("item", "__float__"):
        original = getattr(torch.Tensor, name)

        def patched(tensor, _original=original, _name=name):
            caller = sys._getframe(1).f_code.co_filename
            if not caller.startswith(torch_dir):
                calls.append(f"{_name} from {caller}")
            return _original(tensor)

        monkeypatch.setattr(torch.Tensor, name, patched)
    return calls


def test_training_steps_make_no_host_sync_without_logging(tiny_names, tmp_path, monkeypatch):
    data = NamesDataModule(path=str(tiny_names), block_size=8, batch_size=4, val_size=4)
    model = MicroGPT(data.vocab, n_embd=16, n_head=4, n_layer=1, block_size=8)
    trainer = L.Trainer(max_steps=6, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path)
    calls = count_host_syncs(monkeypatch)
    trainer.fit(model, datamodule=data)
    assert trainer.global_step == 6
    assert calls == []
