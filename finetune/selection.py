"""Which images to label: a budget of train images chosen from the encoder's features, never from labels.

A real user with an unlabeled pile cannot draw today's class-balanced subsets (that draw reads the labels),
so the honest baseline is `random` (uniform over the train split). The others are from the low-budget active
learning literature:
- `typiclust` (Hacohen, Dekel & Weinshall, "Active Learning on a Budget", ICML 2022): k-means of the
  L2-normalised features into min(budget, 500) clusters (KMeans up to 50 clusters, MiniBatchKMeans above, as
  the authors' code does), clusters of at most 5 points dropped as outliers (unless that leaves none), then
  clusters visited largest first, cyclically when the budget exceeds them, taking in each the not yet chosen
  point of highest typicality = 1 / (mean Euclidean distance to its min(20, size // 2) nearest neighbours in
  the cluster + 1e-5).
- `kcenter` (k-center greedy, the coreset of Sener & Savarese 2018): from a seeded first point, repeatedly the
  point farthest (cosine distance) from everything chosen so far.

Only features are held (the split streamed through the encoder, labels dropped as they come: nothing here
can read them), in key order, so the choice depends on the images and the seed alone; a test relabels the
train shards and gets the same keys. `selfsup select` writes `subsets/selected-<N>-<strategy>.txt` (one train
key per line, the manifest's subset format), a JSON record and a contact sheet PNG; `selfsup finetune` with
`finetune.selection` trains every method on such subsets too (`subsets/selected-<N>-<strategy>-seed<S>.txt`).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from runtime.config import SELECTION_STRATEGIES
from runtime.errors import UserError

BALANCED = "balanced"  # today's class-balanced subsets (they read labels): report rows without a strategy
MAX_CLUSTERS = 500  # TypiClust's cap on k-means clusters (the authors' MAX_NUM_CLUSTERS)
MIN_CLUSTER_SIZE = 5  # clusters of at most this many points are outliers (the authors' MIN_CLUSTER_SIZE)
TYPICALITY_K = 20  # neighbours of the typicality score (the authors' K_NN)
KMEANS_MINIBATCH_ABOVE = 50  # above this many clusters MiniBatchKMeans, as the authors' code
SHEET_MAX = 256  # images drawn on a contact sheet at most
SIM_CELLS = 1 << 24  # entries of one block of a distance matrix (64 MiB of float32): memory flat in N


def subset_name(budget: int, strategy: str, seed: int | None = None) -> str:
    """`selected-<N>-<strategy>.txt`, or with `-seed<S>` for fine-tuning's per-seed subsets."""
    return f"selected-{budget}-{strategy}" + ("" if seed is None else f"-seed{seed}") + ".txt"


# ------------------------------------------------------------------ features (labels dropped as they stream)


def split_features(backbone: torch.nn.Module, cfg: Any, split: str, image_size: int, mean, std, on_cluster: bool,
                   keys: Sequence[str] | None = None, mirror: bool = False,
                   ) -> tuple[np.ndarray, list[str], dict[str, Any]]:
    """L2-normalised float32 features [N, D] of the split (or its `keys`) and their keys, sorted by key, and
    where and in which formats they were encoded (`encode_split`'s `formats`).

    Encoded by `finetune.encode.encode_split` where fine-tuning's trained methods run (`on_cluster`: Ray tasks
    on `cfg.trainer`'s resources, else this process) and in its formats; only features are kept, the labels the
    reader yields are dropped unread. With `mirror`, each feature is the mean of the image's and its left-right
    mirror's (a mirrored copy then has the same features: what duplicate search wants)."""
    from finetune.encode import encode_split

    f, _unread, names, formats = encode_split(backbone, cfg, split, keys, image_size, mean, std, on_cluster,
                                              mirror=mirror)
    if not names:
        raise UserError(f"no readable images in the {split} split of {cfg.data.shards}: re-run `selfsup shard`")
    f = f.div_(f.norm(dim=1, keepdim=True).clamp_min(1e-12)).numpy()  # in place: N x D floats held twice, not thrice
    order = np.argsort(np.asarray(names))
    return np.ascontiguousarray(f[order], dtype=np.float32), [names[i] for i in order], formats


# ------------------------------------------------------------------ the strategies


