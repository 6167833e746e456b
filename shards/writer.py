"""Writing WebDataset shards + `manifest.json` (`selfsup shard`); the layout is in `shards.manifest`.

Shards are planned in the parent (keys numbered per split in source order, then each split in a seeded
random order across classes) and written by a process pool, one task per shard, each to a temporary name
renamed into place, so the output is the same for any `workers`. A DIR without a complete manifest is a
crashed run: our own files in it are removed and redone.

Over 400 lines on purpose: one job, turning a source into a complete shard directory (checks, plan, pool of
writers, encoding, manifest), each part small and only used here; reading the shards back is `shards.reader`.
"""

from __future__ import annotations

import concurrent.futures as cf
import io
import json
import math
import multiprocessing
import os
import re
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from runtime.config import MIN_IMAGE_SIZE, atomic_write_text
from runtime.errors import UserError, disk_full_message, is_disk_full
from runtime.runlock import hold, lock_scope
from shards.manifest import MANIFEST, draw_labeled_subset, parse_fractions, read_manifest
from shards.sources import PHOTO_SOURCES, SOURCES, Source, Split, decode_image, open_source

MARKER = ".shard-incomplete"  # present while a run writes; a crash leaves it behind
MIN_SIDE = MIN_IMAGE_SIZE  # images with a shorter side below this are refused (nothing to crop from)
MAX_SKIPPED_LISTED = 100
PARALLEL_MIN_IMAGES = 4096  # below this, shards are written in this process (a pool takes seconds to start)
# our file names: shards, their temp names, and atomic_write_text's temp names of the manifest
_OURS = re.compile(r"^(\.?(train|test|unlabeled)-\d{6}\.tar(\.tmp)?|\.manifest\.json\..*\.tmp)$")
# encoded formats kept as they are in folders; anything else is re-encoded as PNG
_FOLDER_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
SHUFFLE_SEED = 0  # the order of samples in the shards (fixed: see _shuffled_splits)
_MTIME = 946684800.0  # a fixed member time (2000-01-01): the same inputs give byte-identical shards


# ------------------------------------------------------------------ public


@lock_scope
def write_shards(
    source: str,
    out_dir: str | os.PathLike,
    input_dir: str | os.PathLike | None = None,
    shard_size: int = 512,
    image_size: int | None = None,
    labeled_fractions: str | Sequence[float | str] = (0.01, 0.1),
    seed: int = 0,
    test_fraction: float = 0.2,
    workers: int = 2,
    progress: bool | None = None,
    photos_unlabeled: int | None = None,
) -> dict[str, Any]:
    """Shard `source` into `out_dir` and return the manifest. A finished `out_dir` is returned as it is.

    image_size: shorter side on write; None keeps the size (digits: 16). Never enlarges, except digits.
    progress: tqdm bar; None = only on a terminal.
    """
    if source not in SOURCES:
        raise UserError(f"unknown source {source!r}: choose one of {', '.join(SOURCES)}")
    fractions = parse_fractions(labeled_fractions)
    if shard_size < 1:
        raise UserError(f"--shard-size must be positive, got {shard_size}")
    if image_size is not None and image_size < MIN_SIDE:
        raise UserError(f"--image-size must be at least {MIN_SIDE}, got {image_size}")
    if not 0 < test_fraction < 1:
        raise UserError(f"--test-fraction must be in (0, 1), got {test_fraction}")
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    if photos_unlabeled is not None and source not in PHOTO_SOURCES:  # refused before a finished dir is returned
        raise UserError(f"--photos-unlabeled is for the {' and '.join(PHOTO_SOURCES)} sources, not {source}: drop it")
    out = _check_out_dir(out_dir)
    done = _finished(out, source)
    if done is not None:
        return done

    src = open_source(source, input_dir, test_fraction, photos_unlabeled)  # bad input fails here, before DIR exists
    _check_splits(src, fractions)
    size = image_size if image_size is not None else src.default_image_size
    _make_out_dir(out)
    hold(out, f"selfsup shard {source}")  # one writer per dir: a second one refuses before touching a file
    _clean_half_written(out)
    _inside(out, MARKER).write_text(f"selfsup shard {source} (pid {os.getpid()}) is writing here\n")

    total = sum(src.counts.values())
    # processes pay off only for many shards; small array sources encode faster than a pool starts
    workers = 1 if total < PARALLEL_MIN_IMAGES else min(workers, math.ceil(total / shard_size))
    try:
        results = _run_tasks(_plan(src, out, shard_size, size), workers, total, progress)
        manifest = _assemble(src, out, results, size, fractions, seed, shard_size, test_fraction)
        atomic_write_text(_inside(out, MANIFEST), json.dumps(manifest, indent=2) + "\n")
    except KeyboardInterrupt:
        _remove_temp_files(out)  # the marker stays: a rerun redoes the dir (shards come out byte-identical)
        raise KeyboardInterrupt("rerun to continue") from None
    except Exception as e:
        if not is_disk_full(e):
            raise
        _remove_temp_files(out)
        need, bound = _space_needed(out, total, shard_size)
        raise UserError(disk_full_message(out, need, "for all the shards", bound)) from None
    _inside(out, MARKER).unlink(missing_ok=True)
    return manifest


