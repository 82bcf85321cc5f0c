"""The names data: reading a file of names, cutting token rows, and the LightningDataModule.

A name becomes ``[BOS] + characters + [BOS]`` cut to ``block_size + 1`` tokens; the model reads
the first ``n`` of them and predicts the last ``n``. The file is encoded once into a memory-mapped
token store (``microgpt.store``); batches are cut from it by index, one name per row, right-padded to
the batch's longest name, or with ``pack`` several names per row of ``block_size`` tokens.
``encode_names`` does the same for a list of names held in memory.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterator
from functools import cached_property
from importlib.resources import files
from pathlib import Path
from typing import NamedTuple

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import IterableDataset

from microgpt.errors import UserError
from microgpt.store import (
    TokenStore,
    among,
    default_cache_dir,
    ensure_store,
    open_store,
    scan,
    seeded_order,
    store_path,
)
from microgpt.tokenizer import CharTokenizer

# makemore's names.txt (32,033 names, MIT licence; see NOTICE), shipped inside the package
BUNDLED_NAMES = Path(str(files("microgpt") / "names.txt"))
IGNORE_INDEX = -100  # target value of padded positions; F.cross_entropy skips it


class Batch(NamedTuple):
    """Rows of token ids and the ids they predict. ``positions`` is set for packed rows (several names per
    row, each restarting at position 0). A training batch also carries, as host integers, the number of
    target tokens of its whole global batch (``tokens``) and of every micro-batch of its optimizer step
    (``step_tokens``), over all processes: the loss's denominator is known without waiting for any device."""

    inputs: torch.Tensor
    targets: torch.Tensor
    positions: torch.Tensor | None = None
    tokens: int = 0
    step_tokens: int = 0

# The training order is a function of the global step, so resuming mid-epoch is exact without loader state.
warnings.filterwarnings("ignore", message=r".*resuming from a checkpoint that ended before the epoch ended")


def read_names(path: str | os.PathLike) -> list[str]:
    """The names in a UTF-8 text file, one per line, surrounding whitespace stripped, blank lines dropped.

    Any line ending works (``\\n``, ``\\r\\n``, ``\\r``); duplicates are kept, since how often a name
    occurs is part of the data; characters are kept exactly as written (no Unicode normalization).
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file.")
    if path.is_dir():
        raise UserError(f"{path}: is a directory, not a file of names.")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark, as some Windows editors write, is not part of a name
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise UserError(f"{path}: line {line} is not valid UTF-8.") from None
    names = [stripped for line in text.splitlines() if (stripped := line.strip())]
    if not names:
        raise UserError(f"{path}: contains no names (the file is empty or only blank lines).")
    return names


def encode_names(names: list[str], tokenizer: CharTokenizer, block_size: int) -> dict[str, torch.Tensor]:
    """Tokenize ``names`` into padded tensors.

    Returns ``inputs`` and ``targets`` of shape ``(N, block_size)`` (inputs padded with BOS, targets
    with ``IGNORE_INDEX``) and ``lengths`` (N,), the number of predicted positions of each name.
    """
    # code points -> vocabulary ids (the vocabulary is sorted by code point) -> rows
    name_lengths = torch.tensor([len(name) for name in names], dtype=torch.long)
    text = "".join(names).encode("utf-32-le")
    chars = torch.frombuffer(bytearray(text), dtype=torch.int32).long() if text else torch.zeros(0, dtype=torch.long)
    vocab = torch.tensor([ord(c) for c in tokenizer.chars], dtype=torch.long)
    ids = torch.searchsorted(vocab, chars)
    unknown = (ids >= len(vocab)) | (vocab[ids.clamp(max=max(len(vocab) - 1, 0))] != chars)
    if unknown.any():
        tokenizer.encode("".join(chr(c) for c in chars[unknown].tolist()))  # raises, naming them
    cols = torch.arange(len(chars)) - torch.repeat_interleave(torch.cumsum(name_lengths, 0) - name_lengths,
                                                              name_lengths)
    return pad_rows(ids[cols < block_size], name_lengths, tokenizer.bos, block_size)


def pad_rows(ids: torch.Tensor, name_lengths: torch.Tensor, bos: int, block_size: int) -> dict[str, torch.Tensor]:
    """``encode_names``'s tensors from the ids of the names' first ``block_size`` characters, end to
    end, and the names' full lengths: row i is [BOS, characters, BOS] cut to block_size + 1 tokens."""
    kept = name_lengths.clamp(max=block_size)
    rows = torch.repeat_interleave(torch.arange(len(name_lengths)), kept)
    cols = torch.arange(len(ids)) - torch.repeat_interleave(torch.cumsum(kept, 0) - kept, kept)
    tokens = torch.full((len(name_lengths), block_size + 1), IGNORE_INDEX, dtype=torch.long)
    tokens[:, 0] = bos
    tokens[rows, cols + 1] = ids
    ends = name_lengths < block_size  # the closing BOS fits
    tokens[ends.nonzero().squeeze(1), name_lengths[ends] + 1] = bos
    lengths = torch.clamp(name_lengths + 2, max=block_size + 1)
    inputs = tokens[:, :-1].clone()
    inputs[inputs == IGNORE_INDEX] = bos
    return {"inputs": inputs, "targets": tokens[:, 1:].clone(), "lengths": lengths - 1}


