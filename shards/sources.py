"""Image sources for `selfsup shard`: one reader per format, each yielding `(split, label, image)`.

`image` is either a uint8 numpy array (H x W x 3, or H x W for grayscale) for sources that arrive as arrays
(digits, CIFAR, STL-10), or the absolute path of an encoded file (folders), which the shard workers decode,
so that a large folder is read in parallel. `label` is the class index, or -1 for unlabeled images.
Readers yield the splits in order (train, test, unlabeled) so the writer can cut shards as it goes.
"""

from __future__ import annotations

import os
import pickle
import sys
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runtime.errors import UserError

SOURCES = ("digits", "cifar10", "cifar100", "stl10", "folder", "photos", "photos-val")
PHOTO_SOURCES = ("photos", "photos-val")  # made from package wheels (shards/photos.py)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
# The split of sources that have no test set is fixed, independent of `--seed`, so every labeled-subset
# seed is scored on the same test images.
SPLIT_SEED = 0

class PathList(Sequence[str]):
    """File paths in one growing bytes buffer plus an offsets array: ~the path's length + 8 bytes each, where a
    list of `Path`s costs ~450 (a folder of a million images: ~70 MB against ~450 MB)."""

    def __init__(self) -> None:
        self._blob = bytearray()
        self._ends = array("q")

    def append(self, path: str) -> None:
        self._blob += os.fsencode(path)
        self._ends.append(len(self._blob))

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = range(len(self))[i]  # negative indices, IndexError
        start = self._ends[i - 1] if i else 0
        return os.fsdecode(bytes(self._blob[start:self._ends[i]]))


@dataclass
class Split:
    """One split of a source: `labels[i]` and `images[i]` (an array row, or a path) for i in source order."""

    labels: np.ndarray
    images: Sequence[Any]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[int, Any]:
        return int(self.labels[i]), self.images[i]


@dataclass
class Source:
    name: str
    classes: list[str]
    channels: int  # 1 (grayscale) or 3
    splits: dict[str, Split]  # train, test and, when there is one, unlabeled (labels -1)
    default_image_size: int | None = None  # None: keep the size as given
    upscale: bool = False  # only digits may be enlarged (8 px -> 16 px)
    input_dir: str | None = None

    @property
    def counts(self) -> dict[str, int]:
        """Images per split, before decoding."""
        return {name: len(s) for name, s in self.splits.items()}


def open_source(name: str, input_dir: str | os.PathLike | None, test_fraction: float = 0.2,
                photos_unlabeled: int | None = None) -> Source:
    """The reader for `name`; every problem with the input is a one-line `UserError`. `photos_unlabeled`:
    unlabeled crops per class of `photos` / `photos-val` (None: the benchmark's 60)."""
    if name not in SOURCES:
        raise UserError(f"unknown source {name!r}: choose one of {', '.join(SOURCES)}")
    if name == "digits":
        return digits_source()
    if name in PHOTO_SOURCES:
        from shards.photos import photos_source

        return photos_source(validation=name == "photos-val", unlabeled=photos_unlabeled)
    if input_dir is None:
        raise UserError(f"source {name} needs --input DIR (the directory holding the raw {name} files)")
    root = Path(input_dir).expanduser()
    if not root.exists():
        raise UserError(f"input dir not found: {root}: pass the directory holding the {name} files with --input")
    if not root.is_dir():
        raise UserError(f"--input must be a directory, got the file {root}")
    root = root.resolve()
    if name in ("cifar10", "cifar100"):
        return cifar_source(root, name)
    if name == "stl10":
        return stl10_source(root)
    return folder_source(root, test_fraction)


# ------------------------------------------------------------------ decoding


HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 16-bit greyscale (PNG), as PIL opens it


def decode_image(data: bytes | str | os.PathLike):
    """-> (PIL image, fully decoded, as it is meant to be seen; changed): the one decoder of image files, used
    by `selfsup shard` and `selfsup predict` alike.

    EXIF orientation is applied (a portrait photo stays upright), and 16-bit greyscale is scaled to 8 bits
    (65535 -> 255; PIL's own conversion clips everything above 255 to white). `changed` says the pixels
    differ from the file's plain decode, so its bytes cannot be stored as they are. Raises what PIL raises
    (including `Image.DecompressionBombError` for a header claiming too many pixels).
    """
    import io

    from PIL import Image, ImageOps

    img = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
    img.load()  # decodes everything: a truncated or garbled file fails here, not later
    fmt = img.format
    changed = False
    if img.mode in HIGH_DEPTH_MODES:
        arr = np.asarray(img).astype(np.float64)
        img = Image.fromarray(np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8), mode="L")
        changed = True
    orientation = img.getexif().get(0x0112, 1)  # EXIF Orientation
    if orientation not in (None, 1):
        img = ImageOps.exif_transpose(img)
        changed = True
    img.format = fmt
    return img, changed


# ------------------------------------------------------------------ digits


