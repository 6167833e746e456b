"""Which labeled fractions to run, and the labeled subset for a fraction and seed.

"The subset for seed s" is the same wherever it is drawn: the manifest's stored key list when the manifest
holds that seed, else `shards.manifest.draw_labeled_subset` on the train split (the function `selfsup shard`
used). Seed index i of a fine-tuning run means subset seed `manifest seed + i`, so index 0 is the stored one.
Subsets only ever come from the train split; `check_disjoint` proves no test key is among them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from runtime.errors import UserError
from shards.manifest import draw_labeled_subset, shard_url

FULL = 1.0


def fractions_to_run(configured: Sequence[float] | None, manifest: dict) -> list[float]:
    """`finetune.fractions`, or every labeled subset the manifest lists; sorted, without duplicates."""
    if configured:
        fractions = [float(f) for f in configured]
    else:
        fractions = [float(s["fraction"]) for s in manifest.get("labeled_subsets", {}).values()]
    if not fractions:
        raise UserError("no labeled fractions to fine-tune on: set finetune.fractions, e.g. finetune.fractions=[0.01,0.1]")
    return sorted(set(fractions))


def subset_seed(manifest: dict, index: int) -> int:
    return int(manifest.get("seed", 0)) + index


def _stored_entry(manifest: dict, fraction: float, seed: int) -> dict | None:
    for entry in manifest.get("labeled_subsets", {}).values():
        if abs(float(entry["fraction"]) - fraction) < 1e-12 and int(entry.get("seed", -1)) == seed:
            return entry
    return None


def _read_keys(shards_dir: str, relpath: str) -> list[str]:
    url = shard_url(shards_dir, relpath)
    if "://" in url and not url.startswith("file://"):
        from webdataset.gopen import gopen

        with gopen(url, "rb") as f:
            text = f.read().decode("utf-8")
    else:
        path = Path(url.removeprefix("file://"))
        if not path.is_file():
            raise UserError(f"labeled subset file {path} is missing: re-create the shards with `selfsup shard`")
        text = path.read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]


def labeled_subset(shards_dir: str, manifest: dict, fraction: float, index: int,
                   train_keys: Sequence[str], train_labels: Sequence[int]) -> list[str]:
    """The train keys of the labeled subset for `fraction` and seed index `index` (all keys at fraction 1)."""
    if fraction >= FULL:
        keys = [k for k, y in zip(train_keys, train_labels) if int(y) >= 0]
    else:
        seed = subset_seed(manifest, index)
        entry = _stored_entry(manifest, fraction, seed)
        if entry is not None:
            keys = _read_keys(shards_dir, entry["keys"])
        else:
            keys = draw_labeled_subset(list(train_keys), [int(y) for y in train_labels], fraction, seed)
    if not keys:
        raise UserError(f"the labeled subset for fraction {fraction} (seed index {index}) is empty: "
                        "re-create the shards with a larger --labeled-fractions")
    unknown = set(keys) - set(train_keys)
    if unknown:
        raise UserError(f"labeled subset for fraction {fraction} names {len(unknown)} keys that are not in the train "
                        f"split (e.g. {sorted(unknown)[0]}): re-create the shards with `selfsup shard`")
    return keys


def check_disjoint(subset_keys: Sequence[str], test_keys: Sequence[str]) -> None:
    """No test sample may ever be trained on; shards with a key in both splits are refused."""
    both = set(subset_keys) & set(test_keys)
    if both:
        raise UserError(f"{len(both)} labeled training keys are also test keys (e.g. {sorted(both)[0]}): "
                        "the shards are inconsistent, re-create them with `selfsup shard`")
