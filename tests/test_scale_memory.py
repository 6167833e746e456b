"""Memory flat in the size of the data, and one resolution end to end (issue 11).

Real shards on disk; the pipeline runs in this process (`--local`) so that a global forward hook sees the
tensor every network is given (a real observable: the shapes the models receive).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cluster.cli import main as selfsup
from finetune.data import pool_images
from pretrain.loop import _knn_data, knn_monitor
from pretrain.model import build_backbone
from runtime.config import load_config
from shards.splits import iter_split, sample_keys, sample_split, split_index
from tests.datafiles import write_image_folder
from tests.shardkit import make_shards

TINY = {"channels": [8, 16, 32, 64]}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("scale") / "shards"
    make_shards(d, {"train": 150, "test": 70, "unlabeled": 90}, shard_size=16, image_size=8, channels=3)
    return str(d)


class Inputs:
    """Every 4-D tensor given to a module of one of `names` (by class name), recorded as its shape."""

    def __init__(self, *names: str):
        self.names, self.shapes = set(names), []

    def __enter__(self):
        def hook(module, args):
            if type(module).__name__ in self.names and args and torch.is_tensor(args[0]) and args[0].ndim == 4:
                self.shapes.append(tuple(args[0].shape))

        self.handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


# ------------------------------------------------------------------ sampling


def test_sample_keys_is_bounded_seeded_and_in_shard_order(shards):
    keys, labels = split_index(shards, "train")
    assert len(keys) == 150 and labels.tolist() == [i % 4 for i in range(150)]
    a = sample_keys(shards, "train", 40, seed=3)
    assert a == sample_keys(shards, "train", 40, seed=3), "the same seed draws the same sample"
    assert a != sample_keys(shards, "train", 40, seed=4)
    assert len(a) == 40 == len(set(a)) and set(a) <= set(keys)
    assert a == sorted(a, key=keys.index), "kept in shard order"
    assert sample_keys(shards, "train", 150, seed=3) is None, "a split no larger than the bound is read whole"
    spread = np.array([keys.index(k) for k in a])
    assert spread.min() < 30 and spread.max() > 120, "drawn from the whole stream, not its head"
    x, y, k = sample_split(shards, "unlabeled", 25, seed=0, image_size=12)
    assert x.shape == (25, 3, 12, 12) and (y == -1).all() and len(set(k)) == 25


def test_iter_split_never_holds_more_than_a_batch(shards):
    sizes = [len(x) for x, _, _ in iter_split(shards, "train", batch_size=32)]
    assert sizes == [32, 32, 32, 32, 22]


# ------------------------------------------------------------------ the kNN monitor


def test_knn_monitor_streams_features_of_a_bounded_seeded_sample(shards):
    cfg = load_config(None, [f"data.shards={shards}", "data.image_size=8", "pretrain.knn_bank=40",
                             "pretrain.knn_queries=25", "pretrain.knn_k=5"])
    manifest = json.loads((Path(shards) / "manifest.json").read_text())
    data = _knn_data(cfg, manifest)
    assert data == _knn_data(cfg, manifest), "seeded: the same bank and queries twice"
    bank, queries = data
    assert len(bank) == 40 and len(queries) == 25
    assert all(k.startswith("train-") for k in bank) and all(k.startswith("test-") for k in queries)
    torch.manual_seed(0)
    backbone = build_backbone("resnet18", 3, "small", TINY)
    with Inputs("ResNet") as seen:
        acc, n_bank, n_queries = knn_monitor(backbone, cfg, manifest, data, torch.device("cpu"), batch_size=16)
    assert (n_bank, n_queries) == (40, 25) and 0 <= acc <= 1
    # the splits (150 + 70 images) never go through as one tensor: batches of at most 16, 65 images in all
    assert max(s[0] for s in seen.shapes) <= 16 and sum(s[0] for s in seen.shapes) == 65
    whole = load_config(None, [f"data.shards={shards}", "data.image_size=8"])  # the default bound: whole splits
    assert _knn_data(whole, manifest) == (None, None)
    assert knn_monitor(backbone, whole, manifest, (None, None), torch.device("cpu"))[1:] == (150, 70)


# ------------------------------------------------------------------ a labeled subset too large to hold


def test_a_large_labeled_subset_trains_from_the_stream_on_the_same_budget(shards):
    from finetune.classifier import build_classifier, train_supervised_stream
    from shards.reader import ShardLoader

    keys = split_index(shards, "train")[0][:40]
    arch = {"model": "resnet18", "timm_kwargs": TINY, "in_chans": 3, "stem": "small", "num_features": 64,
            "head": {}, "start_from": "backbone", "num_classes": 4}
    torch.manual_seed(0)
    model = build_classifier(arch)
    loader = ShardLoader(shards, splits="train", keys=keys, batch_size=16, seed=0, image_size=8)
    with Inputs("Classifier") as seen:
        stats = train_supervised_stream(model, loader, lambda x: x.float() / 255, epochs=2, labeled=40,
                                        batch_size=16, lr=0.01, weight_decay=0.0)
    assert stats["steps"] == 5 == len(seen.shapes)  # ceil(2 x 40 / 16), as train_supervised counts them
    assert all(s == (16, 3, 8, 8) for s in seen.shapes)


# ------------------------------------------------------------------ distill's pool


def test_distill_pool_is_a_bounded_seeded_sample_holding_every_label(shards):
    labeled = ["train-00000003", "train-00000100", "train-00000149"]
    images, labels, keys = pool_images(shards, ("train", "unlabeled"), labeled, 30, seed=0, image_size=8)
    again = pool_images(shards, ("train", "unlabeled"), labeled, 30, seed=0, image_size=8)
    assert keys == again[2] and torch.equal(images, again[0])
    train = [k for k in keys if k.startswith("train-")]
    unlabeled = [k for k in keys if k.startswith("unlabeled-")]
    assert len(unlabeled) == 30 and 30 <= len(train) <= 33 and set(labeled) <= set(train)
    assert images.shape == (len(keys), 3, 8, 8) and (labels[len(train):] == -1).all()
    assert pool_images(shards, ("train", "unlabeled"), labeled, 30, seed=1, image_size=8)[2] != keys
    whole = pool_images(shards, ("train",), labeled, 1000, seed=0, image_size=8)[2]
    assert whole == split_index(shards, "train")[0], "a small train split: all of it, in shard order"


# ------------------------------------------------------------------ one resolution, and the pixel sample


def _mixed_folder(root: Path) -> Path:
    """3 classes of 28x24 images plus some 14x12 ones: the manifest's size (the smallest) is 12."""
    raw = root / "raw"
    write_image_folder(raw, layout="split", per_class=12, size=(28, 24), n_unlabeled=6, n_test_per_class=3)
    rng = np.random.default_rng(1)
    for part in ("train/cat", "train/dog", "test/fish", "unlabeled"):
        for i in range(2):
            arr = rng.integers(0, 255, (12, 14, 3), dtype=np.uint8)
            Image.fromarray(arr).save(raw / part / f"small_{i}.png")
    return raw