def _check_splits(src: Source, fractions: list[tuple[str, float]]) -> None:
    """Refuse an input whose test split would be empty; warn when a labeled fraction cannot be as small as
    asked (a subset holds at least one image per class), and refuse when that makes it all the labels."""
    where = src.input_dir or src.name
    n_train, n_classes = src.counts.get("train", 0), len(src.classes)
    if n_train and src.counts.get("test", 0) == 0:
        raise UserError(f"the test split of {where} would be empty ({n_train} train images in {n_classes} classes: "
                        "a class needs 2 images to give one to test): add images, or give DIR/train/<class>/* "
                        "and DIR/test/<class>/*")
    for key, f in fractions:
        if f >= 1 or not n_train or math.ceil(f * n_train - 1e-9) >= n_classes:
            continue
        smallest = n_classes / n_train
        if n_classes >= n_train:
            raise UserError(f"labeled fraction {key} cannot be smaller than one image per class: {n_classes} "
                            f"classes in {n_train} train images make every subset all the labels; add images "
                            "(several per class) or drop that fraction (--labeled-fractions)")
        print(f"warning: labeled fraction {key} of {n_train} train images is fewer than one image per class "
              f"({n_classes} classes): its subsets hold {n_classes} images ({smallest:.3g} of the labels); "
              f"use fractions of at least {smallest:.3g}, or more images per class", file=sys.stderr)


# ------------------------------------------------------------- the output


def _check_out_dir(out_dir: str | os.PathLike) -> Path:
    """The resolved output dir: every path written is checked to lie inside it (see `_inside`)."""
    text = str(out_dir)
    if "://" in text or text.startswith("pipe:"):
        raise UserError(f"--out must be a local directory, got {text}: write locally, then copy the dir")
    out = Path(text).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is an existing file: choose a directory path")
    return out.resolve()


def _make_out_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --out {out}: {e.strerror or e}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise UserError(f"--out {out} is not writable: choose another directory")


def _inside(out: Path, rel: str) -> Path:
    """The resolved path of `rel` in `out`; refuses anything that would land outside (.., symlinks)."""
    p = (out / rel).resolve()
    if not p.is_relative_to(out):
        raise UserError(f"refusing to write {p}: it is outside the output dir {out} (a symlink?)")
    return p


def _finished(out: Path, source: str) -> dict[str, Any] | None:
    if not (out / MANIFEST).is_file():
        return None
    try:
        m = read_manifest(out)
    except UserError:  # unreadable, incomplete or invalid: a half-written dir, redone
        return None
    if m.get("source") != source:
        raise UserError(f"{out} already holds complete {m.get('source')} shards, not {source}: "
                        "choose another --out or delete that dir")
    counts = ", ".join(f"{s['count']} {name}" for name, s in m["splits"].items() if s["count"])
    print(f"shards already complete in {out} ({counts}); nothing to do (delete the dir to redo)")
    return m


def _remove_temp_files(out: Path) -> None:
    """Our temporary names only (shards being written, the manifest's and subsets' temp files)."""
    for p in [*out.iterdir(), *((out / "subsets").iterdir() if (out / "subsets").is_dir() else [])]:
        if p.name.startswith(".") and p.name.endswith(".tmp") and (_OURS.match(p.name) or "labeled-" in p.name):
            p.unlink(missing_ok=True)


def _space_needed(out: Path, total: int, shard_size: int) -> tuple[float, str]:
    """(bytes the whole dir needs, "about" | "at least"): the finished shards' size per image times every
    image; with none finished, tar's minimum per sample (two members of one header and one data block)."""
    done = [p for p in out.glob("*-??????.tar") if _OURS.match(p.name)]
    if not done:
        return 2048.0 * total, "at least"
    return sum(p.stat().st_size for p in done) / (len(done) * shard_size) * total, "about"


