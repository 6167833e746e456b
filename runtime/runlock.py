"""One run per directory: an advisory lock file, `<dir>/.selfsup.lock`, holding the holder's pid and host.

`selfsup pipeline`, `pretrain`, `finetune` (on `output_dir`) and `shard` (on `--out`) take it before they
write anything. A second run on the same directory refuses in one line naming the holder (pid, host,
command, start time). The exclusion itself is an `flock` on the file, which the kernel drops when the holder
dies however it dies; a lock file left by a killed run is therefore stale: taken over with a warning naming
the dead holder. The lock is reentrant within a process (the pipeline runs the stages in-process) and the
file is removed when the outermost holder exits.
"""

from __future__ import annotations

import contextlib
import contextvars
import fcntl
import functools
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from runtime.errors import UserError

LOCK_FILE = ".selfsup.lock"
_held: dict[str, int] = {}  # resolved lock path -> nesting depth, in this process
_scope: contextvars.ContextVar[contextlib.ExitStack | None] = contextvars.ContextVar("selfsup_lock_scope", default=None)


def lock_scope(fn: Callable) -> Callable:
    """Decorator: locks taken with `hold()` inside `fn` are released when `fn` returns or raises."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with contextlib.ExitStack() as stack:
            token = _scope.set(stack)
            try:
                return fn(*args, **kwargs)
            finally:
                _scope.reset(token)

    return wrapper


def hold(directory: str | os.PathLike, command: str) -> Path:
    """Take `directory`'s run lock until the enclosing `@lock_scope` function exits (UserError if held)."""
    stack = _scope.get()
    if stack is None:
        raise RuntimeError("runlock.hold() called outside a @lock_scope function")
    return stack.enter_context(run_lock(directory, command))


def _describe(info: dict) -> str:
    since = info.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else "?"
    return f"pid {info.get('pid')} on {info.get('host')}, `{info.get('command', '?')}`, since {when}"


def _read(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    data = b""
    while chunk := os.read(fd, 65536):
        data += chunk
    try:
        info = json.loads(data.decode("utf-8", "replace") or "{}")
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}


@contextlib.contextmanager
def run_lock(directory: str | os.PathLike, command: str) -> Iterator[Path]:
    """Hold `<directory>/.selfsup.lock` for the block (the directory must exist)."""
    path = Path(directory).resolve() / LOCK_FILE
    key = str(path)
    if key in _held:
        _held[key] += 1
        try:
            yield path
        finally:
            _held[key] -= 1
        return
    fd = _acquire(path, command)
    _held[key] = 1
    try:
        yield path
    finally:
        del _held[key]
        with contextlib.suppress(OSError):
            path.unlink()  # before unlocking: a waiter that opened this file sees it is gone and retries
        os.close(fd)


def _acquire(path: Path, command: str) -> int:
    for _ in range(5):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
        except OSError as e:
            raise UserError(f"cannot write in {path.parent} ({e.strerror or e}): choose a writable directory") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            info = _read(fd)
            os.close(fd)
            held = _describe(info) if info.get("pid") else "its lock file is being written"
            raise UserError(f"{path.parent} is in use by another run ({held}): wait for it to finish or choose "
                            "another directory") from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the holder released (removed) it between our open and our lock: take the new file
            os.close(fd)
            continue
        old = _read(fd)
        if old.get("pid"):
            print(f"warning: taking over the stale lock {path} ({_describe(old)}: that run is gone)",
                  file=sys.stderr, flush=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "command": command}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        return fd
    raise UserError(f"could not take the lock {path}: other runs keep taking it; try again")
