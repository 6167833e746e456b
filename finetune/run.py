"""`selfsup finetune`: every method on every labeled fraction and seed, then the report.

Order of work, top to bottom: read the shards' manifest and the encoder (refusing one that does not fit
the data), index the train and test splits (keys and labels; images are streamed from the shards as each
method needs them, so memory stays flat in the data's size), draw each seed's labeled subset (train keys only,
never a test key); run the cheap methods here (pixels on a bounded sample, and knn/linear on features
encoded once by streaming), the trained ones
(scratch, finetune, semi) in-process, as one Ray task per labeled subset (many at once) or under Ray Train
(`execution_mode`); then the report
(json, md, png), one classifier per fraction chosen by a fixed rule (`semi`, else `finetune`, of the first
labeled subset), and W&B. Every method has a fixed budget, so nothing is ever chosen by looking at the test
split.
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finetune import classifier as clf
from finetune.data import labeled_images, sample_of, stream_predict, test_index
from finetune.embedding import FILE as EMBEDDING_FILE
from finetune.embedding import write_embedding
from finetune.encode import encode_split
from finetune.linear import knn_method_predict, linear_predict
from finetune.pixels import pixels_fit, pixels_predict_with
from finetune.placement import run_settings, unlabeled_count, unlabeled_splits
from finetune.predict import save_classifier
from finetune.report import build_report, result_row, table_rows, write_report
from finetune.selection import BALANCED, selection_jobs, selection_loop
from finetune.subsets import FULL, check_disjoint, fractions_to_run, labeled_subset, subset_seed
from finetune.supervised import SELECTION, TRAINED
from pretrain.model import check_compatible, load_encoder
from runtime.config import METHODS, Config, save_config
from runtime.console import Progress
from runtime.errors import UserError
from runtime.launch import one_cluster, run_tasks, run_training
from runtime.tracking import init_tracking
from shards.manifest import read_manifest
from shards.splits import split_index

ENCODER_METHODS = ("scratch", "knn", "linear", "finetune", "semi")  # scratch borrows only the architecture


def plan(cfg: Config, manifest: dict) -> list[tuple[float, list[str], int]]:
    """[(fraction, methods, seeds)]: the configured fractions with every method, then 1.0 with the
    full-fraction methods (those among `finetune.methods`), to show how close few labels come to all."""
    ft = cfg.finetune
    methods = [m for m in METHODS if m in ft.methods]
    out = [(f, methods, ft.num_seeds) for f in fractions_to_run(ft.fractions, manifest) if f < FULL]
    full = methods if any(f >= FULL for f in ft.fractions or []) else [m for m in methods if m in ft.full_fraction_methods]
    if full:
        out.append((FULL, full, ft.full_fraction_seeds))
    return out


def run_finetune(cfg: Config) -> dict[str, Any]:
    with one_cluster():  # the frozen encodes and the trained methods share one cluster (when they use one)
        return _finetune(cfg)


def _finetune(cfg: Config) -> dict[str, Any]:
    ft = cfg.finetune
    out_dir = Path(cfg.output_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"output_dir {out_dir} is a file: set output_dir to a directory")
    if not ft.methods:
        raise UserError("finetune.methods is empty: name at least one of " + ", ".join(METHODS))

    # absolute paths: the Ray tasks and workers run in working directories of their own, maybe on other nodes
    if "://" not in cfg.data.shards and not cfg.data.shards.startswith("pipe:"):
        cfg.data.shards = str(Path(cfg.data.shards).resolve())
    manifest = read_manifest(cfg.data.shards)
    backbone = head = meta = None
    if any(m in ENCODER_METHODS for m in ft.methods):
        backbone, head, meta = load_encoder(cfg.encoder_dir, with_head=True)
        check_compatible(meta, manifest, image_size=cfg.data.image_size)
    jobs = plan(cfg, manifest)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "finetune.config.yaml")

    # one resolution: the size the encoder was trained at (data.image_size, which check_compatible matched)
    mean, std = manifest["mean"], manifest["std"]
    size = int(meta["image_size"]) if meta else int(cfg.data.image_size)
    classes = list(manifest["classes"])
    train_keys, train_y = split_index(cfg.data.shards, "train")  # keys and labels only: no image decoded
    test_keys, test_np = test_index(cfg.data.shards, size)
    arch = clf.architecture(meta, len(classes), ft.start_from) if meta else None
    tracker = init_tracking(cfg, "finetune", out_dir)
    # lineage: the encoder artifact pretraining logged is this run's input
    if meta and all((Path(cfg.encoder_dir) / f).is_file() for f in ENCODER_FILES):
        enc_dir = Path(cfg.encoder_dir).resolve()
        tracker.use_artifact(f"{encoder_run_name(enc_dir, cfg.name)}-encoder", "model",
                             [enc_dir / f for f in ENCODER_FILES])

    # ---- the labeled subsets: train keys only, checked against the test keys
    subsets = []
    for fraction, methods, seeds in jobs:
        for s in range(seeds):
            # all labels are one subset: further seeds only vary training, so the fits that have no seed to vary
            # (pixels, knn, linear) run once and the trained methods on every seed
            todo = methods if s == 0 or fraction < FULL else [m for m in methods if m in TRAINED]
            if not todo:
                continue
            keys = labeled_subset(cfg.data.shards, manifest, fraction, s, train_keys, train_y.tolist())
            check_disjoint(keys, test_keys)
            subsets.append({"fraction": fraction, "seed_index": s, "seed": subset_seed(manifest, s), "keys": keys,
                            "methods": todo})
    n_labels = {j["fraction"]: len(j["keys"]) for j in subsets}
    # where the trained methods run, with which trainer settings; the frozen encodes run there too
    mode, workers, run_cfg = run_settings(cfg, manifest)
    on_cluster = mode != "local"
    # finetune.selection: the same budgets and seeds on subsets chosen from the encoder's features (no labels)
    subsets += selection_jobs(run_cfg, manifest, backbone, subsets, size, out_dir, on_cluster)
    # one display for the stage: runs done / total with time left, and a line as each run finishes
    progress = Progress("finetune", sum(len(j["methods"]) for j in subsets), unit="runs")

    # ---- cheap methods, here: pixels, and knn/linear on features encoded once (streamed) for every subset, on
    # the cluster when the trained methods run there (finetune/encode.py)
    results: list[dict[str, Any]] = []
    encode_s = 0.0
    encoded: dict[str, Any] = {}  # where and in which formats the frozen features were computed
    pixel_fits: dict[float, int] = {}  # fraction -> labeled images the pixel fit used, where it was a sample
    frozen = [j for j in subsets if any(m in ("knn", "linear") for m in j["methods"])]
    if frozen:
        t = time.perf_counter()
        wanted = {k for j in frozen for k in j["keys"]}
        feats, feat_y, feat_keys, encoded = encode_split(
            backbone, run_cfg, "train", None if len(wanted) == len(train_keys) else wanted, size, mean, std, on_cluster)
        row_of = {k: i for i, k in enumerate(feat_keys)}
        test_feats, _, _, _ = encode_split(backbone, run_cfg, "test", None, size, mean, std, on_cluster)
        encode_s = time.perf_counter() - t
    for job in subsets:
        for method in [m for m in job["methods"] if m not in TRAINED]:
            t = time.perf_counter()
            if method == "pixels":
                fit_keys = sample_of(job["keys"], ft.pixels_max_samples, job["seed"])
                if len(fit_keys) < len(job["keys"]):
                    pixel_fits[job["fraction"]] = len(fit_keys)
                xl, yl = labeled_images(cfg.data.shards, fit_keys, size)
                model = pixels_fit(xl, yl, job["seed"])
                del xl
                pred = stream_predict(lambda x, model=model: pixels_predict_with(model, x), cfg.data.shards, size)
            else:
                idx = torch.tensor([row_of[k] for k in job["keys"] if k in row_of], dtype=torch.long)
                yl = feat_y[idx]
                if method == "knn":
                    pred = knn_method_predict(feats[idx], yl, test_feats, len(classes))
                else:
                    pred = linear_predict(feats[idx], yl, test_feats, job["seed"])
            results.append({"method": method, "fraction": job["fraction"], "seed_index": job["seed_index"],
                            "accuracy": float((pred == test_np).mean()), "seconds": time.perf_counter() - t,
                            "selection": job.get("selection", BALANCED)})
            _echo(results[-1], len(job["keys"]), progress)

    # ---- trained methods: in this process, one Ray task per subset, or Ray Train DDP (see execution_mode)
    trained = [{**j, "methods": [m for m in j["methods"] if m in TRAINED]} for j in subsets]
    trained = [j for j in trained if j["methods"]]
    best: dict[float, dict[str, Any]] = {}
    formats: dict[str, Any] = {}  # what finetune.precision / channels_last resolved to where the trained methods ran
    if trained:
        common = {"cfg": cfg, "arch": arch, "encoder": (backbone, head), "mean": mean, "std": std, "image_size": size,
                  "test_labels": test_np,
                  "unlabeled_splits": unlabeled_splits(manifest),
                  "unlabeled_batch": max(1, min(ft.batch_size * ft.fixmatch_unlabeled_ratio, unlabeled_count(manifest))),
                  "report_runs": True}
        name = f"{cfg.name}-finetune"

        def on_report(m: dict[str, Any]) -> None:  # local / train: each run as rank 0 reports it
            if isinstance(m.get("run"), dict):
                _echo(m["run"], int(m.get("labels", 0)), progress)

        try:
            if mode == "tasks":  # the costliest subsets first, so the last task to start is a short one
                order = sorted(trained, key=lambda j: -len(j["keys"]) * len(j["methods"]))

                def on_done(i: int, out: dict[str, Any]) -> None:  # a task's runs, as the task finishes
                    for r in out["results"]:
                        _echo(r, len(order[i]["keys"]), progress)

                outs = run_tasks(selection_loop, [{**common, "jobs": [j]} for j in order], run_cfg, name,
                                 on_done=on_done)
            else:
                outs = [run_training(selection_loop, {**common, "jobs": trained}, run_cfg, local=mode == "local",
                                     name=name, on_report=on_report)]
        finally:
            progress.close()
        for out in outs:
            results += out["results"]
            best.update(out["best"])  # at most one per fraction: the fixed rule's (finetune.supervised.SELECTION)
            formats = out.get("formats") or formats

    # ---- rows, the shipped classifiers, the report
    accs: dict[tuple[str, float, str], list[float]] = defaultdict(list)
    secs: dict[tuple[str, float, str], float] = defaultdict(float)
    for step, r in enumerate(sorted(results, key=lambda r: (r.get("selection", BALANCED) != BALANCED,
                                                            r.get("selection", BALANCED), r["fraction"],
                                                            r["seed_index"]))):
        sel = r.get("selection", BALANCED)
        accs[(r["method"], r["fraction"], sel)].append(r["accuracy"])
        secs[(r["method"], r["fraction"], sel)] += r["seconds"]
        tracker.log({_metric(r["method"], r["fraction"], sel): r["accuracy"]}, step=step)
    shared = [m for m in ("knn", "linear") if any(k[0] == m for k in accs)]
    for m in shared:  # the one encoding pass, split between the frozen methods that used it
        secs[(m, min(f for mm, f, s in accs if mm == m and s == BALANCED), BALANCED)] += encode_s / len(shared)
    rows = [result_row(m, f, n_labels[f], a, secs[(m, f, s)], selection=s) for (m, f, s), a in accs.items()]
    for r in rows:  # the pixel baseline fit on a bounded seeded sample of a large labeled subset says so
        if r["method"] == "pixels" and r["label_fraction"] in pixel_fits:
            r["fit_samples"] = pixel_fits[r["label_fraction"]]
    saved = {}
    for fraction, b in sorted(best.items()):
        state = {k: torch.from_numpy(v.copy()) for k, v in b["state"].items()}  # Ray hands back read-only arrays
        d = save_classifier(out_dir / "classifiers" / f"{b['method']}-{fraction:g}", state, arch, classes,
                            manifest, image_size=size, method=b["method"], fraction=fraction, seed=b["seed_index"],
                            selection=SELECTION,
                            accuracy=b["accuracy"], test_keys=test_keys, test_labels=test_np, test_pred=b["pred"])
        saved[f"{fraction:g}"] = str(d)
        tracker.log_artifact(f"{cfg.name}-classifier-{d.name}", "model", sorted(p for p in d.iterdir() if p.is_file()),
                             metadata={"method": b["method"], "label_fraction": fraction, "seed_index": b["seed_index"],
                                       "accuracy": b["accuracy"], "selection": SELECTION})
    mask = [r["mask_rate"] for r in results if "mask_rate" in r]
    weight = [r["model_weight"] for r in results if "model_weight" in r]
    heldout = semi_heldout(results)
    report = build_report(
        manifest.get("source", cfg.data.source), str(Path(cfg.encoder_dir).resolve()) if meta else None, rows,
        semi_method=ft.semi_method if "semi" in ft.methods else None, semi_mask_rate=mask or None, semi_model_weight=weight or None,
        **({"semi_student": ft.distill_student, "semi_bn_stats": ft.distill_bn_stats}
           if "semi" in ft.methods and ft.semi_method == "distill" else {}),
        **({"probe_epochs": ft.probe_epochs, "backbone_lr_scale": ft.backbone_lr_scale, "wise_alpha": ft.wise_alpha}
           if {"finetune", "semi"} & set(ft.methods) else {}),
        **formats, start_from=ft.start_from, test_samples=len(test_keys), classes=classes, classifiers=saved,
        encoder_knn_acc=(meta or {}).get("knn_acc"), encode_s=round(encode_s, 2),
        **({"encode": encoded} if encoded else {}), shards=str(cfg.data.shards),
        num_workers=workers, execution=mode, image_size=size, pixels_max_samples=ft.pixels_max_samples,
        **({"semi_heldout": heldout} if heldout else {}))
    embedding = None
    if backbone is not None:  # a picture of what the encoder learned, beside the report (report.json says so)
        embedding = write_embedding(backbone, cfg.data.shards, test_keys, classes, size, mean, std,
                                    int(manifest.get("seed", cfg.data.seed)), out_dir / EMBEDDING_FILE)
        report["embedding"] = EMBEDDING_FILE
    paths = write_report(report, out_dir)
    cols, table = table_rows(report)
    tracker.log_table("label_efficiency_table", cols, table)
    from PIL import Image

    with Image.open(paths["png"]) as im:
        tracker.log_images("label_efficiency", np.asarray(im.convert("RGB")))
    if embedding is not None:
        tracker.log_images("embedding", embedding["pixels"],
                           caption=f"encoder features of {embedding['points']} test images, PCA, coloured by class")
    tracker.save_file(paths["md"])
    tracker.summary(summary_values(report))
    tracker.finish()
    return report


ENCODER_FILES = ("encoder.safetensors", "head.safetensors", "encoder.json")


def encoder_run_name(enc_dir: Path, default: str) -> str:
    """The pretraining run's `name` (its encoder artifact is `<name>-encoder`), from the config it saved."""
    try:
        import yaml

        name = (yaml.safe_load((enc_dir / "config.yaml").read_text()) or {}).get("name")
    except (OSError, ValueError, AttributeError, yaml.YAMLError):
        name = None
    return name if isinstance(name, str) and name else default


