"""Checkpoints that survive the process being killed, and that load safely.

* ``AtomicCheckpointIO`` writes every checkpoint to a temporary file in the same directory, syncs it
  to disk and renames it into place, so ``last.ckpt`` is always the newest *complete* checkpoint.
* ``load_checkpoint`` reads a checkpoint with ``weights_only=True`` and turns every way it can be
  wrong (missing, truncated, not a checkpoint, written by another version) into one ``UserError``.
* ``RunCheckpoint`` saves every ``N`` steps and, when the run is stopped by SIGTERM or Ctrl-C, once
  more at the step boundary where it stopped; ``fit --ckpt_path last`` continues from there.
"""

from __future__ import annotations

import os
import pickle
import signal
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from microgpt.errors import UserError

FORMAT = 1  # bump when a checkpoint written by this code can no longer be resumed by a newer one
FORMAT_KEY = "microgpt_format"


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file next to ``path``, fsync it, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """A microgpt checkpoint read with ``weights_only=True``; anything else is a one-sentence ``UserError``."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such checkpoint file.")
    if path.is_dir():
        raise UserError(f"{path}: is a directory, not a checkpoint file.")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights_only" in str(err):
            raise UserError(f"{path}: holds objects other than plain data and tensors; refusing to load it.") from None
        raise UserError(f"{path}: is not a checkpoint, or is truncated.") from None
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile):
        raise UserError(f"{path}: is not a checkpoint, or is truncated.") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise UserError(f"{path}: is a torch file but not a training checkpoint.")
    if checkpoint.get(FORMAT_KEY) != FORMAT:
        raise UserError(
            f"{path}: was written by an incompatible version of microgpt "
            f"(checkpoint format {checkpoint.get(FORMAT_KEY)}, this version reads format {FORMAT})."
        )
    return checkpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    """Saves checkpoints by write-then-rename and loads them with ``weights_only=True``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options.")
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path, map_location: Any = "cpu", weights_only: bool | None = True) -> dict[str, Any]:
        return load_checkpoint(path, map_location)


class RunCheckpoint(ModelCheckpoint):
    """Keeps ``last.ckpt`` current: saved every ``every_n_train_steps`` steps, at the end, and when stopped.

    SIGTERM (Lightning's own handling) and the first Ctrl-C stop the run at the end of the current
    step and save there; a second Ctrl-C stops at once without saving. Nothing is saved when the run
    fails (e.g. on a non-finite loss), so ``last.ckpt`` stays the last good one.

    Args:
        every_n_train_steps: Save after every this many optimizer steps.
        save_last: Keep ``last.ckpt``, the newest checkpoint (``fit --ckpt_path last`` resumes from it).
        save_top_k: How many step-named checkpoints to keep besides ``last.ckpt``.
    """

    def __init__(self, every_n_train_steps: int = 100, save_last: bool = True, save_top_k: int = 1, **kwargs: Any):
        if every_n_train_steps < 1:
            raise UserError(f"every_n_train_steps must be a positive integer, got {every_n_train_steps}.")
        super().__init__(every_n_train_steps=every_n_train_steps, save_last=save_last, save_top_k=save_top_k,
                         save_on_exception=True, **kwargs)
        self._previous_sigint: Any = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Write and read this run's checkpoints through ``AtomicCheckpointIO``."""
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        super().setup(trainer, pl_module, stage)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Turn the first Ctrl-C into Lightning's SIGTERM stop, which ends the run at a step boundary."""
        super().on_train_start(trainer, pl_module)
        try:
            self._previous_sigint = signal.signal(signal.SIGINT, self._stop_at_step_end)
        except ValueError:  # not the main thread: leave Ctrl-C alone
            self._previous_sigint = None

    def _stop_at_step_end(self, signum: int, frame: Any) -> None:
        rank_zero_info("\nCtrl-C: stopping after this step and saving a checkpoint (press again to quit at once).")
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.kill(os.getpid(), signal.SIGTERM)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self._restore_sigint()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """Save only when Lightning stopped the run at a step boundary (SIGTERM); never a half-done or bad state."""
        self._restore_sigint()
        if isinstance(exception, SIGTERMException):
            super().on_exception(trainer, pl_module, exception)
            rank_zero_info(f"stopped at step {trainer.global_step}; continue with: fit ... --ckpt_path last")

    def _restore_sigint(self) -> None:
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None


def find_last_checkpoint(root: str | os.PathLike) -> Path | None:
    """The most recently written ``last.ckpt`` of the runs in ``root`` (``--trainer.default_root_dir``), or None.

    Looks where Lightning puts them: ``ROOT/checkpoints`` without a logger, ``ROOT/NAME/VERSION/checkpoints`` with one.
    """
    root = Path(root)
    candidates = [p for p in [root / "checkpoints" / "last.ckpt", *root.glob("*/*/checkpoints/last.ckpt")] if p.is_file()]
    return max(candidates, key=lambda p: p.stat().st_mtime_ns, default=None)
