"""The one exception a person sees: a one-line message, no traceback, a non-zero exit."""

from __future__ import annotations

import sys
from collections.abc import Callable


class UserError(Exception):
    """Bad input a person can fix: config, paths, data, addresses. Printed as one line by `run_cli`."""


def one_line(message: object) -> str:
    return " ".join(str(message).split())


def run_cli(main: Callable[[], int | None]) -> int:
    """Run a CLI entry point: `UserError` -> one line on stderr and exit 2; Ctrl-C -> exit 130.

    Anything else is a bug and keeps its traceback.
    """
    try:
        return int(main() or 0)
    except UserError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
