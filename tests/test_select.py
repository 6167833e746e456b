"""Which images to label (`selfsup select`, `finetune.selection`) and the data report (`selfsup inspect`).

Real shards of a small image folder (four colour classes, ImageNet layout so the test split is ours to plant
in), a real (randomly initialised, tiny) encoder on disk, the real CLI; no mocks.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cluster.cli import main as selfsup
from finetune.selection import choose, typicality
from pretrain.model import build_model, encoder_meta, save_encoder
from runtime.config import Config
from shards.splits import load_split
from shards.writer import write_shards

SIZE = 32
CLASSES = ("c0", "c1", "c2", "c3")
COLOURS = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200], [200, 200, 40]], np.float32)
TINY = {"channels": [8, 16, 32, 64]}


def _image(c: int, rng: np.random.Generator) -> np.ndarray:
    """A class-coloured smooth field plus noise: the classes differ in colour, images within one in texture."""
    coarse = rng.normal(0, 80, (8, 8, 3)).astype(np.float32)
    smooth = np.kron(coarse, np.ones((SIZE // 8, SIZE // 8, 1), np.float32))
    return np.clip(COLOURS[c] + smooth + rng.normal(0, 8, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)


def _encoder(out: Path, manifest: dict) -> Path:
    cfg = Config()
    cfg.model.timm_kwargs = dict(TINY)
    cfg.model.proj_hidden_dim, cfg.model.proj_output_dim = 32, 16
    cfg.data.image_size = SIZE
    torch.manual_seed(0)
    model = build_model(cfg.model, int(manifest["channels"]))
    save_encoder(out, model, encoder_meta(cfg, manifest, model, epochs=0, knn_acc=None))
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """DIR/train/<c>/ (12 each) and DIR/test/<c>/ (4 each), with planted problems:
    - test/c0/exact.png: a byte-for-byte copy of train/c0/img_3.png (leakage)
    - test/c1/flip.png: train/c1/img_5 mirrored and saved at 64 px (a near duplicate; sharding resizes to 32)
    - train/c2/wrong.png: a class-3 (yellow) image filed under c2; test/c0/wrong.png: a class-1 image under c0
    """
    root = tmp_path_factory.mktemp("select")
    rng = np.random.default_rng(0)
    raw = root / "raw"
    arrays: dict[str, np.ndarray] = {}
    for part, n in (("train", 12), ("test", 4)):
        for c, name in enumerate(CLASSES):
            d = raw / part / name
            d.mkdir(parents=True)
            for i in range(n):
                arr = _image(c, rng)
                Image.fromarray(arr).save(d / f"img_{i}.png")
                arrays[f"{part}/{name}/img_{i}"] = arr
    shutil.copy(raw / "train/c0/img_3.png", raw / "test/c0/exact.png")
    Image.fromarray(arrays["train/c1/img_5"][:, ::-1]).resize((64, 64), Image.NEAREST).save(raw / "test/c1/flip.png")
    arrays["train/c2/wrong"] = _image(3, rng)
    Image.fromarray(arrays["train/c2/wrong"]).save(raw / "train/c2/wrong.png")
    arrays["test/c0/wrong"] = _image(1, rng)
    Image.fromarray(arrays["test/c0/wrong"]).save(raw / "test/c0/wrong.png")
    shards = root / "shards"
    manifest = write_shards("folder", shards, input_dir=raw, shard_size=16, image_size=SIZE,
                            labeled_fractions=[0.1, 0.25], seed=0, workers=1, progress=False)
    # keys of the planted images, found by their pixels (the shards keep no file names)
    key_of = {}
    for split in ("train", "test"):
        x, _, keys = load_split(str(shards), split)
        for k, im in zip(keys, x.numpy().transpose(0, 2, 3, 1)):
            for name, arr in arrays.items():
                if name.startswith(split) and np.array_equal(im, arr):
                    key_of.setdefault(name, k)
            if split == "test" and not any(np.array_equal(im, a) for a in arrays.values()):
                key_of["test/c1/flip"] = k  # the one test image not stored as written: the resized mirror
    key_of["test/c0/exact"] = next(k for k, im in zip(keys, x.numpy().transpose(0, 2, 3, 1))
                                   if np.array_equal(im, arrays["train/c0/img_3"]))
    enc = _encoder(root / "enc", manifest)
    return {"root": root, "shards": shards, "encoder": enc, "key_of": key_of, "manifest": manifest}


@pytest.fixture(scope="module")
def trained(data):
    """A briefly pretrained SimCLR encoder of the folder (a random one ranks every pair of images alike)."""
    out = data["root"] / "pretrained"
    assert selfsup(["pretrain", "--local", f"output_dir={out}", f"data.shards={data['shards']}",
                    f"data.image_size={SIZE}", "pretrain.epochs=15", "pretrain.global_batch_size=32",
                    "pretrain.knn_every=0", "model.timm_kwargs={channels: [8, 16, 32, 64]}", "model.proj_hidden_dim=64",
                    "model.proj_output_dim=32", "augment.preset=small", "trainer.torch_threads=1",
                    "wandb.enabled=false"]) == 0
    return out


def _args(data, out: Path, *extra: str) -> list[str]:
    return [f"encoder={data['encoder']}", f"data.shards={data['shards']}", f"data.image_size={SIZE}",
            f"output_dir={out}", "wandb.enabled=false", *extra]


# ------------------------------------------------------------------ selection


def test_typiclust_picks_the_densest_point_of_each_cluster():
    """Three well-separated blobs (sizes 60, 40, 20) and far outliers, budget 3: one pick per blob, each the
    blob's point of highest typicality (the paper's rule, transcribed as `typicality` over the blob)."""
    rng = np.random.default_rng(1)
    centres = np.eye(8, dtype=np.float32)[:3] * 10
    blobs = [c + rng.normal(0, 0.5, (n, 8)).astype(np.float32) for c, n in zip(centres, (60, 40, 20))]
    x = np.concatenate(blobs + [rng.normal(0, 30, (3, 8)).astype(np.float32)])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    picks = choose(x, 3, "typiclust", seed=0)
    starts = np.cumsum([0, 60, 40, 20])
    for b in range(3):
        inside = [p for p in picks if starts[b] <= p < starts[b + 1]]
        assert len(inside) == 1, (b, picks)
        members = x[starts[b]:starts[b + 1]]
        assert inside[0] - starts[b] == int(np.argmax(typicality(members, min(20, len(members) // 2))))
    # larger budgets than clusters cycle through them; every pick distinct; kcenter reaches the outliers first
    assert len(set(choose(x, 50, "typiclust", seed=0))) == 50
    assert {120, 121, 122} <= set(choose(x, 6, "kcenter", seed=0).tolist())


def _relabel(src: Path, dst: Path, seed: int) -> None:
    """A copy of the shards whose train labels are shuffled (the same images under the same keys)."""
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    rng = np.random.default_rng(seed)
    for name in manifest["splits"]["train"]["shards"]:
        path = dst / name
        with tarfile.open(path) as t:
            members = [(m, t.extractfile(m).read()) for m in t.getmembers()]
        labels = [data for m, data in members if m.name.endswith(".cls")]
        shuffled = iter([labels[i] for i in rng.permutation(len(labels))])
        with tarfile.open(path, "w") as t:
            for m, data in members:
                data = next(shuffled) if m.name.endswith(".cls") else data
                m.size = len(data)
                t.addfile(m, io.BytesIO(data))


def test_select_never_reads_labels(data, tmp_path, capsys):
    """The same keys whatever the train labels say, and wherever the features are encoded: the shards'
    features on a real 2-CPU Ray cluster (2 tasks, the default trainer) and their relabeled copy's in this
    process (`finetune.parallel=local`) give identical selections, for every strategy; the key list is in the
    manifest's subset format (train keys, one a line) with a contact sheet, the record says where it encoded."""
    other = tmp_path / "relabeled"
    _relabel(data["shards"], other, seed=3)
    _, y0, k0 = load_split(str(data["shards"]), "train")
    _, y1, k1 = load_split(str(other), "train")
    assert k0 == k1 and not torch.equal(y0, y1)  # same images and keys, other labels
    chosen = {}
    for shards, out, where in ((data["shards"], tmp_path / "a", "finetune.parallel=auto"),
                               (other, tmp_path / "b", "finetune.parallel=local")):
        args = _args(data, out, "budget=6", "finetune.selection=[random,typiclust,kcenter]", where)
        args = [a if not a.startswith("data.shards=") else f"data.shards={shards}" for a in args]
        assert selfsup(["select", *args]) == 0
        chosen[out.name] = {s: (out / "subsets" / f"selected-6-{s}.txt").read_text().split()
                            for s in ("random", "typiclust", "kcenter")}
        for s in ("random", "typiclust", "kcenter"):
            assert (out / "subsets" / f"selected-6-{s}.png").stat().st_size > 0
            record = json.loads((out / "subsets" / f"selected-6-{s}.json").read_text())
            assert record["budget"] == 6 and record["encode"]["device"] == "cpu"
            assert record["encode"]["parts"] == (2 if out.name == "a" else 0)
    assert chosen["a"] == chosen["b"]
    for keys in chosen["a"].values():
        assert len(keys) == len(set(keys)) == 6 and set(keys) <= set(k0)
    assert "selected-6-typiclust.txt" in capsys.readouterr().out


