"""Packed training rows (--data.pack): several names per row, each scored exactly as alone."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers.names_reference import padded_batch, padded_rows, rows_of, split_names
from test_fidelity import RecordLosses

from microgpt.commands.cli import main
from microgpt.data.batches import first_fit, packed_batch
from microgpt.data.datamodule import NamesDataModule
from microgpt.data.rows import IGNORE_INDEX
from microgpt.model.gpt import GPT
from microgpt.model.tokenizer import CharTokenizer

BATCHED = str(Path(__file__).resolve().parents[1] / "configs" / "names-batched.yaml")
NAMES = ["ab", "abcd", "a", "abc", "bcd", "ddd", "b"]


def random_gpt(vocab_size, seed=0, **kw):
    """A GPT with large random weights (every position's output depends strongly on what it attends to)."""
    torch.manual_seed(seed)
    gpt = GPT(vocab_size, **kw)
    with torch.no_grad():
        for p in gpt.parameters():
            p.normal_(0, 0.5)
    return gpt


def test_first_fit_places_the_longest_first_into_the_first_row_with_room():
    # longest first: 5 -> row 0, 4 -> row 1, 3 -> row 2, 2 -> row 1 (row 0 has 1 left), 1 -> row 0
    assert first_fit([3, 5, 2, 4, 1], capacity=6) == [(2, 0), (0, 0), (1, 4), (1, 0), (0, 5)]


def test_packed_rows_hold_every_name_once_with_positions_restarting(tmp_path):
    tok = CharTokenizer("abcd")
    B, X = tok.bos, IGNORE_INDEX
    rows = rows_of(["ab", "abcd", "a"], tok, 6, tmp_path)  # 3, 5 and 2 positions
    inputs, targets, positions, *_ = packed_batch(rows, torch.tensor([0, 1, 2]))
    # 5 -> row 0; 3 -> row 1; 2 -> row 1 after the 3 (row 0 has 1 slot left); spare slots: token 0, position 0
    assert inputs.tolist() == [[B, 0, 1, 2, 3, 0], [B, 0, 1, B, 0, 0]]
    assert targets.tolist() == [[0, 1, 2, 3, B, X], [0, 1, B, 0, B, X]]
    assert positions.tolist() == [[0, 1, 2, 3, 4, 0], [0, 1, 2, 0, 1, 0]]


def test_a_name_scores_the_same_alone_and_inside_a_packed_row(tmp_path):
    tok = CharTokenizer("abcd")
    gpt = random_gpt(tok.vocab_size, n_embd=8, n_head=2, n_layer=2, block_size=6).double().eval()
    encoded = padded_rows(NAMES, tok, block_size=6)
    inputs, targets, positions, *_ = packed_batch(rows_of(NAMES, tok, 6, tmp_path), torch.arange(len(NAMES)))
    assert inputs.size(0) < len(NAMES)  # names really share rows
    with torch.no_grad():
        packed = gpt(inputs, positions=positions)
        for i, name in enumerate(NAMES):
            n = len(name) + 1
            alone = gpt(encoded["inputs"][i : i + 1, :n])[0]
            # find the name in the packed rows: the run of targets equal to its own
            row, start = next((r, c) for r in range(len(targets)) for c in range(targets.size(1) - n + 1)
                              if positions[r, c] == 0 and targets[r, c : c + n].tolist() == encoded["targets"][i, :n].tolist()
                              and inputs[r, c : c + n].tolist() == encoded["inputs"][i, :n].tolist())
            torch.testing.assert_close(packed[row, start : start + n], alone, rtol=0, atol=1e-12)


def test_packed_batch_has_the_loss_and_gradients_of_the_padded_batch(names_file):
    dm = NamesDataModule(path=str(names_file), block_size=16, batch_size=64, val_size=1000, shuffle=True)
    dm.setup("fit")
    train = split_names(dm)["train"]
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:64]
    padded = padded_batch([train[i] for i in idx], dm.tokenizer, 16)  # the padded rows, computed without the store
    packed = packed_batch(dm.train_rows, idx)
    assert packed.inputs.numel() < 0.75 * padded.inputs.numel()
    results = []
    for batch in (padded, packed):
        gpt = random_gpt(dm.tokenizer.vocab_size, seed=1, n_embd=32, n_head=4, n_layer=2, block_size=16)
        for p in gpt.parameters():
            p.data.mul_(0.1)
        logits = gpt(batch.inputs, positions=batch.positions)
        loss = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE_INDEX)
        loss.backward()
        results.append((loss.detach(), [p.grad for p in gpt.parameters()]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=1e-6)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7)


def test_fit_with_pack_trains_like_padded_rows(names_file, tmp_path):
    """Same recipe, same names per step: the packed run's losses and weights follow the padded run's."""
    runs = []
    for packed in ("false", "true"):
        cli = main(["--config", BATCHED, "--data.path", str(names_file),
                    "--data.pack", packed, "--trainer.max_steps", "30", "--trainer.logger", "false",
                    "--trainer.callbacks", "null", "--trainer.enable_checkpointing", "false",
                    "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
                    "--trainer.default_root_dir", str(tmp_path / packed)], run=False)
        record = RecordLosses()
        cli.trainer.callbacks.append(record)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        runs.append((record.losses, cli.model.state_dict()))
    (losses_a, weights_a), (losses_b, weights_b) = runs
    assert len(losses_a) == 30 and losses_a[-1] < losses_a[0] - 0.5
    assert losses_b == pytest.approx(losses_a, abs=1e-5)
    for name in weights_a:
        torch.testing.assert_close(weights_b[name], weights_a[name], rtol=0, atol=1e-4)  # Adam magnifies rounding
