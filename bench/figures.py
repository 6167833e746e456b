"""Regenerate the figures in `bench/README.md` from a `bench.json`: never typed by hand.

    python -m bench.figures bench/results/memory.json --section memory

replaces the block between `<!-- figures:memory -->` and `<!-- /figures:memory -->` in bench/README.md with the
table `selfsup bench` printed for that JSON (`bench.report.table`) and the machine and load it ran under.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench.report import table
from runtime.errors import run_cli
from runtime.files import fill_marked_block

README = Path(__file__).with_name("README.md")


def block(r: dict, source: str) -> str:
    m = r.get("meta", {})
    parts = [f"started {m['started']}" if m.get("started") else "", f"{m['cpu_count']} cores" if m.get("cpu_count") else "",
             f"load average at the start {m['load_average_start']}" if m.get("load_average_start") else "",
             f"load average at the end {m['load_average']}" if m.get("load_average") else ""]
    machine = ", ".join(p for p in parts if p)
    head = f"From `{source}`" + (f" ({machine})" if machine else "") + ":"
    if m.get("note"):
        head += f"\n\n{m['note']}"
    return f"{head}\n\n```\n{table(r).rstrip()}\n```\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.figures", description=__doc__.split("\n")[0])
    p.add_argument("json", help="a bench.json written by `selfsup bench`")
    p.add_argument("--section", required=True, help="the README block to fill, e.g. memory")
    p.add_argument("--readme", default=str(README), help="the Markdown file holding the block")
    args = p.parse_args(argv)

    def go() -> int:
        r = json.loads(Path(args.json).read_text())
        fill_marked_block(args.readme, args.section, block(r, args.json))
        print(f"{args.readme}: {args.section} figures from {args.json}")
        return 0

    return run_cli(go)


if __name__ == "__main__":
    sys.exit(main())
