"""The moving average of the weights."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch.optim.swa_utils import get_ema_multi_avg_fn

from microgpt.errors import UserError
from microgpt.training.steps import ends_optimizer_step


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

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Update after each optimizer step (not after a micro-batch that only accumulated)."""
        if not ends_optimizer_step(trainer, batch_idx):
            return
        self._updated_at_step = trainer.global_step
        weights = [p.detach().float() for p in pl_module.parameters()]  # no copy when they are float32
        updates_so_far = trainer.global_step - 1
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
