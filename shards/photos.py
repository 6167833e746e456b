"""The `photos` source: a 10-class benchmark of real photographs that ship inside package wheels, so it needs
no download (`selfsup shard photos --out DIR`).

The photographs (scikit-image's are deliberately not used: they are kept for an independent check):

| class | package | image |
|---|---|---|
| china, flower | scikit-learn | `sklearn.datasets.load_sample_images()` (640x427 colour) |
| hopper_top, hopper_bottom | matplotlib | `get_sample_data('grace_hopper.jpg')` (512x600 colour): upper and lower half |
| aero, camera, ascent | PyWavelets | `pywt.data.aero()`, `camera()`, `ascent()` (512x512 grey, as RGB) |
| store_left, store_right | mahotas | `demos/data/DepartmentStore.jpg` (1024x768 colour): left and right half |
| luispedro | mahotas | `demos/data/luispedro.jpg` (300x377 colour) |

Each class's area is cut into a grid of cells of about `CELL` px; a seeded quarter of the cells (at least one)
is the test area, the rest the train area. Crops are squares of a random side between `MIN_SIDE` px and the
cell's shorter side, at random positions wholly inside one cell, resized to `CROP` px: test crops come from
the test cells only and train and unlabeled crops from the train cells only, so no test crop shares a pixel
with any image the encoder or a classifier trains on (otherwise the test would measure memorisation).
`COUNTS` crops per class and split, all from one fixed seed: the same bytes on every machine. More unlabeled
crops (`selfsup shard photos --photos-unlabeled N`, N per class) come from a second fixed generator after them, so
the train, test and first 60 unlabeled crops stay the same bytes.

`selfsup shard photos-val` is the benchmark's validation variant, for choosing settings without the test split:
the test cells are left out entirely, a seeded quarter of each class's train cells (at least one) becomes the
"test" area, and train and unlabeled crops come from the remaining train cells. Like the real test, its "test"
crops share no pixel with anything trained on, so it measures the same thing: how a classifier carries over to
parts of a photograph it never saw (a random fifth of the train crops would not; they overlap their neighbours).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from runtime.errors import UserError

CROP = 64  # px of every stored crop (`--image-size` / data.image_size resizes on write)
CELL = 128  # target cell side: cells are this size or a little larger
MIN_SIDE = 64  # smallest crop side in source pixels
TEST_SHARE = 0.25  # share of each class's cells that is test area
COUNTS = {"train": 100, "test": 40, "unlabeled": 60}  # crops per class and split
SEED = 0
CLASSES = ("china", "flower", "hopper_top", "hopper_bottom", "aero", "camera", "ascent", "store_left",
           "store_right", "luispedro")


def _rgb(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    return np.ascontiguousarray(a[:, :, :3].astype(np.uint8))


def _read(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return _rgb(np.asarray(im.convert("RGB")))


def photographs() -> dict[str, np.ndarray]:
    """class -> H x W x 3 uint8 array, read from the installed packages (a one-line error if one is missing)."""
    try:
        import mahotas
        import matplotlib.cbook as cbook
        import pywt.data
        from sklearn.datasets import load_sample_images
    except ImportError as e:
        raise UserError(f"the photos source needs the package {e.name} (pip install scikit-learn matplotlib "
                        "PyWavelets mahotas)") from None
    sk = dict(zip(("china", "flower"), load_sample_images().images))
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        from PIL import Image

        hopper = _rgb(np.asarray(Image.open(f).convert("RGB")))
    demos = Path(mahotas.__file__).parent / "demos" / "data"
    store = _read(demos / "DepartmentStore.jpg")
    h, w = hopper.shape[0] // 2, store.shape[1] // 2
    return {
        "china": _rgb(sk["china"]), "flower": _rgb(sk["flower"]),
        "hopper_top": hopper[:h], "hopper_bottom": hopper[h:],
        "aero": _rgb(pywt.data.aero()), "camera": _rgb(pywt.data.camera()), "ascent": _rgb(pywt.data.ascent()),
        "store_left": store[:, :w], "store_right": store[:, w:],
        "luispedro": _read(demos / "luispedro.jpg"),
    }


def cells(shape: tuple[int, ...], rng: np.random.Generator) -> dict[str, list[tuple[int, int, int, int]]]:
    """{"train": [...], "test": [...]} cells (y0, y1, x0, x1) of an image of `shape`: a grid of about CELL px,
    a seeded TEST_SHARE of them (at least one) test."""
    h, w = shape[:2]
    ny, nx = max(2, h // CELL), max(2, w // CELL)
    ys, xs = np.linspace(0, h, ny + 1).astype(int), np.linspace(0, w, nx + 1).astype(int)
    grid = [(ys[i], ys[i + 1], xs[j], xs[j + 1]) for i in range(ny) for j in range(nx)]
    order = rng.permutation(len(grid))
    n_test = max(1, round(len(grid) * TEST_SHARE))
    return {"test": [grid[i] for i in sorted(order[:n_test])], "train": [grid[i] for i in sorted(order[n_test:])]}


def crop_boxes(area: list[tuple[int, int, int, int]], n: int, rng: np.random.Generator) -> list[tuple[int, int, int]]:
    """n random squares (y, x, side), each wholly inside one cell of `area`, of a side from MIN_SIDE to the
    cell's shorter side."""
    out = []
    for _ in range(n):
        y0, y1, x0, x1 = area[rng.integers(len(area))]
        side = int(rng.integers(MIN_SIDE, min(y1 - y0, x1 - x0) + 1))
        out.append((int(rng.integers(y0, y1 - side + 1)), int(rng.integers(x0, x1 - side + 1)), side))
    return out


