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


BALANCED = "balanced"  # the rows on today's class-balanced subsets; others name a selection strategy


def result_row(method: str, fraction: float, labels: int, accuracies: list[float], compute_s: float,
               selection: str = BALANCED) -> dict[str, Any]:
    acc = np.asarray(accuracies, dtype=float)
    # sample standard deviation over seeds (ddof=1): the honest spread for the 2-sigma comparison
    std = float(acc.std(ddof=1)) if len(acc) > 1 else 0.0
    return {"method": method, "label_fraction": float(fraction), "labels": int(labels),
            "accuracy_mean": float(acc.mean()), "accuracy_std": std, "seeds": len(acc),
            "accuracies": [float(a) for a in acc], "compute_s": round(float(compute_s), 2), "selection": selection}


def _selection(r: dict) -> str:
    return r.get("selection", BALANCED)  # report.json written before `selection` existed: balanced rows only


def _order(rows: list[dict]) -> list[dict]:
    rank = {m: i for i, m in enumerate(METHODS)}
    return sorted(rows, key=lambda r: (_selection(r) != BALANCED, _selection(r), rank.get(r["method"], len(rank)),
                                       r["label_fraction"]))


def _row(rows: list[dict], method: str, fraction: float, selection: str = BALANCED) -> dict | None:
    for r in rows:
        if r["method"] == method and abs(r["label_fraction"] - fraction) < 1e-12 and _selection(r) == selection:
            return r
    return None


def _balanced(rows: list[dict]) -> list[dict]:
    return [r for r in rows if _selection(r) == BALANCED]


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


def semi_vs_finetune(rows: list[dict], test_samples: int | None = None) -> list[dict[str, Any]]:
    """Per labeled fraction below 1 where both ran on the same subsets: what the unlabeled images add, `semi`
    against the `finetune` model it starts from. `margin`, `std` (the larger of the two) and `beats_by_2std` as in
    `comparisons`; and, the subsets being the same for both (accuracies in seed order), the paired view: each
    subset's difference, their `paired_std` (sample std), `beats_by_2std_paired` (mean difference > 2 of it) and
    `wins` (subsets where semi is ahead). None where there are fewer than 2 subsets or too few test images."""
    too_few = test_samples is not None and test_samples < MIN_TEST_SAMPLES_FOR_VERDICT
    out = []
    for f in sorted({r["label_fraction"] for r in rows if r["label_fraction"] < 1}):
        semi, tuned = _row(rows, "semi", f), _row(rows, "finetune", f)
        if semi is None or tuned is None or semi["seeds"] != tuned["seeds"]:
            continue
        diffs = np.asarray(semi["accuracies"]) - np.asarray(tuned["accuracies"])
        margin = float(diffs.mean())
        testable = semi["seeds"] >= MIN_SEEDS and not too_few
        spread = max(semi["accuracy_std"], tuned["accuracy_std"])
        paired = float(diffs.std(ddof=1)) if len(diffs) > 1 else None
        out.append({"label_fraction": f, "labels": semi["labels"], "seeds": semi["seeds"], "margin": margin,
                    "std": spread if testable else None,
                    "beats_by_2std": bool(margin > 0 and margin > 2 * spread) if testable else None,
                    "paired_std": paired if testable else None,
                    "beats_by_2std_paired": bool(margin > 0 and margin > 2 * paired) if testable else None,
                    "wins": int((diffs > 0).sum())})
    return out


def build_report(dataset: str, encoder: str | None, rows: list[dict], **extra: Any) -> dict[str, Any]:
    rows = _order(rows)
    compute: dict[str, float] = {}
    for r in _balanced(rows):
        compute[r["method"]] = round(compute.get(r["method"], 0.0) + r["compute_s"], 2)
    out = {"dataset": dataset, "encoder": encoder, "results": rows, "compute_s": compute,
           "comparisons": comparisons(rows, extra.get("test_samples")),
           "semi_vs_finetune": semi_vs_finetune(rows, extra.get("test_samples")), **extra}
    strategies = sorted({_selection(r) for r in rows} - {BALANCED})
    if strategies:
        out["selection"] = strategies
        out["selection_comparisons"] = selection_comparisons(rows, extra.get("test_samples"))
    return out


