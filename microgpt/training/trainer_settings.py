"""Trainer settings microgpt refuses, checked once the trainer exists and before anything is written."""

from __future__ import annotations

import lightning as L

from microgpt.errors import UserError


def check_trainer(trainer: L.Trainer, stage: str = "fit") -> None:
    """Refuse, in one sentence naming the flag, a fit of no steps and weights kept in half precision."""
    if stage != "fit":
        return
    if trainer.max_steps == 0 or trainer.max_steps < -1:
        raise UserError(f"--trainer.max_steps must be a positive integer (or -1 for no limit), got {trainer.max_steps}.")
    precision = str(trainer.precision)
    if precision.endswith("-true") and precision not in ("32-true", "64-true"):
        mixed = precision.replace("-true", "-mixed")
        raise UserError(f"--trainer.precision {precision} would keep the weights and Adam's moments in "
                        f"{precision.split('-')[0]} bits, where a small model's updates round away; train with "
                        f"--trainer.precision {mixed} (float32 weights, half-precision matrix products).")
