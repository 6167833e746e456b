"""CPU seconds of one digits `semi` run, the former default against the current one, side by side.

    python -m bench.semi_cost ENCODER_RUN SHARDS --out bench/results/semi_cost.json
    python -m bench.semi_cost --stage BEFORE_RUN AFTER_RUN --out bench/results/semi_stage.json
    python -m bench.semi_cost --json bench/results/semi_cost.json --section semi-cost   # bench/README.md's table
    python -m bench.semi_cost --json bench/results/semi_stage.json --section semi-stage

In one process with one torch thread, for labeled subset 0 at each labeled fraction: the fine-tuning `semi`
starts from, then the former `distill` (scikit-learn LabelSpreading, k=10, alpha 0.8, 10 passes of the whole
network over the pool) and the current one (`finetune.semi.propagate` with the config's spread settings, the
head on cached features for `distill_head_epochs`, `semi_epochs` passes), each from a copy of the same
fine-tuned model. Times are CPU seconds of this process (`time.process_time`), so other work on the machine
changes them little; test accuracy is printed beside them.

`--stage`: two `selfsup finetune` output dirs that ran at the same time on the same encoder and shards (so
under the same load), before and after: per method the summed run seconds (`compute_s` of report.json) and
accuracy, and each stage's wall time (`stage_s`: from finetune.config.yaml, written as the stage starts, to
report.json, written last).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.figures import read_results, readme_options, write_section
from runtime.errors import run_cli


def old_propagate(features, labeled, labels, num_classes, k=10, alpha=0.8):
    """The former teacher: scikit-learn's LabelSpreading on the L2-normalised features."""
    from sklearn.semi_supervised import LabelSpreading

    x = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    y = np.full(len(x), -1, dtype=np.int64)
    y[labeled] = labels
    ls = LabelSpreading(kernel="knn", n_neighbors=min(k, len(x) - 1), alpha=alpha, max_iter=100).fit(x, y)
    out = np.zeros((len(x), num_classes), dtype=np.float32)
    out[:, ls.classes_] = ls.label_distributions_
    return out


def stage(run_dir: str) -> dict:
    d = Path(run_dir)
    report = json.loads((d / "report.json").read_text())
    return {"run": str(d), "stage_s": round((d / "report.json").stat().st_mtime - (d / "finetune.config.yaml").stat().st_mtime, 1),
            "compute_s": report["compute_s"],
            "accuracy": {f"{r['method']}@{r['label_fraction']:g}": [round(r["accuracy_mean"], 4), round(r["accuracy_std"], 4)]
                         for r in report["results"]}}


def stage_table(r: dict) -> str:
    b, a = r["before"], r["after"]
    lines = [f"From `bench/results/semi_stage.json` (both stages at once on one encoder, 2 cores shared with other "
             f"work, load average at the end {r.get('load_average')}: compare the columns, not the seconds with "
             "other tables). Run seconds per method (summed over its runs; `semi` includes the fine-tuning it "
             "starts from):", "", "| method | before (s) | after (s) |", "|---|---|---|"]
    for m in b["compute_s"]:
        lines.append(f"| `{m}` | {b['compute_s'][m]} | {a['compute_s'].get(m, '')} |")
    lines.append(f"| whole stage, wall | {b['stage_s']} | {a['stage_s']} ({a['stage_s'] / b['stage_s']:.2f}x) |")
    return "\n".join(lines) + "\n"


def table(r: dict) -> str:
    """bench/README.md's table from a JSON this script wrote."""
    if "before" in r:
        return stage_table(r)
    lines = [f"From `bench/results/semi_cost.json` (pool of {r['pool']} images, load average at the end "
             f"{r.get('load_average')}; CPU seconds of one process, one thread; encoding the pool once: "
             f"{r['encode_pool_cpu_s']} s). Former: {r['former']}; current: {r['current']}.", "",
             "| fraction (labels) | fine-tuning it starts from: CPU s, acc | former semi: CPU s, teacher on pool, acc "
             "| current semi: CPU s, teacher on pool, acc | CPU current / former |",
             "|---|---|---|---|---|"]
    for x in r["runs"]:
        lines.append(
            f"| {x['fraction'] * 100:g} % ({x['labels']}) | {x['finetune_cpu_s']}, {x['finetune_acc'] * 100:.1f} % "
            f"| {x['former_semi_cpu_s']}, {x['former_teacher_pool_acc'] * 100:.1f} %, {x['former_acc'] * 100:.1f} % "
            f"| {x['current_semi_cpu_s']}, {x['current_teacher_pool_acc'] * 100:.1f} %, {x['current_acc'] * 100:.1f} % "
            f"| {x['semi_cpu_ratio_current_over_former']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.semi_cost", description=__doc__.split("\n")[0])
    p.add_argument("encoder", nargs="?")
    p.add_argument("shards", nargs="?")
    p.add_argument("--out", default=None, help="write the figures to this JSON")
    p.add_argument("--stage", nargs=2, default=None, metavar=("BEFORE_RUN", "AFTER_RUN"),
                   help="compare two fine-tuning stages that ran side by side")
    p.add_argument("--json", default=None, help="with --section: the JSON to fill the README block from")
    readme_options(p, section_required=False)
    args = p.parse_args(argv)
    if args.encoder and args.shards:
        measure(args)
    if args.stage:
        data = {"before": stage(args.stage[0]), "after": stage(args.stage[1]),
                "load_average": [round(v, 2) for v in os.getloadavg()]}
        Path(args.out).write_text(json.dumps(data, indent=2) + "\n")
    if args.section:
        source = args.json or args.out
        return run_cli(lambda: write_section(args.readme, args.section, table(read_results(source)), source))
    return 0