def summary_values(report: dict[str, Any]) -> dict[str, float]:
    """The W&B summary: for every method and label fraction the mean over seeds and its std, as report.json
    has them (`<method>/acc@<fraction>`, `<method>/acc@<fraction>_std`), not the last seed's value."""
    out: dict[str, float] = {}
    for r in report["results"]:
        key = _metric(r["method"], r["label_fraction"], r.get("selection", BALANCED))
        out[key], out[f"{key}_std"] = r["accuracy_mean"], r["accuracy_std"]
    return out


def semi_heldout(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per labeled fraction, the mean over subsets of distill's check on the train images outside each labeled
    subset (`finetune.supervised.heldout_accuracy`): teacher, fine-tuned and distilled accuracy, no test image."""
    by: dict[float, list[dict[str, Any]]] = defaultdict(list)
    for r in sorted(results, key=lambda r: r["seed_index"]):
        if r.get("heldout", {}).get("images") and r.get("selection", BALANCED) == BALANCED:
            by[r["fraction"]].append({"seed_index": r["seed_index"], **r["heldout"]})
    return [{"label_fraction": f, "seeds": len(hs), "images": int(np.mean([h["images"] for h in hs])),
             **{k: round(float(np.mean([h[k] for h in hs])), 4) for k in ("teacher", "finetune", "ensemble", "semi")
                if all(k in h for h in hs)},
             "by_seed": hs} for f, hs in sorted(by.items())]


def _metric(method: str, fraction: float, selection: str) -> str:
    """`<method>/acc@<fraction>`; rows on selected subsets: `<method>/acc@<fraction>/<strategy>`."""
    return f"{method}/acc@{fraction:g}" + ("" if selection == BALANCED else f"/{selection}")


def _echo(r: dict[str, Any], labels: int, progress: Progress) -> None:
    """A finished run: its line, then the display moves on by one."""
    sel = r.get("selection", BALANCED)
    progress.message(f"{r['method']:>8}{'' if sel == BALANCED else f' [{sel}]'}  fraction {r['fraction']:<5g} seed {r['seed_index']}  labels {labels:>5}  "
                     f"acc {r['accuracy']:.4f}  ({r['seconds']:.1f}s)")
    progress.update()
