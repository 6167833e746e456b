"""Command-line glue for the bottom-layer stages: `shard`, `pretrain`, `bench`.

Each stage has `add_*_args(parser)` and `*_main(args)`; `selfsup` (cluster/cli.py) and
`python -m pretrain` both build their parsers from these, so the options are defined once.
"""

from __future__ import annotations

import argparse

from pretrain.errors import UserError


def add_config_args(p: argparse.ArgumentParser) -> None:
    """`--config FILE` and trailing `key.sub=value` overrides, shared by every config-driven stage."""
    p.add_argument("--config", default=None, help="YAML config (default: built-in digits defaults)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")


def load_args_config(args: argparse.Namespace):
    from pretrain.config import load_config

    return load_config(args.config, args.overrides)


# ------------------------------------------------------------------ shard


def add_shard_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="digits | cifar10 | cifar100 | stl10 | folder")
    p.add_argument("--out", required=True, help="output directory for shards and manifest.json")
    p.add_argument("--input", default=None, help="raw data directory (all sources but digits)")


def shard_main(args: argparse.Namespace) -> int:
    raise UserError("`selfsup shard` is not built yet")


# --------------------------------------------------------------- pretrain


def add_pretrain_args(p: argparse.ArgumentParser) -> None:
    add_config_args(p)
    p.add_argument("--local", action="store_true", help="run the loop in this process, without Ray")
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue a finished or stopped run")


def pretrain_main(args: argparse.Namespace) -> int:
    raise UserError("`selfsup pretrain` is not built yet")


# ------------------------------------------------------------------ bench


def add_bench_args(p: argparse.ArgumentParser) -> None:
    pass


def bench_main(args: argparse.Namespace) -> int:
    raise UserError("`selfsup bench` is not built yet")
