"""Muon and AdamW stepped as one optimizer, for Lightning's automatic optimization (which takes one)."""

from __future__ import annotations

from typing import Any

import torch


class MuonWithAdamW(torch.optim.Optimizer):
    """Steps a ``torch.optim.Muon`` and a ``torch.optim.AdamW`` (over disjoint parameters) together.

    Its ``param_groups`` are the very group dicts of the two (Muon's first) and both keep their per-parameter
    state in its ``state``, so a learning-rate scheduler, ``LearningRateMonitor``, gradient clipping and
    Lightning's checkpointing see one ordinary optimizer; its ``state_dict`` has the usual layout.
    """

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer):
        self.muon, self.adamw = muon, adamw
        super().__init__([*muon.param_groups, *adamw.param_groups], {})
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
