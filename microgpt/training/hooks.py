"""Lightning's hook calls, made cheap where a hook does nothing.

Every training step, Lightning calls six hooks on every callback and about fifteen on the LightningModule,
each by name, each inside a profiler context: with the recipes' eight callbacks a sizeable share of the seed
model's step (``docs/speed.md``), though almost none of these hooks does anything.

Lightning 2.6 passes by a hook attribute that is not callable (``lightning/pytorch/trainer/call.py``), which it
does not document; ``microgpt.training.lightning_checks.skips_none_hooks`` checks it once per process. Where it holds,
``skip_idle_hooks`` sets to ``None``, on the instances, the per-batch hooks a callback or the module leaves as
Lightning's no-op; a hook that a class overrides, or that returns something Lightning uses, is never touched.
Where it does not, every hook is called as Lightning ships. ``QuietProfiler`` is Lightning's default
``PassThroughProfiler`` with a context that costs nothing to enter.
"""

from __future__ import annotations

import contextlib

import lightning as L
from lightning.pytorch.profilers import PassThroughProfiler

from microgpt.training.lightning_checks import skips_none_hooks

# Called on every batch, return nothing, and Lightning ignores what they return.
CALLBACK_BATCH_HOOKS = (
    "on_train_batch_start", "on_train_batch_end", "on_before_backward", "on_after_backward",
    "on_before_optimizer_step", "on_before_zero_grad",
    "on_validation_batch_start", "on_validation_batch_end", "on_test_batch_start", "on_test_batch_end",
    "on_predict_batch_start", "on_predict_batch_end",
)
# The module's training hooks (the evaluation loops read the signatures of its evaluation hooks, so those stay).
# ``on_train_batch_start`` may return -1 to end the epoch; Lightning's no-op, like ``None``, returns nothing.
MODULE_BATCH_HOOKS = ("on_train_batch_start", "on_train_batch_end", "on_before_backward", "on_after_backward",
                      "on_before_zero_grad")


def idle_hooks(obj: object, base: type, names: tuple[str, ...]) -> list[str]:
    """The hooks in ``names`` that ``obj``'s class inherits unchanged from ``base`` (and that are not already off)."""
    return [name for name in names if getattr(type(obj), name, None) is getattr(base, name)
            and name not in vars(obj)]


def skip_idle_hooks(trainer: L.Trainer, module: L.LightningModule | None = None) -> bool:
    """Turn off, for Lightning's hook loop, the per-batch hooks that the trainer's callbacks and ``module``
    inherit as no-ops, if this Lightning passes by a ``None`` hook; whether it did. The training itself is
    unchanged: only calls that did nothing are skipped."""
    if not skips_none_hooks():
        return False
    for callback in trainer.callbacks:
        for name in idle_hooks(callback, L.Callback, CALLBACK_BATCH_HOOKS):
            setattr(callback, name, None)
    if module is not None:
        for name in idle_hooks(module, L.LightningModule, MODULE_BATCH_HOOKS):
            setattr(module, name, None)
    return True


class QuietProfiler(PassThroughProfiler):
    """Lightning's default profiler, which records nothing, with one shared context instead of a new
    generator per hook call (some thirty a step)."""

    _context = contextlib.nullcontext()

    def profile(self, action_name: str) -> contextlib.AbstractContextManager:
        return self._context
