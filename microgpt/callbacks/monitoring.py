"""Watching the run: its TensorBoard folder, the learning rate and the throughput."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch import callbacks as lightning_callbacks
from lightning.pytorch.loggers import TensorBoardLogger

from microgpt.checkpoints.runs import run_version
from microgpt.training.steps import ends_optimizer_step, logs_at, starts_optimizer_step


class RunLogger(TensorBoardLogger):
    """Lightning's TensorBoard logger in a run folder of its own, without the ``hp_metric`` placeholder. Unless
    ``version`` is given, ``save_dir/name/version_N`` is claimed by creating it (``microgpt.checkpoints.runs``),
    so that runs started together in one folder never share a version.

    Args:
        save_dir: The root of the runs; the command line links it to --trainer.default_root_dir.
        name: The folder of the runs inside save_dir.
        version: The run's version; unset, the next free one is claimed.
        default_hp_metric: Log TensorBoard's hp_metric placeholder.
    """

    def __init__(self, save_dir: str = ".", name: str = "lightning_logs", version: int | str | None = None,
                 default_hp_metric: bool = False, **kwargs: Any):
        if version is None:
            version = run_version(Path(save_dir) / name)
        super().__init__(save_dir, name=name, version=version, default_hp_metric=default_hp_metric, **kwargs)


class LearningRateCurves(lightning_callbacks.LearningRateMonitor):
    """Lightning's ``LearningRateMonitor`` (tags ``lr-AdamW/pg1`` and ``pg2``: the decayed and undecayed
    parameters), writing once per optimizer step under gradient accumulation (Lightning's writes at every
    micro-batch of a logging step), and idle instead of an error when the run has no logger
    (``--trainer.logger false``)."""

    def on_train_start(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.loggers:
            super().on_train_start(trainer, *args, **kwargs)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if trainer.loggers and starts_optimizer_step(trainer, batch_idx):
            super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.loggers:
            super().on_train_epoch_start(trainer, *args, **kwargs)


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

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._tokens += batch.tokens
        self._names += trainer.datamodule.batch_size
        step = trainer.global_step
        if not trainer.loggers or not ends_optimizer_step(trainer, batch_idx) or not logs_at(trainer, step):
            return  # mid-accumulation, or not a logging step
        seconds = time.perf_counter() - self._since
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics({"train/tokens_per_sec": self._tokens / seconds,
                                    "train/names_per_sec": self._names / seconds},
                                   step=step - 1)  # Lightning's step index, as for train/loss
        self._tokens = self._names = 0
        self._since = time.perf_counter()
