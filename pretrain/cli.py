"""Command-line glue for the bottom-layer stages: `shard`, `pretrain`, `bench`.

Each stage has `add_*_args(parser)` and `*_main(args)`; `selfsup` (cluster/cli.py) and
`python -m pretrain` both build their parsers from these, so the options are defined once.
"""

from __future__ import annotations

import argparse
import os

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
    p.add_argument("--shard-size", type=int, default=512, help="samples per shard (default 512)")
    p.add_argument("--image-size", type=int, default=None,
                   help="resize so the shorter side is this many px (default: digits 16, others as given)")
    p.add_argument("--labeled-fractions", default="0.01,0.1",
                   help="labeled subsets to store, comma-separated, each in (0, 1] (default 0.01,0.1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the labeled subsets (default 0)")
    p.add_argument("--test-fraction", type=float, default=0.2,
                   help="folder DIR/<class>/*: share of each class held out as test (default 0.2)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="processes writing shards in parallel (default: min(4, cores))")


def shard_main(args: argparse.Namespace) -> int:
    from pretrain.shards import write_shards

    m = write_shards(args.source, args.out, input_dir=args.input, shard_size=args.shard_size,
                     image_size=args.image_size, labeled_fractions=args.labeled_fractions, seed=args.seed,
                     test_fraction=args.test_fraction, workers=args.workers)
    splits = ", ".join(f"{s['count']} {name}" for name, s in m["splits"].items() if s["count"])
    shards = sum(len(s["shards"]) for s in m["splits"].values())
    print(f"{m['source']}: {splits} images in {shards} shards at {args.out} "
          f"({m['image_size']} px, {m.get('skipped', 0)} skipped)")
    return 0


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
