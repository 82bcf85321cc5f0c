"""The GPT module: shapes, init, causality and argument checks, against independent computations."""

import math
import subprocess
import sys

import pytest
import torch

from microgpt.model.gpt import GPT


def test_model_imports_without_lightning():
    code = "import sys, microgpt.model.gpt; assert 'lightning' not in sys.modules, 'lightning was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_n_embd_not_divisible_by_n_head_is_a_clear_error():
    with pytest.raises(ValueError, match=r"n_embd \(10\) must be divisible by n_head \(4\)"):
        GPT(vocab_size=5, n_embd=10, n_head=4)


@pytest.mark.parametrize("field", ["n_embd", "n_head", "n_layer", "block_size", "vocab_size"])
def test_non_positive_sizes_are_refused(field):
    kwargs = {"vocab_size": 5, "n_embd": 16, "n_head": 4, "n_layer": 1, "block_size": 8}
    kwargs[field] = 0
    with pytest.raises(ValueError, match=field):
        GPT(**kwargs)


def test_init_draws_and_zeroed_projections():
    torch.manual_seed(0)
    model = GPT(vocab_size=27, n_embd=32, n_head=4, n_layer=2, block_size=8)
    assert not any(getattr(m, "bias", None) is not None for m in model.modules())
    for block in model.blocks:
        assert torch.count_nonzero(block.attn.o.weight) == 0
        assert torch.count_nonzero(block.mlp.fc2.weight) == 0
    drawn = torch.cat([model.wte.weight.flatten(), model.blocks[0].attn.q.weight.flatten(),
                       model.blocks[1].mlp.fc1.weight.flatten(), model.lm_head.weight.flatten()])
    assert abs(drawn.mean().item()) < 0.002
    assert drawn.std().item() == pytest.approx(0.02, rel=0.05)


def test_parameter_count_of_the_seed_model():
    model = GPT(vocab_size=27, n_embd=16, n_head=4, n_layer=1, block_size=8)
    expected = 27 * 16 + 8 * 16 + 4 * 16 * 16 + 2 * 16 * 64 + 16 * 27
    assert sum(p.numel() for p in model.parameters()) == expected


def test_forward_equals_spelled_out_formulas_in_float64():
    torch.manual_seed(1)
    model = GPT(vocab_size=11, n_embd=12, n_head=3, n_layer=2, block_size=6).double()
    for p in model.parameters():  # give the zero-initialised projections real values too
        torch.nn.init.normal_(p, 0, 0.3)
    idx = torch.randint(0, 11, (2, 6))

    def norm(x):
        return x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-5)

    x = norm(model.wte.weight[idx] + model.wpe.weight[:6])
    for b in model.blocks:
        h = norm(x)
        q, k, v = (h @ lin.weight.T for lin in (b.attn.q, b.attn.k, b.attn.v))
        q, k, v = (t.view(2, 6, 3, 4).transpose(1, 2) for t in (q, k, v))
        att = q @ k.transpose(-1, -2) / math.sqrt(4)
        att = att.masked_fill(torch.triu(torch.ones(6, 6, dtype=torch.bool), 1), float("-inf")).softmax(-1)
        x = x + (att @ v).transpose(1, 2).reshape(2, 6, 12) @ b.attn.o.weight.T
        x = x + torch.relu(norm(x) @ b.mlp.fc1.weight.T) ** 2 @ b.mlp.fc2.weight.T
    expected = x @ model.lm_head.weight.T
    torch.testing.assert_close(model(idx), expected, rtol=0, atol=1e-10)


def test_positions_do_not_see_the_future():
    torch.manual_seed(2)
    model = GPT(vocab_size=9, n_embd=16, n_head=4, n_layer=2, block_size=8)
    for p in model.parameters():
        torch.nn.init.normal_(p, 0, 0.3)
    a = torch.tensor([[8, 1, 2, 3, 4, 5]])
    b = torch.tensor([[8, 1, 2, 7, 7, 7]])
    torch.testing.assert_close(model(a)[:, :3], model(b)[:, :3], rtol=0, atol=0)
    assert not torch.allclose(model(a)[:, 3:], model(b)[:, 3:])


def test_too_long_input_is_refused():
    model = GPT(vocab_size=5, block_size=4)
    with pytest.raises(ValueError, match="exceeds block_size 4"):
        model(torch.zeros(1, 5, dtype=torch.long))
