"""What a run prints: the project's own lines and one progress display per stage; Ray's chatter only on request.

- `verbose()`: `--verbose` on a stage, or the environment variable `SELFSUP_VERBOSE=1`, brings back Ray Train's
  own console lines (per-report `Reporting training result ...`, `Checkpoint successfully created ...`) and its
  internal warnings. Off by default: Ray Train logs at `RAY_TRAIN_LOG_LEVEL` (`ray.train.LoggingConfig` on the
  trainer), Ray's job workers and actors at `RAY_JOB_LOG_LEVEL` (`ray.LoggingConfig` on `ray.init`), and the one
  Ray Train logger that is named by its file path (the worker's per-report line) is set to WARNING on each worker.
  Everything still goes to Ray's log files in the session directory.
- `Progress`: one display per stage. On a terminal it rewrites one line (k/N, the stage's numbers, time left);
  anywhere else (CI, Ray job logs, a file) it prints a plain line per update, at most one every
  `PLAIN_EVERY_S` seconds (the last one always), with no control characters.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, TextIO

VERBOSE_ENV = "SELFSUP_VERBOSE"
PLAIN_EVERY_S = 10.0


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def set_verbose(on: bool) -> None:
    """`--verbose`: recorded in the environment, so Ray's processes (started after this) inherit it."""
    if on:
        os.environ[VERBOSE_ENV] = "1"


def ray_train_log_level() -> str:
    """For `ray.train.LoggingConfig(log_level=...)`: INFO when verbose, else only Ray Train's errors."""
    return "INFO" if verbose() else "ERROR"


def ray_job_log_level() -> str:
    """For `ray.LoggingConfig(log_level=...)` on `ray.init`: the job's workers and actors (e.g. Train's
    PreemptionWatcher) log warnings only when verbose."""
    return "INFO" if verbose() else "ERROR"


_QUIETED = False


def quiet_ray_worker() -> None:
    """On a Ray Train worker: Ray Train's worker context logs each report at INFO on a logger named by its
    file path (not under `ray.train`, so `LoggingConfig` misses it); raise that logger's level unless verbose."""
    global _QUIETED
    if _QUIETED or verbose():
        return
    _QUIETED = True
    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # another Ray version: nothing to quiet
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def fmt_duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds < 0:
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """k of `total` done, with the stage's numbers and the time left (from the pace since the first update
    of this run; `start` is k at the beginning, e.g. a resumed run's epoch)."""

    def __init__(self, label: str, total: int, unit: str = "", start: int = 0, stream: TextIO | None = None,
                 tty: bool | None = None):
        self.label, self.total, self.unit = label, max(0, int(total)), unit
        self.start = self.done = int(start)
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self.t0 = time.monotonic()
        self._last_plain = -1e18
        self._shown = False
        self._fields = ""
        global _ACTIVE
        _ACTIVE = self

    def eta(self) -> float | None:
        n = self.done - self.start
        if n <= 0:
            return None
        return (time.monotonic() - self.t0) / n * (self.total - self.done)

    def text(self, fields: str = "") -> str:
        unit = f" {self.unit}" if self.unit else ""
        parts = [f"[{self.label}] {self.done}/{self.total}{unit}"]
        if fields:
            parts.append(fields)
        parts.append(f"elapsed {fmt_duration(time.monotonic() - self.t0)}")
        parts.append(f"left {fmt_duration(0.0 if self.done >= self.total else self.eta())}")
        return "  ".join(parts)

    def update(self, done: int | None = None, fields: str = "") -> None:
        self.done = self.done + 1 if done is None else int(done)
        self._fields = fields
        line = self.text(fields)
        now = time.monotonic()
        if self.tty:
            self.stream.write("\r\x1b[2K" + line)
            self._shown = True
        elif self.done >= self.total or now - self._last_plain >= PLAIN_EVERY_S:
            self.stream.write(line + "\n")
            self._last_plain = now
        self.stream.flush()

    def message(self, line: str) -> None:
        """A line of its own above the live display."""
        if self.tty and self._shown:
            self.stream.write("\r\x1b[2K")
        self.stream.write(line + "\n")
        if self.tty and self._shown:
            self.stream.write(self.text(self._fields))
        self.stream.flush()

    def close(self) -> None:
        global _ACTIVE
        if self.tty and self._shown:
            self.stream.write("\n")
            self.stream.flush()
            self._shown = False
        if _ACTIVE is self:
            _ACTIVE = None


_ACTIVE: Progress | None = None


def emit(line: str) -> None:
    """Print a line of the project's own, above the live display when there is one."""
    if _ACTIVE is not None:
        _ACTIVE.message(line)
    else:
        print(line, flush=True)


def epoch_fields(metrics: dict[str, Any]) -> str:
    """Pretraining's numbers for the display: loss and images/s of the last epoch."""
    out = []
    if isinstance(metrics.get("loss"), (int, float)):
        out.append(f"loss {metrics['loss']:.4f}")
    if isinstance(metrics.get("images_per_s"), (int, float)):
        out.append(f"{metrics['images_per_s']:.0f} img/s")
    return "  ".join(out)
