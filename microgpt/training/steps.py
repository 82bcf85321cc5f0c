"""When an optimizer step ends, and which steps log: the one answer the module and the callbacks share.

With ``accumulate_grad_batches`` N, Lightning steps the optimizer after every N-th batch of an epoch and after
the epoch's last batch, however few batches that step has accumulated. Hooks that act once per optimizer step
(saving, averaging, sampling, logging) ask ``ends_optimizer_step`` in their batch-end hook, or
``starts_optimizer_step`` in their batch-start hook.
"""

from __future__ import annotations

import lightning as L


def ends_optimizer_step(trainer: L.Trainer, batch_idx: int) -> bool:
    """Whether the optimizer steps after batch ``batch_idx`` of the epoch."""
    return (batch_idx + 1) % trainer.accumulate_grad_batches == 0 or batch_idx + 1 == trainer.num_training_batches


def starts_optimizer_step(trainer: L.Trainer, batch_idx: int) -> bool:
    """Whether batch ``batch_idx`` of the epoch is the first of an optimizer step."""
    return batch_idx % trainer.accumulate_grad_batches == 0


def logs_at(trainer: L.Trainer, step: int) -> bool:
    """Whether loggers write at optimizer step ``step`` (1-based): every ``log_every_n_steps``-th; the steps where
    every process may wait for the others anyway."""
    every = trainer.log_every_n_steps
    return every > 0 and step % every == 0


def ended_the_run(trainer: L.Trainer, batch_idx: int) -> bool:
    """At the end of batch ``batch_idx``: whether it ended the run's last optimizer step (``max_steps``, or the
    last batch of the last epoch of ``max_epochs``)."""
    if not ends_optimizer_step(trainer, batch_idx):
        return False
    last_epoch = 0 <= trainer.max_epochs <= trainer.current_epoch + 1 and batch_idx + 1 == trainer.num_training_batches
    return 0 <= trainer.max_steps <= trainer.global_step or last_epoch
