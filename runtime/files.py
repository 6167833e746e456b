"""Files the project keeps: written atomically, with the mode the user's umask gives (not mkstemp's 0600)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def current_umask() -> int:
    """This process's umask, read without changing it where the OS allows (Linux: /proc)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def umask_mode(directory: bool = False) -> int:
    """The mode a plain open() or mkdir() would give: 0o666 (files) or 0o777 (dirs) less the umask.
    `mkstemp`/`mkdtemp` use 0o600/0o700 whatever the umask; what they create and is kept gets this mode."""
    return (0o777 if directory else 0o666) & ~current_umask()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    p = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        os.fchmod(fd, umask_mode())  # the user's umask, like any other file they write (not mkstemp's 0600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise




def fill_marked_block(path: str | os.PathLike, section: str, body: str) -> None:
    """Replace what stands between `<!-- figures:SECTION -->` and `<!-- /figures:SECTION -->` in a Markdown file
    with `body`: how README figures are regenerated from a run's JSON instead of typed. A file without the
    pair of markers is a UserError naming them."""
    import re

    from runtime.errors import UserError

    p = Path(path)
    begin, end = f"<!-- figures:{section} -->", f"<!-- /figures:{section} -->"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    text = p.read_text()
    if not pattern.search(text):
        raise UserError(f"{p} has no {begin} ... {end} block to fill: add the two markers where the figures go")
    # blank lines around the body: a table or code block must not run into the markers (Markdown)
    atomic_write_text(p, pattern.sub(lambda _: f"{begin}\n\n{body.strip()}\n\n{end}", text))
