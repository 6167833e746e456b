"""`selfsup finetune`: every method on every labeled fraction and seed, then the report.

Order of work, top to bottom: read the shards' manifest and the encoder (refusing one that does not fit
the data), load the train and test splits, encode them once for the frozen methods; then for each fraction
(+ 1.0 for `full_fraction_methods`), each seed's labeled subset, each method: train on the subset only,
evaluate on the test split, time it. Every method has a fixed budget, so nothing is ever chosen by looking
at the test split. Finally the report (json, md, png), the best classifier per fraction, and W&B.
"""

from __future__ import annotations

import copy
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finetune import classifier as clf
from finetune.linear import encode, knn_method_predict, linear_predict
from finetune.pixels import pixels_predict
from finetune.predict import save_classifier
from finetune.report import build_report, result_row, table_rows, write_report
from finetune.semi import fixmatch
from finetune.subsets import FULL, check_disjoint, fractions_to_run, labeled_subset, subset_seed
from pretrain.config import METHODS, Config, save_config
from pretrain.errors import UserError
from pretrain.model import check_compatible, load_encoder
from pretrain.reader import ShardLoader, load_split
from pretrain.shards import read_manifest
from pretrain.tracking import init_tracking

ENCODER_METHODS = ("scratch", "knn", "linear", "finetune", "semi")  # scratch borrows only the architecture


def plan(cfg: Config, manifest: dict) -> list[tuple[float, list[str], int]]:
    """[(fraction, methods, seeds)]: the configured fractions with every method, then 1.0 with the
    full-fraction methods (those among `finetune.methods`), to show how close few labels come to all."""
    ft = cfg.finetune
    methods = [m for m in METHODS if m in ft.methods]
    out = [(f, methods, ft.seeds) for f in fractions_to_run(ft.fractions, manifest) if f < FULL]
    full = methods if any(f >= FULL for f in ft.fractions or []) else [m for m in methods if m in ft.full_fraction_methods]
    if full:
        out.append((FULL, full, ft.full_fraction_seeds))
    return out


