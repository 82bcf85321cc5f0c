"""Saving the run: ``last.ckpt`` kept current and saved on SIGTERM and Ctrl-C, and every checkpoint written
atomically."""

from __future__ import annotations

import signal
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities import rank_zero_info

from microgpt.checkpoints.io import atomic_torch_save, load_checkpoint
from microgpt.errors import UserError
from microgpt.training import sigterm_broadcast
from microgpt.training.steps import ends_optimizer_step


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

    def __init__(self, signum: int, step: int, path: str | Path):
        self.signum, self.step, self.path = signum, step, Path(path)
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; saved {self.path}; "
                         "continue with: fit ... --ckpt_path last")


class RunCheckpoint(Checkpoint):
    """Keeps ``last.ckpt`` (in the run's ``checkpoints`` folder) current, the checkpoint that
    ``fit --ckpt_path last`` resumes from exactly: saved after the last step, every ``every_n_train_steps``
    steps or ``train_time_interval`` of training when set, and when the run is stopped.

    SIGTERM and the first Ctrl-C stop the run at the end of the current step, save ``last.ckpt`` there
    and exit with 128 + the signal number; a second Ctrl-C stops at once without saving. With several
    processes they agree on the stop (and on the clock) at every ``log_every_n_steps``-th step, the steps
    that synchronize anyway. Nothing is saved when the run fails (e.g. on a non-finite loss), so
    ``last.ckpt`` stays the last good one. The command line writes every checkpoint of the run atomically
    (``AtomicCheckpointIO``, its default ``--trainer.plugins``). Being a
    Lightning ``Checkpoint``, it runs after the other callbacks' step hooks (a weight average is updated first).

    Args:
        every_n_train_steps: Also save after every this many optimizer steps.
        train_time_interval: Also save once this much training time has passed since the last save, as
            "h:m:s" (quote it in YAML).
    """

    STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, every_n_train_steps: int | None = None, train_time_interval: timedelta | None = None):
        if every_n_train_steps is not None and every_n_train_steps < 1:
            raise UserError(f"every_n_train_steps must be a positive integer, got {every_n_train_steps}.")
        if train_time_interval is not None and train_time_interval.total_seconds() <= 0:
            raise UserError(f"train_time_interval must be positive, got {train_time_interval}.")
        self.every_n_train_steps = every_n_train_steps
        self.seconds = train_time_interval.total_seconds() if train_time_interval is not None else None
        self.path: Path | None = None
        self._previous_handlers: dict[int, Any] = {}
        self._stop_signal = 0
        self._stopped: Stopped | None = None
        self._saved_at_step = -1
        self._saved_at_time = 0.0
        self._loud_again = lambda: None  # puts back Lightning's per-step SIGTERM broadcast

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Find the checkpoint folder; from here on SIGTERM and Ctrl-C only ask for a stop at the end of the step."""
        self.path = Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints" / "last.ckpt"
        self._stop_signal, self._stopped = 0, None
        self._saved_at_step, self._saved_at_time = trainer.global_step, time.monotonic()
        try:
            for signum in self.STOP_SIGNALS:
                self._previous_handlers[signum] = signal.signal(signum, self._request_stop)
        except ValueError:  # not the main thread: signals cannot be handled here
            self._restore_handlers()
        else:  # Lightning's own SIGTERM flag stays down from here on: its per-step broadcast can go
            self._loud_again = sigterm_broadcast.quiet(trainer)

    def _request_stop(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT:
            if self._stop_signal:  # pressed again: quit now
                raise KeyboardInterrupt
            rank_zero_info("\nCtrl-C: stopping after this step and saving a checkpoint (press again to quit at once).")
        self._stop_signal = self._stop_signal or signum

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """After each optimizer step, save when a stop was asked for or a save is due; the point Lightning
        resumes from exactly. A stopped run ends when the next step would start, after this step's logging."""
        if not ends_optimizer_step(trainer, batch_idx):
            return
        step, signum = trainer.global_step, self._stop_signal
        clock = self.seconds is not None and time.monotonic() - self._saved_at_time >= self.seconds
        if trainer.world_size > 1:  # all processes decide alike, on the steps that synchronize anyway
            if step % max(trainer.log_every_n_steps, 1):
                signum, clock = 0, False
            else:
                flags = torch.tensor([signum, int(clock)], device=pl_module.device)
                signum, clock = trainer.strategy.reduce(flags, reduce_op="max").tolist()
        if signum and self._stopped is None:
            self.save(trainer)
            self._stopped = Stopped(signum, step, self.path)
        elif clock or (self.every_n_train_steps and step % self.every_n_train_steps == 0):
            self.save(trainer)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any, **kwargs: Any) -> None:
        if self._stopped is not None:
            raise self._stopped

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Save when this is the last epoch. Here, not at ``on_train_end``, the checkpoint holds the raw
        weights: a weight-averaging callback swaps the average in at the end of training."""
        # current_epoch counts the finished epochs once this one ends: it is still this epoch's index here
        if (0 <= trainer.max_steps <= trainer.global_step
                or 0 <= trainer.max_epochs <= trainer.current_epoch + 1 or trainer.should_stop):
            self.save(trainer)

    def save(self, trainer: L.Trainer) -> None:
        """Write ``last.ckpt``, unless it already holds this step, or (as ``ModelCheckpoint``) in a fast dev run,
        outside fitting, or in the sanity check."""
        if trainer.fast_dev_run or trainer.state.fn != "fit" or trainer.sanity_checking:
            return
        if self._saved_at_step != trainer.global_step:
            trainer.save_checkpoint(self.path, weights_only=False)
            self._saved_at_step, self._saved_at_time = trainer.global_step, time.monotonic()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_handlers()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """Save nothing: the state may be half-way through a step, or bad (a non-finite loss)."""
        self._restore_handlers()

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}
        self._loud_again()
        self._loud_again = lambda: None
