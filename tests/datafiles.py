"""Tiny REAL input files in every format `selfsup shard` reads, for any test to build on.

Each writer lays out files exactly as the official downloads do (CIFAR python-pickle batches, STL-10
column-major binaries, image folders in both layouts), with random pixels and labels 0..n-1 cycling so
every class is present. They return what a test needs to know (counts, classes).
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
from PIL import Image


def _labels(n: int, n_classes: int) -> list[int]:
    return [i % n_classes for i in range(n)]


def _pixels(rng: np.random.Generator, n: int, *shape: int) -> np.ndarray:
    return rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)


def _pickle(path: Path, obj: dict) -> None:
    # protocol 2 and numpy 1's module name, as in the official files (pickled by Python 2 / numpy 1)
    data = pickle.dumps(obj, protocol=2).replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    path.write_bytes(data)


def write_cifar10(dir: str | Path, n_train: int = 20, n_test: int = 10, seed: int = 0) -> dict:
    """`data_batch_1..5`, `test_batch`, `batches.meta` (n_train spread over the 5 batches)."""
    d = Path(dir)
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    labels = _labels(n_train, 10)
    parts = np.array_split(np.arange(n_train), 5)
    for i, idx in enumerate(parts, start=1):
        _pickle(d / f"data_batch_{i}", {
            "batch_label": f"training batch {i} of 5", "labels": [labels[j] for j in idx],
            "data": _pixels(rng, len(idx), 3072), "filenames": [f"img_{j}.png" for j in idx]})
    _pickle(d / "test_batch", {"batch_label": "testing batch 1 of 1", "labels": _labels(n_test, 10),
                               "data": _pixels(rng, n_test, 3072),
                               "filenames": [f"test_{j}.png" for j in range(n_test)]})
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    _pickle(d / "batches.meta", {"label_names": names, "num_cases_per_batch": 10000, "num_vis": 3072})
    return {"train": n_train, "test": n_test, "classes": names}


def write_cifar100(dir: str | Path, n_train: int = 200, n_test: int = 100, seed: int = 0) -> dict:
    """`train`, `test`, `meta` with fine and coarse labels."""
    d = Path(dir)
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, n in (("train", n_train), ("test", n_test)):
        fine = _labels(n, 100)
        _pickle(d / name, {"filenames": [f"{name}_{j}.png" for j in range(n)], "batch_label": name,
                           "fine_labels": fine, "coarse_labels": [f // 5 for f in fine],
                           "data": _pixels(rng, n, 3072)})
    names = [f"class{i:02d}" for i in range(100)]
    _pickle(d / "meta", {"fine_label_names": names, "coarse_label_names": [f"super{i}" for i in range(20)]})
    return {"train": n_train, "test": n_test, "classes": names}


def write_stl10(dir: str | Path, n_train: int = 20, n_test: int = 10, n_unlabeled: int = 5, seed: int = 0) -> dict:
    """`train_X.bin`, `train_y.bin` (labels 1..10), `test_*`, `unlabeled_X.bin`, `class_names.txt`.

    Images are stored column-major (N, 3, 96, 96) as in the official files; the returned
    `first_train_image` is the (H, W, 3) image a correct reader must see for train_X[0].
    """
    d = Path(dir)
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    first = None
    for name, n in (("train", n_train), ("test", n_test), ("unlabeled", n_unlabeled)):
        if name == "unlabeled" and n == 0:
            continue  # unlabeled_X.bin is optional
        hwc = _pixels(rng, n, 96, 96, 3)
        if first is None:
            first = hwc[0].copy()
        hwc.transpose(0, 3, 2, 1).tofile(d / f"{name}_X.bin")  # (N, H, W, C) -> (N, C, W, H)
        if name != "unlabeled":
            (np.array(_labels(n, 10), dtype=np.uint8) + 1).tofile(d / f"{name}_y.bin")
    names = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
    (d / "class_names.txt").write_text("\n".join(names) + "\n")
    return {"train": n_train, "test": n_test, "unlabeled": n_unlabeled, "classes": names,
            "first_train_image": first}


_FORMATS = (("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP"))


def _write_image(path: Path, rng: np.random.Generator, size: tuple[int, int], fmt: str) -> None:
    w, h = size
    # smooth-ish content (a gradient plus noise) so JPEG/WebP files are realistic, not pure noise
    grad = np.linspace(0, 200, w, dtype=np.float32)[None, :, None]
    arr = np.clip(grad + rng.normal(0, 30, size=(h, w, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(arr).save(path, format=fmt)


def write_image_folder(dir: str | Path, layout: str = "flat", classes: tuple[str, ...] = ("cat", "dog", "fish"),
                       per_class: int = 5, with_unlabeled: bool = True, size: tuple[int, int] = (40, 30),
                       n_unlabeled: int = 4, n_test_per_class: int = 2, seed: int = 0) -> dict:
    """An image folder with JPEG, PNG and WebP files (cycling), all `size` (w, h).

    layout="flat":  DIR/<class>/img_k.<ext>            (per_class images each; the test split is drawn later)
    layout="split": DIR/train/<class>/*, DIR/test/<class>/* (per_class train and n_test_per_class test each)
    with_unlabeled: DIR/unlabeled/a/b/*  (nested, to check "any depth")
    """
    if layout not in ("flat", "split"):
        raise ValueError(f"layout must be flat or split, got {layout!r}")
    d = Path(dir)
    rng = np.random.default_rng(seed)
    k = 0
    counts = {"labeled": 0, "train": 0, "test": 0, "unlabeled": 0}
    parts = [("", per_class)] if layout == "flat" else [("train", per_class), ("test", n_test_per_class)]
    for part, n in parts:
        for c in classes:
            cdir = d / part / c
            cdir.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                ext, fmt = _FORMATS[k % len(_FORMATS)]
                k += 1
                _write_image(cdir / f"img_{i}.{ext}", rng, size, fmt)
            counts[part or "labeled"] += n
    if with_unlabeled:
        udir = d / "unlabeled" / "a" / "b"
        udir.mkdir(parents=True, exist_ok=True)
        for i in range(n_unlabeled):
            ext, fmt = _FORMATS[i % len(_FORMATS)]
            _write_image((udir if i % 2 else d / "unlabeled") / f"u_{i}.{ext}", rng, size, fmt)
        counts["unlabeled"] = n_unlabeled
    counts["classes"] = sorted(classes)
    return counts


def write_truncated_jpeg(path: str | Path, size: tuple[int, int] = (64, 48), keep: float = 0.5) -> Path:
    """A JPEG cut off after `keep` of its bytes: it opens (header intact) but cannot be decoded."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)).save(buf, format="JPEG")
    data = buf.getvalue()
    p.write_bytes(data[: int(len(data) * keep)])
    return p


def write_garbage_image(path: str | Path, n_bytes: int = 300) -> Path:
    """Random bytes under an image extension: not an image at all."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(np.random.default_rng(2).integers(0, 256, n_bytes, dtype=np.uint8).tobytes())
    return p


def write_finished_looking_run(dir: str | Path) -> Path:
    """A run dir holding the files a finished run leaves (encoder.json, report.json, configs, metrics), for
    checking that a refused command changes none of them."""
    run = Path(dir)
    run.mkdir(parents=True, exist_ok=True)
    for name, text in {"encoder.json": '{"model": "resnet18"}', "report.json": '{"results": []}',
                       "config.yaml": "name: digits\n", "metrics.jsonl": '{"epoch": 1}\n',
                       "pipeline.config.yaml": "name: digits\n"}.items():
        (run / name).write_text(text)
    return run
