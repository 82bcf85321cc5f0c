"""One run, one folder: the ``version_N`` folder of a run is claimed by creating it, not by listing.

Lightning's ``TensorBoardLogger`` and ``CSVLogger`` pick ``version_N`` as one more than the largest they
list, so runs started together in one root folder pick the same N and overwrite each other's curves and
checkpoints. Here the first process of a run creates ``version_N`` with an exclusive ``mkdir`` (the
operating system lets exactly one creator succeed), moving on to N + 1 when another run got there first,
and hands N to the logger. The processes Lightning's DDP launcher starts for the other ranks read N from
the environment of the process that started them; other ranks (torchrun, SLURM) claim nothing, and
Lightning gives every rank the first one's folder (``trainer.log_dir`` and the checkpoint folder are
broadcast from it). A folder claimed by a run that wrote nothing in it is removed when the process exits.
"""

from __future__ import annotations

import atexit
import os
import re
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger

from microgpt.errors import UserError

VERSION_ENV = "MICROGPT_RUN_VERSION"  # "PID N ROOT": the version the process PID claimed in ROOT
RANK_ENV = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")
_claimed: list[Path] = []


def claim_version(root: str | os.PathLike, flag: str = "--trainer.default_root_dir") -> int:
    """Create ``root/version_N`` for the smallest N above the versions there that no one else creates
    first, and return N."""
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        taken = [int(m.group(1)) for p in root.iterdir() if (m := re.fullmatch(r"version_(\d+)", p.name))]
        version = max(taken, default=-1) + 1
        while True:
            try:
                (root / f"version_{version}").mkdir()
            except FileExistsError:  # another run created it since the listing
                version += 1
                continue
            _claimed.append(root / f"version_{version}")
            return version
    except OSError as err:
        raise UserError(f"{root}: cannot create a run folder here ({err.strerror or err}); "
                        f"choose another with {flag}.") from None


def first_process() -> bool:
    """Whether this is the first process of the run: no launcher gave it a rank other than 0."""
    return all(os.environ.get(key, "0") == "0" for key in RANK_ENV)


def run_version(root: str | os.PathLike, flag: str = "--trainer.default_root_dir") -> int | None:
    """The version this run's logger writes to in ``root``: claimed by the first process (and left in the
    environment for the processes it starts), read back by those, None (Lightning's choice) elsewhere."""
    root = os.path.abspath(root)
    if first_process():
        version = claim_version(root, flag)
        os.environ[VERSION_ENV] = f"{os.getpid()} {version} {root}"
        return version
    pid, version, claimed_in = (os.environ.get(VERSION_ENV) or "0 0 ").split(" ", 2)
    return int(version) if int(pid) == os.getppid() and claimed_in == root else None


def with_claimed_version(logger: Logger, init_args: dict, flag: str = "--trainer.logger.save_dir") -> Logger:
    """``logger`` as given on the command line (``init_args``), built again with a claimed version when it is
    a ``TensorBoardLogger`` or ``CSVLogger`` on a local folder given without ``version``; other loggers as they are."""
    if (not isinstance(logger, (TensorBoardLogger, CSVLogger)) or init_args.get("version") is not None
            or "://" in str(logger.root_dir)):
        return logger
    version = run_version(logger.root_dir, flag)
    return logger if version is None else type(logger)(**{**init_args, "version": version})


@atexit.register
def _release_unused() -> None:
    """Remove the folders this process claimed and left empty (a run that stopped before writing anything)."""
    for folder in _claimed:
        try:
            folder.rmdir()  # only succeeds when empty
        except OSError:
            pass
