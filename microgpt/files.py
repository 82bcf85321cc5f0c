"""Writing files whole or not at all, and saying in words why a file could not be written or read.

``atomic_write`` writes to a temporary file in the same directory, syncs it to disk and renames it into
place, so readers see the old file or the whole new one. A write that fails (a full disk, an I/O error)
removes its temporary file and raises ``WriteFailed``: one line naming the file and what the OS said.
Checkpoints (``microgpt.checkpoints.io``), token stores (``microgpt.data.store``) and sampled names use it.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from microgpt.errors import UserError


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


def unreadable(path: str | os.PathLike, error: OSError) -> UserError:
    """One line for a file that cannot be read, with what the OS said."""
    return UserError(f"{path}: cannot be read ({error.strerror or error}).")
