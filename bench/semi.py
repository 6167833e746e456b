"""The figures behind each shipped config's `finetune.semi_method`: plain `finetune` against the semi-supervised
methods, on the same encoder and the same labeled subsets, collected from fine-tuning runs' report.json files.

    python -m bench.semi collect runs/photos runs/photos-fixmatch --out bench/results/semi-photos.json
    python -m bench.semi figures bench/results/semi-photos.json --section semi-photos

`collect` keeps, per run, the `finetune` and `semi` rows (accuracy per seed, mean, std, compute seconds),
the `semi` rows named by the run's `semi_method` or a `label` given (`RUN_DIR=label`), plus the run's settings that differ,
and the pretraining seconds of the run's encoder (its epochs' `epoch_s` in the encoder's metrics.jsonl, where that
is readable); the table then shows them with the encoder's kNN monitor.
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

SETTINGS = ("semi_epochs", "distill_head_epochs", "semi_lr", "distill_rounds", "spread_k", "spread_alpha",
            "fixmatch_threshold", "fixmatch_unlabeled_ratio", "epochs", "num_seeds", "start_from", "spread_prior",
            "spread_features", "distill_student", "jitter_prob", "jitter_strength", "teacher_models", "distill_bn_stats",
            "backbone_lr_scale", "probe_epochs", "wise_alpha", "mixup")


def _pretrain_s(encoder: str | None) -> float | None:
    """`bench.teacher.pretrain_seconds` of the run's encoder; None where it has no readable metrics.jsonl."""
    from bench.teacher import pretrain_seconds

    try:
        return pretrain_seconds(encoder) if encoder else None
    except (OSError, ValueError):
        return None


def _report(run: str) -> tuple[dict[str, Any], dict[str, Any]]:
    d = Path(run)
    path = d / "report.json" if d.is_dir() else d
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable report.json ({type(e).__name__})") from None
    cfg: dict[str, Any] = {}
    cfg_path = path.parent / "finetune.config.yaml"
    if cfg_path.is_file():
        import yaml

        cfg = (yaml.safe_load(cfg_path.read_text()) or {}).get("finetune", {})
    return report, cfg


def _first(r: dict[str, Any], held: dict[str, Any] | None, method: str, seeds: int | None) -> dict[str, Any]:
    """The row's figures, over its first `seeds` labeled subsets only (None: all): accuracies, mean, std, the
    held-out accuracy (from the run's per-subset `by_seed`), and compute scaled to those subsets (the run's mean
    seconds per subset times their number)."""
    accs = r["accuracies"] if seeds is None else r["accuracies"][:seeds]
    out = {"labels": r["labels"], "label_fraction": r["label_fraction"], "accuracies": accs, "seeds": len(accs),
           "accuracy_mean": float(np.mean(accs)), "accuracy_std": float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0,
           "compute_s": round(r["compute_s"] * len(accs) / max(1, len(r["accuracies"])), 2)}
    out["heldout"] = None
    if held is not None:
        subsets = held.get("by_seed") or []
        if seeds is not None and subsets:
            out["heldout"] = float(np.mean([h[method] for h in subsets[:seeds]]))
        elif seeds is None:
            out["heldout"] = held.get(method)
    return out


def collect(runs: list[str], seeds: int | None = None) -> dict[str, Any]:
    """{"dataset", "rows": [{method, label, run, label_fraction, labels, accuracy_mean, accuracy_std, seeds,
    accuracies, compute_s, heldout, settings}]} from each run's report.json; `seeds`: only the first that many
    labeled subsets of every row, so that runs of different lengths compare on the same subsets."""
    rows, dataset = [], None
    for spec in runs:
        run, _, label = spec.partition("=")
        report, cfg = _report(run)
        pretrain_s = _pretrain_s(report.get("encoder"))
        dataset = dataset or report.get("dataset")
        # distill's check on the train images outside each labeled subset (no test image), where the run has it
        heldout = {h["label_fraction"]: h for h in report.get("semi_heldout") or []}
        for r in report["results"]:
            if r["method"] not in ("finetune", "semi") or r["label_fraction"] >= 1:
                continue
            method = r["method"] if r["method"] == "finetune" else report.get("semi_method") or "semi"
            rows.append({"method": method, "label": (label or method) if r["method"] == "semi" else method, "run": run,
                         **_first(r, heldout.get(r["label_fraction"]), r["method"], seeds),
                         "encoder_knn_acc": report.get("encoder_knn_acc"), "pretrain_s": pretrain_s,
                         "settings": {k: cfg[k] for k in SETTINGS if k in cfg}})
    return {"dataset": dataset, "rows": rows}


