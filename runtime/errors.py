"""The one exception a person sees: a one-line message, no traceback, a non-zero exit."""

from __future__ import annotations

import errno
import shutil
import sys
from collections.abc import Callable
from pathlib import Path


class UserError(Exception):
    """Bad input a person can fix: config, paths, data, addresses. Printed as one line by `run_cli`."""


def one_line(message: object) -> str:
    return " ".join(str(message).split())


_FULL_TEXTS = ("No space left on device", "Disk quota exceeded", "os error 28", "StorageFull")


def is_disk_full(e: BaseException | None) -> bool:
    """An error (or one it was raised from) that says the disk or quota is full, whichever library raised it
    (OSError ENOSPC/EDQUOT; shutil.Error, safetensors and torch only carry it in their message)."""
    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(t in str(e) for t in _FULL_TEXTS):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def _mb(n: float) -> str:
    return f"{n / 2**20:.1f} MB"


def disk_full_message(path: str | Path, needed: float | None = None, what: str = "", bound: str = "about") -> str:
    """One line: where the disk filled, how much is free there, and (when known) about how much is needed."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        free = f"{_mb(shutil.disk_usage(p).free)} free there"
    except OSError:
        free = "free space unknown"
    need = f"{bound} {_mb(needed)} needed{f' {what}' if what else ''}, " if needed else ""
    return (f"no space left on the device writing {path} ({need}{free}): free some space or choose another "
            "directory, then rerun")


def run_cli(main: Callable[[], int | None]) -> int:
    """Run a CLI entry point: `UserError` -> one line on stderr and exit 2; Ctrl-C -> exit 130.

    Anything else is a bug and keeps its traceback.
    """
    try:
        return int(main() or 0)
    except UserError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # raised with a hint where one helps ("rerun to continue")
        print(f"error: interrupted{f'; {one_line(e)}' if str(e) else ''}", file=sys.stderr)
        return 130
    except Exception as e:
        if not is_disk_full(e):
            raise
        where = getattr(e, "filename", None)
        print(f"error: {disk_full_message(where) if where else one_line(e)[:300]}", file=sys.stderr)
        return 2
