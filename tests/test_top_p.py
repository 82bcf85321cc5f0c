"""Top-p (nucleus) sampling against a brute-force nucleus, and many requests generated in one batch of rows."""

import itertools
import math

import pytest
import torch

from microgpt.callbacks import SampleNames
from microgpt.checkpoints.io import FORMAT, FORMAT_KEY
from microgpt.commands.sample import main as sample_main
from microgpt.data.datamodule import NamesDataModule
from microgpt.errors import UserError
from microgpt.model.gpt import GPT
from microgpt.model.names import sample_names
from microgpt.model.sampling import SampleRequest, generate, keep_top_p
from microgpt.training.module import MicroGPT

PROBS = [0.05, 0.3, 0.12, 0.2, 0.25, 0.08]  # token i has probability PROBS[i]


def brute_force_nucleus(probs: list[float], p: float) -> set[int]:
    """The smallest set of tokens whose probability reaches p, found by trying every set, smallest first
    (of the sets of that size, the likeliest); sums are compared allowing for the rounding of adding floats."""
    for size in range(1, len(probs) + 1):
        best = max(itertools.combinations(range(len(probs)), size), key=lambda s: sum(probs[i] for i in s))
        if math.fsum(probs[i] for i in best) >= p - 1e-12:
            return set(best)
    raise AssertionError("p above 1")


def draw(model, prompt, count, end_token, max_new_tokens=None, **settings):
    """The continuations of one request, as ``sample`` draws them."""
    return generate(model, [SampleRequest(prompt, count, **settings)], end_token, max_new_tokens)[0].tokens


def fixed_model(probs: list[float]) -> GPT:
    """A GPT whose next-token distribution is ``probs`` after every context: each token embeds to the same
    vector of ones, the blocks add nothing (their output projections are zero), and the head reads log probs."""
    gpt = GPT(len(probs), n_embd=4, n_head=1, n_layer=1, block_size=4).eval()
    with torch.no_grad():
        for param in gpt.parameters():
            param.zero_()
        gpt.wte.weight.fill_(1.0)
        gpt.lm_head.weight[:, 0] = torch.tensor(probs).log()
    return gpt


CUTS = [0.1, 0.31, 0.5, 0.56, 0.76, 0.8, 0.9, 0.96, 0.999, 1.0]


def test_fixed_model_predicts_the_distribution():
    probs = fixed_model(PROBS)(torch.tensor([[0, 3, 1]])).softmax(-1)
    torch.testing.assert_close(probs, torch.tensor([PROBS] * 3)[None], rtol=0, atol=1e-6)


@pytest.mark.parametrize("p", CUTS)
def test_generate_draws_exactly_the_smallest_set_that_reaches_p(p):
    expected = brute_force_nucleus(PROBS, p)
    drawn = draw(fixed_model(PROBS), [0], 4000, end_token=0, max_new_tokens=1, top_p=p,
                 generator=torch.Generator().manual_seed(0))
    # token 0 is the end token, so a draw of it comes back as an empty continuation
    assert {seq[0] if seq else 0 for seq in drawn} == expected  # every member is at least 5% of 4000 draws


def test_keep_top_p_agrees_with_brute_force_on_random_distributions():
    g = torch.Generator().manual_seed(1)
    for _ in range(200):
        logits = torch.randn(7, generator=g) * 2
        probs = logits.double().softmax(-1).tolist()
        p = float(torch.rand((), generator=g)) * 0.999 + 0.001
        sums = sorted(probs, reverse=True)
        if any(abs(sum(sums[: k + 1]) - p) < 1e-5 for k in range(len(sums))):
            continue  # too close to a boundary for float32 to say
        kept = set(torch.isfinite(keep_top_p(logits, p)).nonzero().flatten().tolist())
        assert kept == brute_force_nucleus(probs, p)


def test_top_p_is_refused_outside_0_1():
    gpt = fixed_model(PROBS)
    for bad in (0, -0.1, 1.5):
        with pytest.raises(ValueError, match="top_p must be in"):
            draw(gpt, [0], 1, 0, top_p=bad)
        with pytest.raises(UserError, match="top_p must be in"):
            SampleNames(top_p=bad)