def _clean_half_written(out: Path) -> None:
    """Remove what an interrupted run of ours left: only our own file names, never anything else."""
    ours = [p for p in out.iterdir() if _OURS.match(p.name)]
    subsets = out / "subsets"
    if subsets.is_dir() and not subsets.is_symlink():
        ours += [p for p in subsets.iterdir() if re.match(r"^\.?labeled-.*\.txt(\..*\.tmp)?$", p.name)]
    stale = [p for p in (out / MARKER, out / MANIFEST) if p.is_file() or p.is_symlink()]
    if ours or stale:
        print(f"found a half-written shard dir at {out} (no complete manifest): redoing it", file=sys.stderr)
    for p in ours + stale:
        p.unlink()  # a name in `out` (or its real subsets/): removes a symlink itself, never its target


# -------------------------------------------------------------- planning


def _plan(src: Source, out: Path, shard_size: int, size: int | None) -> Iterator[tuple]:
    """One task per shard: (path, [(key, label, image)], size, upscale, channels, train?)."""
    buffers: dict[str, list] = {}
    shard_index: dict[str, int] = {}

    def task(split: str) -> tuple:
        i = shard_index.get(split, 0)
        shard_index[split] = i + 1
        items, buffers[split] = buffers[split], []
        path = _inside(out, f"{split}-{i:06d}.tar")
        return split, i, str(path), items, size, src.upscale, src.channels

    for split, records in _shuffled_splits(src.splits):
        for item in records:
            buffers.setdefault(split, []).append(item)
            if len(buffers[split]) >= shard_size:
                yield task(split)
        if buffers.get(split):
            yield task(split)


def _shuffled_splits(splits: dict[str, Split]) -> Iterator[tuple[str, Iterator[tuple[str, int, Any]]]]:
    """`(split, (key, label, image) ...)` per split, keys numbered in source order, yielded in a random
    order across classes: sources list images class by class, and a shard of one or two classes gives
    batches of one or two classes (the WebDataset convention is to shuffle before writing). The order is
    seeded by `SHUFFLE_SEED` and the split's name, not `--seed`: the shards are the same for every
    labeled-subset seed. Only a permutation is held; each image is fetched from the source as it is used."""
    for split, s in splits.items():
        rng = np.random.default_rng([SHUFFLE_SEED, *split.encode()])
        yield split, ((f"{split}-{i:08d}", *s[i]) for i in rng.permutation(len(s)))


def _run_tasks(tasks: Iterator[tuple], workers: int, total: int, progress: bool | None) -> list[dict]:
    from tqdm import tqdm

    results = []
    bar = tqdm(total=total, unit="img", desc="sharding", disable=(None if progress is None else not progress))

    def collect(r: dict) -> None:
        # only the train split's keys and labels are needed (labeled subsets): kept as int arrays, ~8 bytes each
        train = r["split"] == "train"
        r["keys"] = np.array([int(k.rsplit("-", 1)[1]) for k in r["keys"]], dtype=np.int64) if train else None
        r["labels"] = np.asarray(r["labels"], dtype=np.int64) if train else None
        results.append(r)
        bar.update(r["count"] + len(r["skipped"]))
        for ref, reason in r["skipped"]:
            print(f"warning: skipped {ref}: {reason}", file=sys.stderr)

    try:
        if workers == 1:
            for t in tasks:
                collect(_write_shard(t))
            return results
        # at most 2 tasks per worker in flight: bounded memory whatever the size of the source
        # the workers ignore Ctrl-C: the parent alone handles it (one line, not a traceback per worker)
        with cf.ProcessPoolExecutor(max_workers=workers, mp_context=_pool_context(),
                                    initializer=_ignore_sigint) as pool:
            pending: set[cf.Future] = set()
            try:
                for t in tasks:
                    pending.add(pool.submit(_write_shard, t))
                    if len(pending) >= 2 * workers:
                        finished, pending = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                        for f in finished:
                            collect(f.result())
                for f in cf.as_completed(pending):
                    collect(f.result())
            except BaseException:  # Ctrl-C or a failed shard: stop the others now instead of finishing them
                _stop_pool(pool, pending)
                raise
        return results
    finally:
        bar.close()


