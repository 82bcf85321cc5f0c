"""The random state that dropout and sampling draw from, saved in a checkpoint and restored from it. Torch only.

A resumed run draws exactly what the uninterrupted run drew: with as many processes as saved it, each process
gets its own state back; otherwise every process gets rank 0's (dropout then draws anew).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def saved_random_state(world_size: int, device: torch.device,
                       all_gather: Callable[[torch.Tensor], torch.Tensor]) -> dict:
    """This process's random state, and under several processes every process's (``all_gather``, a collective
    that every process calls, stacks a tensor of each rank's in rank order)."""
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    if world_size > 1:
        rng["torch_per_rank"] = gathered(torch.get_rng_state(), device, all_gather)
        if device.type == "cuda":
            rng["cuda_per_rank"] = gathered(torch.cuda.get_rng_state(device), device, all_gather)
    return rng


def gathered(state: torch.Tensor, device: torch.device,
             all_gather: Callable[[torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
    """Every process's ``state`` (a byte tensor), in rank order, on the CPU, each in a storage of its own."""
    return [s.clone() for s in all_gather(state.to(device)).cpu()]


def restore_random_state(rng: dict, world_size: int, rank: int, device: torch.device) -> None:
    """Restore what ``saved_random_state`` saved: this process's own state when the run had as many processes,
    else rank 0's."""
    if world_size > 1 and len(rng.get("torch_per_rank", ())) == world_size:
        # a copy: the state must start its own storage (a view into a stacked tensor crashes torch)
        torch.set_rng_state(rng["torch_per_rank"][rank].clone())
        if "cuda_per_rank" in rng and device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda_per_rank"][rank].clone(), device)
        return
    if "torch" in rng:
        torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])
