"""The names a run trained on and held out, as the token store's 64-bit name hashes: small enough to travel in
every checkpoint (8 bytes a name), so that a checkpoint alone can tell a drawn name new from a known one."""

from __future__ import annotations

import os
from typing import Literal

import numpy as np
import torch

from microgpt.checkpoints.io import load_checkpoint
from microgpt.data.store import line_hashes

STATE_KEY = "known_names"  # in the data module's state, which Lightning saves in every checkpoint
CHECKPOINT_KEY = "NamesDataModule"  # where Lightning puts that state: the data module's class name

Kind = Literal["training", "held-out"]


class KnownNames:
    """Sorted hashes of the training names and of the held-out (validation and test) names, over the ids of
    ``chars`` (the token store's vocabulary), as ``microgpt.data.store.line_hashes`` computes them."""

    def __init__(self, chars: str, train: np.ndarray, held_out: np.ndarray):
        self.chars = chars
        self.train, self.held_out = np.unique(train.astype(np.uint64)), np.unique(held_out.astype(np.uint64))
        self._ids = {c: i for i, c in enumerate(chars)}

    @classmethod
    def of_split(cls, split) -> KnownNames:
        """The training and held-out names of a ``microgpt.data.split.NamesSplit``."""
        store, train = split.store, split.train_lines
        held_out = split.order[len(train):]
        return cls(store.chars, np.asarray(store.hashes[np.asarray(train)]),
                   np.asarray(store.hashes[np.asarray(held_out)]))

    def state(self) -> dict:
        """What a checkpoint stores: the vocabulary and the hashes as int64 tensors (``weights_only`` loads them)."""
        as_tensor = lambda hashes: torch.from_numpy(hashes.view(np.int64).copy())
        return {"chars": self.chars, "train": as_tensor(self.train), "held_out": as_tensor(self.held_out)}

    @classmethod
    def from_state(cls, state: dict | None) -> KnownNames | None:
        if not isinstance(state, dict) or not {"chars", "train", "held_out"} <= state.keys():
            return None
        as_hashes = lambda tensor: tensor.cpu().numpy().view(np.uint64)
        return cls(state["chars"], as_hashes(state["train"]), as_hashes(state["held_out"]))

    @classmethod
    def from_checkpoint(cls, checkpoint: dict) -> KnownNames | None:
        """The names stored in a checkpoint's data module state; None for a checkpoint written without them."""
        return cls.from_state((checkpoint.get(CHECKPOINT_KEY) or {}).get(STATE_KEY))

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> KnownNames | None:
        """The names stored in a checkpoint file; None for one without them, and for a folder ``export`` wrote."""
        return None if os.path.isdir(path) else cls.from_checkpoint(load_checkpoint(path))

    def kind(self, name: str) -> Kind | None:
        """``"training"``, ``"held-out"``, or None for a new name. Two different names share a 64-bit hash with
        a chance of about one in 10**14 for a list of 32,000: then a new name would count as known (never the
        other way)."""
        ids = [self._ids.get(c) for c in name]
        if not ids or None in ids:
            return None  # no name of the file is empty or has a character the file lacks
        key = line_hashes(np.array(ids, dtype=np.int64), np.array([len(ids)]))[0]
        for kind, hashes in (("training", self.train), ("held-out", self.held_out)):
            at = np.searchsorted(hashes, key)
            if at < len(hashes) and hashes[at] == key:
                return kind
        return None
