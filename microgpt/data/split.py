"""A file of names, its token store, and its seeded split into training, validation and test names."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np
from lightning.pytorch.utilities import rank_zero_warn

from microgpt.data.rows import NameRows
from microgpt.data.store import (
    TokenStore,
    chunks,
    ensure_store,
    names_among,
    open_store,
    scan,
    seeded_order,
    store_path,
)
from microgpt.errors import UserError
from microgpt.model.tokenizer import CharTokenizer


class NamesSplit:
    """The names of ``path`` in the order of a seeded shuffle: training names, then ``val_size`` validation
    names, then ``test_size`` test names (or those of ``test_path``). The token stores and the order are
    built on first use and cached in ``cache_dir``."""

    ROWS_IN_MEMORY = 1 << 23  # padded positions held as tensors (two int64 tensors of this many: 128 MiB)

    def __init__(self, path: str, cache_dir: Path, seed: int, val_size: int, test_size: int,
                 test_path: str | None = None):
        self.path, self.cache_dir, self.seed = path, cache_dir, seed
        self.val_size, self.test_size, self.test_path = val_size, test_size, test_path

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
        """The names' indices after the seeded shuffle: training, then validation, then test names."""
        return seeded_order(self.summary[1], self.seed, self.cache_dir)

    @cached_property
    def test_store(self) -> TokenStore:
        """The token store of ``test_path``."""
        return ensure_store(Path(self.test_path), store_path(Path(self.test_path), self.cache_dir))

    @cached_property
    def tokenizer(self) -> CharTokenizer:
        """The character vocabulary of the whole file."""
        return CharTokenizer(self.summary[0])

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

    def known_names(self, names: list[str]) -> tuple[set[str], set[str]]:
        """Those of ``names`` that are training names, and those that are held-out (validation or test) names."""
        held_out = self.order[len(self.train_lines) :]
        return names_among(self.store, self.train_lines, names), names_among(self.store, held_out, names)

    def rows(self, part: str, tokenizer: CharTokenizer, block_size: int) -> NameRows:
        """The rows of the ``"train"``, ``"val"`` or ``"test"`` names for a model with ``tokenizer``, refusing
        characters outside its vocabulary with one sentence naming them. Up to ``ROWS_IN_MEMORY`` positions
        are cut once, here, so that a batch only indexes them; more are cut per batch."""
        if part == "test" and self.test_path:
            store, lines, source = self.test_store, np.arange(len(self.test_store)), self.test_path
        else:
            lines = {"train": self.train_lines, "val": self.val_lines, "test": self.test_lines}[part]
            store, source = self.store, self.path
        rows = NameRows(store, lines, tokenizer, block_size)
        unknown = rows.unknown()
        if unknown:
            raise UserError(
                f"{source}: characters outside the model's vocabulary: {''.join(unknown)!r} "
                f"(the model knows {tokenizer.chars!r})."
            )
        if len(lines) * block_size <= self.ROWS_IN_MEMORY:
            rows.keep_in_memory()
        return rows

    def warn_about_long_names(self, block_size: int) -> None:
        """One warning when names do not fit the context: they are cut, so the model never sees their end."""
        longest = cut = 0
        for chunk in chunks(len(self.store)):
            lengths = self.store.lengths(chunk)
            longest = max(longest, int(lengths.max()))
            cut += int((lengths + 1 > block_size).sum())  # a name of n characters needs n + 1 input positions
        if cut:
            rank_zero_warn(
                f"{self.path}: {cut} of {len(self.store)} names are longer than the context and were cut; "
                f"--model.block_size {longest + 1} keeps them whole."
            )
