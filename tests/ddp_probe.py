"""A callback that records what one process trained on and reported, for tests/test_ddp.py."""

import json
from pathlib import Path

import lightning as L


class RecordRun(L.Callback):
    """Per training step: the names in this process's batch and the global batch loss; then val/loss,
    and which token store the process maps.

    With ``out_dir`` set, the record is written to ``rank{R}.json`` there after training and after
    every validation.
    """

    def __init__(self, out_dir: str | None = None):
        self.out_dir = out_dir
        self.names: list[list[str]] = []
        self.losses: list[float] = []
        self.val_losses: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        inputs, _ = batch
        self.names.append([pl_module.tokenizer.decode(row.tolist()) for row in inputs])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(pl_module.last_train_loss))

    def on_validation_end(self, trainer, pl_module):
        self.val_losses.append(float(trainer.callback_metrics["val/loss"]))
        self.dump(trainer)

    def on_fit_end(self, trainer, pl_module):
        self.dump(trainer)

    def dump(self, trainer):
        if self.out_dir is not None:
            record = {"world_size": trainer.world_size, "names": self.names, "losses": self.losses,
                      "val_losses": self.val_losses, "node_rank": trainer.node_rank,
                      "store": str(trainer.datamodule.store_path), "maps_store": maps(trainer.datamodule.store_path)}
            Path(self.out_dir, f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def maps(path: Path) -> bool:
    """Whether this process has ``path`` memory-mapped."""
    return str(path) in Path("/proc/self/maps").read_text()
