"""Checkpoint files: written atomically, read safely, found by name. Plain torch: no Lightning here.

* ``atomic_torch_save`` saves through ``microgpt.files.atomic_write``, so ``last.ckpt`` is always the
  newest *complete* checkpoint; a failed write also says which checkpoint is the last good one.
* ``load_checkpoint`` reads a checkpoint with ``weights_only=True`` and reports each way it can fail as
  what it is: missing, a directory, unreadable, empty, truncated, not a torch file, damaged, holding
  code (never run), from a newer torch or microgpt, or asked onto a device this machine lacks.
* ``resolve_checkpoint`` finds ``last.ckpt`` or ``best.ckpt`` of the newest run of a root folder
  (``--ckpt_path last`` / ``best``) and says which file it took.

The Lightning side (``RunCheckpoint``, which decides when to save) is in ``microgpt.callbacks.checkpointing``;
rebuilding a model from a checkpoint is ``microgpt.checkpoints.loading``.
"""

from __future__ import annotations

import io
import os
import pickle
import pickletools
import re
import sys
from pathlib import Path
from typing import Any

import torch

from microgpt.commands.devices import device_problem
from microgpt.errors import UserError
from microgpt.files import WriteFailed, atomic_write

FORMAT = 1  # bump when a checkpoint written by this code can no longer be resumed by a newer one
FORMAT_KEY = "microgpt_format"
ZIP_START, ZIP_END = b"PK\x03\x04", b"PK\x05\x06"  # torch.save writes a zip archive: its first and last records


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through ``atomic_write``; a failed write also says which checkpoint is the last good one."""
    path = Path(path)
    try:
        atomic_write(path, lambda f: torch.save(obj, f), what="the checkpoint ")
    except WriteFailed as err:
        raise UserError(f"{err}; {last_good(path)}.") from None


def last_good(path: Path) -> str:
    """Words naming the newest checkpoint beside ``path`` (``path`` itself included) that loads, and its step."""
    candidates = sorted(path.parent.glob("*.ckpt"), key=lambda p: p.stat().st_mtime_ns, reverse=True)
    for candidate in candidates:
        try:
            step = load_checkpoint(candidate).get("global_step")
        except UserError:  # not loadable: not a good one
            continue
        return f"the last good checkpoint is {'still ' if candidate == path else ''}{candidate} (step {step})"
    return f"no earlier checkpoint is in {path.parent}"


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """A microgpt checkpoint read with ``weights_only=True``; anything else is a one-sentence ``UserError``
    that says what is wrong (each cause is checked, not guessed)."""
    path = Path(path)
    if isinstance(map_location, (str, torch.device)) and (problem := device_problem(map_location)):
        raise UserError(f"{path}: cannot be loaded onto device {map_location}: {problem}.")
    try:
        if not path.exists():
            raise UserError(f"{path}: no such checkpoint file.")
        if path.is_dir():
            raise UserError(f"{path}: is a directory, not a checkpoint file.")
        with path.open("rb") as f:
            head = f.read(len(ZIP_START))
    except PermissionError:
        raise UserError(f"{path}: cannot be read (permission denied).") from None
    except OSError as err:
        raise UserError(f"{path}: cannot be read ({err.strerror or err}).") from None
    if not head:
        raise UserError(f"{path}: is empty (0 bytes), not a checkpoint.")
    if head != ZIP_START:  # torch.save has written zip archives since torch 1.6; microgpt never wrote anything else
        raise UserError(f"{path}: {not_an_archive(path, head)}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if called := re.search(r"GLOBAL (\S+)|Unsupported class (\S+)", str(err)):
            raise UserError(f"{path}: holds code (it would call {called.group(1) or called.group(2)} when "
                            "loaded); it will not be loaded.") from err
        raise UserError(f"{path}: is damaged (its data cannot be unpickled: {first_line(err)}).") from err
    except Exception as err:  # torch's RuntimeError or OSError about the archive: find out what is wrong with the file
        raise UserError(f"{path}: {unloadable(path, err)}") from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise UserError(f"{path}: is a torch file but not a training checkpoint.")
    version = checkpoint.get(FORMAT_KEY)
    if isinstance(version, int) and version > FORMAT:
        raise UserError(f"{path}: was written by a newer version of microgpt (checkpoint format {version}, "
                        f"this version reads format {FORMAT}); upgrade microgpt to load it.")
    if version != FORMAT:
        raise UserError(
            f"{path}: was written by an incompatible version of microgpt "
            f"(checkpoint format {version}, this version reads format {FORMAT})."
        )
    return checkpoint


def first_line(err: BaseException) -> str:
    """The first line of an error's message, without the source location torch's C++ errors start with, and
    without torch's advice to load the file with ``weights_only=False`` (which would run any code it holds)."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if lines and lines[0].startswith("Weights only load failed"):  # the reason is on a later line, among advice
        reasons = [re.sub(r"^.*WeightsUnpickler error:\s*", "", line).split(". Please use")[0] for line in lines[1:]
                   if "WeightsUnpickler error:" in line or not re.search(
                       r"weights_only|^\(\d\)|^Check the documentation|^Please file an issue", line)]
        lines = [line for line in reasons if line] or ["torch refused its data"]
    line = (lines or [type(err).__name__])[0]
    return re.sub(r"^\[enforce fail at [^\]]*\]\s*\.?\s*", "", line)


