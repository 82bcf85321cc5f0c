"""The training loss of every optimizer step, kept on the device until the host waits anyway. Torch only.

Under DDP and gradient accumulation a step's loss arrives in parts, one per process and micro-batch (each part
is that micro-batch's NLL sum over the step's target-token count, counted on the host). ``StepLosses`` adds up
a process's parts of the step in progress, and keeps each finished step's value, unchecked, until a step where
the host waits anyway (a logging step, or a checkpoint being written): there the values are summed over the
processes and checked, so a non-finite loss is named by its first step and no other step waits for the device
or another process.
"""

from __future__ import annotations

import torch

JOIN_EVERY = 1024  # unchecked values joined into one tensor on the device: a run that never logs holds one


class StepLosses:
    """This process's part of each optimizer step's training loss (the whole loss on one process)."""

    def __init__(self):
        self.in_progress: torch.Tensor | None = None  # this process's part of the step being accumulated
        self.unchecked: list[torch.Tensor] = []
        self.first_unchecked_step = 0  # the 1-based optimizer step of unchecked[0]
        self.latest: torch.Tensor | None = None  # the latest finished step's part

    def start_fit(self) -> None:
        """Forget the parts of an unfinished step and the unchecked values of an earlier fit."""
        self.in_progress, self.unchecked = None, []

    def add_part(self, part: torch.Tensor) -> None:
        """Add a micro-batch's part to the step in progress."""
        self.in_progress = part if self.in_progress is None else self.in_progress + part

    def finish_step(self) -> torch.Tensor:
        """The part of the step in progress, once its last micro-batch is added; the next part starts a new step."""
        part, self.in_progress = self.in_progress, None
        return part

    def record(self, step: int, part: torch.Tensor) -> None:
        """Keep the loss part of optimizer step ``step`` (1-based) until the next check."""
        self.latest = part
        if not self.unchecked:
            self.first_unchecked_step = step
        self.unchecked.append(part)
        if len(self.unchecked) >= JOIN_EVERY:
            self.unchecked = [self.joined()]

    def joined(self) -> torch.Tensor:
        """The unchecked parts as one tensor on the device."""
        return torch.cat([part.reshape(-1) for part in self.unchecked])

    def take_unchecked(self, device: torch.device) -> torch.Tensor:
        """The unchecked parts, oldest first (steps ``first_unchecked_step`` on), as one tensor; they count as
        checked from here on."""
        parts = self.joined() if self.unchecked else torch.zeros(0, device=device)
        self.unchecked = []
        return parts


def first_non_finite(losses: torch.Tensor) -> int | None:
    """The index of the first NaN or infinite value of ``losses`` (1-D), else None (a host sync)."""
    bad = (~torch.isfinite(losses)).nonzero()
    return int(bad[0]) if len(bad) else None