def table(results: dict[str, Any]) -> str:
    """One row per (label, run): accuracy (%) mean ± std (seeds), the accuracy on the train images outside the
    labeled subsets where the run measured it (`held-out`: no test image, what a default can be chosen by) and
    compute seconds per fraction; `finetune` rows once per encoder run (the same fine-tuning in every run on one
    encoder); runs of one label with the same settings share a row across fractions; a label with more than one
    row is followed by each row's run directory names; where any
    row's encoder has its metrics.jsonl, its pretraining seconds and the encoder's kNN monitor follow."""
    fractions = sorted({r["label_fraction"] for r in results["rows"]})
    keyed: dict[tuple[str, str], dict[float, dict]] = {}
    seen_finetune: set[tuple[float, tuple]] = set()
    for r in results["rows"]:
        if r["method"] == "finetune":  # the same subsets, budget and encoder: the same figures in every run
            key = (r["label_fraction"], tuple(r["accuracies"]))
            if key in seen_finetune:
                continue
            seen_finetune.add(key)
        # one row per method and settings (runs with the same settings at other fractions join it); a second run
        # of it at the same fraction gets its own row
        key = (r["label"], json.dumps(r.get("settings") or {}, sort_keys=True))
        if r["label_fraction"] in keyed.get(key, {}):
            key = (r["label"], key[1] + r["run"])
        keyed.setdefault(key, {})[r["label_fraction"]] = r
    pretrain = any(r.get("pretrain_s") is not None for r in results["rows"])
    head = "| method | " + " | ".join(f"{f * 100:g} %: accuracy | held-out | compute (s)" for f in fractions) + " |"
    head += " pretrain (s) | kNN (test, monitor) |" if pretrain else ""
    lines = [head, "|---" * (3 * len(fractions) + 1 + 2 * pretrain) + "|"]
    labels = [label for label, _ in keyed]
    for (label, _), by_f in keyed.items():
        # a label in more than one row (finetune on two encoders, or with other settings) names each row's runs
        runs = dict.fromkeys(Path(r["run"]).name for r in by_f.values())
        name = f"`{label}` ({', '.join(runs)})" if labels.count(label) > 1 else f"`{label}`"
        cells = []
        for f in fractions:
            r = by_f.get(f)
            cells += (["", "", ""] if r is None else
                      [f"{r['accuracy_mean'] * 100:.1f}" + (f" ± {r['accuracy_std'] * 100:.1f}" if r["seeds"] > 1 else "")
                       + f" (n={r['seeds']})",
                       "" if r.get("heldout") is None else f"{r['heldout'] * 100:.1f}",
                       f"{r['compute_s']:.0f}"])
        if pretrain:
            any_row = next(iter(by_f.values()))
            s, knn = any_row.get("pretrain_s"), any_row.get("encoder_knn_acc")
            cells += ["" if s is None else f"{s:.0f}", "" if knn is None else f"{knn:.3f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.semi", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("collect", help="gather finetune/semi rows from fine-tuning runs into one JSON")
    c.add_argument("runs", nargs="+", help="RUN_DIR (holding report.json), optionally RUN_DIR=label")
    c.add_argument("--out", required=True, help="the JSON to write")
    c.add_argument("--seeds", type=int, default=None,
                   help="only the first N labeled subsets of every run (runs of different lengths, same subsets)")
    figures_command(sub)
    args = p.parse_args(argv)

    def go() -> int:
        if args.cmd == "collect":
            if args.seeds is not None and args.seeds < 1:
                raise UserError(f"--seeds must be at least 1, got {args.seeds}")
            out = collect(args.runs, args.seeds)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
            print(f"{args.out}: {len(out['rows'])} rows from {len(args.runs)} runs")
        else:
            results = read_results(args.json)
            write_section(args.readme, args.section, f"From `{args.json}` ({results['dataset']}):\n\n" + table(results), args.json)
        return 0

    return run_cli(go)


if __name__ == "__main__":
    sys.exit(main())
