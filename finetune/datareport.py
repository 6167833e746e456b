"""`selfsup inspect`: is the data sound? A report from the encoder's features of the labeled splits.

- Near duplicates by cosine similarity of features above `inspect.duplicate_threshold`: across train and
  test (leakage that inflates test accuracy) and within train. The features are the mean of an image's and
  its mirror image's, so a mirrored copy counts as the copy it is (a resized copy differs by resampling
  only), centred on the train mean before the cosine.
- Likely label errors: labeled images (train and test) whose `inspect.knn_k` nearest neighbours mostly
  (more than `inspect.label_error_share`) carry one other label.
- Class balance of the labeled splits (from the shards' labels), and outliers: the images whose nearest
  neighbours are farthest (1 - mean cosine similarity to them).

Memory stays flat in the data's size: images are streamed through the encoder (features kept, float32,
unit length), similarities are computed in blocks of rows against all features (a bounded block), and only
each row's nearest neighbours and the counts are kept. Each split enters at most `inspect.max_images`
images (a seeded sample above, and the report says so). Thumbnails are read back for the few images shown.

Outputs in `output_dir`: data_report.json (written last), data_report.md, data_report_leakage.png,
data_report_duplicates.png, data_report_label_errors.png, data_report_outliers.png; a W&B run (`inspect`)
with the same tables, the sheets and counts in its summary.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finetune.selection import SIM_CELLS, split_features
from runtime.errors import UserError

FILE = "data_report.json"
SPLITS = ("train", "test")
PNGS = {"leakage": "data_report_leakage.png", "duplicates": "data_report_duplicates.png",
        "label_errors": "data_report_label_errors.png", "outliers": "data_report_outliers.png"}


# ------------------------------------------------------------------ the search (pure: features in, findings out)


def neighbours(feats: np.ndarray, k: int, train_n: int, threshold: float) -> dict[str, Any]:
    """One blocked pass over unit-length `feats` (train rows first, then test): each row's k nearest other
    rows (`nn_idx`, `nn_sim`) and its nearest train rows (`dup_idx`, `dup_sim`, itself excluded), and the
    exact counts of pairs above `threshold`: within train (i < j) and test x train."""
    x = torch.from_numpy(np.ascontiguousarray(feats, dtype=np.float32))
    n = x.shape[0]
    k = max(1, min(k, n - 1))
    kd = max(1, min(k, train_n - 1 if train_n > 1 else 1))
    nn_idx = np.empty((n, k), np.int64)
    nn_sim = np.empty((n, k), np.float32)
    dup_idx = np.empty((n, kd), np.int64)
    dup_sim = np.empty((n, kd), np.float32)
    within = across = 0
    test_with_dup = 0
    step = max(1, SIM_CELLS // max(n, 1))
    for s in range(0, n, step):
        sim = x[s:s + step] @ x.T
        rows = torch.arange(sim.shape[0])
        sim[rows, rows + s] = -2.0  # never its own neighbour
        v, i = sim.topk(k, dim=1)
        nn_idx[s:s + step], nn_sim[s:s + step] = i.numpy(), v.numpy()
        tr = sim[:, :train_n]
        if train_n:
            v, i = tr.topk(kd, dim=1)
            dup_idx[s:s + step], dup_sim[s:s + step] = i.numpy(), v.numpy()
        above = tr > threshold
        g = rows + s  # global row index
        is_train = g < train_n
        if is_train.any():  # within train: each pair once (j > i)
            upper = torch.arange(train_n)[None, :] > g[:, None]
            within += int((above & upper)[is_train].sum())
        if (~is_train).any():
            across += int(above[~is_train].sum())
            test_with_dup += int(above[~is_train].any(dim=1).sum())
    return {"nn_idx": nn_idx, "nn_sim": nn_sim, "dup_idx": dup_idx, "dup_sim": dup_sim,
            "within_train_pairs": within, "train_test_pairs": across, "test_with_duplicate": test_with_dup}


def top_pairs(nb: dict[str, Any], rows: range, threshold: float, top: int, unordered: bool) -> list[tuple[int, int, float]]:
    """The `top` most similar (row, train row, similarity) pairs above `threshold` among `rows`' nearest train
    rows; `unordered` (within train): each pair once."""
    seen, out = set(), []
    for r in rows:
        for j, v in zip(nb["dup_idx"][r], nb["dup_sim"][r]):
            if v <= threshold:
                break  # sorted: the rest are less similar
            key = (min(r, int(j)), max(r, int(j))) if unordered else (r, int(j))
            if key not in seen:
                seen.add(key)
                out.append((key[0], key[1], float(v)) if unordered else (r, int(j), float(v)))
    out.sort(key=lambda t: (-t[2], t[0], t[1]))
    return out[:top]


def label_suspects(nb: dict[str, Any], labels: np.ndarray, share: float) -> list[tuple[int, int, float, int]]:
    """(row, suggested label, share of labeled neighbours carrying it, nearest such neighbour) for every labeled
    row whose labeled neighbours give more than `share` of their votes to one label other than its own."""
    out = []
    for r in range(len(labels)):
        if labels[r] < 0:
            continue
        votes = labels[nb["nn_idx"][r]]
        votes = votes[votes >= 0]
        if not len(votes):
            continue
        label, count = Counter(votes.tolist()).most_common(1)[0]
        frac = count / len(votes)
        if label != labels[r] and frac > share:
            near = next(int(j) for j in nb["nn_idx"][r] if labels[j] == label)
            out.append((r, int(label), float(frac), near))
    out.sort(key=lambda t: (-t[2], t[0]))
    return out


# ------------------------------------------------------------------ the stage


def run_inspect(cfg: Any) -> dict[str, Any]:
    from finetune.placement import run_settings
    from pretrain.model import check_compatible, load_encoder
    from runtime.files import atomic_write_text
    from runtime.launch import one_cluster
    from shards.manifest import read_manifest
    from shards.splits import sample_keys, split_index

    ins = cfg.inspect
    if "://" not in cfg.data.shards and not cfg.data.shards.startswith("pipe:"):
        cfg.data.shards = str(Path(cfg.data.shards).resolve())
    manifest = read_manifest(cfg.data.shards)
    backbone, _, meta = load_encoder(cfg.encoder_dir)
    check_compatible(meta, manifest, image_size=cfg.data.image_size)
    size = int(meta["image_size"])
    classes = list(manifest["classes"])
    seed = int(manifest.get("seed", 0))
    mode, _, run_cfg = run_settings(cfg, manifest)  # encoded where fine-tuning would train (finetune.parallel)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    # ---- features of each labeled split (a seeded sample above inspect.max_images), labels from the index
    feats, keys, split_of, counts, balance, sampled = [], [], [], {}, {}, {}
    encoded: dict[str, Any] = {}  # where and in which formats the features were computed
    label_of: dict[str, int] = {}
    with one_cluster():  # both splits encoded on one cluster (when they use one)
        for split in SPLITS:
            if int(manifest["splits"].get(split, {}).get("count", 0)) == 0:
                continue
            all_keys, all_y = split_index(cfg.data.shards, split)
            label_of.update(zip(all_keys, all_y.tolist()))
            balance[split] = {classes[c] if 0 <= c < len(classes) else str(c): n
                              for c, n in sorted(Counter(all_y.tolist()).items())}
            chosen = sample_keys(cfg.data.shards, split, ins.max_images, seed)
            f, k, formats = split_features(backbone, run_cfg, split, size, manifest["mean"], manifest["std"],
                                           mode != "local", keys=chosen, mirror=True)
            encoded = encoded or formats  # the train split's, as fine-tuning's report gives
            feats.append(f)
            keys += k
            split_of += [split] * len(k)
            counts[split] = len(k)
            sampled[split] = chosen is not None
    if "train" not in counts:
        raise UserError(f"no train images in {cfg.data.shards}: nothing to inspect")
    x = np.concatenate(feats)
    del feats
    # centred on the train mean, then unit length: backbone features after a ReLU all share one direction
    # (every cosine near 0.9 on digits); centred, an exact or mirrored copy still scores 1 and the rest spread out
    x -= x[: counts["train"]].mean(axis=0)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    labels = np.array([label_of.get(k, -1) for k in keys], dtype=np.int64)
    train_n = counts["train"]
    nb = neighbours(x, ins.knn_k, train_n, ins.duplicate_threshold)

    def name(c: int) -> str:
        return classes[c] if 0 <= c < len(classes) else str(c)

    def item(r: int) -> dict[str, Any]:
        return {"key": keys[r], "split": split_of[r], "label": name(int(labels[r])) if labels[r] >= 0 else None}

    leak = top_pairs(nb, range(train_n, len(keys)), ins.duplicate_threshold, ins.top, unordered=False)
    dups = top_pairs(nb, range(train_n), ins.duplicate_threshold, ins.top, unordered=True)
    suspects = label_suspects(nb, labels, ins.label_error_share)
    outlier_score = 1.0 - nb["nn_sim"].mean(axis=1)
    outliers = [int(r) for r in np.argsort(-outlier_score, kind="stable")[: ins.top]]

    report: dict[str, Any] = {
        "dataset": manifest.get("source"), "encoder": str(Path(cfg.encoder_dir).resolve()),
        "shards": str(cfg.data.shards), "features": "mean of the image's and its mirror's, centred on the train mean, unit length (cosine)",
        "images": counts, "sampled": sampled, "max_images": ins.max_images, "encode": encoded,
        "duplicate_threshold": ins.duplicate_threshold, "knn_k": ins.knn_k,
        "label_error_share": ins.label_error_share,
        "duplicates": {
            "train_test": {"pairs": nb["train_test_pairs"], "test_images": nb["test_with_duplicate"],
                           "top": [{"test": item(a), "train": item(b), "similarity": round(v, 4)} for a, b, v in leak]},
            "train": {"pairs": nb["within_train_pairs"],
                      "top": [{"a": item(a), "b": item(b), "similarity": round(v, 4)} for a, b, v in dups]},
        },
        "label_errors": {
            "count": len(suspects),
            "by_split": dict(Counter(split_of[r] for r, *_ in suspects)),
            "top": [{**item(r), "suggested": name(s), "share": round(f, 3), "neighbour": keys[j]}
                    for r, s, f, j in suspects[: ins.top]],
        },
        "outliers": {"top": [{**item(r), "score": round(float(outlier_score[r]), 4)} for r in outliers]},
        "class_balance": {s: {"counts": b, "imbalance": round(max(b.values()) / max(1, min(b.values())), 3)
                              if b else None} for s, b in balance.items()},
    }
    report["thumbnails"] = _thumbnails(cfg.data.shards, size, report, leak, dups, suspects[: ins.top], outliers,
                                       keys, split_of, labels, outlier_score, name, out)
    atomic_write_text(out / "data_report.md", to_markdown(report))
    atomic_write_text(out / FILE, json.dumps(report, indent=2) + "\n")
    _track(cfg, out, report)
    return report


def _thumbnails(shards: str, size: int, report: dict[str, Any], leak, dups, suspects, outliers, keys, split_of,
                labels, outlier_score, name, out: Path) -> dict[str, str]:
    """The PNG sheets: only the few images shown are read back from the shards."""
    from finetune.thumbs import grid, pairs
    from shards.splits import load_split

    wanted: dict[str, set[str]] = {}
    rows = {r for a, b, _ in leak + dups for r in (a, b)} | {r for r, *_ in suspects} | \
           {j for *_, j in suspects} | set(outliers)
    for r in rows:
        wanted.setdefault(split_of[r], set()).add(keys[r])
    images: dict[str, np.ndarray] = {}
    for split, ks in wanted.items():
        x, _, got = load_split(shards, split, keys=sorted(ks), image_size=size)
        images.update({k: x[i].numpy() for i, k in enumerate(got)})

    def cell(r: int, caption: str) -> tuple[np.ndarray, str]:
        return images.get(keys[r], np.zeros((1, size, size), np.uint8)), caption

    def short(r: int) -> str:
        return f"{split_of[r][:2]} {keys[r].rsplit('-', 1)[-1].lstrip('0') or '0'}"

    thr = report["duplicate_threshold"]
    made = {}
    if leak:
        made["leakage"] = pairs([(cell(a, short(a)), cell(b, f"{v:.3f}")) for a, b, v in leak],
                                f"test images (left) with a near duplicate in train (right), cosine > {thr}",
                                out / PNGS["leakage"]).name
    if dups:
        made["duplicates"] = pairs([(cell(a, short(a)), cell(b, f"{v:.3f}")) for a, b, v in dups],
                                   f"near-duplicate pairs within train, cosine > {thr}", out / PNGS["duplicates"]).name
    if suspects:
        made["label_errors"] = pairs(
            [(cell(r, f"says {name(int(labels[r]))}"[:10]), cell(j, f"like {name(s)}"[:10])) for r, s, _, j in suspects],
            "likely label errors: the image and its label (left), its nearest neighbour of the label its "
            "neighbours carry (right)", out / PNGS["label_errors"]).name
    if outliers:
        made["outliers"] = grid([cell(r, "")[0] for r in outliers], [f"{outlier_score[r]:.3f}" for r in outliers],
                                "outliers: farthest from their nearest neighbours (1 - mean cosine)",
                                out / PNGS["outliers"], cols=8).name
    for key, png in PNGS.items():  # a sheet from an earlier run that has nothing to show now
        if key not in made and (out / png).exists():
            (out / png).unlink()
    return made


# ------------------------------------------------------------------ words


def summary_lines(report: dict[str, Any]) -> list[str]:
    d = report["duplicates"]
    le = report["label_errors"]
    cb = report["class_balance"]
    lines = [
        f"leakage: {d['train_test']['test_images']} of {report['images'].get('test', 0)} test images have a near "
        f"duplicate in train ({d['train_test']['pairs']} pairs, cosine > {report['duplicate_threshold']})",
        f"duplicates within train: {d['train']['pairs']} pairs",
        f"likely label errors: {le['count']} ({', '.join(f'{s} {n}' for s, n in le['by_split'].items()) or 'none'})",
        "class balance: " + ", ".join(f"{s} {v['imbalance']}x largest/smallest class" for s, v in cb.items()),
    ]
    return lines


def to_markdown(report: dict[str, Any]) -> str:
    d, le, thumbs = report["duplicates"], report["label_errors"], report["thumbnails"]
    sampled = [s for s, v in report["sampled"].items() if v]
    lines = [f"# Data report: {report['dataset']}", "",
             f"Encoder `{report['encoder']}`; features: {report['features']}. Images searched: "
             + ", ".join(f"{s} {n}" for s, n in report["images"].items())
             + (f" (a seeded sample of at most {report['max_images']} for {', '.join(sampled)})" if sampled else "")
             + ".", "", *[f"- {ln}" for ln in summary_lines(report)], ""]
    lines += ["## Leakage: test images with a near duplicate in train", ""]
    if d["train_test"]["top"]:
        lines += ["| test | train | cosine |", "|---|---|---|"]
        lines += [f"| `{p['test']['key']}` ({p['test']['label']}) | `{p['train']['key']}` ({p['train']['label']}) | "
                  f"{p['similarity']:.4f} |" for p in d["train_test"]["top"]]
        lines += ["", f"![leakage]({thumbs['leakage']})", ""]
    else:
        lines += ["None above the threshold.", ""]
    lines += ["## Near duplicates within train", ""]
    if d["train"]["top"]:
        lines += ["| a | b | cosine |", "|---|---|---|"]
        lines += [f"| `{p['a']['key']}` ({p['a']['label']}) | `{p['b']['key']}` ({p['b']['label']}) | "
                  f"{p['similarity']:.4f} |" for p in d["train"]["top"]]
        lines += ["", f"![duplicates]({thumbs['duplicates']})", ""]
    else:
        lines += ["None above the threshold.", ""]
    lines += ["## Likely label errors", "",
              f"Labeled images whose {report['knn_k']} nearest neighbours give more than "
              f"{report['label_error_share']:.0%} of their votes to one other label.", ""]
    if le["top"]:
        lines += ["| key | split | label | neighbours say | share |", "|---|---|---|---|---|"]
        lines += [f"| `{s['key']}` | {s['split']} | {s['label']} | {s['suggested']} | {s['share']:.2f} |"
                  for s in le["top"]]
        lines += ["", f"![label errors]({thumbs['label_errors']})", ""]
    else:
        lines += ["None.", ""]
    lines += ["## Class balance", "", "| class | " + " | ".join(report["class_balance"]) + " |",
              "|---|" + "---|" * len(report["class_balance"])]
    names = list(dict.fromkeys(c for v in report["class_balance"].values() for c in v["counts"]))
    for c in names:
        lines.append(f"| {c} | " + " | ".join(str(v["counts"].get(c, 0)) for v in report["class_balance"].values()) + " |")
    lines += ["", "## Outliers", "", "Images farthest from their nearest neighbours (score: 1 - mean cosine).", "",
              "| key | split | label | score |", "|---|---|---|---|"]
    lines += [f"| `{o['key']}` | {o['split']} | {o['label']} | {o['score']:.4f} |" for o in report["outliers"]["top"]]
    if thumbs.get("outliers"):
        lines += ["", f"![outliers]({thumbs['outliers']})"]
    return "\n".join(lines) + "\n"


def _track(cfg: Any, out: Path, report: dict[str, Any]) -> None:
    """The W&B run of the report: its tables, sheets and counts (offline files unless configured)."""
    from runtime.tracking import init_tracking

    tracker = init_tracking(cfg, "inspect", out)
    d = report["duplicates"]
    tracker.log_table("leakage", ["test", "train", "cosine"],
                      [[p["test"]["key"], p["train"]["key"], p["similarity"]] for p in d["train_test"]["top"]])
    tracker.log_table("duplicates", ["a", "b", "cosine"], [[p["a"]["key"], p["b"]["key"], p["similarity"]]
                                                           for p in d["train"]["top"]])
    tracker.log_table("label_errors", ["key", "split", "label", "suggested", "share"],
                      [[s["key"], s["split"], s["label"], s["suggested"], s["share"]] for s in report["label_errors"]["top"]])
    tracker.log_table("outliers", ["key", "split", "label", "score"],
                      [[o["key"], o["split"], o["label"], o["score"]] for o in report["outliers"]["top"]])
    tracker.log_table("class_balance", ["split", "class", "count"],
                      [[s, c, n] for s, v in report["class_balance"].items() for c, n in v["counts"].items()])
    from PIL import Image

    for key, png in report["thumbnails"].items():
        with Image.open(out / png) as im:
            tracker.log_images(f"data_report/{key}", np.asarray(im.convert("RGB")))
    tracker.save_file(out / "data_report.md")
    tracker.summary({"data_report/train_test_pairs": d["train_test"]["pairs"],
                     "data_report/test_images_with_duplicate": d["train_test"]["test_images"],
                     "data_report/train_pairs": d["train"]["pairs"],
                     "data_report/label_errors": report["label_errors"]["count"]})
    tracker.finish()
