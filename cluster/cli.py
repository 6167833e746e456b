"""`selfsup <stage>`: one command for every stage. Stages are defined in their own packages."""

from __future__ import annotations

import argparse
import os
import sys

from finetune import cli as finetune_cli
from pretrain import cli as pretrain_cli
from pretrain.cli import add_config_args
from pretrain.errors import UserError, run_cli


def add_pipeline_args(p: argparse.ArgumentParser) -> None:
    add_config_args(p)
    p.add_argument("--force", action="append", default=[], metavar="STAGE",
                   help="redo a stage even if it is done: shard, pretrain or finetune (repeatable)")


def pipeline_main(args: argparse.Namespace) -> int:
    raise UserError("`selfsup pipeline` is not built yet")


def add_submit_args(p: argparse.ArgumentParser) -> None:
    pass


def submit_main(args: argparse.Namespace) -> int:
    raise UserError("`selfsup submit` is not built yet")


# name -> (help, add_args, main)
STAGES = {
    "shard": ("write WebDataset shards and a manifest from an image source",
              pretrain_cli.add_shard_args, pretrain_cli.shard_main),
    "pretrain": ("SimCLR pretraining on Ray Train (or --local)",
                 pretrain_cli.add_pretrain_args, pretrain_cli.pretrain_main),
    "finetune": ("label-efficient fine-tuning, baselines and the report",
                 finetune_cli.add_finetune_args, finetune_cli.finetune_main),
    "pipeline": ("shard, pretrain, fine-tune and report in one resumable run", add_pipeline_args, pipeline_main),
    "submit": ("run any stage as a Ray job on a cluster", add_submit_args, submit_main),
    "bench": ("measure the input pipeline against the usual one", pretrain_cli.add_bench_args,
              pretrain_cli.bench_main),
    "predict": ("classify images with a fine-tuned model", finetune_cli.add_predict_args,
                finetune_cli.predict_main),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="selfsup", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="stage", metavar="STAGE", required=True)
    for name, (help_, add_args, main_) in STAGES.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        add_args(sp)
        sp.set_defaults(func=main_)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    args = build_parser().parse_args(argv)
    return run_cli(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