def selection_comparisons(rows: list[dict], test_samples: int | None = None) -> list[dict[str, Any]]:
    """Per method, fraction and strategy other than `random`: the rows on its selected subsets against those on
    uniform-random ones (the honest baseline: neither reads labels), margin in the larger std, and whether it
    beats random by more than 2 std (None with fewer than 2 seeds) or is no worse (mean >= random's)."""
    too_few = test_samples is not None and test_samples < MIN_TEST_SAMPLES_FOR_VERDICT
    out = []
    for r in rows:
        sel = _selection(r)
        if sel in (BALANCED, "random") or (base := _row(rows, r["method"], r["label_fraction"], "random")) is None:
            continue
        margin = r["accuracy_mean"] - base["accuracy_mean"]
        spread = max(r["accuracy_std"], base["accuracy_std"])
        testable = min(r["seeds"], base["seeds"]) >= MIN_SEEDS
        out.append({"method": r["method"], "label_fraction": r["label_fraction"], "labels": r["labels"],
                    "selection": sel, "accuracy_mean": r["accuracy_mean"], "random_mean": base["accuracy_mean"],
                    "margin": margin, "std": spread if testable else None,
                    "beats_random_by_2std": bool(margin > 2 * spread and margin > 0 and not too_few)
                    if testable else None, "no_worse": bool(margin >= 0)})
    return out


# ------------------------------------------------------------------ markdown


def _pct(f: float) -> str:
    return f"{f * 100:g}%"


def summary_sentences(report: dict[str, Any]) -> list[str]:
    rows = _balanced(report["results"])
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
    out += semi_sentences(report)
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


def semi_sentences(report: dict[str, Any]) -> list[str]:
    """One sentence per fraction on `semi` against the `finetune` model it starts from (`semi_vs_finetune`;
    computed from the rows for a report.json written before that key existed)."""
    out = []
    pairs = report.get("semi_vs_finetune")
    if pairs is None:
        pairs = semi_vs_finetune(report["results"], report.get("test_samples"))
    for c in pairs:
        line = (f"At {_pct(c['label_fraction'])}, what the unlabeled images add: `semi` is {c['margin'] * 100:+.1f} "
                f"points against the `finetune` model it starts from, ahead on {c['wins']} of {c['seeds']} subsets")
        if c["beats_by_2std"] is not None:
            line += (f"; {'more' if c['beats_by_2std'] else 'not more'} than two standard deviations of either "
                     f"(std {c['std'] * 100:.1f}), {'more' if c['beats_by_2std_paired'] else 'not more'} than two "
                     f"of the per-subset differences (std {c['paired_std'] * 100:.1f})")
        out.append(line + ".")
    return out


SEMI_METHODS = {
    "distill": ("`distill`: SimCLRv2-style distillation on the unlabeled pool, taught by class-balanced label "
                "spreading over the encoder's features blended with the model's own predictions, fit to the head on "
                "cached backbone features and then for `finetune.semi_epochs` passes to the whole network (the "
                "default: on digits it gained more than FixMatch for less compute)"),
    "fixmatch": "`fixmatch`: FixMatch on the unlabeled shards (confident weak-view pseudo-labels for strong views)",
}


