"""Callbacks: saving the run, inventing names during and at the end of training, writing predictions,
and the moving average of the weights."""

from __future__ import annotations

import csv
import signal
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import callbacks as lightning_callbacks
from lightning.pytorch.callbacks import BasePredictionWriter, Checkpoint, TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_info
from torch.optim.swa_utils import get_ema_multi_avg_fn

from microgpt.checkpoint import atomic_torch_save, load_checkpoint
from microgpt.errors import UserError
from microgpt.files import atomic_write


def novelty(names: list[str], train_names: set[str], held_out_names: set[str]) -> dict[str, float]:
    """Shares of ``names`` that are training names, held-out names (and not training ones), or new."""
    n = len(names)
    in_train = sum(name in train_names for name in names)
    in_held_out = sum(name in held_out_names and name not in train_names for name in names)
    return {"train": in_train / n, "held_out": in_held_out / n, "new": (n - in_train - in_held_out) / n}


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
    ``last.ckpt`` stays the last good one. Every checkpoint of the run is written atomically. Being a
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
        self._saved_at_step = self._seen_step = -1
        self._saved_at_time = 0.0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Write and read this run's checkpoints through ``AtomicCheckpointIO``."""
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Find the checkpoint folder; from here on SIGTERM and Ctrl-C only ask for a stop at the end of the step."""
        self.path = Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints" / "last.ckpt"
        self._stop_signal, self._stopped = 0, None
        self._saved_at_step, self._saved_at_time = trainer.global_step, time.monotonic()
        self._seen_step = trainer.global_step
        try:
            for signum in self.STOP_SIGNALS:
                self._previous_handlers[signum] = signal.signal(signum, self._request_stop)
        except ValueError:  # not the main thread: signals cannot be handled here
            self._restore_handlers()
        else:
            self._quiet_sigterm_broadcast(trainer)

    def _quiet_sigterm_broadcast(self, trainer: L.Trainer) -> None:
        """Under DDP, Lightning 2.6's training loop broadcasts its SIGTERM flag from rank 0 before every batch
        and reads it on the host (``_TrainingEpochLoop._broadcast_sigterm_tensor``, Lightning issue #21487): a
        collective and a device sync per step. While this callback's handlers are installed, Lightning's own
        never runs, so that flag is always 0 and the stop is agreed here instead, on logging steps. The
        broadcast is turned off for this run's loop only, and only where the loop has that method; another
        Lightning keeps its own behaviour."""
        loop = trainer.fit_loop.epoch_loop
        if trainer.world_size > 1 and callable(getattr(loop, "_broadcast_sigterm_tensor", None)):
            loop._broadcast_sigterm_tensor = lambda: None
            self._quieted_loop = loop

    def _request_stop(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT:
            if self._stop_signal:  # pressed again: quit now
                raise KeyboardInterrupt
            rank_zero_info("\nCtrl-C: stopping after this step and saving a checkpoint (press again to quit at once).")
        self._stop_signal = self._stop_signal or signum

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any, **kwargs: Any) -> None:
        """Save when a stop was asked for or a save is due; the point Lightning resumes from exactly.
        A stopped run ends when the next step would start, after this step's logging has finished.
        With accumulated micro-batches, only the ones that end an optimizer step count."""
        step = trainer.global_step
        if step == self._seen_step:  # no optimizer step in this batch: mid-accumulation
            return
        self._seen_step = step
        signum = self._stop_signal
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
        loop = trainer.fit_loop
        if (0 <= loop.max_steps <= trainer.global_step
                or 0 <= loop.max_epochs <= loop.epoch_progress.current.processed or trainer.should_stop):
            self.save(trainer)

    def save(self, trainer: L.Trainer) -> None:
        """Write ``last.ckpt``, unless it already holds this step."""
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
        loop = getattr(self, "_quieted_loop", None)
        if loop is not None:
            del loop._broadcast_sigterm_tensor  # the class's method again
            self._quieted_loop = None


class EMA(L.Callback):
    """An exponential moving average of the weights, updated after every optimizer step; validation,
    test, sampling and saved checkpoints use the average.

    The first update, after step 1, copies the weights; the update after optimizer step ``t + 1`` then uses
    the decay ``min(decay, (1 + t) / (10 + t))``, ``t`` being the number of updates so far. This warm-up,
    rather than bias correction, makes a short run's average span about its last ``t / 9`` steps instead of
    nearly all of them, so it is not dragged back towards the run's first weights. ``t`` is taken from the
    trainer's step count (one update per optimizer step), so no device value is ever waited for and a resumed
    run continues the ramp exactly. The average is kept in float32 whatever the training precision, and
    updated with torch's multi-tensor EMA. Checkpoints hold the average as their weights and the raw weights
    under ``current_model_state``, as Lightning's ``WeightAveraging`` writes them.

    Args:
        decay: Weight of the previous average at each update once warmed up; the average then spans
            about 1 / (1 - decay) steps.
    """

    def __init__(self, decay: float = 0.999):
        if not 0 <= decay <= 1:
            raise UserError(f"EMA decay must be in [0, 1], got {decay}.")
        self.decay = decay
        self.average: list[torch.Tensor] | None = None  # float32, in the order of the module's parameters
        self._updated_at_step = -1

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.average = None  # made by the first update of this fit, or restored from the checkpoint resumed
        self._updated_at_step = -1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any, **kwargs: Any) -> None:
        """Update after each optimizer step (not after a micro-batch that only accumulated)."""
        step = trainer.global_step
        if step == self._updated_at_step:
            return
        self._updated_at_step = step
        weights = [p.detach().float() for p in pl_module.parameters()]  # no copy when they are float32
        updates_so_far = step - 1
        if self.average is None or updates_so_far == 0:
            self.average = [w.clone() for w in weights]
        else:
            t = updates_so_far
            get_ema_multi_avg_fn(min(self.decay, (1 + t) / (10 + t)))(self.average, weights, None)

    def swap(self, pl_module: L.LightningModule) -> None:
        """Exchange the module's weights and the average."""
        with torch.no_grad():
            for p, a in zip(pl_module.parameters(), self.average):
                current = p.detach().float().clone()
                p.copy_(a)
                a.copy_(current)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.average is not None and trainer.state.fn == "fit":
            self.swap(pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.average is not None and trainer.state.fn == "fit":
            self.swap(pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Training is over: from here on (sampling, scoring, the run's last save) the module is the average."""
        if self.average is not None:
            with torch.no_grad():
                for p, a in zip(pl_module.parameters(), self.average):
                    p.copy_(a)
            self.average = None

    def state_dict(self) -> dict[str, Any]:
        return {"latest_update_step": max(self._updated_at_step, 0)}

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Save the average as the checkpoint's weights, and the raw weights beside them to resume from."""
        if self.average is None:
            return
        names = [name for name, _ in pl_module.named_parameters()]
        raw = checkpoint["state_dict"]
        checkpoint["current_model_state"] = raw
        averaged = dict(raw)
        for name, a in zip(names, self.average):
            averaged[name] = a.to(raw[name].dtype, copy=True)
        checkpoint["state_dict"] = averaged
        checkpoint["averaging_state"] = {"n_averaged": torch.tensor(trainer.global_step)}

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Resuming a fit: the average and the raw weights come back. Validate, test and predict score the
        checkpoint's weights, which already are the average: nothing to restore."""
        if trainer.state.fn != "fit":
            return
        if "current_model_state" in checkpoint:
            params = dict(pl_module.named_parameters())
            device = next(iter(params.values())).device
            self.average = [checkpoint["state_dict"][name].to(device, torch.float32, copy=True) for name in params]
            pl_module.load_state_dict(checkpoint["current_model_state"])
            self._updated_at_step = checkpoint.get("global_step", -1)
        # a checkpoint without an average: the next update starts it from the weights


class SampleNames(L.Callback):
    """Invent names with the model: at the end of training (printed, saved to samples.txt, logged), and
    every ``every_n_steps`` optimizer steps during training when set (logged). Only global rank 0 samples.

    Args:
        num_samples: How many names to generate each time.
        temperature: Softmax temperature, positive; lower is more conservative.
        top_k: Draw only among the k most likely characters; all when unset.
        prefix: Every name starts with these characters.
        every_n_steps: Also sample every this many optimizer steps during training; 0 turns it off.
        seed: Seed of the names' random draws. Unset, the end-of-training names continue torch's global
            random state, as the seed script does; rounds during training always use their own generator
            (seeded with seed + step), so watching never changes the training.
        top_p: Draw only among the fewest likeliest characters whose probability reaches this, in (0, 1];
            all when unset.
    """

    def __init__(self, num_samples: int = 20, temperature: float = 0.5, top_k: int | None = None, prefix: str = "",
                 every_n_steps: int = 0, seed: int | None = None, top_p: float | None = None):
        if num_samples < 1:
            raise UserError(f"num_samples must be a positive integer, got {num_samples}.")
        if not temperature > 0:
            raise UserError(f"temperature must be positive, got {temperature}.")
        if top_k is not None and top_k < 1:
            raise UserError(f"top_k must be a positive integer, got {top_k}.")
        if top_p is not None and not 0 < top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {top_p}.")
        if every_n_steps < 0:
            raise UserError(f"every_n_steps must be zero or more, got {every_n_steps}.")
        self.num_samples = num_samples
        self.temperature = temperature
        self.top_k = top_k
        self.top_p = top_p
        self.prefix = prefix
        self.every_n_steps = every_n_steps
        self.seed = seed
        self._sampled_at_step = -1

    def sample(self, pl_module: L.LightningModule, generator: torch.Generator | None) -> list[str]:
        return pl_module.sample(self.num_samples, self.temperature, self.top_k, self.prefix, generator, top_p=self.top_p)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sampled_at_step = trainer.global_step  # a micro-batch that leaves the step count here ends no step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        step = trainer.global_step
        if not self.every_n_steps or step % self.every_n_steps or step == self._sampled_at_step:
            return  # not a sampling step, or a micro-batch that did not end this optimizer step
        self._sampled_at_step = step
        if trainer.is_global_zero:
            generator = torch.Generator(pl_module.device).manual_seed((self.seed or 0) + step)
            log_samples(trainer, self.sample(pl_module, generator), step)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        log_dir = trainer.log_dir  # a broadcast under DDP: every process must ask, or rank 0 waits forever
        if not trainer.is_global_zero:
            return
        generator = None if self.seed is None else torch.Generator(pl_module.device).manual_seed(self.seed)
        names = self.sample(pl_module, generator)
        print("\n".join(f"sample {i:2d}: {name}" for i, name in enumerate(names, 1)))
        if log_dir is not None:
            path = Path(log_dir) / "samples.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("\n".join(names) + "\n", encoding="utf-8")
        log_samples(trainer, names, trainer.global_step)
        shares = report_novelty(trainer, names, "samples")
        if shares is not None:
            for logger in trainer.loggers:
                logger.log_metrics({f"samples/{k}": v for k, v in shares.items()}, step=trainer.global_step)


def report_novelty(trainer: L.Trainer, names: list[str], what: str) -> dict[str, float] | None:
    """Print which shares of ``names`` are training names, held-out names or new, and return them
    (None when the data module does not know its names)."""
    datamodule = trainer.datamodule
    if datamodule is None or not hasattr(datamodule, "known_names"):
        return None
    shares = novelty(names, *datamodule.known_names(names))
    print(f"{what}: {shares['new']:.0%} new, {shares['train']:.0%} training names, "
          f"{shares['held_out']:.0%} held-out names")
    return shares


def log_samples(trainer: L.Trainer, names: list[str], step: int) -> None:
    """Record a round of names with every logger: TensorBoard text, a ``samples.csv`` beside a CSV log, or ``log_text``."""
    for logger in trainer.loggers:
        if hasattr(logger, "log_text"):
            logger.log_text(key="samples", columns=["step", "name"], data=[[step, n] for n in names], step=step)
        elif hasattr(logger.experiment, "add_text"):
            logger.experiment.add_text("samples", "\n\n".join(names), step)
        elif getattr(logger, "log_dir", None):
            path = Path(logger.log_dir) / "samples.csv"
            path.parent.mkdir(parents=True, exist_ok=True)
            new_file = not path.exists()
            with path.open("a", newline="", encoding="utf-8") as f:
                writer = csv.writer(f)
                if new_file:
                    writer.writerow(["step", "name"])
                writer.writerows([step, n] for n in names)


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
    step) instead of after every step, which at batch 1 costs as much as a fifth of the step.

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


class WriteNames(BasePredictionWriter):
    """Write the names made by ``predict``, one per line, and print how many are new.

    Args:
        output: File to write; a relative path is taken inside the run's log directory.
    """

    def __init__(self, output: str = "predictions.txt"):
        super().__init__(write_interval="epoch")
        self.output = output

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        """Gather every process's names on rank 0 (in rank order), which writes the one file."""
        names = [name for batch in predictions for name in batch]
        log_dir = trainer.log_dir  # a broadcast under DDP: every process asks
        if trainer.world_size > 1:
            gathered = [None] * trainer.world_size if trainer.is_global_zero else None
            torch.distributed.gather_object(names, gathered, dst=0)
            if not trainer.is_global_zero:
                return
            names = [name for part in gathered for name in part]
        path = Path(self.output)
        if not path.is_absolute():
            path = Path(log_dir or ".") / path
        atomic_write(path, lambda f: f.write("".join(f"{name}\n" for name in names).encode("utf-8")))  # whole or absent
        print(f"wrote {len(names)} names to {path}")
        report_novelty(trainer, names, "predictions")
