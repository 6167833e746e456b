"""The config arguments every config-driven stage takes: `--config FILE` and `key.sub=value` overrides."""

from __future__ import annotations

import argparse


def add_config_args(p: argparse.ArgumentParser) -> None:
    """`--config FILE` and trailing `key.sub=value` overrides, shared by every config-driven stage."""
    p.add_argument("--config", default=None, help="YAML config (default: built-in digits defaults)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")


def load_args_config(args: argparse.Namespace):
    from runtime.config import load_config

    return load_config(args.config, args.overrides)
