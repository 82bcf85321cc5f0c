"""Writing the names ``predict`` makes."""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from microgpt.callbacks.sampling import report_novelty
from microgpt.files import atomic_write


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