def crops(image: np.ndarray, boxes: list[tuple[int, int, int]]) -> np.ndarray:
    """The `boxes` of `image`, each resized to CROP x CROP."""
    from PIL import Image

    out = np.empty((len(boxes), CROP, CROP, 3), dtype=np.uint8)
    for k, (y, x, side) in enumerate(boxes):
        patch = Image.fromarray(image[y:y + side, x:x + side])
        out[k] = np.asarray(patch.resize((CROP, CROP), Image.Resampling.BICUBIC, reducing_gap=2.0))
    return out


def layout(photos: dict[str, np.ndarray], validation: bool = False,
           unlabeled: int = COUNTS["unlabeled"]) -> dict[str, dict[str, list]]:
    """class -> {"cells": {"train", "test"}, "boxes": {split: [(y, x, side), ...]}}: where every crop comes
    from, all drawn from one generator seeded with SEED (the same on every machine). `validation`: the
    `photos-val` layout, whose "test" cells are a seeded share of the real train cells (`validation_cells`).
    `unlabeled` crops per class: past COUNTS' they are drawn from the train cells by a second generator."""
    rng = np.random.default_rng(SEED)
    out = {}
    for name in CLASSES:
        area = cells(photos[name].shape, rng)
        out[name] = {"cells": area, "boxes": {split: crop_boxes(area["test" if split == "test" else "train"], n, rng)
                                              for split, n in COUNTS.items()}}
    if validation:
        rng = np.random.default_rng(SEED + 1)
        for name in CLASSES:
            area = validation_cells(out[name]["cells"]["train"], rng)
            out[name] = {"cells": area, "boxes": {
                split: crop_boxes(area["test" if split == "test" else "train"], n, rng) for split, n in COUNTS.items()}}
    extra = unlabeled - COUNTS["unlabeled"]
    if extra > 0:
        rng = np.random.default_rng(SEED + 2)
        for name in CLASSES:
            out[name]["boxes"]["unlabeled"] += crop_boxes(out[name]["cells"]["train"], extra, rng)
    return out


def validation_cells(train: list[tuple[int, int, int, int]], rng: np.random.Generator) -> dict[str, list]:
    """{"train": [...], "test": [...]}: a seeded TEST_SHARE of the `train` cells (at least one, and at least one
    left to train on) as the validation variant's test area."""
    if len(train) < 2:
        raise ValueError("a class needs two train cells or more for the validation layout")
    order = rng.permutation(len(train))
    n_val = min(len(train) - 1, max(1, round(len(train) * TEST_SHARE)))
    return {"test": [train[i] for i in sorted(order[:n_val])], "train": [train[i] for i in sorted(order[n_val:])]}


def photos_source(validation: bool = False, unlabeled: int | None = None):
    """The Source: train / test / unlabeled crops, each split listed class by class (the writer shuffles).
    `validation`: the `photos-val` variant (module docstring); `unlabeled`: crops per class (default 60)."""
    from shards.sources import Source, Split

    unlabeled = COUNTS["unlabeled"] if unlabeled is None else unlabeled
    if unlabeled < COUNTS["unlabeled"]:
        raise UserError(f"--photos-unlabeled must be at least {COUNTS['unlabeled']} (the benchmark's own unlabeled "
                        f"crops per class), got {unlabeled}")
    photos = photographs()
    where = layout(photos, validation, unlabeled)
    images: dict[str, list[np.ndarray]] = {s: [] for s in COUNTS}
    labels: dict[str, list[np.ndarray]] = {s: [] for s in COUNTS}
    for label, name in enumerate(CLASSES):
        for split in COUNTS:
            boxes = where[name]["boxes"][split]
            images[split].append(crops(photos[name], boxes))
            labels[split].append(np.full(len(boxes), label if split != "unlabeled" else -1, dtype=np.int64))
    splits = {s: Split(np.concatenate(labels[s]), np.concatenate(images[s])) for s in COUNTS}
    return Source("photos-val" if validation else "photos", list(CLASSES), 3, splits, default_image_size=CROP)