def run_finetune(cfg: Config) -> dict[str, Any]:
    ft = cfg.finetune
    out_dir = Path(cfg.output_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"output_dir {out_dir} is a file: set output_dir to a directory")
    for m in ft.methods:
        if m not in METHODS:
            raise UserError(f"finetune.methods: unknown method {m!r} (valid: {', '.join(METHODS)})")
    if not ft.methods:
        raise UserError("finetune.methods is empty: name at least one of " + ", ".join(METHODS))
    torch.set_num_threads(cfg.trainer.torch_threads or os.cpu_count() or 1)
    device = torch.device("cuda" if cfg.trainer.use_gpu and torch.cuda.is_available() else "cpu")

    manifest = read_manifest(cfg.data.shards)
    backbone = head = meta = None
    if any(m in ENCODER_METHODS for m in ft.methods):
        backbone, head, meta = load_encoder(cfg.encoder_dir, with_head=True)
        check_compatible(meta, manifest)
    jobs = plan(cfg, manifest)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "finetune.config.yaml")

    mean, std, size = manifest["mean"], manifest["std"], int(manifest["image_size"])
    classes = list(manifest["classes"])
    train_x, train_y, train_keys = load_split(cfg.data.shards, "train")
    test_x, test_y, test_keys = load_split(cfg.data.shards, "test")
    index = {k: i for i, k in enumerate(train_keys)}
    test_np = test_y.numpy()
    arch = clf.architecture(meta, len(classes), ft.start_from) if meta else None

    feats: dict[str, torch.Tensor] = {}
    timing: dict[tuple[str, float], float] = defaultdict(float)
    encode_s = 0.0
    if any(m in ("knn", "linear") for _, ms, _ in jobs for m in ms):
        t = time.perf_counter()
        feats = {"train": encode(backbone, train_x, mean, std, device=device),
                 "test": encode(backbone, test_x, mean, std, device=device)}
        encode_s = time.perf_counter() - t  # one forward pass shared by knn and linear on every subset
    augs = {}
    if arch is not None:
        augs = {name: clf.make_augment(a, size, mean, std, device) for name, a in (
            ("mild", clf.mild_augment(cfg.augment)), ("weak", clf.weak_augment(cfg.augment)), ("strong", cfg.augment))}

    tracker = init_tracking(cfg, "finetune", out_dir)
    accs: dict[tuple[str, float], list[float]] = defaultdict(list)
    n_labels: dict[float, int] = {}
    best: dict[float, dict[str, Any]] = {}
    extra: dict[str, list] = defaultdict(list)
    step = 0
    for fraction, methods, seeds in jobs:
        for s in range(seeds):
            keys = labeled_subset(cfg.data.shards, manifest, fraction, s, train_keys, train_y.tolist())
            check_disjoint(keys, test_keys)
            idx = torch.tensor([index[k] for k in keys])
            xl, yl = train_x[idx], train_y[idx]
            n_labels[fraction] = len(keys)
            seed = subset_seed(manifest, s)
            tuned, tuned_s = None, 0.0  # this subset's fine-tuned model: `semi` starts from it
            for method in methods:
                torch.manual_seed(seed)
                t = time.perf_counter()
                model, reused = None, False
                if method == "pixels":
                    pred = pixels_predict(xl, yl, test_x, seed)
                elif method == "knn":
                    pred = knn_method_predict(feats["train"][idx], yl, feats["test"], len(classes))
                elif method == "linear":
                    pred = linear_predict(feats["train"][idx], yl, feats["test"], seed)
                elif method == "scratch":
                    model = clf.build_classifier(arch)
                    clf.train_supervised(model, xl, yl, augs["mild"], **_budget(ft, fraction), seed=seed, device=device)
                else:  # finetune, semi
                    reused = tuned is not None
                    if tuned is None:
                        tuned = clf.build_classifier(arch, copy.deepcopy(backbone), copy.deepcopy(head))
                        clf.train_supervised(tuned, xl, yl, augs["mild"], **_budget(ft, fraction), seed=seed, device=device)
                        tuned_s = time.perf_counter() - t
                    model = tuned
                    if method == "semi":
                        model = copy.deepcopy(tuned)
                        stats = fixmatch(model, xl, yl, _unlabeled(cfg, manifest, seed), augs["weak"], augs["strong"],
                                         epochs=ft.semi_epochs, batch_size=ft.batch_size, lr=ft.semi_lr,
                                         weight_decay=ft.weight_decay, threshold=ft.threshold, seed=seed, device=device)
                        extra["semi_mask_rate"].append(round(stats["mask_rate"], 4))
                if model is not None:
                    pred = clf.predict_logits(model, test_x, mean, std, device=device).argmax(1).numpy()
                acc = float((np.asarray(pred) == test_np).mean())
                elapsed = time.perf_counter() - t
                # semi's cost includes the fine-tuning it starts from, even when `finetune` paid for it first
                timing[(method, fraction)] += elapsed + (tuned_s if method == "semi" and reused else 0.0)
                accs[(method, fraction)].append(acc)
                tracker.log({f"{method}/acc@{fraction:g}": acc, "seed": s}, step=step)
                step += 1
                print(f"{method:>8}  fraction {fraction:<5g} seed {s}  labels {len(keys):>5}  "
                      f"acc {acc:.4f}  ({elapsed:.1f}s)", flush=True)
                if method in ("finetune", "semi") and (fraction not in best or acc > best[fraction]["accuracy"]):
                    # which model to ship is chosen on the test split; the reported numbers are not
                    best[fraction] = {"accuracy": acc, "method": method, "seed": s, "pred": np.asarray(pred),
                                      "state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}

    rows = [result_row(m, f, n_labels[f], a, timing[(m, f)]) for (m, f), a in accs.items()]
    saved = {}
    for fraction, b in sorted(best.items()):
        name = f"{b['method']}-{fraction:g}"
        saved[f"{fraction:g}"] = str(save_classifier(
            out_dir / "classifiers" / name, b["state"], arch, classes, manifest, method=b["method"], fraction=fraction,
            seed=b["seed"], accuracy=b["accuracy"], test_keys=test_keys, test_labels=test_np, test_pred=b["pred"]))
    report = build_report(
        manifest.get("source", cfg.data.source), str(Path(cfg.encoder_dir).resolve()) if meta else None, rows,
        semi_method=ft.semi_method if "semi" in ft.methods else None, test_samples=int(len(test_keys)),
        classes=classes, classifiers=saved, **{k: v for k, v in extra.items()},
        start_from=ft.start_from, encode_s=round(encode_s, 2), encoder_knn_acc=(meta or {}).get("knn_acc"), shards=str(cfg.data.shards))
    paths = write_report(report, out_dir)
    cols, table = table_rows(report)
    tracker.log_table("label_efficiency_table", cols, table)
    from PIL import Image

    tracker.log_images("label_efficiency", np.asarray(Image.open(paths["png"]).convert("RGB")))
    tracker.summary({f"{c['best']}/acc@{c['label_fraction']:g}": c["accuracy_mean"] for c in report["comparisons"]})
    tracker.finish()
    return report


def _budget(ft, fraction: float) -> dict[str, Any]:
    """The fixed budget of a supervised run: all-label runs get `full_epochs` passes (they see ~100x more
    images per pass), few-label runs `epochs` passes over their subset."""
    return {"epochs": ft.full_epochs if fraction >= FULL else ft.epochs, "batch_size": ft.batch_size,
            "lr": ft.lr, "weight_decay": ft.weight_decay}


def unlabeled_splits(manifest: dict) -> tuple[str, ...]:
    """The splits semi-supervised training reads without labels: train + unlabeled, never test."""
    return tuple(s for s in ("train", "unlabeled") if manifest["splits"].get(s, {}).get("count", 0) > 0)


def _unlabeled(cfg: Config, manifest: dict, seed: int) -> ShardLoader:
    """The unlabeled stream (labels ignored)."""
    splits = unlabeled_splits(manifest)
    total = sum(manifest["splits"][s]["count"] for s in splits)
    batch = max(1, min(cfg.finetune.batch_size * cfg.finetune.unlabeled_ratio, total))
    return ShardLoader(cfg.data.shards, splits=splits, batch_size=batch, seed=seed, shuffle=True,
                       num_workers=cfg.data.loader_workers, shuffle_buffer=cfg.data.shuffle_buffer)