def test_select_on_the_cluster_says_what_a_damaged_shard_lost(data, tmp_path, capsys):
    """A train shard whose second half reads as zeros (a well-formed tar that ends early): the Ray tasks that
    encode skip what is missing, and the driver says so in one warning (their own logs stay on the workers);
    the images that were read are still chosen from."""
    shards = tmp_path / "shards"
    shutil.copytree(data["shards"], shards)
    manifest = json.loads((shards / "manifest.json").read_text())
    name, count = manifest["splits"]["train"]["shards"][0], manifest["splits"]["train"]["shard_counts"][0]
    raw = bytearray((shards / name).read_bytes())
    half = len(raw) // 2 // 512 * 512
    raw[half:] = bytes(len(raw) - half)
    (shards / name).write_bytes(bytes(raw))
    args = [a if not a.startswith("data.shards=") else f"data.shards={shards}"
            for a in _args(data, tmp_path / "out", "budget=6")]
    assert selfsup(["select", *args]) == 0
    err = capsys.readouterr().err
    warning = [ln for ln in err.splitlines() if ln.startswith("warning: the train split's encode on the cluster")]
    assert len(warning) == 1 and "short_shard" in warning[0] and "re-run `selfsup shard`" in warning[0], err
    record = json.loads((tmp_path / "out" / "subsets" / "selected-6-typiclust.json").read_text())
    total = manifest["splits"]["train"]["count"]
    assert total - count < record["train_images"] < total and record["encode"]["parts"] >= 1


