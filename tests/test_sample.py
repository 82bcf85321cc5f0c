"""Generation: the cached batched path against a seed-style loop, options, the sample and predict commands."""

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from helpers.sampling_reference import drawn_by_hand
from lightning.pytorch.loggers import CSVLogger

from microgpt.callbacks import SampleNames
from microgpt.commands.cli import main
from microgpt.data.datamodule import NamesDataModule
from microgpt.model.gpt import GPT
from microgpt.model.sampling import SampleRequest, generate
from microgpt.training.module import MicroGPT

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "names.yaml")
END = 9


def draw(model, prompt, count, end_token, max_new_tokens=None, **settings):
    """The continuations of one request, as ``sample`` draws them."""
    return generate(model, [SampleRequest(prompt, count, **settings)], end_token, max_new_tokens)[0].tokens


def noisy_model(block_size=8, seed=0):
    torch.manual_seed(seed)
    model = GPT(vocab_size=10, n_embd=16, n_head=4, n_layer=2, block_size=block_size).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.15)
    return model


def seed_style(model, prompt, max_new_tokens, temperature, generator):
    """One name, one full forward pass over the last block_size tokens per new token."""
    idx, out = list(prompt), []
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([idx[-model.block_size:]]))[:, -1]
        token = torch.multinomial(F.softmax(logits / temperature, -1), 1, generator=generator).item()
        if token == END:
            break
        out.append(token)
        idx.append(token)
    return out


@pytest.mark.parametrize("prompt,max_new", [([END], 8), ([END, 1, 2, 3], 12), ([END, 4] * 6, 5)])
def test_cached_generation_draws_the_same_tokens_as_the_seed_loop(prompt, max_new):
    model = noisy_model()
    for seed in range(20):
        expected = seed_style(model, prompt, max_new, 0.8, torch.Generator().manual_seed(seed))
        got = draw(model, prompt, 1, END, max_new_tokens=max_new, temperature=0.8,
                   generator=torch.Generator().manual_seed(seed))
        assert got == [expected]


def test_cache_gives_full_forward_probabilities_for_a_batch():
    model = noisy_model()
    seqs = torch.randint(0, 10, (5, 8), generator=torch.Generator().manual_seed(3))
    caches = model.new_caches(5)
    stepped = [model(seqs[:, :3], caches)[:, -1]]
    stepped += [model(seqs[:, t : t + 1], caches, start=t)[:, -1] for t in range(3, 8)]
    full = [model(seqs[:, : t + 1])[:, -1] for t in range(2, 8)]
    for a, b in zip(stepped, full):
        torch.testing.assert_close(a.softmax(-1), b.softmax(-1), rtol=0, atol=1e-5)


def test_generation_is_reproducible_with_a_seed_and_names_stop_correctly():
    model = noisy_model()
    seeded = lambda seed: draw(model, [END], 50, END, temperature=1.0, generator=torch.Generator().manual_seed(seed))
    first = seeded(1)
    assert first == seeded(1) and first != seeded(2)
    assert all(len(s) <= model.block_size and END not in s for s in first)
    assert any(len(s) < model.block_size for s in first)
    capped = draw(model, [END], 50, END, max_new_tokens=2, generator=torch.Generator().manual_seed(1))
    assert all(len(s) <= 2 for s in capped) and any(len(s) == 2 for s in capped)


def test_top_k_never_draws_outside_the_k_likeliest():
    model = noisy_model()
    out = draw(model, [END, 2], 200, END, max_new_tokens=6, temperature=2.0, top_k=3,
               generator=torch.Generator().manual_seed(0))
    for seq in out:
        context = [END, 2]
        for token in seq + ([END] if len(seq) < 6 else []):
            top = model(torch.tensor([context[-8:]]))[0, -1].topk(3).indices.tolist()
            assert token in top
            context.append(token)
    greedy = draw(model, [END], 3, END, top_k=1)
    assert greedy[0] == greedy[1] == greedy[2]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckpt")
    names = tmp / "names.txt"
    names.write_text("anna\nbob\ncarla\ndave\neve\nfiona\ngreg\nhana\nmara\nmaja")
    cli = main(["--config", CONFIG, "--data.path", str(names), "--data.val_size", "2", "--trainer.max_steps", "5",
                "--trainer.default_root_dir", str(tmp), "--trainer.enable_progress_bar", "false"], run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return tmp, names, tmp / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"


def sample_cmd(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "microgpt", "sample", *map(str, args)], check=False, capture_output=True,
                          text=True, env=env, timeout=120)


