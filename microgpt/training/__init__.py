"""Training: the LightningModule (``module.py``), its optimizers, and the bookkeeping of the step losses."""
