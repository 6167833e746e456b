"""Command-line glue for `selfsup select` (which images to label) and `selfsup inspect` (a data report)."""

from __future__ import annotations

import argparse

from runtime.args import add_config_args
from runtime.runlock import lock_scope


def add_select_args(p: argparse.ArgumentParser) -> None:
    p.description = ((p.description.rstrip(".") + ". ") if p.description else "") + (
        "Chooses budget=N train images from the encoder's features (encoder=RUN_DIR), never reading labels, with "
        "each strategy in finetune.selection (typiclust when empty); writes <output_dir>/subsets/"
        "selected-<N>-<strategy>.txt (one key per line), .json and a contact sheet .png.")
    add_config_args(p, ["selfsup select encoder=runs/digits output_dir=runs/digits-select budget=15",
                        "selfsup select --config configs/cifar10.yaml encoder=runs/cifar10 budget=100 "
                        "finetune.selection=[random,typiclust,kcenter]"])


@lock_scope
def select_main(args: argparse.Namespace) -> int:
    from finetune.cli import _claim_output_dir
    from finetune.selection import run_select
    from runtime.args import load_args_config

    cfg = load_args_config(args)
    _claim_output_dir(cfg.output_dir, "selfsup select")
    for r in run_select(cfg):
        print(f"{r['strategy']}: {r['budget']} of {r['train_images']} train images -> {r['path']} "
              f"(contact sheet {r['png']})", flush=True)
    return 0


def add_inspect_args(p: argparse.ArgumentParser) -> None:
    p.description = ((p.description.rstrip(".") + ". ") if p.description else "") + (
        "Reads the encoder (encoder=RUN_DIR, default output_dir) and the shards; writes data_report.md, "
        "data_report.json and thumbnail PNGs into output_dir, and a W&B run with the tables.")
    add_config_args(p, ["selfsup inspect encoder=runs/digits output_dir=runs/digits",
                        "selfsup inspect --config configs/imagefolder.yaml encoder=runs/mine "
                        "inspect.duplicate_threshold=0.98"])


@lock_scope
def inspect_main(args: argparse.Namespace) -> int:
    from finetune.cli import _claim_output_dir
    from finetune.datareport import run_inspect, summary_lines
    from runtime.args import load_args_config

    cfg = load_args_config(args)
    _claim_output_dir(cfg.output_dir, "selfsup inspect")
    report = run_inspect(cfg)
    for line in summary_lines(report):
        print(line, flush=True)
    return 0
