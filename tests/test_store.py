"""The token store: it reads a file exactly as the in-memory path did, gives the same batches, and is
built once, reused while the file is unchanged and rebuilt when it changes or is damaged."""

import json
import random
import struct
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from conftest import same_batch
from helpers.names_reference import padded_batch, split_names, train_batches

from microgpt.callbacks import novelty
from microgpt.commands.cli import main
from microgpt.data import store as store_module
from microgpt.data.batches import EvalBatches, TrainBatches
from microgpt.data.datamodule import NamesDataModule
from microgpt.data.split import NamesSplit
from microgpt.data.store import TokenStore, names_among, read_chunks, scan, seeded_order
from microgpt.errors import UserError

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "names-batched.yaml")


def write_names(path: Path, count: int, seed: int = 0, alphabet: str = "abcdefghijklmnopqrstuvwxyzéü山🙂 -") -> list[str]:
    """A file of ``count`` random names (some longer than a context of 8, some repeated), one per line."""
    rng = random.Random(seed)
    names = ["".join(rng.choices(alphabet[:-2], k=1)) + "".join(rng.choices(alphabet, k=rng.randint(0, 12)))
             for _ in range(count)]
    names[5:9] = names[:4]  # duplicates are kept
    path.write_text("\n".join(names) + "\n", encoding="utf-8")
    return [name.strip() for name in names]


@pytest.fixture(autouse=True)
def rows_from_the_store(monkeypatch):
    """These tests cut every batch from the mapped store, as for a file too large to hold as padded rows."""
    monkeypatch.setattr(NamesSplit, "ROWS_IN_MEMORY", 0)


def seeded(names: list[str], seed: int) -> list[str]:
    """The names in the order of the seed's shuffle."""
    names = list(names)
    random.Random(seed).shuffle(names)
    return names


@pytest.mark.parametrize("content", [
    "\ufeffJosé\r\n  Zoë\t\r\n\r\n山田\rAna🙂\nJosé\u2028x y\x85z\n\n",
    "a\nb\n" * 40 + "no final line break",
    "\n\n  \n",
])
def test_streaming_reader_reads_the_stripped_lines_of_the_whole_text(tmp_path, content):
    path = tmp_path / "n.txt"
    path.write_bytes(content.encode("utf-8"))
    expected = [line.strip() for line in content.removeprefix("\ufeff").splitlines() if line.strip()]
    for chunk_bytes in (1, 3, 7, 64, 1 << 20):  # chunks cut inside \r\n pairs and inside multi-byte characters
        assert [name for chunk, _ in read_chunks(path, chunk_bytes) for name in chunk] == expected


def test_invalid_utf8_is_reported_with_its_line_whatever_the_chunks(tmp_path):
    path = tmp_path / "n.txt"
    path.write_bytes(b"anna\nbob\r\ncarla\n\nz\xf6e\n")
    for chunk_bytes in (2, 5, 1 << 20):
        with pytest.raises(UserError) as streamed:
            list(read_chunks(path, chunk_bytes))
        assert str(streamed.value) == f"{path}: line 5 is not valid UTF-8."


def test_store_holds_the_names_tokens_offsets_and_vocabulary(tmp_path):
    names = write_names(tmp_path / "n.txt", 200)
    chars, count = scan(tmp_path / "n.txt")
    assert chars == "".join(sorted(set("".join(names)))) and count == 200
    store = store_module.ensure_store(tmp_path / "n.txt", tmp_path / "n.tokens")
    assert store.tokens.dtype == np.uint8 and store.chars == chars and len(store) == 200
    ids = {c: i for i, c in enumerate(chars)}
    assert store.tokens.tolist() == [ids[c] for c in "".join(names)]
    assert np.diff(store.offsets).tolist() == [len(n) for n in names]
    assert store.decode(np.array([3, 0, 199])) == [names[3], names[0], names[199]]


