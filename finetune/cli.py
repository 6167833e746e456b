"""Command-line glue for `finetune` and `predict`."""

from __future__ import annotations

import argparse

from pretrain.cli import add_config_args


def add_finetune_args(p: argparse.ArgumentParser) -> None:
    add_config_args(p)


def finetune_main(args: argparse.Namespace) -> int:
    from finetune.run import run_finetune
    from pretrain.cli import load_args_config

    report = run_finetune(load_args_config(args))
    for c in report["comparisons"]:
        v = c["beats_all_baselines_by_2std"]
        verdict = "beats" if v else "cannot be tested (fewer than 2 seeds) to beat" if v is None else "does NOT beat"
        print(f"{c['label_fraction']:g} labeled: {c['best']} {c['accuracy_mean']:.4f} {verdict} "
              f"{', '.join(c['against'])} by > 2 std")
    return 0


def add_predict_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a classifier dir (<output_dir>/classifiers/<method>-<fraction>) or a fine-tuning "
                   "output_dir (then its classifier trained on the most labels)")
    p.add_argument("images", nargs="+", help="image files")


def predict_main(args: argparse.Namespace) -> int:
    from finetune.predict import predict_files

    for path, name in predict_files(args.model, args.images):
        print(f"{path}\t{name}")
    return 0