def measure(args) -> None:
    from finetune import classifier as clf
    from finetune.linear import encode
    from finetune.semi import distill, propagate
    from finetune.subsets import labeled_subset
    from pretrain.model import load_encoder
    from runtime.config import Config
    from shards.manifest import read_manifest
    from shards.splits import load_split, split_index

    torch.set_num_threads(1)
    ft = Config().finetune
    manifest = read_manifest(args.shards)
    keys, ys = split_index(args.shards, "train")
    size = int(manifest["image_size"])
    x, y, k = load_split(args.shards, "train", keys=keys, image_size=size)
    xt, yt, _ = load_split(args.shards, "test", image_size=size)
    row = {kk: i for i, kk in enumerate(k)}
    backbone, head, meta = load_encoder(args.encoder, with_head=True)
    arch = clf.architecture(meta, len(manifest["classes"]), ft.start_from)
    mean, std = manifest["mean"], manifest["std"]
    mild = clf.make_augment(clf.mild_augment(Config().augment), size, mean, std, "cpu")
    t = time.process_time()
    feats = encode(backbone, x, mean, std).numpy()
    encode_s = time.process_time() - t
    nc = int(arch["num_classes"])

    def acc(model):
        return float((clf.predict_logits(model, xt, mean, std).argmax(1).numpy() == yt.numpy()).mean())

    out = {"encoder": args.encoder, "pool": len(x), "encode_pool_cpu_s": round(encode_s, 2), "runs": [],
           "current": {"spread_k": ft.spread_k, "spread_alpha": ft.spread_alpha,
                       "distill_head_epochs": ft.distill_head_epochs, "semi_epochs": ft.semi_epochs},
           "former": {"spread": "sklearn LabelSpreading k=10 alpha=0.8", "distill_head_epochs": 0, "semi_epochs": 10}}
    for fraction in sorted(float(s["fraction"]) for s in manifest["labeled_subsets"].values()):
        lab = np.array([row[kk] for kk in labeled_subset(args.shards, manifest, fraction, 0, keys, ys.tolist())])
        labels = y[lab].numpy()
        torch.manual_seed(0)
        t = time.process_time()
        tuned = clf.build_classifier(arch, copy.deepcopy(backbone), copy.deepcopy(head))
        clf.train_supervised(tuned, x[lab], y[lab], mild, epochs=ft.epochs, batch_size=ft.batch_size, lr=ft.lr,
                             weight_decay=ft.weight_decay, seed=0)
        r = {"fraction": fraction, "labels": len(lab), "finetune_cpu_s": round(time.process_time() - t, 2),
             "finetune_acc": acc(tuned)}
        for name, spread, he, e in (("former", lambda lab=lab, labels=labels: old_propagate(feats, lab, labels, nc), 0, 10),
                                    ("current", lambda lab=lab, labels=labels: propagate(feats, lab, labels, nc, k=ft.spread_k,
                                                                  alpha=ft.spread_alpha, prior=ft.spread_prior),
                                     ft.distill_head_epochs,
                                     ft.semi_epochs)):
            model = copy.deepcopy(tuned)
            t = time.process_time()
            soft = spread()
            spread_s = time.process_time() - t
            distill(model, x, soft, lab, labels, mild, rounds=ft.distill_rounds, epochs=e, batch_size=ft.batch_size,
                    lr=ft.semi_lr, weight_decay=ft.weight_decay, seed=0, mean=mean, std=std, head_epochs=he)
            r[f"{name}_spread_cpu_s"] = round(spread_s, 2)
            r[f"{name}_semi_cpu_s"] = round(time.process_time() - t, 2)  # spreading + distillation
            r[f"{name}_teacher_pool_acc"] = float((soft.argmax(1) == y.numpy()).mean())
            r[f"{name}_acc"] = acc(model)
        r["semi_cpu_ratio_current_over_former"] = round(r["current_semi_cpu_s"] / r["former_semi_cpu_s"], 3)
        print(json.dumps(r), flush=True)
        out["runs"].append(r)
    out["load_average"] = [round(v, 2) for v in os.getloadavg()]
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
