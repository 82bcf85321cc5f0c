"""The names data: reading, vocabulary, tokenization, split, training order and download."""

import hashlib
import random

import pytest

from microgpt.data import IGNORE_INDEX, NamesDataModule, download_names, encode_names, read_names
from microgpt.errors import UserError
from microgpt.tokenizer import CharTokenizer


def test_read_names_strips_and_drops_blank_lines(tmp_path):
    path = tmp_path / "n.txt"
    path.write_bytes(b"  anna \r\n\r\nbob\n\t\ncarla")
    assert read_names(path) == ["anna", "bob", "carla"]


def test_vocabulary_is_sorted_characters_plus_bos():
    tok = CharTokenizer.from_names(["cab", "bad"])
    assert tok.chars == "abcd"
    assert tok.bos == 4 and tok.vocab_size == 5
    assert tok.encode("dab") == [3, 0, 1]
    assert tok.decode([3, 0, 4, 1]) == "dab"


def test_names_become_bos_chars_bos_cut_to_block_size_plus_one():
    tok = CharTokenizer("abcdefgh")
    enc = encode_names(["ab", "abcdefgh"], tok, block_size=4)
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
    assert dm.val_names == expected[-10:]
    assert dm.train_names == expected[:-10]

    batches = list(dm.train_dataloader())
    assert len(batches) == 14  # ceil(40 / 3)
    seen = []
    for inputs, targets in batches:
        for row_in, row_t in zip(inputs, targets):
            seen.append(dm.tokenizer.decode(row_in[1:].tolist() + [row_t[row_t != IGNORE_INDEX][-1].item()]))
    # batch k holds names k*B .. k*B+B-1 of the training order, wrapping around at the end
    assert seen == [expected[:-10][i % 40] for i in range(42)]


def test_batches_are_trimmed_and_right_padded(tiny_names):
    dm = NamesDataModule(path=str(tiny_names), batch_size=4, val_size=4)
    dm.setup("fit")
    inputs, targets = next(iter(dm.train_dataloader()))
    names = dm.train_names[:4]
    assert inputs.shape[1] == max(len(n) + 1 for n in names)
    for name, row in zip(names, targets):
        assert (row != IGNORE_INDEX).sum().item() == len(name) + 1


def test_download_verifies_sha256_and_writes_atomically(tmp_path):
    source = tmp_path / "remote.txt"
    source.write_text("anna\nbob\n")
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    dest = tmp_path / "data" / "names.txt"
    download_names(dest, url=source.as_uri(), sha256=digest)
    assert dest.read_text() == "anna\nbob\n"

    other = tmp_path / "other" / "names.txt"
    with pytest.raises(UserError, match="sha256"):
        download_names(other, url=source.as_uri(), sha256="0" * 64)
    assert not other.exists()
    assert not other.parent.exists() or not any(other.parent.iterdir())


def test_download_without_network_says_what_to_do(tmp_path):
    with pytest.raises(UserError, match=r"--data.path FILE"):
        download_names(tmp_path / "names.txt", url=(tmp_path / "missing.txt").as_uri())


def test_real_file_split(names_file):
    dm = NamesDataModule(path=str(names_file))
    assert len(dm.names) == 32033  # 32,032 newlines; the last name has none
    assert len(dm.val_names) == 1000 and len(dm.train_names) == 31033
    assert dm.vocab == "abcdefghijklmnopqrstuvwxyz"
