"""The config part of every config-driven stage's `--help`, generated from the field docs in runtime/config.py."""

from __future__ import annotations

import argparse
import dataclasses
import textwrap
from typing import Any

from runtime.config import RENAMED, Config

WIDTH = 110  # long meanings wrap, indented under their key


def _shown(value: Any) -> str:
    """A default as it would be written in YAML or on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_shown(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_shown(v)}" for k, v in value.items()) + "}"
    return str(value)


def config_keys() -> list[tuple[str, str, str]]:
    """(dotted key, default, one-line meaning) of every config field, in the tree's order."""
    rows = []
    for top in dataclasses.fields(Config):
        if top.metadata.get("doc"):
            rows.append((top.name, _shown(getattr(Config(), top.name)), top.metadata["doc"]))
            continue
        section = getattr(Config(), top.name)
        for f in dataclasses.fields(section):
            rows.append((f"{top.name}.{f.name}", _shown(getattr(section, f.name)), f.metadata.get("doc", "")))
    return rows


def config_help(examples: list[str]) -> str:
    """The epilog: every section and key with its default and meaning, the renamed keys, then `examples`."""
    lines = ["config keys (in a --config YAML file, or as key.sub=value; default shown after '='):"]
    current = ""
    for key, default, doc in config_keys():
        section = key.split(".")[0] if "." in key else ""
        if section != current:
            current = section
            lines.append(f"{section}: {(getattr(Config(), section).__doc__ or '').strip()}")
        lines += textwrap.wrap(f"{key} = {default}" + (f"  -- {doc}" if doc else ""), WIDTH,
                               initial_indent="  ", subsequent_indent="      ", break_long_words=False)
    lines.append("renamed keys (the old names still load, with a one-line note):")
    lines += [f"  {old} -> {new}" for old, new in RENAMED.items()]
    lines.append("examples:")
    lines += [f"  {e}" for e in examples]
    return "\n".join(lines)


def add_config_help(p: argparse.ArgumentParser, examples: list[str]) -> None:
    """Show the config keys and `examples` after the options in `p`'s --help (kept as written, not re-wrapped)."""
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = config_help(examples)