def _ignore_sigint() -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _stop_pool(pool: cf.ProcessPoolExecutor, pending: set[cf.Future]) -> None:
    for f in pending:
        f.cancel()
    for proc in list((getattr(pool, "_processes", None) or {}).values()):
        proc.terminate()  # their temp shards are removed by the caller
    pool.shutdown(wait=False, cancel_futures=True)


def _pool_context() -> multiprocessing.context.BaseContext:
    """fork while this process runs no other threads: workers start at once and, unlike spawn/forkserver,
    never re-import a `__main__` script (which breaks callers without an `if __name__ == "__main__"` guard).
    With threads (Ray, a W&B run) a fork could inherit a held lock, so then forkserver, importing once."""
    # tqdm's monitor only sleeps on an Event: it holds no lock a child could need
    others = [t for t in threading.enumerate() if t is not threading.main_thread() and type(t).__name__ != "TMonitor"]
    if "fork" in multiprocessing.get_all_start_methods() and not others:
        return multiprocessing.get_context("fork")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["shards.writer", "webdataset", "PIL.Image"])
    return ctx


# ----------------------------------------------------------- the workers


class _Refused(Exception):
    """An input image that cannot be used: skipped, warned and counted."""


def _write_shard(task: tuple) -> dict:
    """Encode and write one shard; returns what the manifest needs to know about it."""
    from PIL import ImageFile

    split, index, path, items, size, upscale, channels = task
    # a truncated file must fail to decode here, whatever a library in this process set globally
    truncated_ok, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
    try:
        return _write_items(split, index, path, items, size, upscale, channels)
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = truncated_ok


def _write_items(split: str, index: int, path: str, items: list, size: int | None, upscale: bool,
                 channels: int) -> dict:
    import webdataset as wds

    tmp = Path(path).with_name(f".{Path(path).name}.tmp")
    keys, labels, skipped = [], [], []
    total = np.zeros(channels)
    total_sq = np.zeros(channels)
    pixels = 0
    min_side = None
    tmp.unlink(missing_ok=True)
    writer = None
    try:
        with open(tmp, "xb") as f:  # exclusive create: never follows a symlink planted under this name
            writer = wds.TarWriter(f, mtime=_MTIME)
            for key, label, image in items:
                try:
                    data, ext, arr = _encode(image, size, upscale, channels)
                except _Refused as e:
                    skipped.append((image if isinstance(image, str) else key, str(e)))
                    continue
                writer.write({"__key__": key, ext: data, "cls": str(label)})
                keys.append(key)
                labels.append(label)
                min_side = min(arr.shape[:2]) if min_side is None else min(min_side, *arr.shape[:2])
                if split == "train":  # mean/std are over the train split (in [0, 1] units)
                    x = arr.reshape(-1, channels).astype(np.float64) / 255.0
                    total += x.sum(0)
                    total_sq += (x * x).sum(0)
                    pixels += len(x)
            writer.close()
    except BaseException:  # Ctrl-C, a full disk: no temp file left, and no half-closed tar stream flushed
        _abandon(writer)
        tmp.unlink(missing_ok=True)
        raise
    if keys:
        os.replace(tmp, path)
    else:
        tmp.unlink()
    return {"split": split, "index": index, "path": path if keys else None, "count": len(keys), "keys": keys,
            "labels": labels, "skipped": skipped, "sum": total, "sum_sq": total_sq, "pixels": pixels,
            "min_side": min_side}


def _abandon(writer) -> None:
    """Drop a tar writer whose file is closing under an exception: its stream must not flush into it later
    (tarfile's `__del__` would print "Exception ignored ... write to closed file")."""
    stream = getattr(getattr(writer, "tarstream", None), "fileobj", None)
    if stream is not None and hasattr(stream, "closed"):
        stream.closed = True


def _target_size(w: int, h: int, size: int | None, upscale: bool) -> tuple[int, int] | None:
    """New (w, h) with the shorter side `size`, or None when the image stays as it is."""
    short = min(w, h)
    if size is None or short == size or (short < size and not upscale):
        return None
    scale = size / short
    return max(size, round(w * scale)), max(size, round(h * scale))