def choose(features: np.ndarray, budget: int, strategy: str, seed: int) -> np.ndarray:
    """Row indices of `budget` chosen rows of L2-normalised `features` (sorted)."""
    n = features.shape[0]
    if strategy not in SELECTION_STRATEGIES:
        raise UserError(f"unknown selection strategy {strategy!r} (valid: {', '.join(SELECTION_STRATEGIES)})")
    if not 0 < budget <= n:
        raise UserError(f"budget {budget} must be between 1 and the train split's {n} images")
    if strategy == "random":
        idx = np.random.default_rng(seed).choice(n, size=budget, replace=False)
    elif strategy == "typiclust":
        idx = typiclust(features, budget, seed)
    else:
        idx = kcenter_greedy(features, budget, seed)
    return np.sort(np.asarray(idx, dtype=np.int64))


def kmeans_labels(features: np.ndarray, clusters: int, seed: int) -> np.ndarray:
    """Cluster ids: KMeans for few clusters, MiniBatchKMeans for many (the TypiClust authors' split)."""
    import os
    import warnings

    from sklearn.cluster import KMeans, MiniBatchKMeans
    from threadpoolctl import threadpool_limits

    # half the cores (as fine-tuning's local runs): OpenMP threads spinning on a busy machine cost 10-50x here
    with warnings.catch_warnings(), threadpool_limits(max(1, (os.cpu_count() or 2) // 2)):
        warnings.simplefilter("ignore")  # convergence chatter on tiny or duplicated data
        if clusters <= KMEANS_MINIBATCH_ABOVE:
            km = KMeans(n_clusters=clusters, n_init=10, random_state=seed)
        else:
            km = MiniBatchKMeans(n_clusters=clusters, batch_size=5000, n_init=3, random_state=seed)
        return km.fit_predict(features).astype(np.int64)


def knn_mean_distance(points: np.ndarray, k: int) -> np.ndarray:
    """Per point: the mean Euclidean distance to its k nearest other points, in blocks (bounded memory)."""
    x = torch.from_numpy(np.ascontiguousarray(points, dtype=np.float32))
    m = x.shape[0]
    k = max(1, min(k, m - 1))
    sq = (x * x).sum(1)
    out = torch.empty(m)
    step = max(1, SIM_CELLS // max(m, 1))
    for s in range(0, m, step):
        d2 = (sq[s:s + step, None] + sq[None, :] - 2 * x[s:s + step] @ x.T).clamp_(min=0)
        d2[torch.arange(d2.shape[0]), torch.arange(s, s + d2.shape[0])] = float("inf")  # not its own neighbour
        out[s:s + step] = d2.topk(k, dim=1, largest=False).values.sqrt().mean(1)
    return out.numpy()


def typicality(points: np.ndarray, k: int = TYPICALITY_K) -> np.ndarray:
    """TypiClust's typicality: 1 / (mean distance to the k nearest neighbours + 1e-5); 1 point: 1."""
    if points.shape[0] < 2:
        return np.ones(points.shape[0])
    return 1.0 / (knn_mean_distance(points, k) + 1e-5)


def typiclust(features: np.ndarray, budget: int, seed: int) -> list[int]:
    """TypiClust (TPC-RP) with no labeled set yet, as the authors' `select_samples`: see the module doc."""
    n = features.shape[0]
    clusters = min(budget, MAX_CLUSTERS, n)
    cluster_of = kmeans_labels(features, clusters, seed) if clusters > 1 else np.zeros(n, dtype=np.int64)
    sizes = np.bincount(cluster_of, minlength=clusters)
    ids = [c for c in range(clusters) if sizes[c] > MIN_CLUSTER_SIZE] or [c for c in range(clusters) if sizes[c]]
    ids.sort(key=lambda c: (-sizes[c], c))  # largest first (the authors sort by labeled count, all 0, then size)
    free = cluster_of.copy()  # -1 once chosen
    chosen: list[int] = []
    while len(chosen) < budget:
        progressed = False
        for c in ids:  # one pass over the clusters, largest first; the next pass when the budget is larger
            members = np.flatnonzero(free == c)
            if len(chosen) >= budget or not members.size:
                continue
            # a small cluster: density among half of it, as the authors do
            score = typicality(features[members], min(TYPICALITY_K, max(1, len(members) // 2)))
            pick = int(members[int(np.argmax(score))])
            chosen.append(pick)
            free[pick] = -1
            progressed = True
        if not progressed:  # the kept clusters are used up (a budget above their points): the dropped ones
            ids = sorted({int(c) for c in free[free >= 0]}, key=lambda c: (-sizes[c], c))
    return chosen


def kcenter_greedy(features: np.ndarray, budget: int, seed: int) -> list[int]:
    """k-center greedy: a seeded first point, then each time the point farthest from all chosen (cosine)."""
    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    first = int(np.random.default_rng(seed).integers(x.shape[0]))
    chosen = [first]
    dist = 1 - x @ x[first]
    for _ in range(budget - 1):
        dist[chosen[-1]] = -1.0
        nxt = int(torch.argmax(dist))
        chosen.append(nxt)
        dist = torch.minimum(dist, 1 - x @ x[nxt])
    return chosen


def select_keys(features: np.ndarray, keys: Sequence[str], budget: int, strategy: str, seed: int) -> list[str]:
    """The `budget` chosen train keys (sorted), from features in key order."""
    return [keys[i] for i in choose(features, budget, strategy, seed)]


# ------------------------------------------------------------------ files


def write_subset(path: str | Path, keys: Sequence[str]) -> Path:
    """A key list in the manifest's subset format: one train key per line."""
    from runtime.files import atomic_write_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(f"{k}\n" for k in keys))
    return path


def read_subset(path: str | Path, train_keys: Sequence[str]) -> list[str]:
    """A key list written by `write_subset`, checked against the train split."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"selected subset {path} is missing: run `selfsup select` again")
    keys = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    unknown = set(keys) - set(train_keys)
    if not keys or unknown:
        raise UserError(f"{path} names {len(unknown)} keys that are not train keys (e.g. {sorted(unknown)[:1]}): "
                        "it was made for other shards; run `selfsup select` again")
    return keys


def contact_sheet(shards: str, keys: Sequence[str], image_size: int, title: str, path: str | Path) -> Path:
    """The chosen images (at most SHEET_MAX), captioned by key number, as a PNG."""
    from finetune.thumbs import grid
    from shards.splits import load_split

    shown = list(keys)[:SHEET_MAX]
    x, _, got = load_split(shards, "train", keys=shown, image_size=image_size)
    row = {k: i for i, k in enumerate(got)}
    shown = [k for k in shown if k in row]
    more = f" (first {len(shown)} of {len(keys)})" if len(keys) > len(shown) else ""
    return grid([x[row[k]].numpy() for k in shown], [k.rsplit("-", 1)[-1].lstrip("0") or "0" for k in shown],
                title + more, path, cols=min(16, max(1, len(shown))))


# ------------------------------------------------------------------ `selfsup select`


def run_select(cfg: Any) -> list[dict[str, Any]]:
    """`selfsup select`: for each strategy (`finetune.selection`, typiclust when empty) choose `budget` train
    images from the encoder's features; write the key list, a JSON record and a contact sheet into
    `<output_dir>/subsets/`. Returns one record per strategy."""
    from finetune.placement import run_settings
    from pretrain.model import check_compatible, load_encoder
    from runtime.files import atomic_write_text
    from runtime.launch import one_cluster
    from shards.manifest import read_manifest

    if cfg.budget is None:
        raise UserError("no budget: give the number of images to label, e.g. `selfsup select encoder=RUN_DIR budget=15`")
    strategies = list(cfg.finetune.selection) or ["typiclust"]
    # absolute: Ray tasks that encode run in working directories of their own, maybe on other nodes
    if "://" not in cfg.data.shards and not cfg.data.shards.startswith("pipe:"):
        cfg.data.shards = str(Path(cfg.data.shards).resolve())
    manifest = read_manifest(cfg.data.shards)
    train_count = int(manifest["splits"]["train"]["count"])
    if cfg.budget > train_count:
        raise UserError(f"budget {cfg.budget} is more than the train split's {train_count} images: give budget <= "
                        f"{train_count}")
    backbone, _, meta = load_encoder(cfg.encoder_dir)
    check_compatible(meta, manifest, image_size=cfg.data.image_size)
    size = int(meta["image_size"])
    mode, _, run_cfg = run_settings(cfg, manifest)  # encoded where fine-tuning would train (finetune.parallel)
    with one_cluster():
        feats, keys, encoded = split_features(backbone, run_cfg, "train", size, manifest["mean"], manifest["std"],
                                              mode != "local")
    if cfg.budget > len(keys):
        raise UserError(f"budget {cfg.budget} is more than the train split's {len(keys)} readable images")
    seed = int(manifest.get("seed", 0))  # fine-tuning's seed index 0 uses the same seed
    out = Path(cfg.output_dir) / "subsets"
    records = []
    for strategy in strategies:
        chosen = select_keys(feats, keys, cfg.budget, strategy, seed)
        path = write_subset(out / subset_name(cfg.budget, strategy), chosen)
        png = contact_sheet(cfg.data.shards, chosen, size,
                            f"{strategy}: {cfg.budget} of {len(keys)} train images to label (seed {seed})",
                            path.with_suffix(".png"))
        rec = {"strategy": strategy, "budget": cfg.budget, "seed": seed, "train_images": len(keys),
               "encoder": str(Path(cfg.encoder_dir).resolve()), "shards": str(cfg.data.shards),
               "keys": path.name, "contact_sheet": png.name, "encode": encoded}
        atomic_write_text(path.with_suffix(".json"), json.dumps(rec, indent=2) + "\n")
        records.append({**rec, "path": str(path), "png": str(png)})
    return records


def selection_jobs(cfg: Any, manifest: dict, backbone: torch.nn.Module | None, jobs: list[dict[str, Any]],
                   image_size: int, out_dir: Path, on_cluster: bool) -> list[dict[str, Any]]:
    """Fine-tuning's selected subsets: for every balanced job below fraction 1 (fraction, seed index), one job per
    strategy of `finetune.selection` with the same budget (that subset's size) and seed, its keys chosen from
    the encoder's train features (encoded on the cluster when `on_cluster`, with `cfg`'s trainer settings) and
    written to `<out_dir>/subsets/selected-<N>-<strategy>-seed<S>.txt`."""
    strategies = list(cfg.finetune.selection)
    if not strategies:
        return []
    if backbone is None:
        raise UserError("finetune.selection needs an encoder: add a method that uses one (e.g. finetune.methods=[semi]) "
                        "and encoder=RUN_DIR")
    feats, keys, _ = split_features(backbone, cfg, "train", image_size, manifest["mean"], manifest["std"], on_cluster)
    out = []
    for job in jobs:
        if job["fraction"] >= 1:
            continue
        budget = len(job["keys"])
        for strategy in strategies:
            chosen = select_keys(feats, keys, min(budget, len(keys)), strategy, job["seed"])
            path = write_subset(out_dir / "subsets" / subset_name(budget, strategy, job["seed"]), chosen)
            out.append({**job, "keys": read_subset(path, keys), "selection": strategy})
    return out


@contextlib.contextmanager
def _tagged_reports(selection: str):
    """While a group of selected subsets trains, each run the session reports to the driver's display carries
    its `selection` (so its line says which subsets it trained on)."""
    from runtime.launch import session

    sess = session()
    if selection == BALANCED:
        yield
        return
    report = sess.report

    def tagged(metrics: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        if isinstance(metrics.get("run"), dict):
            metrics = {**metrics, "run": {**metrics["run"], "selection": selection}}
        return report(metrics, *args, **kwargs)

    sess.report = tagged
    try:
        yield
    finally:
        del sess.report  # the class's method again


def selection_loop(config: dict[str, Any]) -> dict[str, Any]:
    """`finetune.supervised.supervised_loop` once per group of jobs with one selection (balanced first), each
    result row tagged with its `selection`; the shipped classifiers (`best`) only from the balanced subsets,
    so the fixed shipping rule is what it was."""
    from finetune.supervised import supervised_loop

    groups: dict[str, list[dict[str, Any]]] = {}
    for job in sorted(config["jobs"], key=lambda j: j.get("selection", BALANCED) != BALANCED):
        groups.setdefault(job.get("selection", BALANCED), []).append(job)
    results: list[dict[str, Any]] = []
    best: dict[float, dict[str, Any]] = {}
    formats: dict[str, Any] = {}
    for selection, jobs in groups.items():
        with _tagged_reports(selection):
            out = supervised_loop({**config, "jobs": jobs})
        formats = out["formats"]
        for r in out["results"]:
            r["selection"] = selection
        results += out["results"]
        if selection == BALANCED:
            best.update(out["best"])
    return {"results": results, "best": best, "formats": formats}
