"""Callbacks: inventing names with the model at the end of training."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

from microgpt.errors import UserError


class SampleNames(L.Callback):
    """Invent names with the trained model when training ends: print them, save them, log them.

    Args:
        num_samples: How many names to generate.
        temperature: Softmax temperature; lower is more conservative. Must be positive.
    """

    def __init__(self, num_samples: int = 20, temperature: float = 0.5):
        if num_samples < 1:
            raise UserError(f"num_samples must be a positive integer, got {num_samples}.")
        if not temperature > 0:
            raise UserError(f"temperature must be positive, got {temperature}.")
        self.num_samples = num_samples
        self.temperature = temperature

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        log_dir = trainer.log_dir  # a broadcast under DDP: every process must ask, or rank 0 waits forever
        if trainer.is_global_zero:
            self.sample(trainer, pl_module, log_dir)

    @rank_zero_only
    def sample(self, trainer: L.Trainer, pl_module: L.LightningModule, log_dir: str | None = None) -> list[str]:
        """Generate, print, save to ``samples.txt`` in ``log_dir``, and log to every logger."""
        was_training = pl_module.training
        pl_module.eval()
        tokenizer = pl_module.tokenizer
        ids = pl_module.gpt.generate(tokenizer.bos, self.num_samples, self.temperature)
        pl_module.train(was_training)
        names = [tokenizer.decode(s) for s in ids]
        lines = [f"sample {i:2d}: {name}" for i, name in enumerate(names, 1)]
        print("\n".join(lines))
        if log_dir is not None:
            path = Path(log_dir) / "samples.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("\n".join(names) + "\n", encoding="utf-8")
        for logger in trainer.loggers:
            text = "\n".join(names)
            if hasattr(logger, "log_text"):
                logger.log_text(key="samples", dataframe=None, columns=["name"], data=[[n] for n in names],
                                step=trainer.global_step)
            elif hasattr(logger.experiment, "add_text"):
                logger.experiment.add_text("samples", text, trainer.global_step)
        return names