def _encode(image: Any, size: int | None, upscale: bool, channels: int) -> tuple[bytes, str, np.ndarray]:
    """-> (encoded bytes, extension, decoded uint8 array H x W [x C]) of the image as stored."""
    from PIL import Image

    if isinstance(image, np.ndarray):
        img = Image.fromarray(np.ascontiguousarray(image))
        fmt, original = "PNG", None
    else:
        try:
            with open(image, "rb") as f:
                original = f.read()
            # decodes everything (a truncated or garbled file fails here, not in training), EXIF-upright,
            # 16-bit scaled to 8: the same decoder as `selfsup predict`
            img, changed = decode_image(original)
        except Exception as e:  # noqa: BLE001 -- PIL raises many types for bad files
            raise _Refused(f"unreadable image ({type(e).__name__}: {e})") from None
        fmt = img.format if img.format in _FOLDER_FORMATS else "PNG"
        if changed:
            original = None  # the file's bytes are not what it shows: re-encoded
    if min(img.size) < MIN_SIDE:
        raise _Refused(f"image of {img.size[0]}x{img.size[1]} px is smaller than {MIN_SIDE} px")
    mode = "L" if channels == 1 else "RGB"
    keep = original is not None and img.mode == mode and fmt == img.format
    if img.mode != mode:
        img = img.convert(mode)
    new = _target_size(*img.size, size, upscale)
    if new is not None:
        keep = False
        resample = Image.Resampling.BILINEAR if min(new) > min(img.size) else Image.Resampling.BICUBIC
        img = img.resize(new, resample)
    arr = np.asarray(img)
    if keep:
        return original, _FOLDER_FORMATS[fmt], arr
    buf = io.BytesIO()
    params = {"quality": 95} if fmt in ("JPEG", "WEBP") else {}
    img.save(buf, format=fmt, **params)
    return buf.getvalue(), _FOLDER_FORMATS[fmt], arr


# ------------------------------------------------------------- manifest


def _assemble(src: Source, out: Path, results: list[dict], size: int | None, fractions: list[tuple[str, float]],
              seed: int, shard_size: int, test_fraction: float) -> dict[str, Any]:
    results.sort(key=lambda r: (r["split"], r["index"]))
    splits: dict[str, dict[str, Any]] = {}
    for name in ("train", "test", "unlabeled"):
        rs = [r for r in results if r["split"] == name and r["count"]]
        splits[name] = {"count": sum(r["count"] for r in rs),
                        "shards": [Path(r["path"]).name for r in rs],
                        "shard_counts": [r["count"] for r in rs]}
    skipped = [s for r in results for s in r["skipped"]]
    if splits["train"]["count"] == 0:
        raise UserError(f"no readable train images in {src.input_dir or src.name} ({len(skipped)} skipped): "
                        "check the input files")
    train = [r for r in results if r["split"] == "train"]
    pixels = sum(r["pixels"] for r in train)
    mean = sum(r["sum"] for r in train) / pixels
    var = np.maximum(sum(r["sum_sq"] for r in train) / pixels - mean**2, 0.0)
    index = np.concatenate([r["keys"] for r in train])
    order = np.argsort(index)
    keys, labels = _TrainKeys(index[order]), np.concatenate([r["labels"] for r in train])[order]

    subsets = {}
    if fractions:
        _inside(out, "subsets").mkdir(exist_ok=True)
    for key, frac in fractions:
        chosen = draw_labeled_subset(keys, labels, frac, seed)
        rel = f"subsets/labeled-{key}-seed{seed}.txt"
        atomic_write_text(_inside(out, rel), "".join(k + "\n" for k in chosen))
        subsets[key] = {"fraction": frac, "count": len(chosen), "seed": seed, "keys": rel}

    return {
        "version": 1,
        "complete": True,
        "source": src.name,
        "input": src.input_dir,
        "classes": src.classes,
        # the smallest shorter side actually stored: `size`, unless smaller images were kept as they are
        "image_size": int(min(r["min_side"] for r in results if r["min_side"] is not None)),
        "channels": src.channels,
        "mean": [round(float(v), 6) for v in mean],
        "std": [round(float(v), 6) for v in np.sqrt(var)],
        "seed": seed,
        "shard_size": shard_size,
        "test_fraction": test_fraction if src.name == "folder" else None,
        "splits": splits,
        "labeled_subsets": subsets,
        "skipped": len(skipped),
        "skipped_files": [f"{ref}: {reason}" for ref, reason in skipped[:MAX_SKIPPED_LISTED]],
    }


class _TrainKeys(Sequence[str]):
    """The train keys `train-00000042` of sorted indices, made one at a time (not 60+ bytes each held)."""

    def __init__(self, index: np.ndarray) -> None:
        self.index = index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return f"train-{int(self.index[i]):08d}"
