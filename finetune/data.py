"""Fine-tuning's data, read from the shards as each stage needs it, so memory stays flat in the split's size.

Nothing here holds a whole split of images: the test split is streamed through a model in batches (keeping
predictions), frozen features are computed by streaming (keeping features), a labeled subset is held as
images only when it has at most `finetune.labeled_in_memory` images (`labeled_images`; larger ones are
streamed by the trained methods), and the pixel baseline and distill's pool are bounded seeded samples.
Every read resizes to one size: the size the encoder was trained at (`data.image_size`).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import numpy as np
import torch

from pretrain.augment import normalize
from pretrain.knn import stream_features
from shards.splits import iter_split, load_split, sample_keys

BATCH = 256


def labeled_images(shards: str, keys: Sequence[str], image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The images and labels of `keys` (train split) in the order of `keys`; for bounded key lists only."""
    x, y, got = load_split(shards, "train", keys=keys, image_size=image_size)
    row = {k: i for i, k in enumerate(got)}
    idx = torch.tensor([row[k] for k in keys if k in row], dtype=torch.long)
    return x[idx], y[idx]


def sample_of(keys: Sequence[str], max_samples: int, seed: int) -> list[str]:
    """`keys` when at most `max_samples`, else a seeded sample of `max_samples` of them (in their order)."""
    if len(keys) <= max_samples:
        return list(keys)
    keep = sorted(random.Random(f"{seed}-sample").sample(range(len(keys)), max_samples))
    return [keys[i] for i in keep]


def test_index(shards: str, image_size: int) -> tuple[list[str], np.ndarray]:
    """(keys, labels) of the readable test samples, in the order every streamed evaluation sees them."""
    keys, labels = [], []
    for _, y, k in iter_split(shards, "test", image_size=image_size, batch_size=BATCH):
        keys += k
        labels.append(y.numpy())
    return keys, (np.concatenate(labels) if labels else np.empty(0, dtype=np.int64))


def stream_predict(predict: Callable[[torch.Tensor], np.ndarray], shards: str, image_size: int,
                   split: str = "test") -> np.ndarray:
    """`predict(uint8 batch) -> class ids` over the split, streamed in batches: only predictions are kept."""
    out = [np.asarray(predict(x)) for x, _, _ in iter_split(shards, split, image_size=image_size, batch_size=BATCH)]
    return np.concatenate(out).astype(np.int64) if out else np.empty(0, dtype=np.int64)


def encode_keys(backbone: torch.nn.Module, shards: str, split: str, keys: Sequence[str] | None, image_size: int,
                mean, std, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Frozen-backbone features of the split's `keys` (all when None), streamed: `(features, labels, keys)`."""
    batches = iter_split(shards, split, keys=keys, image_size=image_size, batch_size=BATCH)
    with torch.no_grad():
        return stream_features(backbone, batches, lambda u: normalize(u, mean, std), device)


def pool_images(shards: str, splits: Sequence[str], labeled_keys: Sequence[str], max_per_split: int, seed: int,
                image_size: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """distill's pool: per split (train, unlabeled) a seeded sample of at most `max_per_split` images drawn
    by streaming (the whole split, in shard order, when no larger), plus any of `labeled_keys` the train
    sample missed (their one-hot labels must be in the pool). `(images, labels, keys)`."""
    parts, labels, keys = [], [], []
    for split in splits:
        if max_per_split <= 0 and split != "train":
            continue
        chosen = sample_keys(shards, split, max_per_split, seed) if max_per_split > 0 else []
        if split == "train" and chosen is not None:
            have = set(chosen)
            chosen = chosen + [k for k in labeled_keys if k not in have]
        if chosen == []:
            continue
        x, y, k = load_split(shards, split, keys=chosen, image_size=image_size)
        parts.append(x)
        labels.append(y)
        keys += k
    return torch.cat(parts), torch.cat(labels), keys
