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
from runtime.errors import UserError, run_cli
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


def readme_options(p: argparse.ArgumentParser, section_required: bool = True) -> None:
    """`--section NAME` and `--readme FILE`: the options of every bench script that writes a README table."""
    p.add_argument("--section", required=section_required,
                   help="the README block to fill: the one between `<!-- figures:NAME -->` markers")
    p.add_argument("--readme", default=str(README), help="the Markdown file holding the block (default bench/README.md)")


def figures_command(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The `figures JSON --section NAME [--readme FILE]` subcommand of the scripts that `collect` a JSON first."""
    f = sub.add_parser("figures", help="write a collected JSON's table into bench/README.md")
    f.add_argument("json", help="the JSON `collect` wrote")
    readme_options(f)
    return f


def read_results(path: str | Path) -> dict:
    """A results JSON, or a one-line error saying why it cannot be read."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"no results file at {path}") from None
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the results file {path}: {e}") from None


def write_section(readme: str | Path, section: str, text: str, source: str) -> None:
    """Fill the README block with a table generated from `source` (never typed), and say so."""
    fill_marked_block(readme, section, text)
    print(f"{readme}: {section} figures from {source}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.figures", description=__doc__.split("\n")[0])
    p.add_argument("json", help="a bench.json written by `selfsup bench`")
    readme_options(p)
    args = p.parse_args(argv)

    def go() -> int:
        write_section(args.readme, args.section, block(read_results(args.json), args.json), args.json)
        return 0

    return run_cli(go)


if __name__ == "__main__":
    sys.exit(main())