@pytest.mark.parametrize("extra, message", [
    (["budget=0"], "budget must be a positive number"),
    (["budget=-3"], "budget must be a positive number"),
    (["budget=100000"], "more than the train split"),
    ([], "no budget"),
    (["budget=5", "finetune.selection=[magic]"], "unknown strategy 'magic'"),
    (["budget=5", "encoder=/nonexistent/enc"], "/nonexistent/enc"),
])
def test_select_bad_input_is_one_line(data, tmp_path, capsys, extra, message):
    args = _args(data, tmp_path / "out", *extra)
    rc = selfsup(["select", *args])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc != 0 and len(err) == 1 and message in err[0] and "Traceback" not in err[0], err
    assert not (tmp_path / "out" / "subsets").exists()


def test_finetune_rows_on_selected_subsets(data, tmp_path):
    """finetune.selection adds rows with `selection` per strategy at the same budgets and seeds; today's rows
    are `balanced` and the comparisons and shipped classifiers use them only."""
    out = tmp_path / "ft"
    rc = selfsup(["finetune", *_args(data, out, "finetune.methods=[knn,linear,finetune]", "finetune.num_seeds=2",
                                     "finetune.epochs=1", "finetune.full_fraction_methods=[]",
                                     "finetune.selection=[random,typiclust]", "trainer.num_workers=0",
                                     "trainer.torch_threads=1")])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    rows = report["results"]
    assert {r["selection"] for r in rows} == {"balanced", "random", "typiclust"}
    assert report["selection"] == ["random", "typiclust"]
    for f in (0.1, 0.25):
        for m in ("knn", "linear", "finetune"):
            got = {r["selection"]: r for r in rows if r["method"] == m and r["label_fraction"] == f}
            assert set(got) == {"balanced", "random", "typiclust"}
            assert len({r["labels"] for r in got.values()}) == 1 and all(r["seeds"] == 2 for r in got.values())
    budget = rows[0]["labels"]
    for s in ("random", "typiclust"):
        assert len((out / "subsets" / f"selected-{budget}-{s}-seed0.txt").read_text().split()) == budget
    cmp = report["selection_comparisons"]
    assert {(c["method"], c["selection"]) for c in cmp} == {(m, "typiclust") for m in ("knn", "linear", "finetune")}
    assert report["comparisons"] == []  # no baseline ran; they would compare the balanced rows only
    assert "## Which images to label" in (out / "report.md").read_text()
    assert json.loads((out / "classifiers" / "finetune-0.1" / "model.json").read_text())["seed"] == 0