def test_sample_command_prints_reproducible_prefixed_names(checkpoint, tmp_path, capsys):
    """A fresh ``python -m microgpt sample`` process writes the file; the same options in this process print
    the same names; both are the names drawn here by hand."""
    from microgpt.commands.sample import main as sample

    _, _, ckpt = checkpoint
    out = tmp_path / "names.txt"
    result = sample_cmd("--ckpt_path", ckpt, "--num_samples", 30, "--prefix", "ma", "--seed", 5, "--top_k", 4,
                        "--output", out)
    assert result.returncode == 0, result.stderr
    names = out.read_text().splitlines()
    assert len(names) == 30 and all(n.startswith("ma") for n in names)
    sample(["--ckpt_path", str(ckpt), "--num_samples", "30", "--prefix", "ma", "--seed", "5", "--top_k", "4"])
    assert capsys.readouterr().out.splitlines() == names
    assert names == drawn_by_hand(ckpt, 30, temperature=0.5, top_k=4, prefix="ma", seed=5)
    assert len(set(names)) > 1 and any(len(n) < 8 for n in names)  # not all alike, and some ended early


@pytest.mark.parametrize("args,message", [
    (["--prefix", "mZ"], "has characters the model has never seen: 'Z'"),
    (["--temperature", "0"], "argument --temperature: must be positive, got 0"),
    (["--ckpt_path", "missing.ckpt"], "missing.ckpt: no such checkpoint file."),
    (["--ckpt_path", "NOT_A_CKPT"], "is not a checkpoint (not a file torch.save writes)."),
])
def test_sample_command_errors_are_one_line(checkpoint, tmp_path, capsys, args, message):
    from microgpt.commands.sample import main as sample

    _, _, ckpt = checkpoint
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"this is not a checkpoint")
    args = [str(junk) if a == "NOT_A_CKPT" else str(tmp_path / a) if a == "missing.ckpt" else a for a in args]
    with pytest.raises(SystemExit) as stop:
        sample(["--ckpt_path", str(ckpt), *args])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert message in err.strip().splitlines()[-1]


def test_predict_writes_names_through_the_prediction_writer(checkpoint, capsys):
    tmp, names, ckpt = checkpoint
    main(["predict", "--config", CONFIG, "--data.path", str(names), "--data.val_size", "2", "--ckpt_path", str(ckpt),
          "--data.predict_size", "7", "--data.predict_prefix", "b", "--data.eval_batch_size", "3",
          "--trainer.default_root_dir", str(tmp / "predict"), "--trainer.enable_progress_bar", "false"])
    written = next((tmp / "predict").rglob("predictions.txt")).read_text().splitlines()
    assert len(written) == 7 and all(n.startswith("b") for n in written)
    known = set(names.read_text().split())
    new = sum(n not in known for n in written) / 7
    assert f"predictions: {new:.0%} new, " in capsys.readouterr().out


def test_callback_samples_during_training_without_changing_it(tiny_names, tmp_path):
    def fit(callbacks, root):
        L.seed_everything(0)
        dm = NamesDataModule(path=str(tiny_names), val_size=2)
        model = MicroGPT(dm.vocab, dropout=0.1)
        trainer = L.Trainer(max_steps=6, logger=CSVLogger(root), callbacks=callbacks, enable_progress_bar=False,
                            enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0)
        trainer.fit(model, datamodule=dm)
        return model

    watched = fit([SampleNames(num_samples=4, every_n_steps=2, seed=3)], tmp_path / "a")
    plain = fit([], tmp_path / "b")
    for a, b in zip(watched.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    rows = next((tmp_path / "a").rglob("samples.csv")).read_text().splitlines()
    assert rows[0] == "step,name"
    assert sorted({int(r.split(",")[0]) for r in rows[1:]}) == [2, 4, 6]
    assert len(rows) == 1 + 3 * 4 + 4  # three rounds during training and the final round
