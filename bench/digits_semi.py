"""The digits `semi` (distill) levers, measured on one encoder and the pipeline's labeled subsets.

For every labeled fraction and seed index (the subsets `selfsup finetune` draws), the classifier is
fine-tuned exactly as the pipeline does (`finetune.epochs` on the subset, mild augmentation), then each
variant builds a teacher by label spreading over some features of the train split (the pool: labels unused
except the subset's), and a student: a copy of the fine-tuned model whose head is fit to the teacher on cached
backbone features (`distill`, `finetune.distill_head_epochs`), as the pipeline's `semi`. Per run it records the
teacher's accuracy on the pool's unlabeled images (train labels: the validation figure defaults are chosen by)
and the student's test accuracy (reported, never used to choose).

    python -m bench.digits_semi runs/enc runs/enc/shards --out bench/results/digits_semi.json
    python -m bench.digits_semi --json bench/results/digits_semi.json   # the table again
    python -m bench.digits_semi --json A.json,B.json --section digits-semi   # bench/README.md's block
    (--holdout 0.2: a seeded fifth of the train split, outside every labeled subset, is kept out of the pool
    and the student is also scored on it: validation on train data, the figure the defaults were chosen by)
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.figures import read_results, readme_options, write_section
from finetune import classifier as clf
from finetune.data import labeled_images
from finetune.linear import encode
from finetune.semi import distill, propagate
from finetune.subsets import labeled_subset, subset_seed
from pretrain.model import load_encoder
from runtime.config import Config
from runtime.errors import run_cli
from shards.manifest import read_manifest
from shards.splits import load_split

# name -> (features, options). Features: backbone | hidden (first projection-head layer) | proj (the head's
# output) | centred (backbone, mean removed) | white<n> (backbone, PCA-whitened to n dims) | tta<n> (backbone
# features averaged over the clean image and n mild-augmented views). Options: k (or ks: the teacher is the mean
# over those k), alpha (default finetune.spread_alpha), prior (default "labels", the former rule), also (a second
# feature kind averaged in), hard (argmax teacher), student ("pretrained": the encoder, not the fine-tuned
# model), head_epochs, semi_epochs. Every variant names its k: the figures in bench/README.md were measured
# with these.
VARIANTS = {
    "base": ("backbone", {"k": 5}),
    "hidden": ("hidden", {"k": 5}),
    "proj": ("proj", {"k": 5}),
    "tta8": ("tta8", {"k": 5}),
    "uniform": ("backbone", {"k": 5, "prior": "uniform"}),
    "k10": ("backbone", {"k": 10}),
    "k3": ("backbone", {"k": 3}),
    "a0.99": ("backbone", {"k": 5, "alpha": 0.99}),
    "a0.9": ("backbone", {"k": 5, "alpha": 0.9}),
    "frozen": ("backbone", {"k": 5, "student": "pretrained"}),
    "frozen-uniform": ("backbone", {"k": 5, "student": "pretrained", "prior": "uniform"}),
    "centred": ("centred", {"k": 5, "prior": "uniform"}),
    "white64": ("white64", {"k": 5, "prior": "uniform"}),
    "white32": ("white32", {"k": 5, "prior": "uniform"}),
    "proj-u": ("proj", {"k": 5, "prior": "uniform"}),
    "k3-u": ("backbone", {"k": 3, "prior": "uniform"}),
    "k8-u": ("backbone", {"k": 8, "prior": "uniform"}),
    "a0.99-u": ("backbone", {"k": 5, "alpha": 0.99, "prior": "uniform"}),
    "a0.8-u": ("backbone", {"k": 5, "alpha": 0.8, "prior": "uniform"}),
    "k2-u": ("backbone", {"k": 2, "prior": "uniform"}),
    "k4-u": ("backbone", {"k": 4, "prior": "uniform"}),
    "k3-u-hard": ("backbone", {"k": 3, "prior": "uniform", "hard": True}),
    "k3-u-frozen": ("backbone", {"k": 3, "prior": "uniform", "student": "pretrained"}),
    "ens345-u": ("backbone", {"ks": [3, 4, 5], "prior": "uniform"}),
    "ens34-u": ("backbone", {"ks": [3, 4], "prior": "uniform"}),
    "ens-bp-u": ("backbone", {"k": 4, "prior": "uniform", "also": "proj"}),
    "ens34-u-e3": ("backbone", {"ks": [3, 4], "prior": "uniform", "semi_epochs": 3}),
    "uniform-h50": ("backbone", {"k": 5, "prior": "uniform", "head_epochs": 50}),
}


def pool_features(kind: str, backbone, head, images, mean, std, augment, seed: int):
    if kind == "backbone":
        return encode(backbone, images, mean, std).numpy()
    if kind in ("hidden", "proj"):
        f = encode(backbone, images, mean, std)
        with torch.no_grad():
            h = head.eval()
            return (clf.first_head_layer(h)(f) if kind == "hidden" else h(f)).numpy()
    if kind == "centred":
        f = encode(backbone, images, mean, std).numpy()
        return f - f.mean(0)
    if kind.startswith("white"):  # PCA-whitened to the first n components
        n = int(kind[5:])
        f = encode(backbone, images, mean, std).numpy().astype(np.float64)
        f = f - f.mean(0)
        u, sv, _ = np.linalg.svd(f, full_matrices=False)
        return (u[:, :n] * np.sqrt(len(f))).astype(np.float32)
    if kind.startswith("tta"):
        n = int(kind[3:])
        torch.manual_seed(seed)
        total = encode(backbone, images, mean, std)
        with torch.no_grad():
            for _ in range(n):
                views = augment(images)
                total += torch.cat([backbone.eval()(views[i:i + 512]) for i in range(0, len(views), 512)])
        return (total / (n + 1)).numpy()
    raise ValueError(kind)


def run(encoder_dir: str, shards: str, variants: list[str], fractions: list[float], seeds: int,
        cfg: Config, holdout: float = 0.0) -> dict:
    ft = cfg.finetune
    manifest = read_manifest(shards)
    backbone, head, meta = load_encoder(encoder_dir, with_head=True)
    mean, std, size = manifest["mean"], manifest["std"], int(meta["image_size"])
    classes = manifest["classes"]
    arch = clf.architecture(meta, len(classes), ft.start_from)
    pool_x, pool_y, pool_keys = load_split(shards, "train", image_size=size)
    all_keys, all_y = list(pool_keys), pool_y.tolist()
    val_x = val_y = None
    subsets = {(f, s): labeled_subset(shards, manifest, f, s, all_keys, all_y) for f in fractions for s in range(seeds)}
    if holdout > 0:  # a seeded share of the train split outside every subset, kept out of the pool: validation
        used = {k for keys in subsets.values() for k in keys}
        free = np.random.default_rng(12345).permutation([i for i, k in enumerate(all_keys) if k not in used])
        val_i = np.sort(free[:int(round(holdout * len(all_keys)))])
        keep = np.setdiff1d(np.arange(len(all_keys)), val_i)
        val_x, val_y = pool_x[val_i], pool_y[val_i]
        pool_x, pool_y, pool_keys = pool_x[keep], pool_y[keep], [pool_keys[i] for i in keep]
    test_x, test_y, _ = load_split(shards, "test", image_size=size)
    index = {k: i for i, k in enumerate(pool_keys)}
    mild = clf.make_augment(clf.mild_augment(cfg.augment), size, mean, std, "cpu")
    feats = {}
    for v in variants:
        for kind in (VARIANTS[v][0], VARIANTS[v][1].get("also")):
            if kind and kind not in feats:
                feats[kind] = pool_features(kind, backbone, head, pool_x, mean, std, mild, 0)
    runs = []
    for fraction in fractions:
        for s in range(seeds):
            seed = subset_seed(manifest, s)
            keys = subsets[(fraction, s)]
            xl, yl = labeled_images(shards, keys, size)
            torch.manual_seed(seed)
            t = time.perf_counter()
            tuned = clf.build_classifier(arch, copy.deepcopy(backbone), copy.deepcopy(head))
            clf.train_supervised(tuned, xl, yl, mild, epochs=ft.epochs, batch_size=ft.batch_size, lr=ft.lr,
                                 weight_decay=ft.weight_decay, seed=seed)
            tuned_s = time.perf_counter() - t
            labeled = np.array([index[k] for k in keys], dtype=np.int64)
            lab_y = pool_y[labeled].numpy()
            unl = np.setdiff1d(np.arange(len(pool_keys)), labeled)
            ft_acc = _acc(tuned, test_x, test_y, mean, std)
            for v in variants:
                kind, opts = VARIANTS[v]
                t = time.perf_counter()
                kinds = [kind] + ([opts["also"]] if "also" in opts else [])
                soft = np.mean([propagate(feats[kd], labeled, lab_y, len(classes), k=k,
                                          alpha=opts.get("alpha", ft.spread_alpha), prior=opts.get("prior", "labels"))
                                for kd in kinds for k in opts.get("ks", [opts.get("k", ft.spread_k)])], axis=0)
                teacher = float((soft[unl].argmax(1) == pool_y[unl].numpy()).mean())
                if opts.get("hard"):
                    soft = np.eye(len(classes), dtype=np.float32)[soft.argmax(1)]
                model = copy.deepcopy(tuned) if opts.get("student", "tuned") == "tuned" else \
                    clf.build_classifier(arch, copy.deepcopy(backbone), copy.deepcopy(head))
                distill(model, pool_x, soft, labeled, lab_y, mild, rounds=ft.distill_rounds,
                        epochs=opts.get("semi_epochs", ft.semi_epochs),
                        batch_size=ft.batch_size, lr=ft.semi_lr, weight_decay=ft.weight_decay, seed=seed, mean=mean,
                        std=std, head_epochs=opts.get("head_epochs", ft.distill_head_epochs))
                row = {"variant": v, "fraction": fraction, "seed_index": s, "labels": len(keys),
                       "teacher_pool_acc": teacher, "finetune_acc": ft_acc,
                       "student_acc": _acc(model, test_x, test_y, mean, std),
                       "student_val_acc": None if val_x is None else _acc(model, val_x, val_y, mean, std),
                       "seconds": time.perf_counter() - t + tuned_s}
                runs.append(row)
                print(json.dumps(row), flush=True)
    return {"encoder": str(encoder_dir), "shards": str(shards), "variants": {v: VARIANTS[v] for v in variants},
            "settings": {"spread_k": ft.spread_k, "spread_alpha": ft.spread_alpha, "epochs": ft.epochs,
                         "distill_head_epochs": ft.distill_head_epochs, "semi_epochs": ft.semi_epochs,
                         "distill_rounds": ft.distill_rounds},
            "runs": runs}


def _acc(model, x, y, mean, std) -> float:
    return float((clf.predict_logits(model, x, mean, std).argmax(1) == y).float().mean())


def table(result: dict) -> str:
    rows = {}
    for r in result["runs"]:
        rows.setdefault((r["variant"], r["fraction"]), []).append(r)
    val = any(r.get("student_val_acc") is not None for r in result["runs"])
    lines = ["| variant | fraction | teacher on pool |" + (" student on held-out train |" if val else "")
             + " student test | finetune test |", "|---|---|---|---|---|" + ("---|" if val else "")]
    for (v, f), rs in rows.items():
        def ms(key, rs=rs):
            a = np.array([r[key] for r in rs]) * 100
            return f"{a.mean():.1f} ± {a.std(ddof=1) if len(a) > 1 else 0:.1f}"
        lines.append(f"| {v} | {f:g} ({len(rs)} seeds) | {ms('teacher_pool_acc')} | "
                     + (f"{ms('student_val_acc')} | " if val else "") + f"{ms('student_acc')} | "
                     f"{ms('finetune_acc')} |")
    return "\n".join(lines)


def block(paths: list[str]) -> str:
    """bench/README.md's text for saved results: per file, its settings, variants and table."""
    out = []
    for path in paths:
        r = read_results(path)
        defs = "; ".join(f"`{v}`: {kind} {json.dumps(opts)}" for v, (kind, opts) in r["variants"].items())
        out.append(f"From `{path}` (encoder `{r['encoder']}`, settings {json.dumps(r['settings'])}; variants "
                   f"(features, options; a missing k is the settings' spread_k, a missing prior `labels`): {defs}):"
                   f"\n\n{table(r)}\n")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("encoder", nargs="?")
    p.add_argument("shards", nargs="?")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--fractions", default="0.01,0.1")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--holdout", type=float, default=0.0, help="share of the train split kept out of the pool "
                   "(never labeled) to validate the student on")
    p.add_argument("--out")
    p.add_argument("--json", help="print the table of saved results (comma-separated files)")
    readme_options(p, section_required=False)  # with --json: fill that block of --readme
    p.add_argument("overrides", nargs="*", default=[])
    a = p.parse_args(argv)
    if a.json:
        def figures() -> None:
            text = block(a.json.split(","))
            if a.section:
                write_section(a.readme, a.section, text, a.json)
            else:
                print(text)

        return run_cli(figures)
    from runtime.config import load_config

    cfg = load_config("configs/digits.yaml", a.overrides)
    torch.set_num_threads(1)
    result = run(a.encoder, a.shards, a.variants.split(","), [float(f) for f in a.fractions.split(",")],
                 a.seeds, cfg, a.holdout)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=1))
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