@pytest.mark.parametrize("semi", ["fixmatch", "distill"])
def test_every_stage_runs_at_the_trained_size_and_the_pixel_fit_is_a_reported_sample(tmp_path, capsys, monkeypatch,
                                                                                     semi):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    raw = _mixed_folder(tmp_path)
    run = tmp_path / "run"
    argv = ["pipeline", "--local", "--config", "configs/imagefolder.yaml", f"output_dir={run}",
            f"data.shards={tmp_path / 'shards'}", f"data.input={raw}", "data.image_size=20", "data.shard_size=8",
            "data.labeled_fractions=[0.5]", "data.loader_workers=0", "augment.preset=small",
            "model.name=resnet18", "model.stem=small", "model.timm_kwargs={channels: [8, 16, 32, 64]}",
            "model.proj_hidden_dim=32", "model.proj_output_dim=16", "pretrain.epochs=1", "pretrain.global_batch_size=16",
            "pretrain.knn_bank=10", "pretrain.knn_queries=7", "trainer.torch_threads=1", "wandb.enabled=false",
            "trainer.use_gpu=false", "model.sync_batchnorm=false", "pretrain.precision=fp32",
            "finetune.num_seeds=1", "finetune.epochs=1", "finetune.semi_epochs=1", "finetune.batch_size=8",
            "finetune.methods=[pixels,scratch,knn,linear,finetune,semi]", "finetune.full_fraction_methods=[pixels,scratch]",
            # 20 labels at 0.5 and 40 at 1.0: above the bound, so every trained method streams its labeled images
            "finetune.labeled_in_memory=15", f"finetune.semi_method={semi}",
            "finetune.pixels_max_samples=10", "finetune.unlabeled_pool=5", "finetune.parallel=local"]
    with Inputs("ResNet", "Classifier") as seen:
        assert selfsup(argv) == 0
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest["image_size"] == 12, "the folder's small images set the manifest's size"
    assert json.loads((run / "encoder.json").read_text())["image_size"] == 20, "the size it was trained at"
    assert seen.shapes and {s[-2:] for s in seen.shapes} == {(20, 20)}, "every network saw 20 px tensors"
    report = json.loads((run / "report.json").read_text())
    assert report["image_size"] == 20 and report["semi_method"] == semi
    model = json.loads(next((run / "classifiers").glob("*/model.json")).read_text())
    assert model["preprocessing"]["image_size"] == 20
    metrics = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["knn_bank"] == 10 and metrics[-1]["knn_queries"] == 7
    # the pixel baseline: all 36+ labels at fraction 1 exceed pixels_max_samples=10 -> a reported sample
    full = next(r for r in report["results"] if r["method"] == "pixels" and r["label_fraction"] == 1.0)
    assert full["fit_samples"] == 10 and full["labels"] > 10
    assert any(r["method"] == "scratch" and r["label_fraction"] == 1.0 for r in report["results"])
    assert "seeded sample of 10" in (run / "report.md").read_text()
    # predict: a small image is brought to the trained size before the model sees it
    capsys.readouterr()
    small = raw / "test" / "fish" / "small_0.png"
    with Inputs("Classifier") as seen:
        assert selfsup(["predict", str(run), str(small)]) == 0
    assert {s[-2:] for s in seen.shapes} == {(20, 20)}
    assert capsys.readouterr().out.strip().split("\t")[1] in manifest["classes"]

