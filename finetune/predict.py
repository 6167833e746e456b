"""The fine-tuned classifier as a file a user keeps, and `selfsup predict MODEL IMAGE...`.

`classifiers/<method>-<fraction>/` holds `model.safetensors` (weights only: loading runs no code),
`model.json` (classes, preprocessing, architecture; written last, so its presence means complete) and
`predictions.csv` (the evaluation's answer for every test key, so anyone can check a prediction later).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from finetune.classifier import build_classifier, predict_logits
from runtime.config import atomic_write_text, umask_mode
from runtime.errors import UserError

WEIGHTS = "model.safetensors"
META = "model.json"
PREDICTIONS = "predictions.csv"
BATCH = 256  # images decoded and classified at a time by `selfsup predict`


def save_classifier(out_dir: str | Path, state: dict[str, torch.Tensor], arch: dict[str, Any], classes: list[str],
                    manifest: dict, *, method: str, fraction: float, seed: int, accuracy: float,
                    image_size: int | None = None,
                    test_keys: list[str], test_labels: np.ndarray, test_pred: np.ndarray,
                    selection: str = "") -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / META).unlink(missing_ok=True)  # an old model.json must not vouch for new weights
    tmp = out / f".{WEIGHTS}.tmp"
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    os.chmod(tmp, umask_mode())  # safetensors creates 0600 files: the user's umask, like any other file
    os.replace(tmp, out / WEIGHTS)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["key", "label", "predicted", "label_name", "predicted_name"])
    for k, y, p in zip(test_keys, test_labels, test_pred):
        w.writerow([k, int(y), int(p), classes[int(y)], classes[int(p)]])
    atomic_write_text(out / PREDICTIONS, buf.getvalue())
    meta = {
        "format": "selfsup-classifier", "version": 1, "classes": list(classes),
        "preprocessing": {"image_size": int(image_size or manifest["image_size"]), "channels": int(manifest["channels"]),
                          "mean": [float(v) for v in manifest["mean"]], "std": [float(v) for v in manifest["std"]],
                          "resize": "shorter side to image_size (bicubic down, bilinear up), then center crop"},
        "architecture": arch, "method": method, "label_fraction": float(fraction), "seed": int(seed),
        "test_accuracy": float(accuracy),  # of this model only: it was chosen before it was scored
        "selected": selection or "chosen by the caller without the test split",
    }
    atomic_write_text(out / META, json.dumps(meta, indent=2) + "\n")
    return out


def resolve_model_dir(model_dir: str | Path) -> Path:
    """A classifier dir as given, or, for a fine-tuning output_dir, its classifier with the most labels."""
    d = Path(model_dir)
    if (d / META).is_file() or not (d / "classifiers").is_dir():
        return d
    found = []
    for c in (d / "classifiers").iterdir():
        try:
            found.append((float(json.loads((c / META).read_text())["label_fraction"]), c))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    if not found:
        raise UserError(f"no classifier under {d / 'classifiers'}: rerun `selfsup finetune`")
    return max(found)[1]


def available_classifiers(directory: str | Path) -> list[str]:
    """Names of the complete classifiers (a model.json) directly under `directory`, or under its
    `classifiers/` when it is a fine-tuning output_dir; [] when there are none or it cannot be read."""
    d = Path(directory)
    if (d / "classifiers").is_dir():
        d = d / "classifiers"
    try:
        return sorted(c.name for c in d.iterdir() if (c / META).is_file())
    except OSError:
        return []


def load_classifier(model_dir: str | Path):
    """-> (model in eval mode, meta). Weights come from safetensors only, loaded strictly."""
    d = resolve_model_dir(model_dir)
    if not d.is_dir():
        there = available_classifiers(d.parent)
        hint = (f"the classifiers in {d.parent} are {', '.join(there)}" if there else
                "pass a directory under <output_dir>/classifiers/ written by `selfsup finetune`")
        raise UserError(f"classifier not found at {d}: {hint}")
    if not (d / META).is_file():
        raise UserError(f"{d / META} is missing: {d} is not a classifier written by `selfsup finetune`")
    try:
        meta = json.loads((d / META).read_text())
        arch, pre, classes = meta["architecture"], meta["preprocessing"], meta["classes"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{d / META} is not a valid classifier description ({e}): rerun `selfsup finetune`") from None
    model = build_classifier(arch)
    try:
        state = load_file(str(d / WEIGHTS))
        model.load_state_dict(state, strict=True)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise UserError(f"weights {d / WEIGHTS} are missing or do not match {META} "
                        f"({' '.join(str(e).split())[:160]}): rerun `selfsup finetune`") from None
    if len(classes) != arch["num_classes"] or not {"image_size", "channels", "mean", "std"} <= pre.keys():
        raise UserError(f"{d / META} is inconsistent (classes or preprocessing): rerun `selfsup finetune`")
    return model.eval(), meta


def load_image(path: str | Path, size: int, channels: int) -> torch.Tensor:
    """uint8 [C, size, size] prepared as the shards were: mode, shorter side to `size`, center crop."""
    from PIL import Image, UnidentifiedImageError

    from shards.sources import IMAGE_EXTENSIONS, decode_image

    if os.path.isdir(path):
        raise UserError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {path}")
    try:
        img = decode_image(str(path))[0].convert("L" if channels == 1 else "RGB")  # as `selfsup shard` decodes
    except FileNotFoundError:
        raise UserError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"cannot read image {path} ({' '.join(str(e).split())[:120]}): pass a JPEG, PNG or WebP") from None
    w, h = img.size
    if min(w, h) != size:
        scale = size / min(w, h)
        new = (max(size, round(w * scale)), max(size, round(h * scale)))
        up = min(new) > min(img.size)
        img = img.resize(new, Image.Resampling.BILINEAR if up else Image.Resampling.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    img = img.crop((left, top, left + size, top + size))
    arr = np.array(img, dtype=np.uint8)  # a copy: torch wants a writable array
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(arr))


def predict_files(model_dir: str | Path, images: list[str], on_error=None) -> list[tuple[str, str]]:
    """[(path, class name)] for each image file. `model_dir`: a classifier dir or a fine-tuning output_dir.

    An unreadable image raises its one-line UserError, or, with `on_error(path, error)`, is reported through
    it and left out while the others are predicted."""
    return [(p, top[0][0]) for p, top in predict_top_k(model_dir, images, 1, on_error)]


def predict_top_k(model_dir: str | Path, images: list[str], k: int = 1,
                  on_error=None) -> list[tuple[str, list[tuple[str, float]]]]:
    """[(path, [(class name, probability), ...])]: the `k` most probable classes of each image, most probable
    first (softmax of the classifier's logits). Errors as `predict_files`."""
    out = []
    for path, top, error in iter_top_k(model_dir, images, k):
        if error is None:
            out.append((path, top))
        elif on_error is None:
            raise error
        else:
            on_error(path, error)
    return out


def image_paths(paths: Iterable[str]) -> Iterator[str]:
    """Each path as given, except a directory: the image files under it as `selfsup shard folder` lists them
    (`shards.sources.iter_image_files`), as they are found, so a folder of any size needs no shell glob."""
    from shards.sources import iter_image_files

    for p in paths:
        if not os.path.isdir(p):
            yield p
            continue
        found = 0
        for f in iter_image_files(p):
            found += 1
            yield f
        if not found:
            yield p  # reported as an error in its place (load_image), the other paths go on


def iter_top_k(model_dir: str | Path, images: Iterable[str], k: int = 1, batch_size: int = BATCH,
               device: str = "cpu") -> Iterator[tuple[str, list[tuple[str, float]] | None, UserError | None]]:
    """`(path, [(class name, probability), ...], None)` for each image in input order, or `(path, None, error)`
    for one that cannot be read; `batch_size` images decoded and classified at a time, so memory stays flat
    however many images stream through. The classifier is loaded (and a bad one refused) before it returns."""
    model, meta = load_classifier(model_dir)
    return _top_k(model.to(device), meta, iter(images), max(1, min(int(k), len(meta["classes"]))), batch_size,
                  device)


def _top_k(model: torch.nn.Module, meta: dict[str, Any], it: Iterator[str], k: int, batch_size: int,
           device: str) -> Iterator[tuple[str, list[tuple[str, float]] | None, UserError | None]]:
    pre = meta["preprocessing"]
    size, channels = int(pre["image_size"]), int(pre["channels"])
    while chunk := list(itertools.islice(it, batch_size)):
        loaded: dict[int, torch.Tensor] = {}
        errors: dict[int, UserError] = {}
        for i, p in enumerate(chunk):
            try:
                loaded[i] = load_image(p, size, channels)
            except UserError as e:
                errors[i] = e
        tops: dict[int, list[tuple[str, float]]] = {}
        if loaded:  # predict_logits runs under no_grad
            prob = predict_logits(model, torch.stack(list(loaded.values())), pre["mean"], pre["std"],
                                  device=device).float().softmax(1)
            top = prob.topk(k, dim=1)
            for i, vals, idx in zip(loaded, top.values.tolist(), top.indices.tolist()):
                tops[i] = [(meta["classes"][c], float(v)) for v, c in zip(vals, idx)]
        for i, p in enumerate(chunk):
            yield (p, tops[i], None) if i in tops else (p, None, errors[i])