def digits_source() -> Source:
    """scikit-learn's 8x8 digits (values 0..16), class-stratified 80/20 split: 1437 train, 360 test."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    labels = d.target.astype(np.int64)
    idx_train, idx_test = train_test_split(
        np.arange(len(labels)), test_size=0.2, stratify=labels, random_state=SPLIT_SEED
    )

    splits = {split: Split(labels[np.sort(idx)], images[np.sort(idx)])
              for split, idx in (("train", idx_train), ("test", idx_test))}
    return Source("digits", [str(c) for c in range(10)], 1, splits, default_image_size=16, upscale=True)


# ------------------------------------------------------------------- CIFAR

_CIFAR = {
    # name: (subdir of the official tarball, train files, test files, meta file, label key, names key)
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                "batches.meta", "labels", "label_names"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "meta", "fine_labels", "fine_label_names"),
}


class _ArrayUnpickler(pickle.Unpickler):
    """CIFAR batches are pickles; allow only what they hold (dicts, lists, numpy arrays), never code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _load_batch(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            # latin1: the official files were pickled by Python 2; numpy needs the raw bytes kept
            raw = _ArrayUnpickler(f, encoding="latin1").load()
    except Exception as e:  # noqa: BLE001 -- any failure means "not a CIFAR batch"
        raise UserError(f"{path} is not a readable CIFAR batch file ({type(e).__name__}: {e})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path} is not a CIFAR batch file (expected a pickled dict)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}


def cifar_source(root: Path, name: str) -> Source:
    subdir, train_files, test_files, meta_file, label_key, names_key = _CIFAR[name]
    if (root / subdir).is_dir():  # the extracted official tarball
        root = root / subdir
    missing = [f for f in train_files + test_files if not (root / f).is_file()]
    if missing:
        raise UserError(f"no {name} batch files in {root} (missing {', '.join(missing)}): pass the directory "
                        f"of the extracted python version ({subdir}) with --input")
    batches = {split: [_load_batch(root / f) for f in files]
               for split, files in (("train", train_files), ("test", test_files))}
    n_classes = 10 if name == "cifar10" else 100
    classes = [str(c) for c in range(n_classes)]
    if (root / meta_file).is_file():
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in _load_batch(root / meta_file)[names_key]]
        if len(names) == n_classes:
            classes = names
    arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split, items in batches.items():
        data, labels = [], []
        for b in items:
            x = np.asarray(b.get("data"))
            y = np.asarray(b.get(label_key), dtype=np.int64)
            if x.ndim != 2 or x.shape[1] != 3072 or len(y) != len(x):
                raise UserError(f"{name} batch in {root} has data of shape {x.shape} and {len(y)} labels; "
                                "expected N x 3072 uint8 and N labels")
            data.append(x.astype(np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.append(y)
        arrays[split] = (np.concatenate(data), np.concatenate(labels))
        bad = arrays[split][1][(arrays[split][1] < 0) | (arrays[split][1] >= n_classes)]
        if len(bad):
            raise UserError(f"{name} {split} labels must be in 0..{n_classes - 1}, found {int(bad[0])} in {root}")

    splits = {split: Split(arrays[split][1], arrays[split][0]) for split in ("train", "test")}
    return Source(name, classes, 3, splits, input_dir=str(root))


# ------------------------------------------------------------------ STL-10

_STL_PIXELS = 3 * 96 * 96


def _stl_images(path: Path) -> np.ndarray:
    size = path.stat().st_size
    if size == 0 or size % _STL_PIXELS:
        raise UserError(f"{path} has {size} bytes, not a multiple of 96*96*3: not an STL-10 image file")
    # memmap: unlabeled_X.bin is 2.7 GB; images are copied out one shard at a time.
    x = np.memmap(path, dtype=np.uint8, mode="r").reshape(-1, 3, 96, 96)
    return x.transpose(0, 3, 2, 1)  # stored column-major: (N, C, W, H) -> (N, H, W, C)


def stl10_source(root: Path) -> Source:
    if (root / "stl10_binary").is_dir():  # the extracted official tarball
        root = root / "stl10_binary"
    needed = ["train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin"]
    missing = [f for f in needed if not (root / f).is_file()]
    if missing:
        raise UserError(f"no STL-10 binaries in {root} (missing {', '.join(missing)}): pass the extracted "
                        "stl10_binary directory with --input")
    arrays = {}
    for split in ("train", "test"):
        x = _stl_images(root / f"{split}_X.bin")
        y = np.fromfile(root / f"{split}_y.bin", dtype=np.uint8).astype(np.int64) - 1  # 1..10 -> 0..9
        if len(y) != len(x):
            raise UserError(f"STL-10 {split}: {len(x)} images but {len(y)} labels in {root}")
        if len(y) and (y.min() < 0 or y.max() > 9):
            raise UserError(f"STL-10 {split} labels must be 1..10 in {root}, found {int(y.min()) + 1}..{int(y.max()) + 1}")
        arrays[split] = (x, y)
    unlabeled = _stl_images(root / "unlabeled_X.bin") if (root / "unlabeled_X.bin").is_file() else None
    classes = [str(c) for c in range(10)]
    names_file = root / "class_names.txt"
    if names_file.is_file():
        names = [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
        if len(names) == 10:
            classes = names

    splits = {split: Split(arrays[split][1], arrays[split][0]) for split in ("train", "test")}
    if unlabeled is not None:
        splits["unlabeled"] = Split(np.full(len(unlabeled), -1, dtype=np.int64), unlabeled)
    return Source("stl10", classes, 3, splits, input_dir=str(root))


# ------------------------------------------------------------------ folder


def iter_image_files(d: str | os.PathLike) -> Iterator[str]:
    """Image files under d at any depth, hidden files and other extensions ignored, in a fixed order: each
    folder's files sorted by name, then its subfolders, sorted, in turn; yielded as they are found."""
    for dirpath, dirnames, filenames in os.walk(d, followlinks=False):
        dirnames[:] = sorted(n for n in dirnames if not n.startswith("."))
        for f in sorted(filenames):
            if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS):
                yield os.path.join(dirpath, f)


def _image_files(d: Path) -> PathList:
    """`iter_image_files(d)`, held compactly."""
    out = PathList()
    for f in iter_image_files(d):
        out.append(f)
    return out


def _labeled_split(parts: Iterator[tuple[int, Sequence[str]]]) -> Split:
    """One Split of (label, files) parts, in order."""
    labels, files = array("i"), PathList()
    for label, part in parts:
        for f in part:
            labels.append(label)
            files.append(f)
    return Split(np.frombuffer(labels, dtype=np.int32) if labels else np.zeros(0, np.int32), files)


def _class_dirs(d: Path, exclude: tuple[str, ...] = (), root: Path | None = None) -> list[Path]:
    dirs = sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name not in exclude)
    return [p for p in dirs if not _loops_back(p, root or d)]


def _loops_back(p: Path, root: Path) -> bool:
    """A symlinked folder that resolves inside the input folder `root` or to one of its ancestors
    (`DIR/loop -> DIR`) would show images again under another label: not followed, and warned. Links to
    folders elsewhere are followed."""
    if not p.is_symlink():
        return False
    target, here = p.resolve(), root.resolve()
    if not (target.is_relative_to(here) or here.is_relative_to(target)):
        return False
    print(f"warning: not following {p} -> {target} as a class: it links back into the input folder",
          file=sys.stderr, flush=True)
    return True


def _split_off_test(by_class: list[PathList], test_fraction: float) -> dict[str, Split]:
    """Per class, a fixed-seed `test_fraction` to test (at least one each side once a class has two)."""
    rng = np.random.default_rng(SPLIT_SEED)
    is_test = []
    for files in by_class:
        order = rng.permutation(len(files))
        n_test = 0 if len(files) < 2 else min(len(files) - 1, max(1, round(len(files) * test_fraction)))
        mask = np.zeros(len(files), dtype=bool)
        mask[order[:n_test]] = True
        is_test.append(mask)

    def part(test: bool) -> Iterator[tuple[int, list[str]]]:
        for label, (files, mask) in enumerate(zip(by_class, is_test)):
            yield label, [files[i] for i in np.flatnonzero(mask == test)]  # one class's paths at a time

    return {"train": _labeled_split(part(False)), "test": _labeled_split(part(True))}


def folder_source(root: Path, test_fraction: float = 0.2) -> Source:
    """`DIR/<class>/*` (test split drawn per class) or `DIR/train/<class>/*` + `DIR/test/<class>/*`,
    plus `DIR/unlabeled/**` at any depth. Classes are the folder names, sorted (torchvision's order)."""
    split_layout = (root / "train").is_dir()
    class_dirs = _class_dirs(root / "train", root=root) if split_layout else _class_dirs(root, ("unlabeled",))
    classes = [p.name for p in class_dirs]
    by_class = [_image_files(d) for d in class_dirs]
    if split_layout and (root / "test").is_dir():
        test_dirs = _class_dirs(root / "test", root=root)
        for cdir in test_dirs:
            if cdir.name not in classes:
                raise UserError(f"test class {cdir.name!r} in {root / 'test'} has no train folder in "
                                f"{root / 'train'}: add it there or remove it")
        labeled = {"train": _labeled_split(enumerate(by_class)),
                   "test": _labeled_split((classes.index(c.name), _image_files(c)) for c in test_dirs)}
    else:  # no test folder: hold out test_fraction of each class
        labeled = _split_off_test(by_class, test_fraction)
    unlabeled = _image_files(root / "unlabeled") if (root / "unlabeled").is_dir() else PathList()
    if not len(labeled["train"]):
        found = "only unlabeled images" if unlabeled else "no images"
        raise UserError(f"{found} ({', '.join(IMAGE_EXTENSIONS)}) in {root}: expected labeled images in "
                        "DIR/<class>/*.jpg, or DIR/train/<class>/* and DIR/test/<class>/*")

    splits = {**labeled, "unlabeled": Split(np.full(len(unlabeled), -1, dtype=np.int32), unlabeled)}
    return Source("folder", classes, 3, splits, input_dir=str(root))