def test_a_large_vocabulary_takes_two_bytes_per_token(tmp_path):
    alphabet = "".join(chr(0x4E00 + i) for i in range(300))
    names = write_names(tmp_path / "n.txt", 400, alphabet=alphabet)
    dm = NamesDataModule(path=str(tmp_path / "n.txt"), block_size=6, batch_size=4, val_size=10)
    dm.setup("fit")
    assert dm.split.store.tokens.dtype == np.uint16 and len(dm.vocab) > 256
    got = [batch for epoch in range(2) for batch in TrainBatches(dm.train_rows, 4, lambda e=epoch: e)]
    expected = train_batches(seeded(names, 42)[:-10], dm.tokenizer, 6, 4, range(2 * 98))
    for a, b in zip(got, expected, strict=True):
        assert same_batch(a, b)


@pytest.mark.parametrize("in_memory", [False, True])
@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_batches_are_the_names_of_the_seeded_order_cut_into_rows(tmp_path, monkeypatch, in_memory, shuffle, packed):
    """Every rank's slice of three epochs' batches, a stream restored mid-epoch, and the validation batches,
    from rows cut from the store or held in memory, equal the rows built from the names' characters."""
    if in_memory:
        monkeypatch.setattr(NamesSplit, "ROWS_IN_MEMORY", 1 << 23)
    names = write_names(tmp_path / "n.txt", 150)
    dm = NamesDataModule(path=str(tmp_path / "n.txt"), block_size=8, batch_size=6, val_size=12, test_size=5,
                         seed=3, shuffle=shuffle, pack=packed)
    dm.setup("fit")
    assert (dm.train_rows.in_memory is not None) == in_memory
    order = seeded(names, 3)
    train, val = order[:-17], order[-17:-5]
    assert split_names(dm)["train"] == train and split_names(dm)["val"] == val
    kw = {"shuffle": shuffle, "seed": 3, "packed": packed}
    for rank, world_size in ((0, 1), (0, 2), (1, 2)):
        batches = TrainBatches(dm.train_rows, 6, rank=rank, world_size=world_size, **kw)
        assert len(batches) == 23  # ceil(133 / 6)
        got = []
        for epoch in range(3):
            batches.current_epoch = lambda e=epoch: e
            got += list(batches)
        resumed = TrainBatches(dm.train_rows, 6, lambda: 1, rank=rank, world_size=world_size, **kw)
        resumed.load_state_dict({"epoch": 1, "batches_done": 14})
        got += list(resumed)
        expected = train_batches(train, dm.tokenizer, 8, 6, [*range(69), *range(37, 46)], rank=rank,
                                 world_size=world_size, **kw)
        assert len(got) == len(expected)
        for a, b in zip(got, expected):
            assert (a.positions is not None) == packed and same_batch(a, b)
        mine = val[rank::world_size]
        for i, a in enumerate(EvalBatches(dm.val_rows, 5, rank, world_size)):
            assert same_batch(a, padded_batch(mine[5 * i : 5 * i + 5], dm.tokenizer, 8))
        assert i == (len(mine) - 1) // 5


class RecordBatches(L.Callback):
    def __init__(self):
        self.batches = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append([t.clone() if isinstance(t, torch.Tensor) else t for t in batch])


