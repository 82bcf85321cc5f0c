"""Start-up checks of the Lightning behaviour that two of microgpt's shortcuts rely on, beyond its documented API.

* ``skips_none_hooks``: Lightning's hook calls pass by a hook attribute that is ``None``, so ``microgpt.training.hooks``
  may turn off the hooks that do nothing.
* ``sigterm_broadcast_is_the_flag_alone``: under DDP, the training loop's per-batch broadcast carries only rank
  0's "SIGTERM received" flag, so ``RunCheckpoint``, whose own handlers keep that flag down, may leave it out.

Each check runs Lightning's own code on a stand-in trainer, once per process, and answers False on any surprise
(a renamed function, a changed signature, another result); the shortcut is then left out and Lightning runs as
it ships. ``tests/test_hooks.py`` fails when a check answers False on the installed Lightning.
"""

from __future__ import annotations

import contextlib
import functools
from types import SimpleNamespace

import torch


class _Hooks:
    """A callback or module stand-in: one hook turned off, one that counts its calls."""

    def __init__(self):
        self.on_train_batch_end = None
        self.calls = 0
        self.state_key = "probe"
        self._current_fx_name = None

    def on_before_backward(self, *args) -> None:
        self.calls += 1


@functools.cache
def skips_none_hooks() -> bool:
    """Whether Lightning's callback and module hook calls pass by a hook that is ``None`` and still call the rest."""
    try:
        from lightning.pytorch.trainer import call
    except ImportError:
        return False
    callback, module = _Hooks(), _Hooks()
    trainer = SimpleNamespace(lightning_module=None, callbacks=[callback], profiler=_NoProfiler())
    try:
        call._call_callback_hooks(trainer, "on_train_batch_end")
        call._call_callback_hooks(trainer, "on_before_backward")
        skipped = call._call_lightning_module_hook(trainer, "on_train_batch_end", pl_module=module)
        call._call_lightning_module_hook(trainer, "on_before_backward", pl_module=module)
    except Exception:  # noqa: BLE001 (any surprise means: not the behaviour this check knows)
        return False
    return skipped is None and callback.calls == 1 and module.calls == 1


class _NoProfiler:
    def profile(self, action_name: str) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


@functools.cache
def sigterm_broadcast_is_the_flag_alone() -> bool:
    """Whether ``_TrainingEpochLoop._broadcast_sigterm_tensor`` makes exactly one collective, a broadcast from
    rank 0 of ``trainer.received_sigterm``, and raises Lightning's ``SIGTERMException`` only when it is set."""
    try:
        from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop
        from lightning.pytorch.utilities.exceptions import SIGTERMException
        method = _TrainingEpochLoop._broadcast_sigterm_tensor
        return ([broadcast_of(method, flag, SIGTERMException) for flag in (False, True)]
                == [([(0, 0)], False), ([(1, 0)], True)])
    except Exception:  # noqa: BLE001 (any surprise means: not the behaviour this check knows)
        return False


def broadcast_of(method, flag: bool, stop: type[Exception]) -> tuple[list, bool]:
    """The collectives ``method`` makes for a trainer whose SIGTERM flag is ``flag`` (with ``torch.distributed``'s
    functions replaced meanwhile by ones that record their calls), and whether it raised ``stop``."""
    sent = []
    loop = SimpleNamespace(trainer=SimpleNamespace(received_sigterm=flag,
                                                   strategy=SimpleNamespace(root_device=torch.device("cpu"))))
    dist = torch.distributed
    saved = {name: getattr(dist, name, None) for name in ("broadcast", "barrier", "all_reduce", "all_gather")}
    dist.broadcast = lambda tensor, src=0, *args, **kwargs: sent.append((int(tensor.item()), src))
    dist.barrier = lambda *args, **kwargs: None
    dist.all_reduce = dist.all_gather = lambda *args, **kwargs: sent.append("another collective")
    try:
        method(loop)
    except stop:
        return sent, True
    finally:
        for name, value in saved.items():
            setattr(dist, name, value)
    return sent, False
