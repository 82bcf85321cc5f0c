"""The training loss of every optimizer step, kept on the device until the host waits anyway.

Under DDP and gradient accumulation a step's loss arrives in parts, one per process and micro-batch (each part
is that micro-batch's NLL sum over the step's target-token count, counted on the host). ``StepLosses`` adds up
a process's parts of the step in progress, and keeps each finished step's value, unchecked, until a step where
the host waits anyway (a logging step, or a checkpoint being written): there the values are summed over the
processes and checked, so a non-finite loss is named by its first step and no other step waits for the device
or another process.
"""

from __future__ import annotations

import lightning as L
import torch

from microgpt.errors import UserError
from microgpt.training.steps import ends_optimizer_step, logs_at

JOIN_EVERY = 1024  # unchecked values joined into one tensor on the device: a run that never logs holds one


class NonFiniteLoss(UserError):
    """The training loss became NaN or infinite; the run stops without saving."""


class StepLosses:
    """This process's part of each optimizer step's training loss (the whole loss on one process)."""

    def __init__(self):
        self.in_progress: torch.Tensor | None = None  # this process's part of the step being accumulated
        self.unchecked: list[torch.Tensor] = []
        self.lrs: list[float] = []  # the learning rate of each unchecked step
        self.first_unchecked_step = 0  # the 1-based optimizer step of unchecked[0]
        self.latest: torch.Tensor | None = None  # the latest finished step's part

    def start_fit(self) -> None:
        """Forget the parts of an unfinished step and the unchecked values of an earlier fit."""
        self.in_progress, self.unchecked, self.lrs = None, [], []

    def add(self, trainer: L.Trainer, batch_idx: int, part: torch.Tensor, lr: float) -> torch.Tensor | None:
        """Add a micro-batch's part (trained at learning rate ``lr``); when the batch ends an optimizer step,
        keep the step's loss, and on logging steps check the losses kept so far and return the step's loss
        (summed over the processes) for the loggers."""
        self.in_progress = part if self.in_progress is None else self.in_progress + part
        if not ends_optimizer_step(trainer, batch_idx):
            return None
        step = trainer.global_step + 1
        self.record(step, self.in_progress, lr)
        self.in_progress = None
        return self.check(trainer)[-1] if logs_at(trainer, step) else None

    def record(self, step: int, part: torch.Tensor, lr: float) -> None:
        """Keep the loss part of optimizer step ``step`` (1-based) until the next check."""
        self.latest = part
        if not self.unchecked:
            self.first_unchecked_step = step
            self.lrs = []
        self.unchecked.append(part)
        self.lrs.append(lr)
        if len(self.unchecked) >= JOIN_EVERY:
            self.unchecked = [self.joined()]

    def joined(self) -> torch.Tensor:
        """The unchecked parts as one tensor on the device."""
        return torch.cat([part.reshape(-1) for part in self.unchecked])

    def check(self, trainer: L.Trainer) -> torch.Tensor:
        """The losses of the steps since the last check, summed over processes (a collective under DDP: every
        process checks at the same steps); raises ``NonFiniteLoss`` naming the first step whose loss was NaN
        or infinite."""
        losses = self.joined() if self.unchecked else torch.zeros(0, device=trainer.strategy.root_device)
        self.unchecked = []
        if trainer.world_size > 1:
            losses = trainer.strategy.reduce(losses, reduce_op="sum")
        bad = (~torch.isfinite(losses)).nonzero()  # a host sync
        if len(bad):
            i = int(bad[0])
            raise NonFiniteLoss(f"the training loss is {float(losses[i])} at step {self.first_unchecked_step + i} "
                                f"(lr {self.lrs[i]:.6g}); stopped without saving, so the last checkpoint is the "
                                "last good one.")
        return losses

    def summed_latest(self, trainer: L.Trainer) -> float:
        """The latest step's loss over all processes (a collective under DDP: every process asks)."""
        loss = self.latest.reshape(1)
        if trainer.world_size > 1:
            loss = trainer.strategy.reduce(loss, reduce_op="sum")
        return float(loss[0])
