"""The one exception type a user can fix, and the one place it becomes a line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class UserError(Exception):
    """Something about the user's input (a file, a flag, a checkpoint) that they can fix."""


def user_error_behind(err: BaseException | None) -> UserError | None:
    """``err`` if it is a ``UserError``, else the first one it was raised from (jsonargparse and Lightning wrap
    the errors raised while they build a class or run a hook), else a full disk's ``OSError`` in that chain
    as a ``UserError``, else None."""
    from microgpt.files import disk_full  # files.py raises UserError: imported here, not at the top

    chain, seen = [], set()
    while err is not None and id(err) not in seen:
        if isinstance(err, UserError):
            return err
        chain.append(err)
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return next((full for err in chain if (full := disk_full(err)) is not None), None)


@contextmanager
def exit_on_user_error(prog: str, translate: Callable[[BaseException], UserError | None] = user_error_behind
                       ) -> Iterator[None]:
    """Run the body; an error that ``translate`` finds a ``UserError`` behind becomes ``PROG: error: MESSAGE``
    on stderr and exit status 2 (``MICROGPT_DEBUG=1`` raises it instead, traceback and all)."""
    try:
        yield
    except Exception as err:
        found = translate(err)
        if found is None or os.environ.get("MICROGPT_DEBUG"):
            raise
        print(f"{prog}: error: {found}", file=sys.stderr)
        raise SystemExit(2) from None


class OneLineParser(argparse.ArgumentParser):
    """argparse refusing abbreviated flags, with a bad flag or value raised as a ``UserError`` (one line) instead
    of a usage dump."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{"allow_abbrev": False, **kwargs})

    def error(self, message: str):
        raise UserError(message)
