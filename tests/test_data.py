"""The names data: reading, vocabulary, tokenization, split, training order and the bundled file."""

import hashlib
import random
import subprocess
import sys
import zipfile

import pytest
import torch
from conftest import ROOT
from helpers.names_reference import rows_of, split_names, train_batches
from lightning.pytorch.callbacks import Callback

from microgpt.data.datamodule import NamesDataModule
from microgpt.data.rows import IGNORE_INDEX
from microgpt.model.tokenizer import CharTokenizer


def test_names_file_lines_are_stripped_and_blank_ones_dropped(tmp_path):
    path = tmp_path / "n.txt"
    path.write_bytes(b"  anna \r\n\r\nbob\n\t\ncarla")
    dm = NamesDataModule(path=str(path), val_size=1, cache_dir=str(tmp_path / "cache"))
    assert sorted(split_names(dm)["all"]) == ["anna", "bob", "carla"]
    assert dm.vocab == "abclnor"  # the file's characters, sorted


def test_vocabulary_is_the_characters_plus_bos():
    tok = CharTokenizer("abcd")
    assert tok.bos == 4 and tok.vocab_size == 5
    assert tok.encode("dab") == [3, 0, 1]
    assert tok.decode([3, 0, 4, 1]) == "dab"


def test_names_become_bos_chars_bos_cut_to_block_size_plus_one(tmp_path):
    tok = CharTokenizer("abcdefgh")
    enc = rows_of(["ab", "abcdefgh"], tok, 4, tmp_path).cut(torch.tensor([0, 1]))
    B = tok.bos
    assert enc["lengths"].tolist() == [3, 4]
    assert enc["inputs"].tolist() == [[B, 0, 1, B], [B, 0, 1, 2]]
    assert enc["targets"].tolist() == [[0, 1, B, IGNORE_INDEX], [0, 1, 2, 3]]


def test_split_and_training_order_follow_the_seed_shuffle(tmp_path):
    names = [f"n{chr(97 + i % 26)}{i}" for i in range(50)]
    path = tmp_path / "n.txt"
    path.write_text("\n".join(names))
    dm = NamesDataModule(path=str(path), batch_size=3, val_size=10, seed=7)
    dm.setup("fit")
    expected = list(names)
    random.seed(7)
    random.shuffle(expected)
    assert split_names(dm)["val"] == expected[-10:]
    assert split_names(dm)["train"] == expected[:-10]

    batches = list(dm.train_dataloader())
    assert len(batches) == 14  # ceil(40 / 3)
    seen = []
    for inputs, targets, *_ in batches:
        for row_in, row_t in zip(inputs, targets):
            seen.append(dm.tokenizer.decode(row_in[1:].tolist() + [row_t[row_t != IGNORE_INDEX][-1].item()]))
    # batch k holds names k*B .. k*B+B-1 of the training order, wrapping around at the end
    assert seen == [expected[:-10][i % 40] for i in range(42)]


def test_batches_are_trimmed_and_right_padded(tiny_names):
    dm = NamesDataModule(path=str(tiny_names), batch_size=4, val_size=4)
    dm.setup("fit")
    inputs, targets, *_ = next(iter(dm.train_dataloader()))
    names = split_names(dm)["train"][:4]
    assert inputs.shape[1] == max(len(n) + 1 for n in names)
    for name, row in zip(names, targets):
        assert (row != IGNORE_INDEX).sum().item() == len(name) + 1


def test_bundled_names_are_makemores_file(names_file):
    assert hashlib.sha256(names_file.read_bytes()).hexdigest() == (
        "0a30b5557f192f32ab962680889aac5f6fda0f4cecf40a6d0b5694f58ea8cc4d")


def test_default_path_is_the_bundled_file_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    dm = NamesDataModule()
    assert len(split_names(dm)["all"]) == 32033 and not any(tmp_path.iterdir())


def test_wheel_ships_the_names_and_their_notice(tmp_path):
    """A regular (non-editable) install must find the names too: they are package data in the wheel."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("microgpt_names-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        assert {"microgpt/data/names.txt", "microgpt/data/NOTICE"} <= set(archive.namelist())
        assert hashlib.sha256(archive.read("microgpt/data/names.txt")).hexdigest().startswith("0a30b555")


def test_real_file_split(names_file):
    dm = NamesDataModule(path=str(names_file))
    names = split_names(dm)
    assert len(names["all"]) == 32033  # 32,032 newlines; the last name has none
    assert len(names["val"]) == 1000 and len(names["train"]) == 31033
    assert dm.vocab == "abcdefghijklmnopqrstuvwxyz"


class RecordBatches(Callback):
    """The training batches each epoch gives, as Lightning hands them to the model."""

    def __init__(self):
        self.epochs: dict[int, list] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.epochs.setdefault(trainer.current_epoch, []).append(batch)


@pytest.mark.parametrize("shuffle", ["false", "true"])
def test_overfit_batches_repeats_the_same_batches_every_epoch(tiny_names, tmp_path, shuffle):
    """``--trainer.overfit_batches 2``, as a Lightning user passes it: every epoch trains on the first two
    batches of the stream, the same names each time (20 names, 3 a batch: 7 batches in a whole epoch)."""
    from microgpt.commands.cli import main

    cli = main(["--config", str(ROOT / "configs" / "names.yaml"), "--data.path", str(tiny_names),
                "--data.val_size", "2", "--data.batch_size", "3", "--data.shuffle", shuffle,
                "--trainer.overfit_batches", "2", "--trainer.max_epochs", "4", "--trainer.max_steps", "-1",
                "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
                "--trainer.default_root_dir", str(tmp_path)], run=False)
    record = RecordBatches()
    cli.trainer.callbacks.append(record)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    names = split_names(cli.datamodule)["train"]
    tokenizer = cli.datamodule.tokenizer
    expected = train_batches(names, tokenizer, cli.datamodule.block_size, 3, range(2), shuffle=shuffle == "true",
                             seed=cli.datamodule.seed)
    assert sorted(record.epochs) == [0, 1, 2, 3]
    for batches in record.epochs.values():
        assert len(batches) == 2
        for got, want in zip(batches, expected):
            assert torch.equal(got.inputs, want.inputs) and torch.equal(got.targets, want.targets)
