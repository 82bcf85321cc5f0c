"""Names cut into rows of token ids: ``[BOS] + characters + [BOS]`` cut to ``block_size + 1`` tokens.

The model reads the first ``n`` tokens of a row and predicts the last ``n``: a row's ``inputs`` are
padded with BOS and its ``targets`` with ``IGNORE_INDEX``, up to ``block_size``.
"""

from __future__ import annotations

import numpy as np
import torch

from microgpt.data.store import TokenStore, chunks
from microgpt.model.tokenizer import CharTokenizer

IGNORE_INDEX = -100  # target value of padded positions; F.cross_entropy skips it


def pad_rows(ids: torch.Tensor, name_lengths: torch.Tensor, bos: int, block_size: int) -> dict[str, torch.Tensor]:
    """The rows of names from the ids of their first ``block_size`` characters, end to end, and their full
    lengths: ``inputs`` and ``targets`` of shape ``(N, block_size)``, and ``lengths`` (N,), the number of
    predicted positions of each name."""
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


class NameRows:
    """Some names of a token store (``lines``, in this order) as rows for a model's vocabulary: ``cut(idx)``
    gives the rows of names ``idx`` of the selection. After ``keep_in_memory()`` every row is cut once and a
    batch only indexes them (fast for small files); before, each call cuts its rows from the store."""

    def __init__(self, store: TokenStore, lines: np.ndarray, tokenizer: CharTokenizer, block_size: int):
        self.store, self.lines, self.block_size, self.bos = store, lines, block_size, tokenizer.bos
        known = {c: i for i, c in enumerate(tokenizer.chars)}
        self.ids = np.array([known.get(c, -1) for c in store.chars], dtype=np.int64)  # store id -> model id
        self.in_memory: dict[str, torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.lines)

    def unknown(self) -> list[str]:
        """The characters of these names outside the model's vocabulary, in order of first appearance."""
        if (self.ids >= 0).all():
            return []
        found: dict[str, None] = {}
        for chunk in chunks(len(self.lines)):
            tokens = self.store.gather(np.asarray(self.lines[chunk]))[0]
            bad = tokens[self.ids[tokens] < 0]
            _, first = np.unique(bad, return_index=True)
            for i in sorted(first.tolist()):
                found.setdefault(self.store.chars[bad[i]])
        return list(found)

    def keep_in_memory(self) -> None:
        """Cut every row now and hold them as tensors (the names must all be in the vocabulary)."""
        self.in_memory = self.cut(torch.arange(len(self)))

    def target_counts(self, idx: torch.Tensor) -> torch.Tensor:
        """How many targets each of the names at ``idx`` has once cut to the context (``cut(idx)["lengths"]``)."""
        if self.in_memory is not None:
            return self.in_memory["lengths"][idx]
        lengths = self.store.lengths(np.asarray(self.lines[idx.numpy()]))
        return torch.from_numpy(np.minimum(lengths + 1, self.block_size))

    def cut(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """The ``inputs``, ``targets`` and ``lengths`` (see ``pad_rows``) of the names at ``idx``, ``block_size`` wide."""
        if self.in_memory is not None:
            return {k: v[idx] for k, v in self.in_memory.items()}
        ids, lengths = self.store.gather(np.asarray(self.lines[idx.numpy()]), limit=self.block_size)
        return pad_rows(torch.from_numpy(self.ids[ids]), torch.from_numpy(lengths), self.bos, self.block_size)
