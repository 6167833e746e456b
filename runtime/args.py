"""The config arguments every config-driven stage takes: `--config FILE` and `key.sub=value` overrides."""

from __future__ import annotations

import argparse


def add_config_args(p: argparse.ArgumentParser, examples: list[str] | None = None) -> None:
    """`--config FILE` and trailing `key.sub=value` overrides, shared by every config-driven stage; its
    --help then lists every config key with its default and meaning, and `examples` (two, usually)."""
    from runtime.confighelp import add_config_help

    p.add_argument("--config", default=None, help="YAML config (default: built-in digits defaults)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="config overrides, e.g. pretrain.epochs=5 (the keys are listed below)")
    add_config_help(p, examples or [])


def load_args_config(args: argparse.Namespace):
    from runtime.config import load_config

    return load_config(args.config, args.overrides)
