"""Thumbnail sheets a person looks at instead of reading keys: a grid of images (the images chosen for
labeling) and a grid of image pairs (near duplicates, suspected label errors next to a neighbour), each
cell with a short caption under it. PIL only: small, fast, no figure machinery."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

CELL = 64  # thumbnail side in pixels: small images are upscaled (nearest) so a digit is visible
CAPTION = 12  # pixels of caption text under each thumbnail
PAD = 4


def to_pil(image: np.ndarray | object, cell: int = CELL) -> Image.Image:
    """A uint8 [C, H, W] (or torch) image as an RGB thumbnail of side `cell` (nearest-neighbour upscale)."""
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] in (1, 3):
        arr = arr.transpose(1, 2, 0)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    im = Image.fromarray(arr.astype(np.uint8)).convert("RGB")
    scale = cell / max(im.size)
    return im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.NEAREST)


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def sheet(cells: Sequence[Sequence[tuple[object, str]]], title: str, path: str | Path, cell: int = CELL,
          group: int = 0) -> Path:
    """Write a PNG of rows of (image, caption) cells under a title line; returns the path.

    Rows may have different lengths; the sheet is as wide as the longest row. `group` > 0 leaves a wider gap
    after every `group` cells (pairs side by side read as pairs)."""
    font = _font()
    cols = max((len(r) for r in cells), default=1)
    gap = 4 * PAD if group else 0

    def x_of(j: int) -> int:
        return PAD + j * (cell + PAD) + (gap * (j // group) if group else 0)

    w = x_of(cols)
    h_row = cell + CAPTION + PAD
    title_h = 16
    h = title_h + PAD + max(1, len(cells)) * h_row
    canvas = Image.new("RGB", (max(w, 8 * len(title) // 2 + 2 * PAD), h), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((PAD, 2), title, fill="black", font=font)
    for i, row in enumerate(cells):
        y = title_h + PAD + i * h_row
        for j, (image, caption) in enumerate(row):
            x = x_of(j)
            canvas.paste(to_pil(image, cell), (x, y))
            draw.text((x, y + cell + 1), caption[: max(4, cell // 6)], fill="black", font=font)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    canvas.save(tmp, format="PNG")
    tmp.replace(out)
    return out


def grid(images: Sequence[object], captions: Sequence[str], title: str, path: str | Path, cols: int = 16,
         cell: int = CELL) -> Path:
    """`images` in rows of `cols`, each with its caption."""
    items = list(zip(images, captions))
    rows = [items[i:i + cols] for i in range(0, len(items), cols)]
    return sheet(rows, title, path, cell)


def pairs(items: Sequence[tuple[tuple[object, str], tuple[object, str]]], title: str, path: str | Path,
          per_row: int = 4, cell: int = CELL) -> Path:
    """Image pairs ((image, caption), (image, caption)), `per_row` pairs to a row, a gap between pairs."""
    flat = [[c for pair in items[i:i + per_row] for c in pair] for i in range(0, len(items), per_row)]
    return sheet(flat, title, path, cell, group=2)
