"""`embedding.png`: what the encoder learned, as a picture. The encoder's features of a bounded seeded sample of
the test split, projected to 2-D by PCA (deterministic, no fitting to tune), one colour per class."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from finetune.data import encode_keys, sample_of

MAX_POINTS = 2000  # the sample of the test split drawn (seeded), so the picture costs the same on any dataset
FILE = "embedding.png"


def pca_2d(features: np.ndarray) -> np.ndarray:
    """The first two principal components of `features` [n, d] (centred; signs fixed: largest |loading| > 0)."""
    x = np.asarray(features, dtype=np.float64)
    x = x - x.mean(0, keepdims=True)
    if x.shape[0] < 2:
        return np.zeros((x.shape[0], 2))
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    comps = vt[:2]
    if comps.shape[0] < 2:
        comps = np.vstack([comps, np.zeros_like(comps[:1])])
    signs = np.sign(comps[np.arange(2), np.abs(comps).argmax(1)])
    return x @ (comps * np.where(signs == 0, 1, signs)[:, None]).T


def write_embedding(backbone: torch.nn.Module, shards: str, test_keys: list[str], classes: list[str],
                    image_size: int, mean, std, seed: int, path: str | Path) -> dict[str, Any]:
    """Encode a seeded sample (at most MAX_POINTS) of the test split, project it, save the scatter at `path`.
    Returns {"path", "points", "pixels" (the image as uint8 HxWx3, for W&B)}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sample_of(test_keys, MAX_POINTS, seed)
    feats, labels, _ = encode_keys(backbone, shards, "test", keys, image_size, mean, std)
    xy = pca_2d(feats.numpy())
    y = labels.numpy().astype(int)
    fig, ax = plt.subplots(figsize=(6.4, 5.2), dpi=120)
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20" if len(classes) <= 20 else "nipy_spectral")
    for c in range(len(classes)):
        m = y == c
        if m.any():
            ax.scatter(xy[m, 0], xy[m, 1], s=6, alpha=0.7, color=cmap(c / max(1, len(classes) - 1))
                       if len(classes) > 20 else cmap(c), label=classes[c] if len(classes) <= 20 else None)
    if len(classes) <= 20:
        ax.legend(fontsize=7, markerscale=2, loc="best", ncol=2)
    ax.set_title(f"encoder features of {len(y)} test images (PCA)")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    fig.tight_layout()
    out = Path(path)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, format="png")
    fig.canvas.draw()
    pixels = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    tmp.replace(out)
    return {"path": out, "points": int(len(y)), "pixels": pixels}
