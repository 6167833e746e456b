"""Pretraining levers judged without the test split: how well label spreading over an encoder's features labels
the train images outside each labeled subset (the teacher `distill` learns from), per fraction and subset.

    python -m bench.teacher collect runs/photos-final runs/photos-crop02=crop0.2 --out bench/results/teacher-photos.json
    python -m bench.teacher figures bench/results/teacher-photos.json --section teacher-photos

`collect`, for each pretraining run (RUN_DIR, optionally RUN_DIR=label), reads its config.yaml (shards, image size,
`finetune.spread_k`/`spread_alpha`), its encoder, and distill's pool (train + unlabeled splits, never test); for
each labeled fraction and subset (the manifest's, drawn as `selfsup finetune` draws them) runs
`finetune.semi.propagate` and scores it on the pool's train images outside the subset. The pretraining monitor's
kNN accuracy (which reads test images, so is shown, never used to choose) and the pretraining seconds come along.
`figures` writes the table into bench/README.md between `<!-- figures:SECTION -->` markers: never typed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from bench.figures import figures_command, read_results, write_section
from runtime.errors import UserError, run_cli

SETTINGS = ("pretrain.epochs", "model.proj_layers", "augment.preset", "augment.crop_scale", "augment.jitter_prob",
            "augment.jitter_strength", "augment.grayscale_prob", "data.image_size")


def _setting(cfg: dict[str, Any], dotted: str) -> Any:
    section, key = dotted.split(".")
    return (cfg.get(section) or {}).get(key)


def run_figures(run: str, seeds: int, spread_k: int | None = None, spread_alpha: float | None = None) -> dict[str, Any]:
    """One encoder run's teacher accuracies: {run, settings, knn_acc, pretrain_s, fractions: [{label_fraction,
    labels, images, accuracies, mean, std}]}; `spread_k`/`spread_alpha` override the run's config."""
    import yaml

    from finetune.data import pool_images
    from finetune.linear import encode
    from finetune.semi import propagate
    from finetune.subsets import fractions_to_run, labeled_subset
    from pretrain.model import load_encoder
    from shards.manifest import read_manifest
    from shards.splits import split_index

    d = Path(run)
    try:
        cfg = yaml.safe_load((d / "config.yaml").read_text()) or {}
        backbone, _, meta = load_encoder(d)
    except (OSError, ValueError) as e:
        raise UserError(f"{run}: not a finished pretraining run ({type(e).__name__}: {e})") from None
    shards, ft = cfg["data"]["shards"], cfg.get("finetune") or {}
    manifest = read_manifest(shards)
    size = int(meta["image_size"])
    train_keys, train_y = split_index(shards, "train")
    splits = tuple(s for s in ("train", "unlabeled") if manifest["splits"].get(s, {}).get("count", 0) > 0)
    images, labels, keys = pool_images(shards, splits, [], int(ft.get("unlabeled_pool", 50000)),
                                       int(cfg["data"].get("seed", 0)), size)
    feats = encode(backbone, images, manifest["mean"], manifest["std"]).numpy()
    index, y = {k: i for i, k in enumerate(keys)}, labels.numpy()
    k = int(spread_k if spread_k is not None else ft.get("spread_k", 5))
    alpha = float(spread_alpha if spread_alpha is not None else ft.get("spread_alpha", 0.95))
    prior = ft.get("spread_prior", "labels")  # what `selfsup finetune` spreads with; runs older than the key: labels
    out = []
    for f in [f for f in fractions_to_run(None, manifest) if f < 1]:
        accs, n_labels, n_images = [], 0, 0
        for s in range(seeds):
            subset = labeled_subset(shards, manifest, f, s, train_keys, train_y.tolist())
            labeled = np.array([index[k] for k in subset], dtype=np.int64)
            soft = propagate(feats, labeled, y[labeled], len(manifest["classes"]), k=k, alpha=alpha, prior=prior)
            held = np.setdiff1d(np.flatnonzero(y >= 0), labeled)
            accs.append(float((soft[held].argmax(1) == y[held]).mean()))
            n_labels, n_images = len(subset), len(held)
        out.append({"label_fraction": f, "labels": n_labels, "images": n_images, "accuracies": accs,
                    "mean": float(np.mean(accs)), "std": float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0})
    settings = {**{name: _setting(cfg, name) for name in SETTINGS}, "finetune.spread_k": k, "finetune.spread_alpha": alpha,
                "finetune.spread_prior": prior}
    return {"run": run, "settings": settings, "knn_acc": meta.get("knn_acc"),
            "pretrain_s": pretrain_seconds(d), "fractions": out}


