"""Finding shards again: `manifest.json`, shard URLs and labeled subsets -- what every stage reads.

Layout of a shards DIR (see docs/interfaces.md):
    DIR/train-000000.tar ...  DIR/test-000000.tar ...  DIR/unlabeled-000000.tar ...
    DIR/subsets/labeled-<fraction>-seed<seed>.txt      one train key per line
    DIR/manifest.json                                  written last, atomically, with "complete": true

`shards.writer` makes them (`selfsup shard`); `shards.reader` streams them back.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from runtime.errors import UserError

MANIFEST = "manifest.json"


def fraction_key(value: float | str) -> str:
    """The manifest key of a labeled fraction: the text as written ("0.01"), or str(float) for numbers."""
    return value.strip() if isinstance(value, str) else str(value)


def parse_fractions(values: str | Sequence[float | str]) -> list[tuple[str, float]]:
    """`"0.01,0.1"` or `[0.01, "0.1"]` -> [("0.01", 0.01), ("0.1", 0.1)]; each must be in (0, 1]."""
    items = values.split(",") if isinstance(values, str) else list(values)
    out: dict[str, float] = {}
    for item in items:
        key = fraction_key(item)
        if key == "":
            continue
        try:
            f = float(key)
        except ValueError:
            raise UserError(f"labeled fraction {key!r} is not a number: pass e.g. --labeled-fractions 0.01,0.1") from None
        if not 0 < f <= 1:
            raise UserError(f"labeled fraction {key} must be in (0, 1]: pass e.g. --labeled-fractions 0.01,0.1")
        out.setdefault(key, f)
    return list(out.items())


def draw_labeled_subset(keys: Sequence[str], labels: Sequence[int], fraction: float, seed: int) -> list[str]:
    """A class-balanced, seeded subset of the labeled keys: ceil(fraction * N) keys (at least one per class),
    spread as evenly over the classes as their sizes allow. Returned sorted.

    The one place subsets are drawn: `selfsup shard` stores some, fine-tuning draws other seeds with it.
    The draw depends on the set of (key, label) pairs only, not on the order they are passed in.
    """
    if not 0 < fraction <= 1:
        raise UserError(f"labeled fraction must be in (0, 1], got {fraction}")
    if len(labels) != len(keys):
        raise ValueError(f"{len(keys)} keys but {len(labels)} labels")
    if any(keys[i] > keys[i + 1] for i in range(len(keys) - 1)):  # already in order: no copies (the writer's)
        order = sorted(range(len(keys)), key=lambda i: keys[i])
        keys = [keys[i] for i in order]
        labels = [labels[i] for i in order]
    labels = np.asarray(labels, dtype=np.int64)
    classes = np.unique(labels[labels >= 0])
    n = int((labels >= 0).sum())
    if n == 0:
        raise UserError("cannot draw a labeled subset: the split has no labeled samples")
    total = min(n, max(len(classes), math.ceil(fraction * n - 1e-9)))
    rng = np.random.default_rng(seed)
    members = {int(c): rng.permutation(np.flatnonzero(labels == c)) for c in classes}
    quota = dict.fromkeys(members, 0)
    remaining = total
    while remaining > 0:
        open_ = [c for c in members if quota[c] < len(members[c])]
        share = remaining // len(open_)
        if share == 0:  # fewer left than classes: one more each for a seeded choice of classes
            for c in rng.permutation(open_)[:remaining]:
                quota[int(c)] += 1
            break
        for c in open_:
            take = min(share, len(members[c]) - quota[c])
            quota[c] += take
            remaining -= take
    chosen = np.sort(np.concatenate([members[c][: quota[c]] for c in members]))
    return [keys[i] for i in chosen]


def shard_url(shards_dir: str | os.PathLike, relpath: str) -> str:
    """Join a shards dir (local path or URL) and a path from the manifest."""
    rel = str(relpath)
    if rel.startswith("/") or ".." in Path(rel).parts:
        raise UserError(f"manifest path {rel!r} leaves the shards dir: re-create the shards with `selfsup shard`")
    base = str(shards_dir)
    if "://" in base:
        return base.rstrip("/") + "/" + rel
    return os.path.join(base, rel)


URL_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # pipe:..., file://..., s3://...


def open_url(url: str):
    """A binary stream for a local path or any URL: webdataset's `gopen` for the schemes it knows
    (`pipe:`, `file://`, http(s), gs, ...), fsspec for the others (`s3://`, `memory://`, ...)."""
    from webdataset.gopen import gopen, gopen_schemes

    scheme = url.split(":", 1)[0] if URL_SCHEME.match(url) else ""
    if scheme and len(scheme) > 1 and scheme not in ("file", *gopen_schemes):
        import fsspec

        return fsspec.open(url, "rb").open()
    return gopen(url, "rb")


def read_manifest(shards_dir: str | os.PathLike) -> dict[str, Any]:
    """The validated manifest of a complete shards dir (local or URL); a one-line UserError otherwise."""
    url = shard_url(shards_dir, MANIFEST)
    redo = f"run `selfsup shard SOURCE --out {shards_dir}` first"
    try:
        if "://" in str(shards_dir) and not str(shards_dir).startswith("file://"):
            with open_url(url) as f:
                text = f.read().decode("utf-8")
        else:
            text = Path(url.removeprefix("file://")).read_text()
    except Exception:  # noqa: BLE001 -- missing file, bad URL, network error: one message, one fix
        raise UserError(f"shards not found at {shards_dir}: {redo}") from None
    try:
        m = json.loads(text)
    except json.JSONDecodeError:
        raise UserError(f"{url} is not valid JSON: delete it and {redo}") from None
    if not isinstance(m, dict) or m.get("complete") is not True:
        raise UserError(f"shards at {shards_dir} are incomplete (an interrupted `selfsup shard`?): {redo}")
    for k in ("version", "source", "classes", "image_size", "channels", "mean", "std", "splits", "labeled_subsets"):
        if k not in m:
            raise UserError(f"{url} has no {k!r}: it was written by another tool or version; {redo}")
    for split in ("train", "test"):
        s = m["splits"].get(split)
        if not isinstance(s, dict) or not {"count", "shards", "shard_counts"} <= s.keys():
            raise UserError(f"{url} lacks the {split} split: {redo}")
    for s in m["splits"].values():
        for rel in s["shards"]:
            shard_url(shards_dir, rel)  # refuses paths that leave the dir
    return m
