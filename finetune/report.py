"""The label-efficiency report: report.json (the numbers), report.md (the table a person reads) and
label_efficiency.png (accuracy against labeled fraction). Every sentence is computed from the numbers."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from runtime.config import METHODS, atomic_write_text

BASELINES = ("pixels", "scratch")
MIN_SEEDS = 2  # a standard deviation needs two seeds; below that no 2-std verdict is given
PRETRAINED = ("finetune", "semi", "linear", "knn")


def result_row(method: str, fraction: float, labels: int, accuracies: list[float], compute_s: float) -> dict[str, Any]:
    acc = np.asarray(accuracies, dtype=float)
    # sample standard deviation over seeds (ddof=1): the honest spread for the 2-sigma comparison
    std = float(acc.std(ddof=1)) if len(acc) > 1 else 0.0
    return {"method": method, "label_fraction": float(fraction), "labels": int(labels),
            "accuracy_mean": float(acc.mean()), "accuracy_std": std, "seeds": len(acc),
            "accuracies": [float(a) for a in acc], "compute_s": round(float(compute_s), 2)}


def _order(rows: list[dict]) -> list[dict]:
    rank = {m: i for i, m in enumerate(METHODS)}
    return sorted(rows, key=lambda r: (rank.get(r["method"], len(rank)), r["label_fraction"]))


def _row(rows: list[dict], method: str, fraction: float) -> dict | None:
    for r in rows:
        if r["method"] == method and abs(r["label_fraction"] - fraction) < 1e-12:
            return r
    return None


# Below this many test images an accuracy moves in steps of 1/n and the seeds' std says nothing (2 images:
# every seed scores 0, 0.5 or 1, often with std 0): no "beats by 2 std" verdict is claimed.
MIN_TEST_SAMPLES_FOR_VERDICT = 30


def comparisons(rows: list[dict], test_samples: int | None = None) -> list[dict[str, Any]]:
    """Per labeled fraction below 1: the best of finetune/semi against each baseline, with the margin in
    units of the larger of the two standard deviations (the product's claim is margin > 2 of them).
    `std_exceeds_margin` flags a lead smaller than that standard deviation (per baseline, and the list of
    such baselines per fraction): the method's spread over labeled subsets is larger than what it gains. With
    fewer than 2 seeds on either side there is no standard deviation to speak of: the verdict is None. It is
    never claimed on fewer than MIN_TEST_SAMPLES_FOR_VERDICT test images (then `too_few_test_samples`)."""
    too_few = test_samples is not None and test_samples < MIN_TEST_SAMPLES_FOR_VERDICT
    out = []
    for f in sorted({r["label_fraction"] for r in rows if r["label_fraction"] < 1}):
        ours = [r for m in ("finetune", "semi") if (r := _row(rows, m, f))]
        base = [r for m in BASELINES if (r := _row(rows, m, f))]
        if not ours or not base:
            continue
        best = max(ours, key=lambda r: r["accuracy_mean"])
        against = {}
        for b in base:
            margin = best["accuracy_mean"] - b["accuracy_mean"]
            spread = max(best["accuracy_std"], b["accuracy_std"])
            testable = min(best["seeds"], b["seeds"]) >= MIN_SEEDS
            against[b["method"]] = {"margin": margin, "std": spread if testable else None,
                                    "beats_by_2std": bool(margin > 2 * spread and margin > 0 and not too_few)
                                    if testable else None,
                                    # the spread over labeled subsets is larger than the lead itself
                                    "std_exceeds_margin": bool(spread > margin) if testable else None}
        verdicts = [a["beats_by_2std"] for a in against.values()]
        out.append({"label_fraction": f, "labels": best["labels"], "best": best["method"],
                    "accuracy_mean": best["accuracy_mean"], "accuracy_std": best["accuracy_std"], "against": against,
                    "std_exceeds_margin": sorted(m for m, a in against.items() if a["std_exceeds_margin"]),
                    "beats_all_baselines_by_2std": None if None in verdicts else all(verdicts),
                    **({"too_few_test_samples": True} if too_few else {})})
    return out


def build_report(dataset: str, encoder: str | None, rows: list[dict], **extra: Any) -> dict[str, Any]:
    rows = _order(rows)
    compute: dict[str, float] = {}
    for r in rows:
        compute[r["method"]] = round(compute.get(r["method"], 0.0) + r["compute_s"], 2)
    return {"dataset": dataset, "encoder": encoder, "results": rows, "compute_s": compute,
            "comparisons": comparisons(rows, extra.get("test_samples")), **extra}


# ------------------------------------------------------------------ markdown


def _pct(f: float) -> str:
    return f"{f * 100:g}%"


def summary_sentences(report: dict[str, Any]) -> list[str]:
    rows = report["results"]
    out = []
    for c in report["comparisons"]:
        base = max(c["against"], key=lambda m: _row(rows, m, c["label_fraction"])["accuracy_mean"])
        b = _row(rows, base, c["label_fraction"])
        a = c["against"][base]
        verdict = ("no gain at all" if a["margin"] <= 0 else
                   "with too few seeds for a spread (finetune.num_seeds >= 2 gives one)" if a["beats_by_2std"] is None
                   else "more than two standard deviations" if a["beats_by_2std"] else
                   f"too few test images ({report.get('test_samples')}) to tell" if c.get("too_few_test_samples")
                   else "not by two standard deviations")
        out.append(
            f"With {_pct(c['label_fraction'])} of the labels ({c['labels']} images), `{c['best']}` reaches "
            f"{c['accuracy_mean'] * 100:.1f}% against {b['accuracy_mean'] * 100:.1f}% for the best baseline "
            f"(`{base}`): {a['margin'] * 100:+.1f} points, {verdict}."
        )
        for m in c.get("std_exceeds_margin", []):
            am = c["against"][m]
            out.append(f"Flag: at {_pct(c['label_fraction'])} the spread over labeled subsets (std "
                       f"{am['std'] * 100:.1f} points) is larger than `{c['best']}`'s margin over `{m}` "
                       f"({am['margin'] * 100:+.1f} points): that lead is not reliable.")
    full = [r for r in rows if r["label_fraction"] >= 1]
    few = [r for r in rows if r["label_fraction"] < 1 and r["method"] in PRETRAINED]
    if full and few:
        top_full = max(full, key=lambda r: r["accuracy_mean"])
        top_few = max(few, key=lambda r: (r["accuracy_mean"], -r["label_fraction"]))
        gap = top_full["accuracy_mean"] - top_few["accuracy_mean"]
        out.append(
            f"With all {top_full['labels']} labels the best method here (`{top_full['method']}`) reaches "
            f"{top_full['accuracy_mean'] * 100:.1f}%; `{top_few['method']}` with {top_few['labels']} labels "
            f"({_pct(top_few['label_fraction'])}) comes within {gap * 100:.1f} points of it"
            if gap >= 0 else
            f"With all {top_full['labels']} labels the best method here (`{top_full['method']}`) reaches "
            f"{top_full['accuracy_mean'] * 100:.1f}%, and `{top_few['method']}` with only {top_few['labels']} "
            f"labels ({_pct(top_few['label_fraction'])}) beats it by {-gap * 100:.1f} points"
        )
        out[-1] += "."
    return out


SEMI_METHODS = {
    "distill": ("`distill`: SimCLRv2-style distillation on the unlabeled pool, taught by class-balanced label "
                "spreading over the encoder's features blended with the model's own predictions, fit to the head on "
                "cached backbone features and then for `finetune.semi_epochs` passes to the whole network (the "
                "default: on digits it gained more than FixMatch for less compute)"),
    "fixmatch": "`fixmatch`: FixMatch on the unlabeled shards (confident weak-view pseudo-labels for strong views)",
}


def to_markdown(report: dict[str, Any]) -> str:
    rows = report["results"]
    fractions = sorted({r["label_fraction"] for r in rows})
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    labels = {f: max(r["labels"] for r in rows if r["label_fraction"] == f) for f in fractions}
    head = "| method | " + " | ".join(f"{_pct(f)} ({labels[f]} labels)" for f in fractions) + " | compute (s) |"
    lines = [f"# Label efficiency: {report['dataset']}", "",
             f"Encoder: `{report['encoder']}`. Test accuracy (%) on the test split, mean ± std over seeds "
             "(labeled subsets); the same fixed training budget for every seed, no model choice on the test split.",
             "", head, "|" + "---|" * (len(fractions) + 2)]
    for m in methods:
        cells = []
        for f in fractions:
            r = _row(rows, m, f)
            cells.append("" if r is None else
                         f"{r['accuracy_mean'] * 100:.1f} (n={r['seeds']})" if r["seeds"] < MIN_SEEDS else
                         f"{r['accuracy_mean'] * 100:.1f} ± {r['accuracy_std'] * 100:.1f} (n={r['seeds']})")
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {report['compute_s'].get(m, 0):.1f} |")
    lines += ["", *summary_sentences(report), ""]
    for r in rows:
        if r["method"] == "pixels" and r.get("fit_samples"):
            lines.append(f"`pixels` at {_pct(r['label_fraction'])} was fit on a seeded sample of {r['fit_samples']} of "
                         f"its {r['labels']} labeled images (`finetune.pixels_max_samples`), to keep memory bounded.")
    if report.get("semi_method"):
        lines.append(f"`semi` is {SEMI_METHODS.get(report['semi_method'], report['semi_method'])}, started from "
                     "each seed's `finetune` model; its compute time includes that fine-tuning.")
    lines += ["", "![label efficiency](label_efficiency.png)", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------ plot


def plot(report: dict[str, Any], path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for m in [m for m in METHODS if any(r["method"] == m for r in rows)]:
        rs = sorted((r for r in rows if r["method"] == m), key=lambda r: r["label_fraction"])
        x = [r["label_fraction"] for r in rs]
        y = [r["accuracy_mean"] * 100 for r in rs]
        e = [r["accuracy_std"] * 100 for r in rs]
        ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=m, linestyle="--" if m in BASELINES else "-")
    fractions = sorted({r["label_fraction"] for r in rows})
    ax.set_xscale("log")
    ax.set_xticks(fractions)
    ax.set_xticklabels([_pct(f) for f in fractions])
    ax.minorticks_off()
    ax.set_xlabel("labeled fraction of the train split (log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Label efficiency on {report['dataset']}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(path)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    tmp.replace(out)
    return out


def table_rows(report: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    cols = ["method", "label_fraction", "labels", "accuracy_mean", "accuracy_std", "seeds", "compute_s"]
    return cols, [[r[c] for c in cols] for r in report["results"]]


def write_report(report: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """label_efficiency.png, report.md, then report.json last: its presence means the stage is done."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"png": plot(report, out / "label_efficiency.png"), "md": out / "report.md", "json": out / "report.json"}
    atomic_write_text(paths["md"], to_markdown(report))
    atomic_write_text(paths["json"], json.dumps(_finite(report), indent=2) + "\n")
    return paths


def _finite(x: Any) -> Any:
    """JSON has no NaN: a NaN accuracy would make report.json unreadable to strict parsers."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


# ------------------------------------------------------------------ README's table (python -m finetune.report)

README_NOTES = {"pixels": "(logistic regression on pixels)", "scratch": "(same network, random init)",
                "knn": "(frozen encoder)", "linear": "(frozen encoder)"}


def readme_table(report: dict[str, Any]) -> str:
    """The README's label-efficiency table from a report.json: accuracy in %, mean ± std over seeds (the mean
    alone for one seed), the best method of each compared fraction (`comparisons`) in bold."""
    rows = report["results"]
    fractions = sorted({r["label_fraction"] for r in rows})
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    labels = {f: max(r["labels"] for r in rows if r["label_fraction"] == f) for f in fractions}
    best = {c["label_fraction"]: c["best"] for c in report.get("comparisons", [])}
    lines = ["| method | " + " | ".join(f"{f * 100:g} % ({labels[f]:,} labels)" for f in fractions) + " |",
             "|---" * (len(fractions) + 1) + "|"]
    for m in methods:
        note = README_NOTES.get(m, f"(`{report['semi_method']}`)" if m == "semi" and report.get("semi_method") else "")
        cells = []
        for f in fractions:
            r = _row(rows, m, f)
            if r is None or r["accuracy_mean"] is None:
                cells.append("")
                continue
            text = f"{r['accuracy_mean'] * 100:.1f}"
            if r["seeds"] > 1 and r["accuracy_std"] is not None:
                text += f" ± {r['accuracy_std'] * 100:.1f}"
            cells.append(f"**{text}**" if best.get(f) == m else text)
        lines.append(f"| `{m}`{' ' + note if note else ''} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """`python -m finetune.report RUN_DIR [--markdown] [--readme FILE --section NAME]`: print README's table
    from RUN_DIR/report.json, or write it into FILE between `<!-- figures:NAME -->` markers."""
    import argparse
    import sys

    from runtime.errors import UserError, run_cli

    p = argparse.ArgumentParser(prog="python -m finetune.report", description=main.__doc__)
    p.add_argument("run_dir", help="a fine-tuning output_dir (holding report.json) or a report.json")
    p.add_argument("--markdown", action="store_true", help="the README's Markdown table (the default and only form)")
    p.add_argument("--readme", default=None, help="write the table into this Markdown file instead of printing it")
    p.add_argument("--section", default=None, help="with --readme: the `<!-- figures:NAME -->` block to fill")
    args = p.parse_args(argv)
    if (args.readme is None) != (args.section is None):
        p.error("--readme and --section go together")

    def go() -> int:
        path = Path(args.run_dir)
        path = path / "report.json" if path.is_dir() else path
        try:
            report = json.loads(path.read_text())
            table = readme_table(report)
        except FileNotFoundError:
            raise UserError(f"{path} not found: run `selfsup finetune` (or the pipeline) first") from None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"{path} is not a readable report.json ({type(e).__name__}: {e})") from None
        if args.readme:
            from runtime.files import fill_marked_block

            fill_marked_block(args.readme, args.section, table)
            print(f"{args.readme}: {args.section} table from {path}")
        else:
            sys.stdout.write(table)
        return 0

    return run_cli(go)


if __name__ == "__main__":
    raise SystemExit(main())