def test_fit_and_resumed_fit_train_on_the_in_memory_batches(tmp_path):
    """Through Lightning, packed and shuffled, and resumed mid-epoch (padded resumes are compared run against
    run in test_resume.py)."""
    packed = "true"
    names = write_names(tmp_path / "n.txt", 90, seed=1)
    args = ["--config", CONFIG, "--data.path", str(tmp_path / "n.txt"), "--data.val_size", "10",
            "--data.test_size", "0", "--data.shuffle", "true", "--data.pack", packed, "--model.block_size", "8",
            "--trainer.logger", "false", "--trainer.callbacks", json.dumps([{  # keeps epoch=1-step=4.ckpt
                "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {"every_n_train_steps": 4, "save_top_k": -1}}]),
            "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false"]
    runs = []
    for root in ("whole", "resumed"):
        ckpt = None
        if root == "resumed":
            (ckpt,) = (tmp_path / "whole" / "checkpoints").glob("epoch=1-step=4.ckpt")  # 3 steps an epoch
        cli = main([*args, "--trainer.default_root_dir", str(tmp_path / root), "--trainer.max_steps", "7"], run=False)
        record = RecordBatches()
        cli.trainer.callbacks.append(record)
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")  # whatever filters are installed
            cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt)
        runs.append(record.batches)
    # the batches' place in the stream is restored from the checkpoint, so Lightning has no doubt to voice
    assert not [w for w in warned if "ended before the epoch ended" in str(w.message)]
    whole, resumed = runs
    expected = train_batches(seeded(names, 42)[:-10], cli.datamodule.tokenizer, 8, 32, range(7), shuffle=True,
                             seed=42, packed=packed == "true")
    assert len(whole) == 7 and len(resumed) == 3
    for got, want in zip(whole + resumed, expected + expected[4:], strict=True):
        assert same_batch(got, want)


def building(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if "token store" in line]


def test_store_is_reused_while_the_file_is_unchanged_and_rebuilt_when_it_changes(tmp_path, capsys):
    path = tmp_path / "n.txt"
    path.write_text("anna\nbob\ncarla\n")
    first = NamesDataModule(path=str(path), val_size=1, cache_dir=str(tmp_path / "cache"))
    first.prepare_data()
    assert building(capsys) == [f"microgpt: building the token store of {path} in {tmp_path / 'cache'}"]
    built = first.split.store_path.stat().st_mtime_ns

    again = NamesDataModule(path=str(path), val_size=1, cache_dir=str(tmp_path / "cache"))
    again.prepare_data()
    again.setup("fit")
    assert building(capsys) == [] and again.split.store_path == first.split.store_path
    assert again.split.store_path.stat().st_mtime_ns == built and sorted(split_names(again)["all"]) == ["anna", "bob", "carla"]

    path.write_text("anna\nbob\ncarla\ndörte\n")
    changed = NamesDataModule(path=str(path), val_size=1, cache_dir=str(tmp_path / "cache"))
    changed.prepare_data()
    assert len(building(capsys)) == 1 and changed.split.store_path != first.split.store_path
    assert sorted(split_names(changed)["all"]) == ["anna", "bob", "carla", "dörte"] and "ö" in changed.vocab


@pytest.mark.parametrize("damage", ["truncate", "old format", "zeroed", "random"])
def test_a_damaged_store_is_rebuilt_with_one_line(tmp_path, capsys, damage):
    path = tmp_path / "n.txt"
    names = write_names(path, 200)
    dm = NamesDataModule(path=str(path), val_size=5, cache_dir=str(tmp_path / "cache"))
    dm.prepare_data()
    good = dm.split.store_path.read_bytes()
    if damage == "truncate":
        dm.split.store_path.write_bytes(good[:-9])
    elif damage == "old format":
        dm.split.store_path.write_bytes(good[:8] + struct.pack("<I", 0) + good[12:])
    else:  # 500 bytes of the tokens and offsets overwritten, the size unchanged
        new = bytes(500) if damage == "zeroed" else random.Random(0).randbytes(500)
        dm.split.store_path.write_bytes(good[:1000] + new + good[1500:])
        assert len(dm.split.store_path.read_bytes()) == len(good)
    capsys.readouterr()
    again = NamesDataModule(path=str(path), val_size=5, cache_dir=str(tmp_path / "cache"))
    again.setup("fit")
    (line,) = building(capsys)
    assert line.startswith(f"microgpt: token store {dm.split.store_path} is unusable (") and line.endswith("); rebuilding it.")
    assert dm.split.store_path.read_bytes() == good and split_names(again)["train"] == seeded(names, 42)[:-5]


@pytest.mark.parametrize("damage", ["truncate", "zeroed"])
def test_a_damaged_order_file_is_computed_again_with_one_line(tmp_path, capsys, damage):
    order = seeded_order(1000, 5, tmp_path)
    assert order.tolist() == seeded(list(range(1000)), 5)
    (path,) = tmp_path.glob("order-1000-seed5.*")
    good = path.read_bytes()
    path.write_bytes(good[:-100] if damage == "truncate" else good[:32] + bytes(len(good) - 32))  # header kept
    capsys.readouterr()
    assert seeded_order(1000, 5, tmp_path).tolist() == order.tolist()
    (line,) = capsys.readouterr().err.strip().splitlines()
    reason = "truncated" if damage == "truncate" else "its bytes do not match their checksum"
    assert line == f"microgpt: the names' order {path} is unusable ({reason}); computing it again."
    assert path.read_bytes() == good


def test_a_zeroed_order_cache_never_trains_on_name_zero(tmp_path, capsys):
    """The order overwritten with zeros of the right shape: every name would be name 0 (losses of 0.0000)."""
    path = tmp_path / "n.txt"
    names = write_names(path, 100)
    first = NamesDataModule(path=str(path), val_size=5, cache_dir=str(tmp_path / "cache"))
    first.setup("fit")
    (order_file,) = (tmp_path / "cache").glob("order-*")
    good = order_file.read_bytes()
    order_file.write_bytes(good[:32] + bytes(len(good) - 32))
    capsys.readouterr()
    again = NamesDataModule(path=str(path), val_size=5, cache_dir=str(tmp_path / "cache"))
    again.setup("fit")
    assert "computing it again" in capsys.readouterr().err
    assert split_names(again)["train"] == seeded(names, 42)[:-5]


def test_a_copy_under_another_name_reuses_the_store(tmp_path, capsys):
    """docs/data-store.md: an unchanged file reuses its store anywhere, under any name."""
    (tmp_path / "a").mkdir()
    original, copy = tmp_path / "names.txt", tmp_path / "a" / "other.txt"
    write_names(original, 30)
    copy.write_bytes(original.read_bytes())
    NamesDataModule(path=str(original), val_size=3, cache_dir=str(tmp_path / "cache")).prepare_data()
    assert len(building(capsys)) == 1
    reused = NamesDataModule(path=str(copy), val_size=3, cache_dir=str(tmp_path / "cache"))
    reused.prepare_data()
    assert building(capsys) == [] and len(list((tmp_path / "cache").glob("*.tokens"))) == 1


def test_an_unwritable_cache_is_one_line_naming_the_flag_and_variable(tiny_names, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", CONFIG, "--data.path", str(tiny_names), "--data.val_size", "2", "--data.test_size", "0",
              "--data.cache_dir", str(blocker / "cache"), "--trainer.max_steps", "1", "--trainer.logger", "false",
              "--trainer.default_root_dir", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"microgpt: error: cannot write the token store {blocker / 'cache'}/")
    assert err.endswith("point --data.cache_dir or the MICROGPT_CACHE environment variable at a writable directory.")


def test_the_cache_follows_the_environment_variable(tiny_names, tmp_path, monkeypatch):
    monkeypatch.setenv("MICROGPT_CACHE", str(tmp_path / "elsewhere"))
    dm = NamesDataModule(path=str(tiny_names), val_size=2)
    dm.prepare_data()
    assert dm.split.store_path.parent == tmp_path / "elsewhere" and dm.split.store_path.exists()
    assert NamesDataModule(path=str(tiny_names), cache_dir=str(tmp_path / "flag")).split.store_path.parent == tmp_path / "flag"


def test_novelty_from_the_store_equals_novelty_from_sets_of_names(tmp_path):
    names = write_names(tmp_path / "n.txt", 300, seed=4)
    dm = NamesDataModule(path=str(tmp_path / "n.txt"), val_size=30, test_size=20)
    order = seeded(names, 42)
    rng = random.Random(0)
    samples = rng.sample(order, 40) + ["", "zzzzzzzzzzz", "Ω", order[0] + "x", order[-1][:-1]]
    train, held_out = dm.known_names(samples)
    assert train == set(order[:-50]) & set(samples) and held_out == set(order[-50:]) & set(samples)
    assert novelty(samples, train, held_out) == novelty(samples, set(order[:-50]), set(order[-50:]))


def test_hash_collisions_are_checked_against_the_tokens(tmp_path, monkeypatch):
    """With every name hashing alike, only the tokens tell names apart, and the answers stay right."""
    names = write_names(tmp_path / "n.txt", 60, seed=2)
    store = TokenStore(store_module.ensure_store(tmp_path / "n.txt", tmp_path / "n.tokens").path)
    monkeypatch.setattr(store_module, "line_hashes", lambda ids, lengths: np.zeros(len(lengths), dtype=np.uint64))
    store.hashes = np.zeros(len(store), dtype=np.uint64)
    lines = np.arange(0, 60, 2)
    wanted = [names[1], names[2], names[10], "nope"]
    assert names_among(store, lines, wanted) == {n for n in wanted if n in {names[i] for i in lines}}