# ------------------------------------------------------------------ the data report


@pytest.mark.slow  # pretrains a small encoder first (~20 s idle, a minute on a busy machine)
def test_inspect_finds_planted_duplicates_and_label_errors(data, trained, tmp_path, capsys):
    out = tmp_path / "report"
    assert selfsup(["inspect", *_args(data, out, f"encoder={trained}", "inspect.knn_k=5", "wandb.enabled=true",
                                      "wandb.mode=offline")]) == 0
    report = json.loads((out / "data_report.json").read_text())
    key = data["key_of"]
    top = report["duplicates"]["train_test"]["top"]
    # the planted copies are the two most similar train/test pairs
    assert {(p["test"]["key"], p["train"]["key"]) for p in top[:2]} == {
        (key["test/c0/exact"], key["train/c0/img_3"]), (key["test/c1/flip"], key["train/c1/img_5"])}, top[:4]
    assert top[0]["similarity"] > 0.999 and top[1]["similarity"] > report["duplicate_threshold"]
    assert report["encode"]["parts"] >= 1  # mirrored features from Ray tasks (the default trainer: 2 workers)
    assert report["duplicates"]["train_test"]["test_images"] >= 2
    suspects = {s["key"]: s for s in report["label_errors"]["top"]}
    assert suspects[key["train/c2/wrong"]]["suggested"] == "c3" and suspects[key["train/c2/wrong"]]["label"] == "c2"
    assert suspects[key["test/c0/wrong"]]["suggested"] == "c1" and suspects[key["test/c0/wrong"]]["split"] == "test"
    assert report["class_balance"]["train"]["counts"] == {"c0": 12, "c1": 12, "c2": 13, "c3": 12}
    assert report["class_balance"]["test"]["counts"] == {"c0": 6, "c1": 5, "c2": 4, "c3": 4}
    assert len(report["outliers"]["top"]) == 16
    for png in ("leakage", "label_errors", "outliers"):
        assert (out / report["thumbnails"][png]).stat().st_size > 0
    md = (out / "data_report.md").read_text()
    assert key["test/c0/exact"] in md and "![leakage]" in md
    assert list((out / "wandb").glob("offline-run-*/run-*.wandb"))  # the W&B run's offline file
    assert "likely label errors: " in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["encoder=/nonexistent/enc"], "/nonexistent/enc"),
    (["inspect.duplicate_threshold=1.5"], "inspect.duplicate_threshold must be in (0, 1]"),
    (["inspect.knn_k=0"], "inspect.knn_k"),
])
def test_inspect_bad_input_is_one_line(data, tmp_path, capsys, extra, message):
    rc = selfsup(["inspect", *_args(data, tmp_path / "out", *extra)])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc != 0 and len(err) == 1 and message in err[0] and "Traceback" not in err[0], err
    assert not (tmp_path / "out" / "data_report.json").exists()