def to_markdown(report: dict[str, Any]) -> str:
    rows = _balanced(report["results"])
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
    probe, scale = report.get("probe_epochs"), report.get("backbone_lr_scale", 1.0)
    wise = report.get("wise_alpha", 1.0)
    how = ([f"first fit its head alone on the frozen encoder's features of the labels for {probe} passes (a linear "
            "probe, then fine-tuning: LP-FT)"] if probe else []) + \
          ([f"trained the backbone at {scale:g} x the head's learning rate"] if scale != 1.0 else []) + \
          ([f"kept {wise:g} x the fine-tuned weights + {1 - wise:g} x those after the linear probe (WiSE-FT)"]
           if wise != 1.0 else [])
    if how:
        lines.append(f"Fine-tuning from the encoder (`finetune`, and the model `semi` starts from) {' and '.join(how)}.")
    if report.get("precision"):
        lines.append(f"The trained methods ran in {'bf16 autocast' if report['precision'] == 'bf16' else 'fp32'}"
                     + (", in the channels-last memory format" if report.get("channels_last") else "")
                     + " (`finetune.precision`, `finetune.channels_last`).")
    if report.get("semi_method"):
        student = ("; its student is a freshly initialised network (`finetune.distill_student=scratch`), taught "
                   "by each seed's `finetune` model" if report.get("semi_student") == "scratch"
                   else ", started from each seed's `finetune` model")
        lines.append(f"`semi` is {SEMI_METHODS.get(report['semi_method'], report['semi_method'])}{student}; its "
                     "compute time includes that fine-tuning.")
    for h in report.get("semi_heldout") or []:
        lines.append(f"Without the test split, on the ~{h['images']} train images outside each {_pct(h['label_fraction'])} "
                     f"subset (mean of {h['seeds']}): label spreading {h['teacher'] * 100:.1f}%, `finetune` "
                     f"{h['finetune'] * 100:.1f}%, "
                     + (f"the ensemble teacher's mean prediction {h['ensemble'] * 100:.1f}%, " if "ensemble" in h else "")
                     + f"`semi` {h['semi'] * 100:.1f}%.")
    lines += selection_markdown(report)
    lines += ["", "![label efficiency](label_efficiency.png)", ""]
    return "\n".join(lines)


def selection_markdown(report: dict[str, Any]) -> list[str]:
    """report.md's "which images to label" section: each method on selected vs uniform-random subsets."""
    if not report.get("selection"):
        return []
    lines = ["", "## Which images to label", "",
             "The same budgets chosen without labels from the encoder's features (`finetune.selection`) against "
             "uniform-random subsets (`random`, the honest baseline: a real user cannot draw balanced subsets "
             "without labels); `balanced` is the class-balanced draw above, which reads the labels. Test accuracy (%), "
             "mean ± std over seeds.", "", selection_table(report, markdown=True), ""]
    for c in report.get("selection_comparisons", []):
        v = c["beats_random_by_2std"]
        verdict = ("with too few seeds for a spread" if v is None else "more than two standard deviations" if v
                   else "ahead, but not by two standard deviations" if c["margin"] > 0
                   else "the same" if c["margin"] == 0 else "behind")
        lines.append(f"At {_pct(c['label_fraction'])} ({c['labels']} labels), `{c['method']}` on `{c['selection']}` "
                     f"subsets reaches {c['accuracy_mean'] * 100:.1f}% against {c['random_mean'] * 100:.1f}% on "
                     f"random ones: {c['margin'] * 100:+.1f} points, {verdict}.")
    return lines


def selection_table(report: dict[str, Any], markdown: bool = False) -> str:
    """A table of every method that ran on selected subsets: one row per method and selection (random first,
    then the strategies, then balanced), one column per budget; README's `--table selection`."""
    rows = report["results"]
    sel_rows = [r for r in rows if _selection(r) != BALANCED]
    fractions = sorted({r["label_fraction"] for r in sel_rows})
    methods = [m for m in METHODS if any(r["method"] == m for r in sel_rows)]
    strategies = ["random", *[s for s in report.get("selection", []) if s != "random"], BALANCED]
    labels = {f: max(r["labels"] for r in sel_rows if r["label_fraction"] == f) for f in fractions}
    wins = {(c["method"], c["label_fraction"], c["selection"]) for c in report.get("selection_comparisons", [])
            if c["beats_random_by_2std"]}
    lines = ["| method | selection | " + " | ".join(f"{f * 100:g} % ({labels[f]:,} labels)" for f in fractions) + " |",
             "|---|---" + "|---" * len(fractions) + "|"]
    for m in methods:
        for s in strategies:
            cells = []
            for f in fractions:
                r = _row(rows, m, f, s)
                if r is None:
                    cells.append("")
                    continue
                text = f"{r['accuracy_mean'] * 100:.1f}" + (f" ± {r['accuracy_std'] * 100:.1f}" if r["seeds"] > 1 else "")
                cells.append(f"**{text}**" if (m, f, s) in wins else text)
            if any(cells):
                note = " (reads labels)" if s == BALANCED else " (uniform)" if s == "random" else ""
                lines.append(f"| `{m}` | `{s}`{note} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ plot


def plot(report: dict[str, Any], path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _balanced(report["results"])
    chosen = [r for r in report["results"] if _selection(r) != BALANCED]
    if chosen:
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12.4, 4.4), dpi=120)
        _plot_selection(ax2, report, chosen)
    else:
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


