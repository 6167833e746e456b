"""Tiny real shards for the reader and augmentation tests, in the exact docs/interfaces.md format.

Written with webdataset's own `ShardWriter`, independent of `shards/writer.py` (built in parallel), so the
reader is tested against the format, not against one writer. Every image carries its global sample index in
its first two pixels (lossless PNG), so a test can tell which samples a loader yielded without keys.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

SPLITS = ("train", "test", "unlabeled")  # split code written into pixel (0, 2)


def image_for(split: str, index: int, size: int, channels: int, rng: np.random.Generator) -> np.ndarray:
    """Random pixels, with the split and `index` written into pixels (0,0..2) of the first channel."""
    arr = rng.integers(0, 256, size=(size, size, channels), dtype=np.uint8)
    arr[0, 0, 0] = index // 256
    arr[0, 1, 0] = index % 256
    arr[0, 2, 0] = SPLITS.index(split)
    return arr


def keys_of(images) -> list[str]:
    """Recover the keys `image_for` wrote, from a uint8 [B, C, S, S] batch."""
    return [
        f"{SPLITS[int(im[0, 0, 2])]}-{int(im[0, 0, 0]) * 256 + int(im[0, 0, 1]):08d}" if im[0, 0, 2] < 3 else "?"
        for im in images
    ]


def encode(arr: np.ndarray, fmt: str = "png") -> bytes:
    img = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
    buf = io.BytesIO()
    img.save(buf, format={"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}[fmt])
    return buf.getvalue()


def make_shards(
    out: str | Path,
    counts: dict[str, int],
    shard_size: int = 7,
    image_size: int = 8,
    channels: int = 3,
    num_classes: int = 4,
    fmt: str = "png",
    seed: int = 0,
) -> dict:
    """Write `counts[split]` samples per split into `out/<split>-%06d.tar` and `out/manifest.json`.

    Labels are `index % num_classes` (`-1` in `unlabeled`). Returns the manifest. Keys follow the format:
    `train-00000042` (index < 65536, image_size >= 3).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    splits: dict[str, dict] = {}
    for split, n in counts.items():
        shards, shard_counts = [], []
        if n:
            with wds.ShardWriter(str(out / f"{split}-%06d.tar"), maxcount=shard_size, verbose=0) as sink:
                for i in range(n):
                    label = -1 if split == "unlabeled" else i % num_classes
                    sink.write(
                        {
                            "__key__": f"{split}-{i:08d}",
                            fmt: encode(image_for(split, i, image_size, channels, rng), fmt),
                            "cls": str(label),
                        }
                    )
            n_shards = -(-n // shard_size)
            shards = [f"{split}-{j:06d}.tar" for j in range(n_shards)]
            shard_counts = [min(shard_size, n - j * shard_size) for j in range(n_shards)]
        splits[split] = {"count": n, "shards": shards, "shard_counts": shard_counts}
    manifest = {
        "version": 1,
        "complete": True,
        "source": "test",
        "classes": [str(c) for c in range(num_classes)],
        "image_size": image_size,
        "channels": channels,
        "mean": [0.5] * channels,
        "std": [0.25] * channels,
        "seed": seed,
        "splits": splits,
        "labeled_subsets": {},
    }
    write_manifest(out, manifest)
    return manifest


def write_manifest(out: str | Path, manifest: dict) -> None:
    (Path(out) / "manifest.json").write_text(json.dumps(manifest, indent=1))


def write_raw_tar(path: str | Path, members: list[tuple[str, bytes]]) -> None:
    """A tar with exactly these member names and bytes (for hostile names like `../../x.png`)."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
