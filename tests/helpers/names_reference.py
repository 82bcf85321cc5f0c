"""What the data code must give, computed independently of it in plain Python from the names' characters:
padded and packed rows, the training stream's batches, and a split's names as strings."""

from __future__ import annotations

import numpy as np
import torch

from microgpt.data.batches import Batch
from microgpt.data.rows import IGNORE_INDEX, NameRows
from microgpt.data.store import ensure_store
from microgpt.model.tokenizer import CharTokenizer


def row_tokens(name: str, tokenizer: CharTokenizer, block_size: int) -> list[int]:
    """``[BOS] + characters + [BOS]``, cut to ``block_size + 1`` tokens."""
    return ([tokenizer.bos] + tokenizer.encode(name) + [tokenizer.bos])[: block_size + 1]


def padded_rows(names: list[str], tokenizer: CharTokenizer, block_size: int) -> dict[str, torch.Tensor]:
    """``inputs`` (padded with BOS) and ``targets`` (padded with IGNORE_INDEX), ``block_size`` wide, and
    ``lengths``, the predicted positions of each name."""
    inputs, targets, lengths = [], [], []
    for name in names:
        tokens = row_tokens(name, tokenizer, block_size)
        n = len(tokens) - 1
        inputs.append(tokens[:-1] + [tokenizer.bos] * (block_size - n))
        targets.append(tokens[1:] + [IGNORE_INDEX] * (block_size - n))
        lengths.append(n)
    return {"inputs": torch.tensor(inputs, dtype=torch.long).view(len(names), block_size),
            "targets": torch.tensor(targets, dtype=torch.long).view(len(names), block_size),
            "lengths": torch.tensor(lengths, dtype=torch.long)}


def padded_batch(names: list[str], tokenizer: CharTokenizer, block_size: int, trim: bool = True) -> Batch:
    """One name per row, trimmed to the longest name's positions unless ``trim`` is off."""
    rows = padded_rows(names, tokenizer, block_size)
    width = max(rows["lengths"].tolist()) if trim else block_size
    return Batch(rows["inputs"][:, :width], rows["targets"][:, :width])


def packed_batch(names: list[str], tokenizer: CharTokenizer, block_size: int) -> Batch:
    """The names laid end to end in rows of ``block_size`` slots: longest first (ties in the given order),
    each into the first row that still has room; positions restart at 0 with every name; spare slots hold
    token 0 at position 0 and no target."""
    rows: list[list[tuple[int, int, int]]] = []  # (input, target, position) per filled slot
    tokens = [row_tokens(name, tokenizer, block_size) for name in names]
    for i in sorted(range(len(names)), key=lambda i: -len(tokens[i])):
        slots = [(tokens[i][j], tokens[i][j + 1], j) for j in range(len(tokens[i]) - 1)]
        row = next((row for row in rows if len(row) + len(slots) <= block_size), None)
        if row is None:
            rows.append(row := [])
        row.extend(slots)
    spare = [(0, IGNORE_INDEX, 0)]
    full = [row + spare * (block_size - len(row)) for row in rows]
    inputs, targets, positions = (torch.tensor([[slot[f] for slot in row] for row in full], dtype=torch.long)
                                  for f in range(3))
    return Batch(inputs, targets, positions)


def stream_names(names: list[str], batch_size: int, k: int, shuffle: bool, seed: int) -> list[str]:
    """The names of global batch ``k`` of the training stream: place ``p`` is name ``p % N`` of pass
    ``p // N`` over ``names``, passes reshuffled by ``torch.randperm`` seeded ``seed + pass`` with ``shuffle``."""
    chosen = []
    for p in range(k * batch_size, (k + 1) * batch_size):
        n, i = divmod(p, len(names))
        if shuffle:
            i = int(torch.randperm(len(names), generator=torch.Generator().manual_seed(seed + n))[i])
        chosen.append(names[i])
    return chosen


def train_batches(names: list[str], tokenizer: CharTokenizer, block_size: int, batch_size: int, batches: range,
                  shuffle: bool = False, seed: int = 0, rank: int = 0, world_size: int = 1,
                  packed: bool = False) -> list[Batch]:
    """The training batches ``batches`` (global numbers) of process ``rank``: its slice of each global batch,
    padded or packed, with the global batch's target tokens (one micro-batch per step)."""
    out = []
    for k in batches:
        chosen = stream_names(names, batch_size, k, shuffle, seed)
        tokens = sum(min(len(name) + 1, block_size) for name in chosen)
        per_rank = batch_size // world_size
        mine = chosen[rank * per_rank : (rank + 1) * per_rank]
        batch = (packed_batch if packed else padded_batch)(mine, tokenizer, block_size)
        out.append(batch._replace(tokens=tokens, step_tokens=tokens))
    return out


def rows_of(names: list[str], tokenizer: CharTokenizer, block_size: int, folder) -> NameRows:
    """The package's rows of ``names`` (in this order), through a token store written in ``folder``."""
    source = folder / "rows-of.txt"
    source.write_text("\n".join(names) + "\n", encoding="utf-8")
    store = ensure_store(source, folder / "rows-of.tokens")
    return NameRows(store, np.arange(len(store)), tokenizer, block_size)


def split_names(dm) -> dict[str, list[str]]:
    """A data module's names as strings: ``all`` in the seeded order, and its ``train``, ``val`` and ``test`` names."""
    split = dm.split
    return {part: split.store.decode(lines) for part, lines in
            (("all", split.order), ("train", split.train_lines), ("val", split.val_lines), ("test", split.test_lines))}
