"""`selfsup shard`: tiny real files in every format -> shards -> read back with webdataset and tarfile."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import tarfile
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from cluster.cli import main as selfsup
from runtime.errors import UserError
from shards import writer
from shards.manifest import MANIFEST, draw_labeled_subset, read_manifest, shard_url
from shards.writer import write_shards
from tests.datafiles import (
    write_cifar10,
    write_cifar100,
    write_garbage_image,
    write_image_folder,
    write_stl10,
    write_truncated_jpeg,
)

ROOT = Path(__file__).resolve().parents[1]


def read_back(out: Path, manifest: dict) -> dict[str, list[dict]]:
    """Every sample of every split, decoded by webdataset's own reader, in key order (the source's order;
    the shards hold them shuffled); tar member counts checked too."""
    samples = {}
    for split, info in manifest["splits"].items():
        assert len(info["shards"]) == len(info["shard_counts"])
        for rel, n in zip(info["shards"], info["shard_counts"]):
            with tarfile.open(out / rel) as tar:
                members = tar.getmembers()
                assert len({Path(m.name).stem for m in members}) == n
                for m in members:  # `cls` is the label as text, -1 only for unlabeled
                    if m.name.endswith(".cls"):
                        label = int(tar.extractfile(m).read().decode("ascii"))
                        assert (label == -1) == (split == "unlabeled")
        urls = [shard_url(out, rel) for rel in info["shards"]]
        got = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("rgb8")) if urls else []
        assert len(got) == info["count"] == sum(info["shard_counts"])
        samples[split] = sorted(got, key=lambda s: s["__key__"])
    keys = [s["__key__"] for ss in samples.values() for s in ss]
    assert len(keys) == len(set(keys)), "keys must be unique across splits"
    return samples


def image_of(sample: dict) -> np.ndarray:
    return next(sample[k] for k in ("png", "jpg", "webp") if k in sample)


def check_subsets(out: Path, manifest: dict, samples: dict) -> None:
    labels = {s["__key__"]: int(s["cls"]) for s in samples["train"]}
    n_classes = len(set(labels.values()))
    for key, sub in manifest["labeled_subsets"].items():
        keys = (out / sub["keys"]).read_text().split()
        assert len(keys) == sub["count"] == len(set(keys))
        per_class = Counter(labels[k] for k in keys)  # KeyError: a key that is not a train sample
        assert len(per_class) == n_classes, f"subset {key} misses a class"
        assert max(per_class.values()) - min(per_class.values()) <= 1 or sub["fraction"] == 1


def test_digits_gives_1437_train_and_360_test(tmp_path):
    m = write_shards("digits", tmp_path, workers=1, shard_size=500)
    assert (m["splits"]["train"]["count"], m["splits"]["test"]["count"]) == (1437, 360)
    assert m["splits"]["train"]["shard_counts"] == [500, 500, 437]
    assert m["channels"] == 1 and m["image_size"] == 16 and m["classes"] == [str(c) for c in range(10)]
    samples = read_back(tmp_path, m)
    assert image_of(samples["train"][0]).shape[:2] == (16, 16)
    from sklearn.datasets import load_digits

    per_class = Counter(load_digits().target.tolist())
    test_per_class = Counter(int(s["cls"]) for s in samples["test"])
    assert all(abs(test_per_class[c] - 0.2 * n) <= 1 for c, n in per_class.items()), "stratified 80/20"
    assert {k: v["count"] for k, v in m["labeled_subsets"].items()} == {"0.01": 15, "0.1": 144}
    check_subsets(tmp_path, m, samples)
    px = np.stack([image_of(s) for s in samples["train"]]).astype(np.float64) / 255
    assert m["mean"][0] == pytest.approx(px.mean(), abs=1e-4)
    assert m["std"][0] == pytest.approx(px.std(), abs=1e-4)
    assert read_manifest(tmp_path) == json.loads((tmp_path / MANIFEST).read_text())


def _cifar_batches(d: Path, files: list[str], label_key: str):
    x, y = [], []
    for f in files:
        with open(d / f, "rb") as fh:
            b = pickle.load(fh)
        x.append(np.asarray(b["data"]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        y += b[label_key]
    return np.concatenate(x), y


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_pixels_and_labels_survive(tmp_path, name):
    raw = tmp_path / "raw"
    if name == "cifar10":
        info = write_cifar10(raw, n_train=23, n_test=10)
        x, y = _cifar_batches(raw, [f"data_batch_{i}" for i in range(1, 6)], "labels")
    else:
        info = write_cifar100(raw, n_train=200, n_test=100)
        x, y = _cifar_batches(raw, ["train"], "fine_labels")
    out = tmp_path / "shards"
    m = write_shards(name, out, input_dir=raw, shard_size=64, workers=1, labeled_fractions="0.05,1")
    assert m["classes"] == info["classes"] and m["channels"] == 3 and m["image_size"] == 32
    assert (m["splits"]["train"]["count"], m["splits"]["test"]["count"]) == (info["train"], info["test"])
    samples = read_back(out, m)
    got = {s["__key__"]: s for s in samples["train"]}
    for i in range(len(y)):  # PNG is lossless: every pixel and label as in the batch files
        s = got[f"train-{i:08d}"]
        assert int(s["cls"]) == y[i]
        np.testing.assert_array_equal(image_of(s), x[i])
    assert set(m["labeled_subsets"]) == {"0.05", "1"}
    assert m["labeled_subsets"]["1"]["count"] == info["train"]
    check_subsets(out, m, samples)


def test_stl10_column_major_labels_and_unlabeled(tmp_path):
    info = write_stl10(tmp_path / "raw", n_train=20, n_test=10, n_unlabeled=7)
    out = tmp_path / "shards"
    m = write_shards("stl10", out, input_dir=tmp_path / "raw", shard_size=8, workers=1)
    assert m["classes"] == info["classes"] and m["image_size"] == 96
    assert {s: m["splits"][s]["count"] for s in m["splits"]} == {"train": 20, "test": 10, "unlabeled": 7}
    assert m["splits"]["unlabeled"]["shard_counts"] == [7]
    samples = read_back(out, m)
    np.testing.assert_array_equal(image_of(samples["train"][0]), info["first_train_image"])
    assert [int(s["cls"]) for s in samples["train"]] == [i % 10 for i in range(20)]  # 1..10 -> 0..9
    assert {int(s["cls"]) for s in samples["unlabeled"]} == {-1}
    # resized on write: shorter side 48
    m2 = write_shards("stl10", tmp_path / "small", input_dir=tmp_path / "raw", image_size=48, workers=1)
    assert m2["image_size"] == 48
    assert image_of(read_back(tmp_path / "small", m2)["test"][0]).shape == (48, 48, 3)


@pytest.mark.parametrize("layout", ["flat", "split"])
def test_image_folder_with_corrupt_files(tmp_path, layout, capfd):
    raw = tmp_path / "raw"
    info = write_image_folder(raw, layout=layout, classes=("cat", "dog", "fish"), per_class=5, size=(40, 30))
    cls_dir = raw / ("train/dog" if layout == "split" else "dog")
    write_truncated_jpeg(cls_dir / "broken.jpg")
    write_garbage_image(raw / "unlabeled" / "noise.png")
    (raw / "cat" if layout == "flat" else raw / "train" / "cat").joinpath("notes.txt").write_text("not an image")
    out = tmp_path / "shards"
    m = write_shards("folder", out, input_dir=raw, shard_size=4, image_size=20, workers=1)
    assert m["classes"] == ["cat", "dog", "fish"] and m["image_size"] == 20
    assert m["skipped"] == 2 and len(m["skipped_files"]) == 2
    assert any("broken.jpg" in s for s in m["skipped_files"]) and any("noise.png" in s for s in m["skipped_files"])
    err = capfd.readouterr().err
    assert "broken.jpg" in err and "noise.png" in err
    labeled = m["splits"]["train"]["count"] + m["splits"]["test"]["count"]
    assert labeled == (info["train"] + info["test"] if layout == "split" else info["labeled"])
    if layout == "flat":  # 5 per class, test_fraction 0.2: one test image per class
        assert m["splits"]["test"]["count"] == 3
    assert m["splits"]["unlabeled"]["count"] == info["unlabeled"]
    samples = read_back(out, m)
    exts = Counter(k for s in samples["train"] for k in ("jpg", "png", "webp") if k in s)
    assert set(exts) == {"jpg", "png", "webp"}, "folder images keep their format"
    assert all(min(image_of(s).shape[:2]) == 20 for ss in samples.values() for s in ss)
    assert Counter(int(s["cls"]) for s in samples["test"]) == Counter({0: 2, 1: 2, 2: 2} if layout == "split"
                                                                      else {0: 1, 1: 1, 2: 1})
    check_subsets(out, m, samples)


def test_split_layout_without_test_folder_holds_out_test_fraction(tmp_path):
    raw = tmp_path / "raw"
    write_image_folder(raw, layout="split", classes=("a", "b"), per_class=10, with_unlabeled=False)
    for p in (raw / "test").rglob("*.*"):
        p.unlink()
    for d in sorted((raw / "test").rglob("*"), reverse=True):
        d.rmdir()
    (raw / "test").rmdir()
    m = write_shards("folder", tmp_path / "out", input_dir=raw, test_fraction=0.3, workers=1)
    assert (m["splits"]["train"]["count"], m["splits"]["test"]["count"]) == (14, 6)
    assert Counter(int(s["cls"]) for s in read_back(tmp_path / "out", m)["test"]) == {0: 3, 1: 3}


def test_unresized_folder_images_are_stored_byte_for_byte(tmp_path):
    raw = tmp_path / "raw"
    write_image_folder(raw, classes=("a", "b"), per_class=3, with_unlabeled=False, size=(24, 24))
    m = write_shards("folder", tmp_path / "out", input_dir=raw, workers=1)
    originals = {p.read_bytes() for p in raw.rglob("img_*")}
    stored = [image_of(s) for s in wds.WebDataset(
        [shard_url(tmp_path / "out", r) for r in m["splits"]["train"]["shards"]], shardshuffle=False)]
    assert stored and all(b in originals for b in stored)


def test_parallel_workers_write_the_same_shards(tmp_path, monkeypatch):
    monkeypatch.setattr(writer, "PARALLEL_MIN_IMAGES", 0)  # use the pool even for these few images
    raw = tmp_path / "raw"
    write_image_folder(raw, layout="split", classes=("a", "b"), per_class=6, n_unlabeled=5)
    one = write_shards("folder", tmp_path / "one", input_dir=raw, shard_size=3, workers=1)
    # fork when this process runs no other threads; earlier tests in the same process may have left some
    alive = [t for t in threading.enumerate()
             if t is not threading.main_thread() and type(t).__name__ != "TMonitor"]
    assert writer._pool_context().get_start_method() == ("forkserver" if alive else "fork")
    two = write_shards("folder", tmp_path / "two", input_dir=raw, shard_size=3, workers=2)
    # another thread alive (as under Ray or W&B): the pool must not fork this process, but still work
    stop = threading.Event()
    busy = threading.Thread(target=stop.wait)
    busy.start()
    try:
        assert writer._pool_context().get_start_method() == "forkserver"
        three = write_shards("folder", tmp_path / "three", input_dir=raw, shard_size=3, workers=2)
    finally:
        stop.set()
        busy.join()
    assert len(one["splits"]["train"]["shards"]) == 4
    for other, name in ((two, "two"), (three, "three")):
        assert one["splits"] == other["splits"] and one["mean"] == other["mean"]
        for rel in one["splits"]["train"]["shards"]:  # byte-identical, whoever wrote them
            assert (tmp_path / "one" / rel).read_bytes() == (tmp_path / name / rel).read_bytes()


def test_labeled_subsets_are_balanced_and_seeded():
    keys = [f"train-{i:08d}" for i in range(1000)]
    labels = [0] * 700 + [1] * 200 + [2] * 90 + [3] * 10  # imbalanced on purpose
    a = draw_labeled_subset(keys, labels, 0.1, seed=0)
    assert len(a) == 100
    assert a == draw_labeled_subset(keys, labels, 0.1, seed=0)
    shuffled = np.random.default_rng(5).permutation(len(keys))  # same pairs, another order: same subset
    assert a == draw_labeled_subset([keys[i] for i in shuffled], [labels[i] for i in shuffled], 0.1, seed=0)
    assert a != draw_labeled_subset(keys, labels, 0.1, seed=1)
    assert sorted(Counter(labels[keys.index(k)] for k in a).values()) == [10, 30, 30, 30]  # class 3 has only 10
    tiny = draw_labeled_subset(keys, labels, 0.001, seed=0)  # 1 key by the fraction, but >= 1 per class
    assert sorted(Counter(labels[keys.index(k)] for k in tiny)) == [0, 1, 2, 3]
    with pytest.raises(UserError):
        draw_labeled_subset(keys, labels, 0.0, seed=0)


def test_rerun_is_a_no_op_and_a_crash_is_redone(tmp_path, capsys):
    raw = tmp_path / "raw"
    write_cifar10(raw, n_train=20, n_test=10)
    out = tmp_path / "shards"
    m = write_shards("cifar10", out, input_dir=raw, shard_size=8, workers=1)
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert write_shards("cifar10", out, input_dir=raw, shard_size=8, workers=1) == m
    assert "already complete" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == stamp
    # a crash: no manifest, a marker, a stale extra shard; plus a file that is not ours
    (out / MANIFEST).unlink()
    (out / ".shard-incomplete").write_text("crashed\n")
    (out / "train-000042.tar").write_bytes(b"half")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="shards not found"):
        read_manifest(out)
    assert write_shards("cifar10", out, input_dir=raw, shard_size=8, workers=1) == m
    assert "half-written" in capsys.readouterr().err
    assert not (out / "train-000042.tar").exists() and not (out / ".shard-incomplete").exists()
    assert (out / "notes.txt").read_text() == "mine"
    (out / MANIFEST).write_text(json.dumps({**m, "complete": False}))
    with pytest.raises(UserError, match="incomplete"):
        read_manifest(out)
    assert write_shards("cifar10", out, input_dir=raw, shard_size=8, workers=1) == m  # redone again
    other = write_shards("cifar10", tmp_path / "seed1", input_dir=raw, shard_size=8, seed=1, workers=1)
    assert other["labeled_subsets"]["0.1"]["keys"] == "subsets/labeled-0.1-seed1.txt"
    assert (tmp_path / "seed1" / "subsets/labeled-0.1-seed1.txt").read_text() != \
        (out / "subsets/labeled-0.1-seed0.txt").read_text()
    with pytest.raises(UserError, match="already holds complete cifar10"):
        write_shards("digits", out, workers=1)


def test_never_writes_through_symlinks_outside_the_dir(tmp_path):
    raw, out, outside = tmp_path / "raw", tmp_path / "shards", tmp_path / "outside"
    write_cifar10(raw, n_train=20, n_test=10)
    outside.mkdir()
    victim = outside / "victim.tar"
    victim.write_text("keep me")
    out.mkdir()
    os.symlink(victim, out / "train-000000.tar")  # planted where a shard will go
    os.symlink(victim, out / ".train-000001.tar.tmp")  # and where a temp file will go
    m = write_shards("cifar10", out, input_dir=raw, shard_size=8, workers=1)
    assert victim.read_text() == "keep me"
    assert not (out / "train-000000.tar").is_symlink()
    read_back(out, m)
    # a `subsets` dir that points outside is refused, not written through
    out2 = tmp_path / "shards2"
    out2.mkdir()
    os.symlink(outside, out2 / "subsets")
    with pytest.raises(UserError, match="outside the output dir"):
        write_shards("cifar10", out2, input_dir=raw, shard_size=8, workers=1)
    assert sorted(p.name for p in outside.iterdir()) == ["victim.tar"]


class _Evil:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def _bad_inputs(tmp: Path) -> list[tuple[list[str], str]]:
    (tmp / "empty").mkdir()
    (tmp / "empty" / "cat").mkdir()
    (tmp / "empty" / "cat" / "readme.txt").write_text("no images here")
    (tmp / "cifar").mkdir()
    (tmp / "cifar" / "readme.txt").write_text("no batches")
    (tmp / "afile").write_text("x")
    (tmp / "stl").mkdir()
    write_cifar10(tmp / "badpickle", n_train=5, n_test=2)
    (tmp / "badpickle" / "data_batch_3").write_bytes(b"\x80\x02garbage")
    write_cifar10(tmp / "evil", n_train=5, n_test=2)
    with open(tmp / "evil" / "test_batch", "wb") as f:  # a pickle that would run code when loaded
        pickle.dump(_Evil(str(tmp / "pwned")), f, protocol=2)
    write_stl10(tmp / "badstl", n_train=2, n_test=2, n_unlabeled=0)
    with open(tmp / "badstl" / "test_X.bin", "ab") as f:
        f.write(b"xyz")
    out = str(tmp / "out")
    return [
        (["folder", "--input", str(tmp / "missing"), "--out", out], "input dir not found"),
        (["folder", "--input", str(tmp / "empty"), "--out", out], "no images"),
        (["cifar10", "--input", str(tmp / "cifar"), "--out", out], "no cifar10 batch files"),
        (["cifar100", "--input", str(tmp / "cifar"), "--out", out], "no cifar100 batch files"),
        (["stl10", "--input", str(tmp / "stl"), "--out", out], "no STL-10 binaries"),
        (["imagenet", "--out", out], "unknown source 'imagenet'"),
        (["cifar10", "--out", out], "needs --input"),
        (["digits", "--out", str(tmp / "afile")], "is an existing file"),
        (["digits", "--out", out, "--labeled-fractions", "0"], "must be in (0, 1]"),
        (["digits", "--out", out, "--labeled-fractions", "0.1,1.5"], "must be in (0, 1]"),
        (["digits", "--out", out, "--labeled-fractions", "ten"], "not a number"),
        (["digits", "--out", out, "--shard-size", "0"], "--shard-size"),
        (["digits", "--out", out, "--image-size", "4"], "--image-size"),
        (["folder", "--input", str(tmp / "empty"), "--out", out, "--test-fraction", "1.5"], "--test-fraction"),
        (["digits", "--out", out, "--workers", "0"], "--workers"),
        (["digits", "--out", str(tmp / "afile" / "sub")], "cannot create --out"),
        (["cifar10", "--input", str(tmp / "badpickle"), "--out", out], "not a readable CIFAR batch"),
        (["cifar10", "--input", str(tmp / "evil"), "--out", out], "refusing to load posix.mkdir"),
        (["stl10", "--input", str(tmp / "badstl"), "--out", out], "not a multiple of 96*96*3"),
    ]


def test_bad_input_is_one_line_and_non_zero(tmp_path, capsys):
    for argv, needle in _bad_inputs(tmp_path):
        code = selfsup(["shard", *argv])
        err = capsys.readouterr().err
        assert code != 0, argv
        assert err.count("\n") == 1 and needle in err and "Traceback" not in err, (argv, err)
    assert not (tmp_path / "out").exists(), "bad input must not leave an output dir behind"
    assert not (tmp_path / "pwned").exists(), "a CIFAR pickle must never run code"


def test_console_script_reports_one_line(tmp_path):
    exe = Path(sys.executable).with_name("selfsup")
    r = subprocess.run([str(exe), "shard", "cifar10", "--input", str(tmp_path / "nope"), "--out",
                        str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "input dir not found" in r.stderr
