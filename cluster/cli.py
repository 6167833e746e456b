"""`selfsup <stage>`: one command for every stage. Stages are defined in their own packages."""

from __future__ import annotations

import argparse
import os
import sys

from bench import cli as bench_cli
from finetune import cli as finetune_cli
from finetune import datacli
from pretrain import cli as pretrain_cli
from runtime.args import add_config_args
from runtime.errors import run_cli
from shards import cli as shard_cli


def add_pipeline_args(p: argparse.ArgumentParser) -> None:
    add_config_args(p, ["selfsup pipeline   # the digits run on this machine, in minutes",
                        "selfsup pipeline --config configs/cifar10.yaml --force finetune finetune.num_seeds=5"])
    p.add_argument("--force", action="append", default=[], metavar="STAGE",
                   help="redo a stage even if it is done, and the stages after it: shard, pretrain or finetune; "
                        "inspect redoes only the data report")
    p.add_argument("--local", action="store_true", help="pretrain in this process, without Ray")


def pipeline_main(args: argparse.Namespace) -> int:
    from cluster.pipeline import run_pipeline
    from runtime.args import load_args_config

    run_pipeline(load_args_config(args), force=args.force, local=args.local)
    return 0


def add_submit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=None,
                   help="Ray dashboard URL (default: $RAY_API_SERVER_ADDRESS, $RAY_ADDRESS, http://127.0.0.1:8265)")
    p.add_argument("--wait", action=argparse.BooleanOptionalAction, default=None,
                   help="stream the job's logs and exit with its outcome (default: wait)")
    p.add_argument("--no-requirements", dest="requirements", action="store_false",
                   help="do not pip-install pyproject.toml's dependencies (the cluster image has them)")
    p.add_argument("--submission-id", default=None, help="job id to use instead of a generated one")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--status", metavar="ID", help="print a job's status and exit")
    g.add_argument("--logs", metavar="ID", help="print a job's logs (with --wait: follow them to the end)")
    g.add_argument("--stop", metavar="ID", help="stop a job")
    p.add_argument("stage_args", nargs=argparse.REMAINDER, metavar="-- STAGE [ARGS]",
                   help="the stage to run on the cluster and its arguments, e.g. `-- pipeline --config X`")


def submit_main(args: argparse.Namespace) -> int:
    from cluster import submit

    stage_args = list(args.stage_args)
    if stage_args[:1] == ["--"]:
        stage_args = stage_args[1:]
    if args.status:
        return submit.run_status(args.address, args.status)
    if args.logs:
        # --wait is the default for submitting; for logs, only an explicit `--wait` follows
        return submit.run_logs(args.address, args.logs, follow_logs=args.wait is True)
    if args.stop:
        return submit.run_stop(args.address, args.stop)
    return submit.run_submit(args.address, stage_args, wait=args.wait is not False, requirements=args.requirements,
                             submission_id=args.submission_id)


# name -> (help, add_args, main)
STAGES = {
    "shard": ("write WebDataset shards and a manifest from an image source",
              shard_cli.add_shard_args, shard_cli.shard_main),
    "pretrain": ("SimCLR pretraining on Ray Train (or --local)",
                 pretrain_cli.add_pretrain_args, pretrain_cli.pretrain_main),
    "finetune": ("label-efficient fine-tuning, baselines and the report",
                 finetune_cli.add_finetune_args, finetune_cli.finetune_main),
    "pipeline": ("shard, pretrain, fine-tune and report in one resumable run", add_pipeline_args, pipeline_main),
    "submit": ("run any stage as a Ray job on a cluster", add_submit_args, submit_main),
    "bench": ("measure the input pipeline against the usual one", bench_cli.add_bench_args,
              bench_cli.bench_main),
    "predict": ("classify images with a fine-tuned model", finetune_cli.add_predict_args,
                finetune_cli.predict_main),
    "select": ("choose which train images to label, from the encoder's features (no labels read)",
               datacli.add_select_args, datacli.select_main),
    "inspect": ("a data report from the encoder: duplicates, leakage, likely label errors, balance, outliers",
                datacli.add_inspect_args, datacli.inspect_main),
}


def package_version() -> str:
    """The installed package's version (pyproject.toml's), or "unknown" when run from a bare checkout."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("selfsup")
    except PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="selfsup", description=__doc__.split("\n")[0])
    p.add_argument("--version", action="version", version=f"selfsup {package_version()}")
    sub = p.add_subparsers(dest="stage", metavar="STAGE", required=True)
    for name, (help_, add_args, main_) in STAGES.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        add_args(sp)
        if name in VERBOSE_STAGES:
            sp.add_argument("--verbose", action="store_true",
                            help="also show Ray's own console lines (per-report, checkpoint, internal warnings); "
                                 "same as SELFSUP_VERBOSE=1")
        sp.set_defaults(func=main_)
    return p


VERBOSE_STAGES = ("pretrain", "finetune", "pipeline")


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    args = build_parser().parse_args(argv)
    if getattr(args, "verbose", False):
        from runtime.console import set_verbose

        set_verbose(True)
    return run_cli(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