def pretrain_seconds(encoder_dir: str | Path) -> float | None:
    """Seconds an encoder's pretraining epochs took: the sum of `epoch_s` in its metrics.jsonl (None without one)."""
    path = Path(encoder_dir) / "metrics.jsonl"
    if not path.is_file():
        return None
    metrics = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return round(sum(m.get("epoch_s", 0.0) for m in metrics), 1) if metrics else None


def table(results: dict[str, Any]) -> str:
    """One row per encoder run: teacher accuracy (%) on the held-out train images, mean ± std over subsets, per
    fraction; then the settings, the pretraining seconds and the monitor's kNN (test images: not a chooser)."""
    fractions = sorted({f["label_fraction"] for r in results["runs"] for f in r["fractions"]})
    lines = ["| encoder | " + " | ".join(f"{f * 100:g} %: teacher, held-out" for f in fractions)
             + " | settings | pretrain (s) | kNN (test, monitor) |",
             "|---" * (len(fractions) + 4) + "|"]
    for r in results["runs"]:
        by_f = {f["label_fraction"]: f for f in r["fractions"]}
        cells = [f"{by_f[f]['mean'] * 100:.1f} ± {by_f[f]['std'] * 100:.1f} (n={len(by_f[f]['accuracies'])})"
                 if f in by_f else "" for f in fractions]
        settings = ", ".join(f"{k.split('.')[1]}={v}" for k, v in r["settings"].items() if v is not None)
        knn = "" if r["knn_acc"] is None else f"{r['knn_acc']:.3f}"
        secs = "" if r["pretrain_s"] is None else f"{r['pretrain_s']:.0f}"
        lines.append(f"| `{r['label']}` | " + " | ".join(cells) + f" | {settings} | {secs} | {knn} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.teacher", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("collect", help="label spreading's held-out accuracy for each pretraining run, into one JSON")
    c.add_argument("runs", nargs="+", help="RUN_DIR (a finished pretraining run), optionally RUN_DIR=label")
    c.add_argument("--seeds", type=int, default=5, help="labeled subsets per fraction (default 5)")
    c.add_argument("--spread-k", type=int, default=None, help="label spreading's k (default: each run's config)")
    c.add_argument("--spread-alpha", type=float, default=None,
                   help="label spreading's alpha (default: each run's config)")
    c.add_argument("--append", action="store_true", help="add these rows to --out's runs instead of replacing them")
    c.add_argument("--out", required=True, help="the JSON to write")
    figures_command(sub)
    args = p.parse_args(argv)

    def go() -> int:
        if args.cmd == "collect":
            if args.seeds < 1:
                raise UserError(f"--seeds must be at least 1, got {args.seeds}")
            out = Path(args.out)
            runs = read_results(out)["runs"] if args.append and out.is_file() else []
            for spec in args.runs:
                run, _, label = spec.partition("=")
                runs.append({"label": label or Path(run).name,
                             **run_figures(run, args.seeds, args.spread_k, args.spread_alpha)})
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({"runs": runs}, indent=2) + "\n")
            print(f"{args.out}: {len(runs)} rows")
        else:
            results = read_results(args.json)
            write_section(args.readme, args.section, f"From `{args.json}`:\n\n" + table(results), args.json)
        return 0

    return run_cli(go)


if __name__ == "__main__":
    sys.exit(main())
