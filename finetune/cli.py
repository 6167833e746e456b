"""Command-line glue for `finetune` and `predict`."""

from __future__ import annotations

import argparse

from runtime.args import add_config_args
from runtime.runlock import hold, lock_scope


def add_finetune_args(p: argparse.ArgumentParser) -> None:
    p.description = ((p.description.rstrip(".") + ". ") if p.description else "") + (
        "Reads the encoder of a pretraining run: encoder=RUN_DIR (default: output_dir, where `pretrain` wrote it).")
    add_config_args(p, ["selfsup finetune encoder=runs/digits output_dir=runs/digits-ft finetune.num_seeds=3",
                        "selfsup finetune --config configs/cifar10.yaml encoder=runs/cifar10 "
                        "finetune.methods=[linear,finetune]"])


@lock_scope
def finetune_main(args: argparse.Namespace) -> int:
    from finetune.run import run_finetune
    from runtime.args import load_args_config

    cfg = load_args_config(args)
    _claim_output_dir(cfg.output_dir)
    report = run_finetune(cfg)
    for c in report["comparisons"]:
        if c.get("too_few_test_samples"):
            print(f"{c['label_fraction']:g} labeled: {c['best']} {c['accuracy_mean']:.4f}; too few test images "
                  f"({report.get('test_samples')}) for a 2-std verdict against {', '.join(c['against'])}")
            continue
        v = c["beats_all_baselines_by_2std"]
        verdict = "beats" if v else "cannot be tested (fewer than 2 seeds) to beat" if v is None else "does NOT beat"
        print(f"{c['label_fraction']:g} labeled: {c['best']} {c['accuracy_mean']:.4f} {verdict} "
              f"{', '.join(c['against'])} by > 2 std")
    for c in report.get("selection_comparisons", []):  # finetune.selection: each strategy against uniform random
        v = c["beats_random_by_2std"]
        verdict = "no spread (1 seed)" if v is None else "beats random by > 2 std" if v else \
            "no worse than random" if c["no_worse"] else "worse than random"
        print(f"{c['labels']} labels chosen by {c['selection']}: {c['method']} {c['accuracy_mean']:.4f} vs "
              f"{c['random_mean']:.4f} on random ones, {verdict}")
    return 0


def _claim_output_dir(output_dir: str, command: str = "selfsup finetune") -> None:
    """Before any work: output_dir (created if missing) must be a writable directory no other run is using."""
    import os
    from pathlib import Path

    from runtime.errors import UserError

    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir {out} is a file: set output_dir to a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)  # to hold its lock from the start, as pretrain does
    except OSError as e:
        raise UserError(f"cannot create output_dir {out} ({e.strerror or e}): choose a writable directory") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise UserError(f"output_dir {out} is not writable (permissions, or an immutable or read-only "
                        "directory): choose a writable output_dir")
    hold(out, command)


def add_predict_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a classifier dir (<output_dir>/classifiers/<method>-<fraction>) or a fine-tuning "
                   "output_dir (then its classifier trained on the most labels)")
    p.add_argument("images", nargs="+", help="image files, or directories: the image files under them (recursively, "
                   "sorted); printed as each batch is classified, so a folder of any size streams")
    p.add_argument("--top-k", type=int, default=1, metavar="K",
                   help="print the K most probable classes of each image, most probable first (default 1)")
    p.add_argument("--json", action="store_true",
                   help='print one JSON array for scripts: [{"image", "predictions": [{"class", "probability"}]} '
                        'or {"image", "error"}]')
    p.add_argument("--batch-size", type=int, default=256, metavar="N",
                   help="images decoded and classified at a time (default 256): memory is flat in their number")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the classifier runs (default cpu)")


def predict_main(args: argparse.Namespace) -> int:
    import json
    import sys

    import torch

    from finetune.predict import image_paths, iter_top_k
    from runtime.errors import UserError, one_line

    if args.top_k < 1:
        raise UserError(f"--top-k {args.top_k}: give 1 or more")
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: give 1 or more")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible here; leave --device out to run on the CPU")
    results = iter_top_k(args.model, image_paths(args.images), args.top_k, args.batch_size, args.device)
    failed, first = 0, True
    if args.json:
        print("[", end="", flush=True)
    try:
        for path, top, error in results:
            if error is not None:  # one line per unreadable image; the others go on
                failed += 1
                print(f"error: {one_line(error)}", file=sys.stderr, flush=True)
            if args.json:
                item = ({"image": path, "error": one_line(error)} if error is not None else
                        {"image": path, "predictions": [{"class": c, "probability": round(v, 6)} for c, v in top]})
                print(("\n  " if first else ",\n  ") + json.dumps(item), end="", flush=True)
                first = False
            elif error is None:  # PATH<TAB>CLASS<TAB>PROBABILITY, then the next most probable with --top-k
                print("\t".join([path, *(f"{c}\t{v:.3f}" for c, v in top)]), flush=True)
    finally:
        if args.json:
            print("\n]", flush=True)  # what was printed stays one valid array, even when a later path fails
    return 2 if failed else 0
