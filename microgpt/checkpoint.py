"""Checkpoints that survive the process being killed, and that load safely.

* ``AtomicCheckpointIO`` writes every checkpoint to a temporary file in the same directory, syncs it
  to disk and renames it into place, so ``last.ckpt`` is always the newest *complete* checkpoint.
* ``load_checkpoint`` reads a checkpoint with ``weights_only=True`` and turns every way it can be
  wrong (missing, truncated, not a checkpoint, written by another version) into one ``UserError``.
* ``RunCheckpoint`` saves every ``N`` steps, after the last step, and, when the run is stopped by SIGTERM
  or Ctrl-C, once more at the end of the step where it stopped; ``fit --ckpt_path last`` continues from there.
"""

from __future__ import annotations

import os
import pickle
import signal
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info

from microgpt.errors import UserError

FORMAT = 1  # bump when a checkpoint written by this code can no longer be resumed by a newer one
FORMAT_KEY = "microgpt_format"


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> None:
    """Call ``write`` on a temporary file next to ``path``, fsync it, then rename it over ``path``:
    readers see the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
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


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through ``atomic_write``."""
    atomic_write(path, lambda f: torch.save(obj, f))


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """A microgpt checkpoint read with ``weights_only=True``; anything else is a one-sentence ``UserError``."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such checkpoint file.")
    if path.is_dir():
        raise UserError(f"{path}: is a directory, not a checkpoint file.")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except PermissionError as err:
        raise UserError(f"{path}: cannot be read (permission denied).") from err
    except pickle.UnpicklingError as err:
        if "weights_only" in str(err):
            raise UserError(f"{path}: holds objects other than plain data and tensors; refusing to load it.") from err
        raise UserError(f"{path}: is not a checkpoint, or is truncated.") from err
    except Exception as err:  # whatever torch trips over in a file that is not a whole checkpoint
        raise UserError(f"{path}: is not a checkpoint, or is truncated.") from err
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


class Stopped(Exception):
    """The run was stopped by a signal after saving ``path`` at ``step``; the command line exits 128 + signum."""

    def __init__(self, signum: int, step: int, path: str | os.PathLike):
        self.signum, self.step, self.path = signum, step, Path(path)
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; saved {self.path}; "
                         "continue with: fit ... --ckpt_path last")


class RunCheckpoint(ModelCheckpoint):
    """Keeps ``last.ckpt`` current: saved every ``every_n_train_steps`` steps, at the end, and when stopped.

    SIGTERM and the first Ctrl-C stop the run at the end of the current step, save ``last.ckpt``
    there and exit (with 128 + the signal number); a second Ctrl-C stops at once without saving. Nothing is saved when the run
    fails (e.g. on a non-finite loss), so ``last.ckpt`` stays the last good one.

    Args:
        every_n_train_steps: Save after every this many optimizer steps.
        save_last: Keep ``last.ckpt``, the newest checkpoint (``fit --ckpt_path last`` resumes from it).
        save_top_k: How many step-named checkpoints to keep besides ``last.ckpt``.
    """

    STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, every_n_train_steps: int = 100, save_last: bool = True, save_top_k: int = 1, **kwargs: Any):
        if every_n_train_steps < 1:
            raise UserError(f"every_n_train_steps must be a positive integer, got {every_n_train_steps}.")
        super().__init__(every_n_train_steps=every_n_train_steps, save_last=save_last, save_top_k=save_top_k,
                         **kwargs)
        self._previous_handlers: dict[int, Any] = {}
        self._stop_signal = 0
        self._stopped: Stopped | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Write and read this run's checkpoints through ``AtomicCheckpointIO``."""
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        super().setup(trainer, pl_module, stage)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """While training, SIGTERM and Ctrl-C only ask for a stop at the end of the current step."""
        super().on_train_start(trainer, pl_module)
        self._stop_signal, self._stopped = 0, None
        try:
            for signum in self.STOP_SIGNALS:
                self._previous_handlers[signum] = signal.signal(signum, self._request_stop)
        except ValueError:  # not the main thread: signals cannot be handled here
            self._restore_handlers()

    def _request_stop(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT:
            if self._stop_signal:  # pressed again: quit now
                raise KeyboardInterrupt
            rank_zero_info("\nCtrl-C: stopping after this step and saving a checkpoint (press again to quit at once).")
        self._stop_signal = self._stop_signal or signum

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any, **kwargs: Any) -> None:
        """Save as usual; if a stop was asked for (on any process), save ``last.ckpt`` now.

        This is where periodic checkpoints are saved too, the point Lightning resumes from exactly.
        The run stops when the next step would start, after this step's logging has finished.
        """
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)
        signum = self._stop_signal
        if trainer.world_size > 1:  # all processes stop at the same step
            signum = int(trainer.strategy.reduce(torch.tensor(signum), reduce_op="max"))
        if signum and self._stopped is None:
            path = Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"
            trainer.save_checkpoint(path)
            self._stopped = Stopped(signum, trainer.global_step, path)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any, **kwargs: Any) -> None:
        if self._stopped is not None:
            raise self._stopped

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Also save when this is the last epoch, so the steps after the last multiple of
        ``every_n_train_steps`` are kept (Lightning's own end-of-training save skips them once any
        checkpoint exists). Saving here, not at ``on_train_end``, keeps the raw weights in the
        checkpoint: a weight-averaging callback swaps the average in at the end of training."""
        super().on_train_epoch_end(trainer, pl_module)
        loop = trainer.fit_loop
        last_epoch = (
            0 <= loop.max_steps <= trainer.global_step
            or 0 <= loop.max_epochs <= loop.epoch_progress.current.processed
            or trainer.should_stop
        )
        if last_epoch and not self._should_skip_saving_checkpoint(trainer):
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self._restore_handlers()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """Save nothing: the state may be half-way through a step, or bad (a non-finite loss)."""
        self._restore_handlers()

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}


def find_last_checkpoint(root: str | os.PathLike) -> Path | None:
    """The most recently written ``last.ckpt`` of the runs in ``root`` (``--trainer.default_root_dir``), or None.

    Looks where Lightning puts them: ``ROOT/checkpoints`` without a logger, ``ROOT/NAME/VERSION/checkpoints`` with one.
    """
    root = Path(root)
    candidates = [p for p in [root / "checkpoints" / "last.ckpt", *root.glob("*/*/checkpoints/last.ckpt")] if p.is_file()]
    return max(candidates, key=lambda p: p.stat().st_mtime_ns, default=None)
