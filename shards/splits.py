"""Whole splits read in shard order, for evaluation and fine-tuning: in memory (`load_split`), streamed in
batches (`iter_split`), as keys and labels only (`split_index`), or as a bounded seeded sample (`sample_keys`,
`sample_split`). The training stream with equal batches per rank is `shards.reader.ShardLoader`.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Iterable, Iterator

import torch

from runtime.errors import UserError
from shards.reader import IMAGE_EXTS, _Decoder, _safe_key, _samples, _Shard, read_manifest, split_shards

log = logging.getLogger(__name__)


def load_split(
    shards_dir: str, split: str, keys: Iterable[str] | None = None, image_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """A whole split in shard order, in memory: `(images uint8 [N,C,S,S], labels int64 [N], keys)`.

    With `keys`, only those samples (still in shard order; compare the returned keys). Corrupt samples are
    skipped with a warning; a split (or key list) without readable samples is a UserError.
    """
    manifest = read_manifest(shards_dir)
    keyset = frozenset(keys) if keys is not None else None
    shards = split_shards(shards_dir, manifest, (split,))
    decoder = _Decoder(
        channels=int(manifest["channels"]),
        image_size=int(image_size or manifest["image_size"]),
        nominal_size=int(manifest["image_size"]),
        num_classes=len(manifest["classes"]),
    )
    images, labels, names = [], [], []
    for shard in shards:
        for sample in _samples(shard, decoder.skips, keyset):
            out = decoder(sample, shard)
            if out is not None:
                images.append(out[0])
                labels.append(out[1])
                names.append(sample["__key__"])
    if keyset is not None and len(names) < len(keyset):
        log.warning("%d of %d requested keys not found or unreadable in %s/%s",
                    len(keyset) - len(names), len(keyset), shards_dir, split)
    if not images and keyset is None and not sum(decoder.skips.values()):
        raise UserError(f"no readable samples in split {split} of {shards_dir}: it holds no images (its input had "
                        "none for it, e.g. every class a single image, so none was left for a test split): shard "
                        "an input with at least 2 images per class, or DIR/train + DIR/test folders")
    if not images:
        what = f"{len(keyset)} requested keys of " if keyset is not None else ""
        raise UserError(
            f"no readable samples in {what}split {split} of {shards_dir} "
            f"({sum(decoder.skips.values())} skipped): re-run `selfsup shard`"
        )
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64), names


def iter_split(
    shards_dir: str, split: str, keys: Iterable[str] | None = None, image_size: int | None = None,
    batch_size: int = 256, part: tuple[int, int] | None = None, skips: Counter | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
    """A split (or only its `keys`) streamed in shard order, as `load_split` reads it but one batch at a
    time: `(images uint8 [B,C,S,S], labels int64 [B], keys)`, at most `batch_size` images held. Corrupt
    samples are skipped like `load_split` does (an empty split yields nothing). `part=(i, n)` reads only the
    i-th of n contiguous runs of the split's shards: parts 0..n-1 one after the other give the whole split.
    `skips`, when given, receives the skipped samples' counts by reason as they happen."""
    manifest = read_manifest(shards_dir)
    keyset = frozenset(keys) if keys is not None else None
    decoder = _Decoder(channels=int(manifest["channels"]), image_size=int(image_size or manifest["image_size"]),
                       nominal_size=int(manifest["image_size"]), num_classes=len(manifest["classes"]))
    if skips is not None:
        decoder.skips = skips
    line = split_shards(shards_dir, manifest, (split,))
    if part is not None:
        i, n = part
        line = line[len(line) * i // n:len(line) * (i + 1) // n]
    images, labels, names = [], [], []
    for shard in line:
        for sample in _samples(shard, decoder.skips, keyset):
            out = decoder(sample, shard)
            if out is None:
                continue
            images.append(out[0])
            labels.append(out[1])
            names.append(sample["__key__"])
            if len(images) == batch_size:
                yield torch.stack(images), torch.tensor(labels, dtype=torch.int64), names
                images, labels, names = [], [], []
    if images:
        yield torch.stack(images), torch.tensor(labels, dtype=torch.int64), names


def split_index(shards_dir: str, split: str) -> tuple[list[str], torch.Tensor]:
    """`(keys, labels int64 [N])` of a split in shard order, read without decoding a single image (keys and
    labels checked as the decoder checks them; an undecodable image is still listed)."""
    manifest = read_manifest(shards_dir)
    check = _Decoder(int(manifest["channels"]), int(manifest["image_size"]), int(manifest["image_size"]),
                     len(manifest["classes"]))
    keys, labels = [], []
    for shard in split_shards(shards_dir, manifest, (split,)):
        for sample in _samples(shard, check.skips):
            label = _raw_label(check, sample, shard)
            if label is not None:
                keys.append(sample["__key__"])
                labels.append(label)
    return keys, torch.tensor(labels, dtype=torch.int64)


def sample_keys(shards_dir: str, split: str, max_samples: int, seed: int, labeled: bool = False,
                keys: Iterable[str] | None = None) -> list[str] | None:
    """A seeded sample of at most `max_samples` keys of a split (of its `keys`; with `labeled`, of its
    samples with a label), in shard order, drawn by reservoir sampling over the stream without decoding an
    image: memory holds `max_samples` keys whatever the split's size. None when the split (as the manifest
    counts it, or `keys`) has no more than `max_samples`: read all of it. The same arguments give the same
    sample."""
    manifest = read_manifest(shards_dir)
    keyset = frozenset(keys) if keys is not None else None
    total = len(keyset) if keyset is not None else int(manifest["splits"].get(split, {}).get("count", 0))
    if total <= max_samples:
        return None
    check = _Decoder(int(manifest["channels"]), int(manifest["image_size"]), int(manifest["image_size"]),
                     len(manifest["classes"]))
    rng = random.Random(f"{seed}-{split}-sample")
    chosen: list[tuple[int, str]] = []  # (stream position, key)
    seen = 0
    for shard in split_shards(shards_dir, manifest, (split,)):
        for sample in _samples(shard, check.skips, keyset):
            label = _raw_label(check, sample, shard)
            if label is None or (labeled and label < 0):
                continue
            if len(chosen) < max_samples:
                chosen.append((seen, sample["__key__"]))
            else:
                j = rng.randrange(seen + 1)  # Algorithm R: every sample kept with probability max / seen
                if j < max_samples:
                    chosen[j] = (seen, sample["__key__"])
            seen += 1
    return [k for _, k in sorted(chosen)]


def sample_split(shards_dir: str, split: str, max_samples: int, seed: int, image_size: int | None = None,
                 keys: Iterable[str] | None = None, labeled: bool = False):
    """`load_split` of a bounded seeded sample: at most `max_samples` images of the split (or of its `keys`),
    drawn by `sample_keys` and then decoded by streaming, so the split is never held whole."""
    chosen = sample_keys(shards_dir, split, max_samples, seed, labeled=labeled, keys=keys)
    return load_split(shards_dir, split, keys=chosen if chosen is not None else keys, image_size=image_size)


def _raw_label(check: _Decoder, sample: dict, shard: _Shard) -> int | None:
    """The label of a raw sample, or None where the decoder would refuse it before decoding."""
    if not _safe_key(sample["__key__"]) or not any(sample.get(e) for e in IMAGE_EXTS):
        return None
    return check._label(sample.get("cls"), shard.split)
