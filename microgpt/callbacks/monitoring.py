"""Watching the run: the learning rate, a progress bar that is not redrawn every step, and throughput."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
from lightning.pytorch import callbacks as lightning_callbacks
from lightning.pytorch.callbacks import TQDMProgressBar


class LearningRateMonitor(lightning_callbacks.LearningRateMonitor):
    """Lightning's ``LearningRateMonitor`` (tags ``lr-AdamW/pg1`` and ``pg2``, the decayed and undecayed
    parameters), idle instead of an error when the run has no logger (``--trainer.logger false``)."""

    def on_train_start(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.loggers:
            super().on_train_start(trainer, *args, **kwargs)

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.loggers:
            super().on_train_batch_start(trainer, *args, **kwargs)

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.loggers:
            super().on_train_epoch_start(trainer, *args, **kwargs)


class ProgressBar(TQDMProgressBar):
    """Lightning's progress bar, redrawn at most ``refreshes_per_second`` times a second (and after the last
    step) instead of after every step, which at batch 1 is a sizeable share of the step (``docs/speed.md``).

    Args:
        refreshes_per_second: How often the training bar may be redrawn.
    """

    def __init__(self, refreshes_per_second: float = 4.0):
        super().__init__()
        self.interval = 1 / refreshes_per_second
        self._drawn_at = 0.0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any, **kwargs: Any) -> None:
        now = time.monotonic()
        if now - self._drawn_at >= self.interval or trainer.global_step == trainer.max_steps:
            self._drawn_at = now
            super().on_train_batch_end(trainer, pl_module, *args, **kwargs)


class Throughput(L.Callback):
    """Logs training throughput, ``train/tokens_per_sec`` and ``train/names_per_sec`` (all processes together),
    averaged over the optimizer steps since the previous logging step.

    Lightning's ``ThroughputMonitor`` waits for the device after every batch. The batches here carry their
    global target-token count as a host integer, and every global batch holds ``batch_size`` names, so
    counting needs neither the device nor the other processes.
    """

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._tokens = self._names = 0  # since the last log
        self._since = time.perf_counter()
        self._seen_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._tokens += batch.tokens
        self._names += trainer.datamodule.batch_size
        step, every = trainer.global_step, trainer.log_every_n_steps
        ended_a_step, self._seen_step = step != self._seen_step, step
        if not ended_a_step or not trainer.loggers or every < 1 or step % every:
            return  # mid-accumulation, or not a logging step
        seconds = time.perf_counter() - self._since
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics({"train/tokens_per_sec": self._tokens / seconds,
                                    "train/names_per_sec": self._names / seconds},
                                   step=step - 1)  # Lightning's step index, as for train/loss
        self._tokens = self._names = 0
        self._since = time.perf_counter()