def _plot_selection(ax, report: dict[str, Any], chosen: list[dict]) -> None:
    """The right panel: each method that ran on selected subsets, one colour per method, one line style per
    selection (random dashed, balanced dotted, the strategies solid), slightly offset so error bars show."""
    rows = report["results"]
    styles = {"random": "--", BALANCED: ":"}
    strategies = ["random", *[s for s in report.get("selection", []) if s != "random"], BALANCED]
    colours = {}
    for i, m in enumerate([m for m in METHODS if any(r["method"] == m for r in chosen)]):
        colours[m] = f"C{i}"
        for j, s in enumerate(strategies):
            rs = sorted((r for r in rows if r["method"] == m and _selection(r) == s and r["label_fraction"] < 1),
                        key=lambda r: r["label_fraction"])
            if not rs:
                continue
            x = [r["label_fraction"] * (1 + 0.04 * (j - 1)) for r in rs]
            ax.errorbar(x, [r["accuracy_mean"] * 100 for r in rs], yerr=[r["accuracy_std"] * 100 for r in rs],
                        marker="o" if s not in styles else "s", capsize=3, color=colours[m], linestyle=styles.get(s, "-"),
                        label=f"{m}: {s}", alpha=0.6 if s == BALANCED else 1.0)
    fractions = sorted({r["label_fraction"] for r in chosen})
    ax.set_xscale("log")
    ax.set_xticks(fractions)
    ax.set_xticklabels([f"{_pct(f)}\n({max(r['labels'] for r in chosen if r['label_fraction'] == f)} labels)"
                        for f in fractions])
    ax.minorticks_off()
    ax.set_xlabel("label budget")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Which images to label: selected vs uniform random")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)


def table_rows(report: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    cols = ["method", "label_fraction", "labels", "accuracy_mean", "accuracy_std", "seeds", "compute_s", "selection"]
    return cols, [[r.get(c, BALANCED) if c == "selection" else r[c] for c in cols] for r in report["results"]]


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
    rows = _balanced(report["results"])
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
    said = semi_sentences(report)
    return "\n".join(lines) + "\n" + ("\n" + "\n".join(said) + "\n" if said else "")


def pipeline_line(record: dict[str, Any]) -> str:
    """One sentence on how long `selfsup pipeline` took, stage by stage, from its `pipeline.json`."""
    stages = ", ".join(f"{stage} {s:.0f} s" for stage, s in (record.get("stage_s") or {}).items())
    return f"The pipeline ran in {record['wall_s']:.0f} s" + (f" ({stages})." if stages else " (every stage skipped).")


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
    p.add_argument("--table", choices=("methods", "selection"), default="methods",
                   help="methods: the label-efficiency table (default); selection: selected vs uniform-random subsets")
    args = p.parse_args(argv)
    if (args.readme is None) != (args.section is None):
        p.error("--readme and --section go together")

    def go() -> int:
        path = Path(args.run_dir)
        path = path / "report.json" if path.is_dir() else path
        try:
            report = json.loads(path.read_text())
            if args.table == "selection" and not report.get("selection"):
                raise UserError(f"{path} has no rows on selected subsets: run `selfsup finetune` with "
                                "finetune.selection=[random,typiclust]")
            table = readme_table(report) if args.table == "methods" else selection_table(report)
            # written by `selfsup pipeline` after its report.json; a report redone since is not that run's
            timing = path.parent / "pipeline.json"
            if args.table == "methods" and timing.is_file() and timing.stat().st_mtime >= path.stat().st_mtime:
                table += "\n" + pipeline_line(json.loads(timing.read_text())) + "\n"
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
