"""The recipes' optimizer choices beyond torch's own: Muon with AdamW as one optimizer, and the warmup and
cosine learning-rate schedule. A recipe names them by class path under ``model.optimizer`` and
``model.lr_scheduler``; ``MicroGPT.configure_optimizers`` calls them with its parameter groups and the run's
length."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from microgpt.checkpoints.io import load_checkpoint
from microgpt.errors import UserError


def parameter_groups(model: torch.nn.Module) -> list[dict[str, Any]]:
    """Two groups of ``model``'s parameters for any torch optimizer: the linear layers' weight matrices, decayed
    with the optimizer's ``weight_decay``, and the rest (embeddings, biases) never decayed. Each group carries its
    parameters' names under ``param_names``, torch's own key, by which ``MuonWithAdamW`` picks its matrices."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay = {"params": [], "param_names": []}, {"params": [], "param_names": [], "weight_decay": 0.0}
    for name, p in model.named_parameters():
        group = decay if p.dim() >= 2 and id(p) not in embeddings else no_decay
        group["params"].append(p)
        group["param_names"].append(name)
    return [decay, no_decay]


def check_resumable(path: str, optimizer: torch.optim.Optimizer) -> None:
    """Refuse, in one line, to resume the checkpoint at ``path`` with an optimizer whose parameter groups differ
    from those its optimizer state was saved with (another optimizer than the run's)."""
    saved = [len(g["params"]) for state in load_checkpoint(path).get("optimizer_states", [])[:1]
             for g in state["param_groups"]]
    groups = [len(g["params"]) for g in optimizer.param_groups]
    if saved and saved != groups:
        raise UserError(f"{path}: its optimizer state holds parameter groups of {saved} parameters, and this run's "
                        f"{type(optimizer).__name__} has {groups}; resume with the optimizer the run was trained "
                        "with (--model.optimizer).")


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon (``torch.optim.Muon``, torch 2.9 or later) for the 2-D parameters whose names match ``muon_params``
    (the blocks' weight matrices: not the embeddings or the output head), AdamW for every other parameter,
    stepped as one optimizer, which is what Lightning's automatic optimization takes.

    Its ``param_groups`` are the very group dicts of the two (Muon's first, named ``muon``, ``adamw`` and
    ``adamw-no_decay`` for ``LearningRateMonitor``) and both keep their state in its ``state``, so a schedule,
    gradient clipping and Lightning's checkpointing see one ordinary optimizer.

    Args:
        params: Parameter groups, as ``parameter_groups`` makes them (with ``param_names``).
        lr: AdamW's peak learning rate.
        betas: AdamW's beta1 and beta2.
        eps: AdamW's epsilon.
        weight_decay: AdamW's decay of the decayed group (the output head).
        muon_lr: Muon's peak learning rate (scaled by sqrt(rows / columns) for matrices taller than wide).
        muon_momentum: Muon's momentum (Nesterov), in [0, 1).
        muon_weight_decay: Muon's decoupled weight decay.
        muon_ns_steps: Newton–Schulz iterations that orthogonalise each update (fewer are cheaper and rougher).
        muon_params: Regular expression matched against the start of a parameter's name: Muon steps the 2-D
            parameters that match.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01, muon_lr: float = 0.02, muon_momentum: float = 0.95,
                 muon_weight_decay: float = 0.0, muon_ns_steps: int = 5, muon_params: str = r"blocks\."):
        for name, value, ok, words in (("muon_lr", muon_lr, muon_lr > 0, "positive"),
                                       ("muon_momentum", muon_momentum, 0 <= muon_momentum < 1, "in [0, 1)"),
                                       ("muon_weight_decay", muon_weight_decay, muon_weight_decay >= 0, "zero or more"),
                                       ("muon_ns_steps", muon_ns_steps, muon_ns_steps >= 1, "a positive integer")):
            if not ok:
                raise UserError(f"{name} must be {words}, got {value}.")
        muon_type = getattr(torch.optim, "Muon", None)
        if muon_type is None:
            raise UserError(f"MuonWithAdamW needs torch.optim.Muon, which torch {torch.__version__} lacks (torch 2.9 "
                            "and later have it); upgrade torch or use --model.optimizer torch.optim.AdamW.")
        matrices, adamw_groups = [], []
        for group in params:
            names = group.get("param_names") or [""] * len(group["params"])
            keep = [p for p, n in zip(group["params"], names) if not (p.dim() == 2 and re.match(muon_params, n))]
            matrices += [p for p in group["params"] if not any(p is k for k in keep)]
            adamw_groups.append({**{k: v for k, v in group.items() if k != "param_names"}, "params": keep})
        for group, name in zip(adamw_groups, ("adamw", "adamw-no_decay")):
            group.setdefault("name", name)
        self.muon = muon_type([{"params": matrices, "name": "muon"}], lr=muon_lr, momentum=muon_momentum,
                              weight_decay=muon_weight_decay, nesterov=True, ns_steps=muon_ns_steps)
        self.adamw = torch.optim.AdamW(adamw_groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__([*self.muon.param_groups, *self.adamw.param_groups], {})
        self.share_groups_and_state()

    def share_groups_and_state(self) -> None:
        """Point the two optimizers at this one's group dicts and state (after building or loading)."""
        muon_groups = len(self.muon.param_groups)
        self.muon.param_groups = self.param_groups[:muon_groups]
        self.adamw.param_groups = self.param_groups[muon_groups:]
        self.muon.state = self.adamw.state = self.state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # load_state_dict ends here with new group dicts and a new state
        super().__setstate__(state)
        if "muon" in self.__dict__:
            self.share_groups_and_state()

    @torch.no_grad()
    def step(self, closure=None):
        """Run the closure once (Lightning's forward and backward), then step Muon and AdamW."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss


# a schedule class and its settings: like Lightning's LRSchedulerCallable, and also given the run's optimizer steps
RunScheduleCallable = Callable[[torch.optim.Optimizer, int], LRScheduler]
SETTINGS = ("lr_lambdas", "total_steps", "warmup_steps", "min_lr_ratio")


class WarmupCosine(LambdaLR):
    """Every group's learning rate, stepped once per optimizer step: a linear warmup from
    ``1 / warmup_steps`` of the peak (never 0) to the peak, then a cosine decay to ``min_lr_ratio`` of it at
    ``total_steps``, the run's optimizer steps (``configure_optimizers`` passes Lightning's estimate).

    Args:
        optimizer: The optimizer whose groups' learning rates are the peaks.
        total_steps: Optimizer steps of the whole run.
        warmup_steps: Optimizer steps of linear warmup, zero or more.
        min_lr_ratio: The fraction of the peak the decay ends at, in [0, 1].
    """

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0,
                 min_lr_ratio: float = 0.0):
        if warmup_steps < 0:
            raise UserError(f"warmup_steps must be zero or more, got {warmup_steps}.")
        if not 0 <= min_lr_ratio <= 1:
            raise UserError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}.")
        self.total_steps, self.warmup_steps, self.min_lr_ratio = total_steps, warmup_steps, min_lr_ratio
        super().__init__(optimizer, self.factor)

    def factor(self, step: int) -> float:
        """The multiplier of the peak learning rate at optimizer step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * cosine

    def state_dict(self) -> dict[str, Any]:
        """The schedule's position only: its settings come from the recipe of the run that loads it."""
        return {k: v for k, v in super().state_dict().items() if k not in SETTINGS}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict({**state_dict, "lr_lambdas": [None]})
