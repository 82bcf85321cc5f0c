"""Faults on purpose, for tests/test_faults.py: a disk that fills up during a run, and a checkpoint write
slow enough to be killed in the middle. Loaded by the runs under test through ``--trainer.callbacks+=``
and ``--trainer.plugins``."""

from __future__ import annotations

import errno
import io
import os
import time
from pathlib import Path

import lightning as L
import torch

from microgpt.callbacks.checkpointing import AtomicCheckpointIO
from microgpt.files import atomic_write


def fill(folder: str | os.PathLike) -> Path:
    """Fill the file system of ``folder`` to the last byte with a file ``filler`` there, and return it."""
    path = Path(folder) / "filler"
    block = bytes(1 << 16)
    with path.open("wb", buffering=0) as f:
        try:
            while True:
                f.write(block)
        except OSError as err:
            if err.errno != errno.ENOSPC:
                raise
        try:
            while True:  # the last partial block, a byte at a time
                f.write(b"\0")
        except OSError as err:
            if err.errno != errno.ENOSPC:
                raise
    return path


class FillDisk(L.Callback):
    """Fills the disk under ``folder`` at the end of optimizer step ``at_step`` of ``fit``, or when
    ``predict`` starts.

    Args:
        folder: A folder on the file system to fill.
        at_step: The step of ``fit`` after which the disk is full; None: when ``predict`` starts.
    """

    def __init__(self, folder: str, at_step: int | None = None):
        self.folder, self.at_step = folder, at_step

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if trainer.global_step == self.at_step:
            fill(self.folder)

    def on_predict_start(self, trainer, pl_module) -> None:
        if self.at_step is None:
            fill(self.folder)


class SlowCheckpointIO(AtomicCheckpointIO):
    """Writes checkpoints as microgpt does, except that from save number ``slow_from`` on, it writes half
    of the file, touches ``marker`` and waits ten minutes before writing the rest (to be killed meanwhile).

    Args:
        slow_from: The first save (counting from 1) that stalls half-way.
        marker: File created once half of the stalled checkpoint is written.
    """

    def __init__(self, slow_from: int = 2, marker: str = "halfway"):
        super().__init__()
        self.slow_from, self.marker, self.saves = slow_from, Path(marker), 0

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        self.saves += 1
        if self.saves < self.slow_from:
            return super().save_checkpoint(checkpoint, path, storage_options)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        data = buffer.getvalue()

        def write_slowly(f) -> None:
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
            self.marker.touch()
            time.sleep(600)
            f.write(data[len(data) // 2 :])

        atomic_write(path, write_slowly)