class StoredNames:
    """Some names of a token store (``lines``, in this order), cut into rows for a model's vocabulary:
    ``rows(idx)`` is what ``encode_names`` gives for names ``idx`` of the selection."""

    def __init__(self, store: TokenStore, lines: np.ndarray, tokenizer: CharTokenizer, block_size: int):
        self.store, self.lines, self.block_size, self.bos = store, lines, block_size, tokenizer.bos
        known = {c: i for i, c in enumerate(tokenizer.chars)}
        self.ids = np.array([known.get(c, -1) for c in store.chars], dtype=np.int64)  # store id -> model id

    def __len__(self) -> int:
        return len(self.lines)

    def unknown(self) -> list[str]:
        """The characters of these names outside the model's vocabulary, in order of first appearance."""
        if (self.ids >= 0).all():
            return []
        found: dict[str, None] = {}
        for start in range(0, len(self.lines), 1 << 20):
            tokens = self.store.gather(np.asarray(self.lines[start : start + (1 << 20)]))[0]
            bad = tokens[self.ids[tokens] < 0]
            _, first = np.unique(bad, return_index=True)
            for i in sorted(first.tolist()):
                found.setdefault(self.store.chars[bad[i]])
        return list(found)

    def target_counts(self, idx: torch.Tensor) -> torch.Tensor:
        """How many targets each of the names at ``idx`` has once cut to the context (``rows(idx)["lengths"]``)."""
        lengths = self.store.lengths(np.asarray(self.lines[idx.numpy()]))
        return torch.from_numpy(np.minimum(lengths + 1, self.block_size))

    def rows(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        ids, lengths = self.store.gather(np.asarray(self.lines[idx.numpy()]), limit=self.block_size)
        return pad_rows(torch.from_numpy(self.ids[ids]), torch.from_numpy(lengths), self.bos, self.block_size)


Encoded = dict[str, torch.Tensor] | StoredNames  # names cut into rows, held in memory or read from a store


def count(encoded: Encoded) -> int:
    """How many names ``encoded`` holds."""
    return len(encoded["lengths"]) if isinstance(encoded, dict) else len(encoded)


def target_counts(encoded: Encoded, idx: torch.Tensor) -> torch.Tensor:
    """How many target tokens each of the names at ``idx`` has, without cutting their rows."""
    return encoded["lengths"][idx] if isinstance(encoded, dict) else encoded.target_counts(idx)


def cut_rows(encoded: Encoded, idx: torch.Tensor) -> dict[str, torch.Tensor]:
    """The ``inputs``, ``targets`` and ``lengths`` of the names at ``idx``, ``block_size`` wide."""
    return {k: v[idx] for k, v in encoded.items()} if isinstance(encoded, dict) else encoded.rows(idx)


def take(encoded: Encoded, idx: torch.Tensor, trim: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The (inputs, targets) batch of the names at ``idx``, trimmed to the batch's longest name (or, without
    ``trim``, ``block_size`` wide)."""
    batch = cut_rows(encoded, idx)
    if not trim:
        return batch["inputs"], batch["targets"]
    T = int(batch["lengths"].max())
    return batch["inputs"][:, :T], batch["targets"][:, :T]


def first_fit(lengths: list[int], capacity: int) -> list[tuple[int, int]]:
    """(row, offset) of each item when items are placed, longest first, into the first row with room."""
    free: list[int] = []
    place = [(0, 0)] * len(lengths)
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, room in enumerate(free) if room >= lengths[i]), len(free))
        if row == len(free):
            free.append(capacity)
        place[i] = (row, capacity - free[row])
        free[row] -= lengths[i]
    return place


def pack(encoded: Encoded, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (inputs, targets, positions) batch of the names at ``idx`` laid end to end in rows of
    ``block_size`` tokens. ``positions`` restarts at 0 with every name, which is how the model tells the
    names of a row apart; slots left over at the end of a row hold token 0 at position 0 and no target."""
    batch = cut_rows(encoded, idx)
    lengths = batch["lengths"]
    width = batch["inputs"].size(1)
    place = torch.tensor(first_fit(lengths.tolist(), width), dtype=torch.long)
    rows, offsets = place.unbind(1)
    num_rows = int(rows.max()) + 1
    first = torch.cumsum(lengths, 0) - lengths  # where each name starts in the flat list of tokens
    within = torch.arange(int(lengths.sum())) - torch.repeat_interleave(first, lengths)
    slots = torch.repeat_interleave(rows * width + offsets, lengths) + within
    real = torch.arange(width) < lengths[:, None]  # (N, width): the name's own tokens, in order
    inputs = torch.zeros(num_rows * width, dtype=torch.long)
    targets = torch.full((num_rows * width,), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros(num_rows * width, dtype=torch.long)
    inputs[slots] = batch["inputs"][real]
    targets[slots] = batch["targets"][real]
    positions[slots] = within
    return inputs.view(num_rows, width), targets.view(num_rows, width), positions.view(num_rows, width)


def packed_rows(encoded: Encoded, idx: torch.Tensor) -> int:
    """How many rows ``pack`` lays the names at ``idx`` in."""
    lengths = target_counts(encoded, idx).tolist()
    return max(row for row, _ in first_fit(lengths, int(cut_rows(encoded, idx[:1])["inputs"].size(1)))) + 1


def pad_to_rows(batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor], multiple: int):
    """A packed batch with empty rows (token 0 at position 0, no target) added up to a multiple of ``multiple`` rows."""
    missing = -batch[0].size(0) % multiple
    if not missing:
        return batch
    inputs, targets, positions = batch
    width = inputs.size(1)
    return (torch.cat([inputs, inputs.new_zeros(missing, width)]),
            torch.cat([targets, targets.new_full((missing, width), IGNORE_INDEX)]),
            torch.cat([positions, positions.new_zeros(missing, width)]))


class TrainBatches(IterableDataset):
    """An endless stream of names in a fixed order, cut into numbered global batches.

    Global batch ``k`` holds stream positions ``k*B .. k*B+B-1``; position ``p`` is name ``p % N``
    of pass ``p // N`` over the names (every pass in the given order, or reshuffled per pass when
    ``shuffle`` is set). A process of rank ``r`` out of ``W`` gets the ``r``-th of ``W`` equal
    slices of every global batch. Epoch ``e`` is global batches ``e*P .. e*P+P-1`` (``P = len(self)``),
    and an optimizer step takes ``accumulate`` of them, or the epoch's last few, as Lightning steps.
    Each iteration yields the global batches ``window()`` returns, as ``Batch``es of padded rows
    (``take``) or, with ``packed``, of packed rows (``pack``). With ``static``, every batch has one shape,
    so that a compiled step compiles once: padded rows are ``block_size`` wide, and packed batches get empty
    rows up to a multiple of ``rows``.
    """

    def __init__(self, encoded: Encoded, batch_size: int, window: Callable[[], range],
                 shuffle: bool = False, seed: int = 0, rank: int = 0, world_size: int = 1, packed: bool = False,
                 accumulate: int = 1, static: bool = False, rows: int = 1):
        self.encoded = encoded
        self.static, self.rows = static, rows
        self.packed = packed
        self.num_names = count(encoded)
        self.batch_size = batch_size
        self.window = window
        self.shuffle = shuffle
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.accumulate = accumulate
        self.batches_per_epoch = math.ceil(self.num_names / batch_size)
        self._step_tokens = (range(0), 0)  # (the global batches of an optimizer step, their target tokens)

    def __len__(self) -> int:
        """Batches in a whole epoch, also when resuming mid-epoch: Lightning counts the ones already done,
        and ``window()`` then yields only the rest."""
        return self.batches_per_epoch

    def global_names(self, k: int) -> torch.Tensor:
        """The name indices of global batch ``k``, all processes' slices in rank order."""
        p = torch.arange(k * self.batch_size, (k + 1) * self.batch_size)
        idx = p % self.num_names
        if self.shuffle:
            passes = p // self.num_names
            for n in passes.unique().tolist():
                idx[passes == n] = self.permutation(n)[idx[passes == n]]
        return idx

    def permutation(self, n: int) -> torch.Tensor:
        """The order of pass ``n`` over the names when shuffling (the latest one is cached)."""
        if getattr(self, "_cached", (None,))[0] != n:
            generator = torch.Generator().manual_seed(self.seed + n)
            self._cached = (n, torch.randperm(self.num_names, generator=generator))
        return self._cached[1]

    def tokens(self, k: int) -> int:
        """Target tokens in global batch ``k``, over all processes."""
        return int(target_counts(self.encoded, self.global_names(k)).sum())

    def step_batches(self, k: int) -> range:
        """The global batches of the optimizer step that global batch ``k`` belongs to."""
        epoch_start = k // self.batches_per_epoch * self.batches_per_epoch
        first = epoch_start + (k - epoch_start) // self.accumulate * self.accumulate
        return range(first, min(first + self.accumulate, epoch_start + self.batches_per_epoch))

    def step_tokens(self, k: int, tokens: int) -> int:
        """Target tokens in all the micro-batches of global batch ``k``'s optimizer step (``tokens`` are k's own)."""
        if self.accumulate == 1:
            return tokens
        batches, total = self._step_tokens
        if k not in batches:
            batches = self.step_batches(k)
            total = sum(tokens if j == k else self.tokens(j) for j in batches)
            self._step_tokens = (batches, total)
        return total

    def __iter__(self) -> Iterator[Batch]:
        for k in self.window():
            names = self.global_names(k)
            tokens = int(target_counts(self.encoded, names).sum())
            mine = self.own_slice(names)
            if self.packed:
                rows = pack(self.encoded, mine)
                rows = pad_to_rows(rows, self.rows) if self.static else rows
            else:
                rows = (*take(self.encoded, mine, trim=not self.static), None)
            yield Batch(*rows, tokens=tokens, step_tokens=self.step_tokens(k, tokens))

    def own_slice(self, names: torch.Tensor) -> torch.Tensor:
        """This process's slice of a global batch's names."""
        per_rank = self.batch_size // self.world_size
        return names[self.rank * per_rank : (self.rank + 1) * per_rank]

    def most_packed_rows(self, batches: range) -> int:
        """The most rows that this process's slice of any of global ``batches`` is packed in."""
        return max(packed_rows(self.encoded, self.own_slice(self.global_names(k))) for k in batches)


class EvalBatches(IterableDataset):
    """Every name once, in batches; a process of rank ``r`` out of ``W`` scores names ``r, r+W, ...``.
    A process that gets no names yields one empty batch, so that every process takes part in the
    evaluation's end (where the metrics are summed over processes)."""

    def __init__(self, encoded: Encoded, batch_size: int, rank: int = 0, world_size: int = 1):
        self.encoded = encoded
        self.indices = torch.arange(rank, count(encoded), world_size)
        self.batch_size = batch_size

    def __len__(self) -> int:
        return max(1, math.ceil(len(self.indices) / self.batch_size))

    def __iter__(self) -> Iterator[Batch]:
        if not len(self.indices):
            yield Batch(torch.zeros(0, 1, dtype=torch.long), torch.full((0, 1), IGNORE_INDEX, dtype=torch.long))
        for idx in self.indices.split(self.batch_size):
            yield Batch(*take(self.encoded, idx))


class PredictRequests:
    """Sampling requests for ``predict``: this process's share of ``total`` names, in chunks of at most
    ``chunk``, each with a seed of its own drawn from ``seed``, the process's rank and the chunk's number.
    Every process gets at least one request (of 0 names, when there are more processes than names), so that
    all of them reach the end of prediction, where the names are gathered."""

    def __init__(self, total: int, chunk: int, request: dict, seed: int, rank: int = 0, world_size: int = 1):
        share = total // world_size + (rank < total % world_size)
        counts = [min(chunk, share - i) for i in range(0, share, chunk)] or [0]
        self.requests = [{**request, "count": n, "seed": chunk_seed(seed, rank, i)} for i, n in enumerate(counts)]

    def __len__(self) -> int:
        return len(self.requests)

    def __iter__(self) -> Iterator[dict]:
        return iter(self.requests)


def chunk_seed(seed: int, rank: int, chunk: int) -> int:
    """A seed for chunk ``chunk`` of process ``rank``'s names, well apart from every other (seed, rank, chunk)."""
    return int(np.random.SeedSequence([seed % 2**63, rank, chunk]).generate_state(1, np.uint64)[0] >> 1)


class NamesDataModule(L.LightningDataModule):
    """Names, one per line, split into training and held-out validation names.

    Args:
        path: UTF-8 text file with one name per line; unset, makemore's names.txt that ships with microgpt.
        block_size: Context length; set it with --model.block_size, which is linked here.
        batch_size: Names per batch, summed over all devices (an optimizer step takes accumulate_grad_batches batches).
        val_size: Number of names held out for validation: the last ones after the seeded shuffle (before any test names).
        test_size: Number of names held out for testing, the very last ones; 0 tests on the validation names.
        test_path: A separate file of names to test on instead of the held-out split.
        shuffle: Reshuffle the training names at every pass instead of keeping the seed's order.
        pack: Lay training names end to end in rows of block_size tokens, each name attending only to
            itself: the same loss and gradients as one padded row per name, with far fewer padded positions.
        predict_size: How many names the predict command invents.
        predict_prefix: Names invented by predict start with these characters.
        predict_temperature: Softmax temperature of predict's draws, positive.
        predict_top_k: Predict draws only among the k most likely characters; all when unset.
        predict_top_p: Predict draws only among the fewest likeliest characters whose probability reaches
            this, in (0, 1]; all when unset.
        seed: Seed of the one-time shuffle that fixes the split and the training order.
        eval_batch_size: Names per batch when scoring held-out names.
        static_shapes: Give every training batch one shape, so that a compiled training step compiles once:
            padded rows block_size wide, packed batches padded to a fixed number of rows; linked from --model.compile.
        cache_dir: Folder for the token stores that names files are encoded into once; unset, $MICROGPT_CACHE,
            else $XDG_CACHE_HOME/microgpt, else ~/.cache/microgpt.
    """

    ROWS_IN_MEMORY = 1 << 23  # padded positions held as tensors (two int64 tensors of this many: 128 MiB)

    def __init__(
        self,
        path: str | None = None,
        block_size: int = 8,
        batch_size: int = 1,
        val_size: int = 1000,
        test_size: int = 0,
        test_path: str | None = None,
        shuffle: bool = False,
        pack: bool = False,
        predict_size: int = 20,
        predict_prefix: str = "",
        predict_temperature: float = 0.5,
        predict_top_k: int | None = None,
        predict_top_p: float | None = None,
        seed: int = 42,
        eval_batch_size: int = 500,
        static_shapes: bool = False,
        cache_dir: str | None = None,
    ):
        super().__init__()
        for name, value in [("block_size", block_size), ("batch_size", batch_size),
                            ("eval_batch_size", eval_batch_size)]:
            if value < 1:
                raise UserError(f"--data.{name} must be a positive integer, got {value}.")
        for name, value in [("val_size", val_size), ("test_size", test_size)]:
            if value < 0:
                raise UserError(f"--data.{name} must be zero or more, got {value}.")
        self.save_hyperparameters(ignore=["cache_dir"])  # a folder of this machine, not part of the recipe
        self.path = path or str(BUNDLED_NAMES)
        self.block_size = block_size
        self.batch_size = batch_size
        self.val_size = val_size
        self.test_size = test_size
        self.test_path = test_path
        self.shuffle = shuffle
        self.pack = pack
        self.predict_request = {"prefix": predict_prefix, "temperature": predict_temperature, "top_k": predict_top_k,
                                "top_p": predict_top_p}
        self.predict_size = predict_size
        self.seed = seed
        self.eval_batch_size = eval_batch_size
        self.static_shapes = static_shapes
        self.rank, self.world_size = 0, 1  # set by setup
        self.predict_seed: int | None = None  # torch's seed, read by setup
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()

    @cached_property
    def summary(self) -> tuple[str, int]:
        """The file's vocabulary and number of names: from its store when there is one, else from a scan."""
        store, _ = open_store(self.store_path)
        chars, num_names = (store.chars, len(store)) if store is not None else scan(Path(self.path))
        if self.val_size + self.test_size >= num_names:
            raise UserError(
                f"{self.path}: --data.val_size {self.val_size} and --data.test_size {self.test_size} leave no "
                f"training names (the file has {num_names}); pass smaller sizes, or --data.val_size 0 to train "
                "on all of them without validation."
            )
        return chars, num_names

    @cached_property
    def store_path(self) -> Path:
        return store_path(Path(self.path), self.cache_dir)

    @cached_property
    def store(self) -> TokenStore:
        """The file's token store, built first when needed."""
        return ensure_store(Path(self.path), self.store_path, self.summary[0])

    @cached_property
    def order(self) -> np.ndarray:
        """The names' indices after the seeded shuffle: training, then ``val_size`` validation, then
        ``test_size`` test names."""
        return seeded_order(self.summary[1], self.seed, self.cache_dir)

    @cached_property
    def test_store(self) -> TokenStore:
        """The token store of ``test_path``."""
        return ensure_store(Path(self.test_path), store_path(Path(self.test_path), self.cache_dir))

    def prepare_data(self) -> None:
        """Build the token stores and the seeded order that are missing (once per node, by its first process)."""
        _ = self.store, self.order  # the properties build them and keep them
        if self.test_path and (self.trainer is None or self.trainer.testing):
            _ = self.test_store

    @cached_property
    def tokenizer(self) -> CharTokenizer:
        """The character vocabulary of the whole file."""
        return CharTokenizer(self.summary[0])

    @property
    def vocab(self) -> str:
        """The vocabulary's characters in id order (linked to the model)."""
        return self.tokenizer.chars

    @property
    def train_lines(self) -> np.ndarray:
        return self.order[: len(self.order) - self.val_size - self.test_size]

    @property
    def val_lines(self) -> np.ndarray:
        end = len(self.order) - self.test_size
        return self.order[end - self.val_size : end]

    @property
    def test_lines(self) -> np.ndarray:
        return self.order[len(self.order) - self.test_size :] if self.test_size else self.val_lines

    # The names as Python strings, for small files and for inspection; training never builds these lists.
    @property
    def names(self) -> list[str]:
        """All names after the seeded shuffle: training, then validation, then test names."""
        return self.store.decode(self.order)

    @property
    def train_names(self) -> list[str]:
        return self.store.decode(self.train_lines)

    @property
    def val_names(self) -> list[str]:
        return self.store.decode(self.val_lines)

    @property
    def test_names(self) -> list[str]:
        return self.store.decode(self.test_lines)

    def known_names(self, names: list[str]) -> tuple[set[str], set[str]]:
        """Those of ``names`` that are training names, and those that are held-out (validation or test) names."""
        held_out = self.order[len(self.train_lines) :]
        return among(self.store, self.train_lines, names), among(self.store, held_out, names)

    def setup(self, stage: str) -> None:
        trainer = self.trainer
        self.rank, self.world_size = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        # torch's seed as set by --seed_everything, read before a checkpoint's random state is restored
        self.predict_seed = torch.initial_seed()
        if stage == "fit" and self.batch_size % self.world_size:
            raise UserError(
                f"--data.batch_size {self.batch_size} cannot be split evenly over {self.world_size} processes."
            )
        # evaluate with the model's own vocabulary: a checkpoint's may differ from this file's
        model = trainer.lightning_module if trainer else None
        tokenizer = getattr(model, "tokenizer", self.tokenizer)
        if stage == "fit":
            self.warn_about_long_names()
            self.train_encoded = self.select(self.store, self.train_lines, tokenizer, self.path)
        if stage in ("fit", "validate"):
            self.val_encoded = self.select(self.store, self.val_lines, tokenizer, self.path)
        if stage == "test":
            if self.test_path:
                store = self.test_store
                self.test_encoded = self.select(store, np.arange(len(store)), tokenizer, self.test_path)
            else:
                self.test_encoded = self.select(self.store, self.test_lines, tokenizer, self.path)

    def select(self, store: TokenStore, lines: np.ndarray, tokenizer: CharTokenizer, source: str) -> Encoded:
        """The names at ``lines`` of ``store``, refusing characters outside the vocabulary with one sentence
        naming them. A selection of up to ``ROWS_IN_MEMORY`` positions is cut into rows once, here, so that
        a batch only indexes them (a step at batch 1 is a few milliseconds); a larger one is cut per batch."""
        names = StoredNames(store, lines, tokenizer, self.block_size)
        unknown = names.unknown()
        if unknown:
            raise UserError(
                f"{source}: characters outside the model's vocabulary: {''.join(unknown)!r} "
                f"(the model knows {tokenizer.chars!r})."
            )
        if len(lines) * self.block_size <= self.ROWS_IN_MEMORY:
            return names.rows(torch.arange(len(lines)))
        return names

    def warn_about_long_names(self) -> None:
        """One warning when names do not fit the context: they are cut, so the model never sees their end."""
        longest = cut = 0
        for start in range(0, len(self.store), 1 << 20):  # a million names at a time
            lengths = self.store.lengths(slice(start, start + (1 << 20)))
            longest = max(longest, int(lengths.max()))
            cut += int((lengths + 1 > self.block_size).sum())  # a name of n characters needs n + 1 input positions
        if cut:
            rank_zero_warn(
                f"{self.path}: {cut} of {len(self.store)} names are longer than the context and were cut; "
                f"--model.block_size {longest + 1} keeps them whole."
            )

    def epoch_window(self) -> range:
        """The global batches of the current epoch that are still to be trained on. Every epoch takes
        ``ceil(P / N)`` optimizer steps for its ``P`` batches (Lightning steps on an epoch's last batch even
        when fewer than ``N = accumulate_grad_batches`` have accumulated), so the step count says where
        in its epoch the run is."""
        per_epoch = math.ceil(len(self.train_lines) / self.batch_size)
        trainer = self.trainer
        if trainer is None:
            return range(per_epoch)
        accumulate = trainer.accumulate_grad_batches
        epoch = trainer.current_epoch
        steps_done = trainer.global_step - epoch * math.ceil(per_epoch / accumulate)
        done = min(max(steps_done * accumulate, 0), per_epoch)
        return range(epoch * per_epoch + done, (epoch + 1) * per_epoch)

    # The loaders are the batch iterables themselves: Lightning takes any iterable, the batches are made in
    # this process already, and a torch DataLoader around them would cost about 30 us a step for nothing.
    def train_dataloader(self) -> TrainBatches:
        accumulate = self.trainer.accumulate_grad_batches if self.trainer else 1
        batches = TrainBatches(self.train_encoded, self.batch_size, self.epoch_window, shuffle=self.shuffle,
                               seed=self.seed, rank=self.rank, world_size=self.world_size, packed=self.pack,
                               accumulate=accumulate, static=self.static_shapes)
        if self.static_shapes and self.pack:
            # the most rows any batch of the first pass needs (of its first 1000 batches): a rare later batch
            # that needs more is padded to twice as many, and a compiled step compiles once more for it
            batches.rows = batches.most_packed_rows(range(min(len(batches), 1000)))
        return batches

    def val_dataloader(self) -> EvalBatches:
        return EvalBatches(self.val_encoded, self.eval_batch_size, self.rank, self.world_size)

    def predict_dataloader(self) -> PredictRequests:
        """Sampling requests: this process's share of ``predict_size`` names, in chunks of ``eval_batch_size``,
        drawn with seeds that follow from torch's seed (``--seed_everything``), the rank and the chunk."""
        seed = torch.initial_seed() if self.predict_seed is None else self.predict_seed
        return PredictRequests(self.predict_size, self.eval_batch_size, self.predict_request, seed, self.rank,
                               self.world_size)

    def test_dataloader(self) -> EvalBatches:
        return EvalBatches(self.test_encoded, self.eval_batch_size, self.rank, self.world_size)
