"""Whether this machine can put tensors on a torch device named by the user (``sample --device``)."""

from __future__ import annotations

import torch


def device_problem(device: str | torch.device) -> str | None:
    """Why this machine cannot hold tensors on ``device``, in a few words, or None when it can.

    Checks the name, then the backend's own ``is_available()`` and device count, then makes a tensor there."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        return "not a torch device name (cpu, cuda, cuda:1, mps, xpu, ...)"
    if device.type == "cpu":
        return None
    if device.type == "meta":
        return "the meta device holds no values"
    backend = getattr(torch, device.type, None)
    label = device.type.upper()
    if backend is not None and hasattr(backend, "is_available"):
        if not backend.is_available():
            return f"this machine has no {label} device (torch.{device.type}.is_available() is False)"
        count = backend.device_count() if hasattr(backend, "device_count") else None
        if device.index is not None and count is not None and device.index >= count:
            return (f"this machine has {count} {label} device{'s' if count != 1 else ''} "
                    f"({', '.join(f'{device.type}:{i}' for i in range(count))})")
    try:
        torch.empty(1, device=device)
    except Exception as err:  # noqa: BLE001 - backends fail in many types; what each says is the answer
        said = (str(err).splitlines() or [""])[0].split(". ")[0].rstrip(".")
        return f"torch cannot use it here ({type(err).__name__}: {said})"
    return None
