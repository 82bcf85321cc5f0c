"""Held-out metrics, padding, the optimizer's parameter groups and the learning-rate schedule."""

import math
from functools import partial

import lightning as L
import pytest
import torch
from helpers.names_reference import padded_rows, split_names

from microgpt.callbacks import novelty
from microgpt.data.datamodule import NamesDataModule
from microgpt.errors import UserError
from microgpt.model.tokenizer import CharTokenizer
from microgpt.training.module import MicroGPT
from microgpt.training.optimizers import WarmupCosine


def trained_looking_model(vocab="abcde", seed=0, **kw):
    torch.manual_seed(seed)
    model = MicroGPT(vocab, n_embd=8, n_head=2, block_size=6, **kw)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model.eval()


def nll_by_hand(model, name):
    """Sum of -log p(next char) over a name and its end token, from softmax written out, and the count."""
    tok = model.tokenizer
    seq = [tok.bos, *tok.encode(name), tok.bos][: model.hparams.block_size + 1]
    logits = model.gpt(torch.tensor([seq[:-1]]))[0].double()
    logp = logits - torch.log(torch.exp(logits).sum(-1, keepdim=True))
    return -sum(logp[i, t].item() for i, t in enumerate(seq[1:])), len(seq) - 1


def test_one_name_scores_the_same_alone_and_inside_a_padded_batch():
    model = trained_looking_model().double()  # float64: only a masking error could show, not GEMM rounding
    tok = model.tokenizer
    alone = padded_rows(["ab"], tok, 6)
    batch = padded_rows(["ab", "abcdeab", "c"], tok, 6)
    T = int(alone["lengths"].max())
    with torch.no_grad():
        a = model.gpt(alone["inputs"][:, :T])[0]
        b = model.gpt(batch["inputs"])[0, :T]
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    nll = model.token_nll((batch["inputs"], batch["targets"]))
    assert len(nll) == 3 + 6 + 2  # padding receives no loss


def test_val_loss_weights_tokens_across_batches_and_derives_ppl_and_bpc():
    model = trained_looking_model()
    names = ["abcdea", "b", "cab", "d"]
    dm_batches = [padded_rows(names[:1], model.tokenizer, 6), padded_rows(names[1:], model.tokenizer, 6)]
    for i, enc in enumerate(dm_batches):  # two batches with 6 and 2+4+2 predicted tokens
        model.validation_step((enc["inputs"], enc["targets"]), i)
    logged = {}
    model.log_dict = lambda d, **kw: logged.update({k: float(v) for k, v in d.items()})
    model.trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    model.on_validation_epoch_end()

    sums, counts = zip(*(nll_by_hand(model, n) for n in names))
    expected = sum(sums) / sum(counts)
    assert expected != pytest.approx(sum(s / c for s, c in zip(sums, counts)) / 4, abs=1e-3)  # not a mean of means
    assert logged["val/loss"] == pytest.approx(expected, abs=1e-5)
    assert logged["val/ppl"] == pytest.approx(math.exp(expected), rel=1e-5)
    assert logged["val/bpc"] == pytest.approx(expected / math.log(2), rel=1e-5)


def test_test_loss_does_not_depend_on_batch_size(tiny_names, tmp_path):
    model = trained_looking_model(vocab="".join(sorted(set(tiny_names.read_text().replace("\n", "")))))
    losses = []
    for eval_batch_size in (1, 3, 50):
        dm = NamesDataModule(path=str(tiny_names), val_size=6, eval_batch_size=eval_batch_size, block_size=6)
        trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
        losses.append(trainer.test(model, datamodule=dm, verbose=False)[0]["test/loss"])
    assert losses == pytest.approx([losses[0]] * 3, abs=1e-6)


def test_test_path_with_unknown_characters_names_them(tiny_names, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text("anna\nzoë\n", encoding="utf-8")
    dm = NamesDataModule(path=str(tiny_names), val_size=2, test_path=str(other))
    model = MicroGPT(dm.vocab)
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(UserError, match=r"characters outside the model's vocabulary: 'zë'"):
        trainer.test(model, datamodule=dm, verbose=False)


def test_weight_decay_applies_to_linear_weights_only():
    model = MicroGPT("abc", n_embd=8, n_head=2, n_layer=2, optimizer=partial(torch.optim.AdamW, weight_decay=0.1))
    model.trainer = L.Trainer(max_steps=10, logger=False)
    groups = model.configure_optimizers()["optimizer"].param_groups
    decayed = {id(p) for g in groups if g["weight_decay"] == 0.1 for p in g["params"]}
    linear = {id(m.weight) for m in model.gpt.modules() if isinstance(m, torch.nn.Linear)}
    assert decayed == linear
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def lr_factor(step: int, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0) -> float:
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    return WarmupCosine(optimizer, total_steps, warmup_steps, min_lr_ratio).factor(step)


def test_lr_schedule_warmup_cosine_and_floor():
    # the seed: full lr at step 0, cosine to 0 over the run
    assert [lr_factor(t, 500) for t in (0, 250, 500)] == pytest.approx([1.0, 0.5, 0.0])
    # warmup never gives lr 0, reaches the peak at the end of warmup, then decays to the floor
    assert [lr_factor(t, 100, warmup_steps=4) for t in range(5)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])
    assert lr_factor(100, 100, warmup_steps=4, min_lr_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(52, 100, warmup_steps=4, min_lr_ratio=0.1) == pytest.approx(0.1 + 0.9 * 0.5)


def test_shuffle_visits_every_name_once_per_pass_in_a_new_order(tmp_path):
    """The names in the training batches themselves (decoded here): each pass over the stream holds every
    training name of the file once, each pass in a new order, and the first epoch is the stream's start."""
    names = [f"n{chr(97 + i % 26)}{chr(97 + i // 26)}" for i in range(30)]
    path = tmp_path / "n.txt"
    path.write_text("\n".join(names))
    dm = NamesDataModule(path=str(path), batch_size=5, val_size=2, shuffle=True)
    dm.setup("fit")
    tokenizer = CharTokenizer(dm.vocab)
    batches = dm.train_dataloader()

    def decoded() -> list[str]:
        return [tokenizer.decode(row.tolist()) for batch in batches for row in batch.inputs]

    first_epoch = decoded()  # 28 training names in batches of 5: 6 batches, stream places 0-29
    batches.current_epoch = lambda: 1
    stream = first_epoch + decoded()  # places 30-59: two passes and a bit
    split = split_names(dm)
    assert len(first_epoch) == 30 and len(stream) == 60
    train = set(names) - set(split["val"])
    assert len(train) == 28 and sorted(stream[:28]) == sorted(train) == sorted(stream[28:56])
    assert stream[:28] != stream[28:56] and stream[:28] != split["train"]  # reshuffled, and not the file's order


def test_novelty_shares():
    shares = novelty(["ann", "bob", "cy", "dee"], train_names={"ann", "zed"}, held_out_names={"bob", "ann"})
    assert shares == {"train": 0.25, "held_out": 0.25, "new": 0.5}
