"""A callback that records what one process trained on, reported and communicated, for tests/test_ddp.py.

Importing this module wraps ``torch.distributed``'s collectives so that each call is counted (DDP's own
gradient all-reduce runs in C++ and is not seen, as intended: it is the one communication a step needs).
"""

import json
from collections import Counter
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist

COLLECTIVES = ("all_reduce", "barrier", "broadcast", "broadcast_object_list", "all_gather", "all_gather_object",
               "all_gather_into_tensor", "gather", "gather_object", "reduce", "reduce_scatter", "scatter",
               "scatter_object_list", "all_to_all", "monitored_barrier")
RAW = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}
CALLS: Counter = Counter()


def counted(name):
    def call(*args, **kwargs):
        CALLS[name] += 1
        return RAW[name](*args, **kwargs)
    return call


for _name in RAW:
    setattr(dist, _name, counted(_name))


class RecordRun(L.Callback):
    """Per training step: the names in this process's batch, the global batch loss, and the collectives
    made from the step's start to the next step's start; then val/loss, and which token store the process maps.

    With ``out_dir`` set, the record is written to ``rank{R}.json`` there after training and after
    every validation.
    """

    def __init__(self, out_dir: str | None = None):
        self.out_dir = out_dir
        self.names: list[list[str]] = []
        self.losses: list[float] = []
        self.val_losses: list[float] = []
        self.collectives: list[dict[str, int]] = []
        self.logging_steps: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.close_step()
        self.names.append([pl_module.tokenizer.decode(row.tolist()) for row in batch.inputs])
        CALLS.clear()
        self.counting = True

    def close_step(self):
        if getattr(self, "counting", False):
            self.collectives.append(dict(CALLS))
            self.counting = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = pl_module.step_losses.latest.detach().clone().reshape(1)
        if trainer.world_size > 1:
            RAW["all_reduce"](loss)  # not counted: the record's own
        self.losses.append(float(loss))
        every = trainer.log_every_n_steps
        if every and trainer.global_step % every == 0:
            self.logging_steps.append(trainer.global_step)

    def on_train_end(self, trainer, pl_module):
        self.close_step()

    def on_validation_end(self, trainer, pl_module):
        self.val_losses.append(float(trainer.callback_metrics["val/loss"]))
        self.dump(trainer)

    def on_fit_end(self, trainer, pl_module):
        self.dump(trainer)

    def dump(self, trainer):
        if self.out_dir is not None:
            record = {"world_size": trainer.world_size, "names": self.names, "losses": self.losses,
                      "val_losses": self.val_losses, "node_rank": trainer.node_rank,
                      "collectives": self.collectives, "logging_steps": self.logging_steps,
                      "store": str(trainer.datamodule.split.store_path), "maps_store": maps(trainer.datamodule.split.store_path)}
            Path(self.out_dir, f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def maps(path: Path) -> bool:
    """Whether this process has ``path`` memory-mapped."""
    return str(path) in Path("/proc/self/maps").read_text()


class FailOnRank(L.Callback):
    """Stops one process with a user error at the start of a training step, as a file only it cannot read would."""

    def __init__(self, rank: int = 1, step: int = 2):
        self.rank, self.step = rank, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == self.rank and trainer.global_step + 1 == self.step:
            from microgpt.errors import UserError

            raise UserError(f"process {self.rank} cannot go on (a test's failure)")


class DrawPerRank(L.Callback):
    """Makes the processes' random states differ, as rank-dependent sampling or augmentation would: process r
    draws 100 (r + 1) numbers before a fresh run's first step (a resumed run gets its states from the checkpoint)."""

    def on_fit_start(self, trainer, pl_module):
        if trainer.ckpt_path is None:
            torch.rand(100 * (trainer.global_rank + 1))
