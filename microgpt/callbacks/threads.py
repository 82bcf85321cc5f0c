"""``Threads``: torch's CPU threads for the run, chosen once the model and the batch are known (``microgpt.threads``)."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from microgpt.threads import Start, use_threads


class Threads(L.Callback):
    """Sets torch's intra-op threads from the model's width, the batch (the training batch for ``fit``, the
    evaluation batch otherwise) and the cores each process of the run may use, unless the user set them
    (``OMP_NUM_THREADS``, or ``torch.set_num_threads`` before the run), and logs the choice in one line."""

    def __init__(self) -> None:
        # before Lightning's launcher, which sets OMP_NUM_THREADS and torch's threads of its own for DDP
        self.start = Start.now()
        self.chosen = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.chosen:  # once per process: a fit's closing validation keeps the fit's choice
            return
        self.chosen = True
        data = trainer.datamodule
        if trainer.strategy.root_device.type != "cpu" or data is None:
            return  # the steps run on an accelerator (the CPU's threads only feed it), or the batch is unknown
        batch = data.batch_size if stage == "fit" else data.eval_batch_size
        processes = trainer.num_devices  # the processes of this run on this machine
        rank_zero_info(use_threads(-(-batch // processes) * data.block_size, pl_module, processes, self.start))
