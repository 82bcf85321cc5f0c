"""Checkpoint files: written atomically, read safely, found by name. Plain torch: no Lightning here.

* ``atomic_write`` writes to a temporary file in the same directory, syncs it to disk and renames it
  into place, so ``last.ckpt`` is always the newest *complete* checkpoint. A write that fails (a full
  disk, an I/O error) removes its temporary file and raises ``WriteFailed``: one line naming the file
  and what the OS said; ``atomic_torch_save`` adds which checkpoint is the last good one.
* ``load_checkpoint`` reads a checkpoint with ``weights_only=True`` and reports each way it can fail as
  what it is: missing, a directory, unreadable, empty, truncated, not a torch file, damaged, carrying
  code, from a newer torch or microgpt, or asked onto a device this machine lacks.
* ``find_checkpoint`` finds the newest ``last.ckpt`` or ``best.ckpt`` of a root folder
  (``--ckpt_path last`` / ``best``).

The Lightning side (``RunCheckpoint``, which decides when to save) is in ``microgpt.callbacks.checkpointing``;
rebuilding a model from a checkpoint is ``microgpt.loading``.
"""

from __future__ import annotations

import errno
import os
import pickle
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch

from microgpt.devices import device_problem
from microgpt.errors import UserError

FORMAT = 1  # bump when a checkpoint written by this code can no longer be resumed by a newer one
FORMAT_KEY = "microgpt_format"
ZIP_START, ZIP_END = b"PK\x03\x04", b"PK\x05\x06"  # torch.save writes a zip archive: its first and last records


def current_umask() -> int:
    """The process's umask: from /proc where there is one, else by setting it and putting it back."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        umask = os.umask(0o022)
        os.umask(umask)
        return umask


class WriteFailed(UserError):
    """Writing ``path`` failed with the OS error ``error``; the file there, if any, is as it was."""

    def __init__(self, path: Path, error: OSError, what: str = ""):
        self.path, self.error = path, error
        super().__init__(f"cannot write {what}{path}: {os_reason(error)}")


def os_reason(error: OSError) -> str:
    """What the OS said, in words: a full disk or quota is called that."""
    said = error.strerror or str(error)
    if error.errno == errno.ENOSPC:
        return f"the disk is full ({said})"
    if error.errno == errno.EDQUOT:
        return f"the disk quota is used up ({said})"
    return said


def disk_full(err: BaseException) -> UserError | None:
    """One line for the ``OSError`` of a full disk or a used-up quota, whoever was writing (TensorBoard,
    Lightning, ...), or None for any other error."""
    if not isinstance(err, OSError) or err.errno not in (errno.ENOSPC, errno.EDQUOT):
        return None
    return UserError(f"cannot write {err.filename or 'to the disk'}: {os_reason(err)}.")


class RecordingFile:
    """A binary file whose ``write`` errors are kept in ``error``: torch turns the ``OSError`` of a full disk
    into a ``RuntimeError`` about zip positions, and this is how the real cause is known."""

    def __init__(self, file: BinaryIO):
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as err:
            self.error = err
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self.file, name)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any], what: str = "") -> None:
    """Call ``write`` on a temporary file next to ``path``, fsync it, then rename it over ``path``:
    readers see the old file or the whole new one, never a part.

    When the file itself cannot be written (``write``'s writes to it, the sync or the rename fail), the
    temporary file is removed and ``WriteFailed`` is raised (``what``, e.g. "the checkpoint ", starts its
    message); any other error of ``write`` passes through unchanged, also after removing the temporary file."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    except OSError as err:
        raise WriteFailed(path, err, what) from None
    out = RecordingFile(os.fdopen(fd, "wb"))
    written = False
    try:
        os.chmod(tmp, 0o666 & ~current_umask())  # the permissions open() gives, not mkstemp's owner-only 0o600
        write(out)
        written = True
        out.file.flush()
        os.fsync(out.file.fileno())
        out.file.close()
        os.replace(tmp, path)
    except BaseException as err:
        try:
            out.file.close()
        except OSError:  # its buffer cannot be flushed either: the disk is still full
            pass
        Path(tmp).unlink(missing_ok=True)
        # a write to the file failed (whatever ``write`` made of it), or the flush, sync or rename did
        cause = out.error or (err if written and isinstance(err, OSError) else None)
        if cause is not None:
            raise WriteFailed(path, cause, what) from None
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):  # file systems that cannot sync a folder
            raise WriteFailed(path, err, what) from None


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
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if re.search(r"GLOBAL|Unsupported class|Can only", str(err)):
            raise UserError(f"{path}: holds objects other than plain data and tensors; refusing to load it.") from err
        raise UserError(f"{path}: is damaged (its data cannot be unpickled: {first_line(err)}).") from err
    except Exception as err:  # torch's RuntimeError or OSError about the archive: find out what is wrong with the file
        raise UserError(f"{path}: {unloadable(path, head, err)}") from err
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
    """The first line of an error's message, without the source location torch's C++ errors start with."""
    line = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return re.sub(r"^\[enforce fail at [^\]]*\]\s*\.?\s*", "", line)


def unloadable(path: Path, head: bytes, err: Exception) -> str:
    """Why torch could not load ``path``, from the file's own bytes: not a zip archive, a zip archive
    without its end, one written by a newer torch, a read error of the OS, or else damaged (with torch's words)."""
    if head != ZIP_START:
        if head[:1] == b"\x80":  # a pickle: torch's format before 1.6
            return f"is damaged (torch: {first_line(err)})."
        return "is not a checkpoint (not a file torch.save writes)."
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


def find_checkpoint(root: str | os.PathLike, name: str) -> Path | None:
    """The most recently written ``NAME.ckpt`` (``last`` or ``best``) of the runs in ``root``
    (``--trainer.default_root_dir``), or None: the one whose file was replaced last, whether its run has
    finished or is still running; on equal times, the higher version number.

    Looks where Lightning puts them: ``ROOT/checkpoints`` without a logger, ``ROOT/NAME/VERSION/checkpoints``
    with one. A file found is always whole: checkpoints are only ever renamed into place once complete."""
    root = Path(root)
    file = f"{name}.ckpt"
    found = []
    for candidate in [root / "checkpoints" / file, *root.glob(f"*/*/checkpoints/{file}")]:
        try:
            found.append((candidate.stat().st_mtime_ns, version_number(candidate), candidate))
        except OSError:  # not there (or replaced between the listing and now)
            continue
    return max(found, default=(0, 0, None))[2]


def version_number(path: Path) -> int:
    """N of the ``version_N`` folder ``path`` lies in, else -1."""
    found = re.fullmatch(r"version_(\d+)", path.parent.parent.name)
    return int(found.group(1)) if found else -1