PICKLE_SCAN_BYTES = 64 << 20  # of a pickle, the part looked through for code
CODE_OPCODES = {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "NEWOBJ", "NEWOBJ_EX", "EXT1", "EXT2", "EXT4"}


def not_an_archive(path: Path, head: bytes) -> str:
    """Why a file that is not a zip archive is not a checkpoint: a pickle that holds code (found by reading its
    opcodes, never by running it), or any other file."""
    if head[:1] == b"\x80":  # a pickle (protocol 2 or later), as pickle.dump writes
        called, strings = [], ["", ""]
        try:
            with path.open("rb") as f:  # read into memory, so that a length read from garbage allocates nothing
                data = io.BytesIO(f.read(PICKLE_SCAN_BYTES))
            for op, arg, _ in pickletools.genops(data):
                if op.name in CODE_OPCODES:  # GLOBAL names "module name"; STACK_GLOBAL the last two strings
                    called.append(arg.replace(" ", ".") if isinstance(arg, str) else ".".join(strings[-2:]))
                elif isinstance(arg, str):
                    strings.append(arg)
        except (ValueError, EOFError, OSError):  # not a whole pickle after all
            called = []
        if called:
            return f"is a pickle that holds code (it would call {called[0]} when loaded); it will not be loaded."
    return "is not a checkpoint (not a file torch.save writes)."


def unloadable(path: Path, err: Exception) -> str:
    """Why torch could not load the zip archive ``path``, from the file's own bytes: an archive without its
    end, one written by a newer torch, a read error of the OS, or else damaged (with torch's words)."""
    size = path.stat().st_size
    with path.open("rb") as f:
        f.seek(max(0, size - (1 << 16) - 22))  # the end record sits within the last 64 KiB + 22 bytes
        if ZIP_END not in f.read():
            return "is truncated (the end of the file is missing)."
    said = first_line(err)
    if "maximum supported version" in said:
        return f"was written by a newer version of torch than this one ({torch.__version__}): {said.split('. ')[0]}."
    if isinstance(err, OSError):
        return f"cannot be read ({err.strerror or err})."
    return f"is damaged (torch: {said})."


def newest_run(root: str | os.PathLike) -> Path | None:
    """The checkpoint folder of the newest run in ``root`` (``--trainer.default_root_dir``): of the runs that
    saved a checkpoint, the one whose newest checkpoint file was written last, finished or still running; on
    equal times, the higher version number. None when no run there saved one.

    Looks where Lightning puts them: ``ROOT/checkpoints`` without a logger, ``ROOT/NAME/VERSION/checkpoints``
    with one. A run that saved nothing (``validate``, ``test``, ``predict``, a fast dev run) is no candidate."""
    root = Path(root)
    found = []
    for folder in [root / "checkpoints", *root.glob("*/*/checkpoints")]:
        try:  # a file replaced between the listing and now is skipped
            times = [p.stat().st_mtime_ns for p in folder.glob("*.ckpt") if p.is_file()]
        except OSError:
            continue
        if times:
            found.append((max(times), version_number(folder), folder))
    return max(found, default=(0, 0, None))[2]


def resolve_checkpoint(value: str, root: str | os.PathLike, root_flag: str, prog: str = "microgpt",
                       start_afresh: bool = False) -> str | None:
    """The checkpoint ``--ckpt_path VALUE`` means: a file as it is; ``last`` or ``best`` that file of the newest
    run in ``root`` (``newest_run``), never another run's, with one line on stderr naming the file taken.
    With ``start_afresh``, ``last`` in a root where no run saved anything is None (a fit that starts afresh);
    anything else not found is a ``UserError`` naming ``root_flag``."""
    if value not in ("last", "best"):
        return value
    run = newest_run(root)
    if run is None:
        if start_afresh and value == "last":
            return None
        raise UserError(f"--ckpt_path {value}: no {value}.ckpt under {Path(root).resolve()} (no run there saved a "
                        f"checkpoint); pass a checkpoint file or {root_flag}.")
    path = run / f"{value}.ckpt"
    if not path.is_file():
        why = " (a run writes best.ckpt when it validates during fit)" if value == "best" else ""
        raise UserError(f"--ckpt_path {value}: no {value}.ckpt in the newest run under {Path(root).resolve()}, "
                        f"{run.parent}{why}; pass a checkpoint file to take another run's.")
    if all(os.environ.get(key, "0") == "0" for key in ("RANK", "LOCAL_RANK", "NODE_RANK")):  # once per run
        print(f"{prog}: --ckpt_path {value} is {path}", file=sys.stderr, flush=True)
    return str(path)


def version_number(path: Path) -> int:
    """N of the ``version_N`` folder the checkpoint folder ``path`` lies in, else -1."""
    found = re.fullmatch(r"version_(\d+)", path.parent.name)
    return int(found.group(1)) if found else -1
