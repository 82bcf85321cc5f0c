"""Checkpoint files: written atomically, read safely, found by name. Plain torch: no Lightning here.

* ``atomic_write`` writes to a temporary file in the same directory, syncs it to disk and renames it
  into place, so ``last.ckpt`` is always the newest *complete* checkpoint.
* ``load_checkpoint`` reads a checkpoint with ``weights_only=True`` and turns every way it can be
  wrong (missing, truncated, not a checkpoint, written by another version) into one ``UserError``.
* ``find_checkpoint`` finds the newest run's ``last.ckpt`` or ``best.ckpt`` (``--ckpt_path last`` / ``best``).

The Lightning side (``RunCheckpoint``, which decides when to save) is in ``microgpt.callbacks``.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch

from microgpt.errors import UserError

FORMAT = 1  # bump when a checkpoint written by this code can no longer be resumed by a newer one
FORMAT_KEY = "microgpt_format"


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> None:
    """Call ``write`` on a temporary file next to ``path``, fsync it, then rename it over ``path``:
    readers see the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through ``atomic_write``."""
    atomic_write(path, lambda f: torch.save(obj, f))


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """A microgpt checkpoint read with ``weights_only=True``; anything else is a one-sentence ``UserError``."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such checkpoint file.")
    if path.is_dir():
        raise UserError(f"{path}: is a directory, not a checkpoint file.")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except PermissionError as err:
        raise UserError(f"{path}: cannot be read (permission denied).") from err
    except pickle.UnpicklingError as err:
        if "weights_only" in str(err):
            raise UserError(f"{path}: holds objects other than plain data and tensors; refusing to load it.") from err
        raise UserError(f"{path}: is not a checkpoint, or is truncated.") from err
    except Exception as err:  # whatever torch trips over in a file that is not a whole checkpoint
        raise UserError(f"{path}: is not a checkpoint, or is truncated.") from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise UserError(f"{path}: is a torch file but not a training checkpoint.")
    if checkpoint.get(FORMAT_KEY) != FORMAT:
        raise UserError(
            f"{path}: was written by an incompatible version of microgpt "
            f"(checkpoint format {checkpoint.get(FORMAT_KEY)}, this version reads format {FORMAT})."
        )
    return checkpoint


def find_checkpoint(root: str | os.PathLike, name: str) -> Path | None:
    """The most recently written ``NAME.ckpt`` (``last`` or ``best``) of the runs in ``root``
    (``--trainer.default_root_dir``), or None.

    Looks where Lightning puts them: ``ROOT/checkpoints`` without a logger, ``ROOT/NAME/VERSION/checkpoints`` with one.
    """
    root = Path(root)
    file = f"{name}.ckpt"
    candidates = [p for p in [root / "checkpoints" / file, *root.glob(f"*/*/checkpoints/{file}")] if p.is_file()]
    return max(candidates, key=lambda p: p.stat().st_mtime_ns, default=None)