def test_top_p_reaches_sample_predict_and_the_callback(tmp_path, capsys):
    """A tiny top_p keeps only the likeliest character at every step: every name comes out the same."""
    torch.manual_seed(0)
    model = MicroGPT("abcdefghij", block_size=8)
    with torch.no_grad():
        model.gpt.lm_head.weight.normal_(0, 1.0)  # a peaked, untrained distribution
    greedy = model.sample(1, top_k=1)[0]
    assert model.sample(30, 1.0, top_p=1e-6) == [greedy] * 30
    assert len(set(model.sample(30, 1.0))) > 1
    batch = {"count": 5, "prefix": "", "temperature": 1.0, "top_k": None, "top_p": 1e-6, "seed": 3}
    assert model.predict_step(batch, 0) == [greedy] * 5
    request = next(iter(NamesDataModule(predict_top_p=0.25, predict_size=3).predict_dataloader()))
    assert request["top_p"] == 0.25
    assert SampleNames(num_samples=4, temperature=1.0, top_p=1e-6).sample(model, None) == [greedy] * 4
    ckpt = tmp_path / "model.ckpt"
    torch.save({"hyper_parameters": dict(model.hparams), "state_dict": model.state_dict(), FORMAT_KEY: FORMAT}, ckpt)
    out = tmp_path / "names.txt"
    sample_main(["--ckpt_path", str(ckpt), "--num_samples", "6", "--temperature", "1.0", "--top_p", "0.4",
                 "--seed", "2", "--output", str(out)])
    expected = sample_names(model.gpt, model.tokenizer, 6, 1.0, prefix="", generator=torch.Generator().manual_seed(2),
                            top_p=0.4)
    assert out.read_text().splitlines() == expected
    with pytest.raises(SystemExit) as stop:
        sample_main(["--ckpt_path", str(ckpt), "--top_p", "0"])
    assert stop.value.code == 2 and "--top_p: must be in (0, 1], got 0" in capsys.readouterr().err


def noisy_model(seed=0):
    torch.manual_seed(seed)
    model = GPT(vocab_size=10, n_embd=16, n_head=4, n_layer=2, block_size=8).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.15)
    return model


END = 9
REQUESTS = [([END], 5, 0.8, None, None), ([END, 1, 2], 3, 1.5, 3, None), ([END, 4] * 6, 4, 1.0, None, 0.7),
            ([END, 3], 7, 0.5, 2, 0.9), ([END, 5, 5, 5, 5, 5, 5], 2, 2.0, None, 0.5)]


def test_a_batch_of_requests_draws_what_each_draws_alone():
    model = noisy_model()
    requests = [SampleRequest(p, n, t, k, tp, torch.Generator().manual_seed(i)) for i, (p, n, t, k, tp)
                in enumerate(REQUESTS)]
    together = [drawn.tokens for drawn in generate(model, requests, END)]
    for i, ((prompt, n, t, k, tp), got) in enumerate(zip(REQUESTS, together)):
        # alone, a request reads its whole prompt in one pass; in the batch, only the part every prompt has
        alone = draw(model, prompt, n, END, temperature=t, top_k=k, top_p=tp, generator=torch.Generator().manual_seed(i))
        assert got == alone
        assert all(len(s) <= model.block_size for s in got)


def test_a_seeded_request_gets_the_same_tokens_whatever_else_is_in_the_batch():
    model = noisy_model(1)
    mine = lambda: SampleRequest([END, 2, 7], 6, 1.3, 4, 0.9, torch.Generator().manual_seed(42))
    alone = generate(model, [mine()], END)[0].tokens
    others = [SampleRequest(p, n, t, k, tp) for p, n, t, k, tp in REQUESTS]  # unseeded: torch's global numbers
    for companions in (others[:1], others[2:], others[::-1] * 3):
        batch = [*companions[: len(companions) // 2], mine(), *companions[len(companions) // 2 :]]
        assert generate(model, batch, END)[len(companions) // 2].tokens == alone
    assert generate(model, [mine(), SampleRequest([END], 1, 1.0, generator=torch.Generator().manual_seed(42))],
                          END)[0].tokens == alone


def test_each_row_keeps_its_own_nucleus_in_a_mixed_batch():
    gpt = fixed_model(PROBS)
    cuts = [0.1, 0.56, 0.9, 1.0, None]
    requests = [SampleRequest([0], 2000, 1.0, None, p, torch.Generator().manual_seed(i)) for i, p in enumerate(cuts)]
    for p, drawn in zip(cuts, generate(gpt, requests, end_token=0, max_new_tokens=1)):
        assert {s[0] if s else 0 for s in drawn.tokens} == brute_force_nucleus(PROBS, p or 1.0)
    top_k = [drawn.tokens for drawn in generate(gpt, [SampleRequest([0], 2000, 1.0, 2, 0.9),
                                                      SampleRequest([0], 2000, 1.0, 4, 0.6)], end_token=0, max_new_tokens=1)]
    likeliest = sorted(range(len(PROBS)), key=lambda i: -PROBS[i])
    assert {s[0] for s in top_k[0]} == set(likeliest[:2])  # top-k first, then the nucleus of what is left
    renormalized = [PROBS[i] if i in likeliest[:4] else 0.0 for i in range(len(PROBS))]
    total = sum(renormalized)
    assert {s[0] if s else 0 for s in top_k[1]} == brute_force_nucleus([q / total for q in renormalized], 0.6)
