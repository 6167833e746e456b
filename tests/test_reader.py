"""The shard reader on real tar shards: equal batches per rank, coverage, seeded shuffling, corrupt data."""

import io
import json
import shutil
import tarfile
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from PIL import Image
from shardkit import encode, image_for, keys_of, make_shards, write_manifest, write_raw_tar

from runtime.errors import UserError
from shards.reader import ShardLoader
from shards.splits import load_split

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    """100 train samples in 15 shards of 7 (the last holds 2): divisible by neither 2 nor 3 ranks."""
    d = tmp_path_factory.mktemp("uneven")
    make_shards(d, {"train": 100, "test": 20}, shard_size=7, image_size=8)
    return d


def read_ranks(d, world_size, epoch=1, **kw):
    """Every rank's batches of one epoch, as each rank would read them in its own process."""
    out = []
    for rank in range(world_size):
        loader = ShardLoader(d, splits="train", rank=rank, world_size=world_size, **kw)
        loader.set_epoch(epoch)
        out.append((len(loader), list(loader), loader))
    return out


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_every_rank_yields_the_same_full_batches_and_together_they_cover_the_split(uneven, world_size, num_workers):
    ranks = read_ranks(uneven, world_size, batch_size=8, num_workers=num_workers, seed=3)
    lengths = {n for n, _, _ in ranks}
    assert len(lengths) == 1, f"ranks disagree on len(loader): {lengths}"
    seen = []
    for n, batches, loader in ranks:
        assert len(batches) == n  # exactly len(loader) batches: no rank waits on the others' collectives
        for images, labels in batches:
            assert images.shape == (8, 3, 8, 8) and images.dtype == torch.uint8
            assert labels.dtype == torch.int64
            keys = keys_of(images)
            assert labels.tolist() == [int(k.split("-")[1]) % 4 for k in keys]  # labels travel with images
            seen += keys
        assert loader.skipped == 0
    assert set(seen) == {f"train-{i:08d}" for i in range(100)}
    # the ranks' parts differ by at most one sample, so resampling stays small (< one batch per worker)
    assert len(seen) - 100 < world_size * 8 * max(1, num_workers)


@pytest.mark.parametrize("world_size,num_workers,count", [(2, 2, 10), (3, 2, 2)])
def test_fewer_shards_than_ranks_times_workers(tmp_path, world_size, num_workers, count):
    make_shards(tmp_path, {"train": count, "test": 1}, shard_size=100, image_size=8)  # one shard
    ranks = read_ranks(tmp_path, world_size, batch_size=4, num_workers=num_workers)
    assert len({n for n, _, _ in ranks}) == 1
    assert all(len(batches) == n and n > 0 for n, batches, _ in ranks)
    seen = {k for _, batches, _ in ranks for images, _ in batches for k in keys_of(images)}
    assert seen == {f"train-{i:08d}" for i in range(count)}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_evaluation_mode_yields_each_sample_exactly_once(uneven, num_workers):
    ranks = read_ranks(uneven, 3, batch_size=8, num_workers=num_workers, shuffle=False, equal_batches=False)
    keys = [k for _, batches, _ in ranks for images, _ in batches for k in keys_of(images)]
    assert sorted(keys) == [f"train-{i:08d}" for i in range(100)]
    assert sum(len(b) for _, b, _ in ranks) == sum(n for n, _, _ in ranks)


def test_shuffle_is_seeded_per_epoch(uneven):
    def order(seed, epoch, num_workers=0):
        loader = ShardLoader(uneven, splits="train", batch_size=10, seed=seed, num_workers=num_workers,
                             shuffle_buffer=20)
        loader.set_epoch(epoch)
        return [k for images, _ in loader for k in keys_of(images)]

    a = order(0, 0)
    assert a == order(0, 0)
    assert a != order(0, 1)
    assert a != order(1, 0)
    assert sorted(a) != a  # shuffled, not shard order
    with_workers = order(0, 2, num_workers=2)
    assert with_workers == order(0, 2, num_workers=2)
    # a second epoch over the same persistent worker processes follows set_epoch
    loader = ShardLoader(uneven, splits="train", batch_size=10, num_workers=2)
    epochs = []
    for epoch in (0, 1, 0):
        loader.set_epoch(epoch)
        epochs.append([k for images, _ in loader for k in keys_of(images)])
    assert epochs[0] == epochs[2] != epochs[1]


def _png(arr):
    return encode(arr)


def test_corrupt_and_hostile_samples_are_skipped_counted_and_the_epoch_finishes(tmp_path):
    rng = np.random.default_rng(0)
    good = [(f"train-{i:08d}", image_for("train", i, 8, 3, rng)) for i in range(12)]
    members = []
    for key, arr in good[:6]:
        members += [(f"{key}.png", _png(arr)), (f"{key}.cls", b"1")]
    rgba = Image.fromarray(image_for("train", 6, 8, 3, rng)).convert("RGBA")
    buf = io.BytesIO()
    rgba.save(buf, "PNG")
    bigger = image_for("train", 7, 12, 3, rng)  # another size: resized + centre-cropped to 8
    members += [
        ("train-00000006.png", buf.getvalue()), ("train-00000006.cls", b"2"),  # another mode: converted
        ("train-00000007.png", _png(bigger)), ("train-00000007.cls", b"3"),
        ("bad-garbage.png", b"this is not an image" * 5), ("bad-garbage.cls", b"0"),
        ("bad-empty.png", b""), ("bad-empty.cls", b"0"),
        ("bad-tiny.png", _png(np.zeros((1, 1, 3), np.uint8))), ("bad-tiny.cls", b"0"),
        ("bad-label.png", _png(good[0][1])), ("bad-label.cls", b"9"),  # only 4 classes
        ("bad-label2.png", _png(good[0][1])), ("bad-label2.cls", b"cat"),
        ("../../escape.png", _png(good[0][1])), ("../../escape.cls", b"0"),
        ("nested/../../up.png", _png(good[0][1])), ("nested/../../up.cls", b"0"),
        ("bad-noimage.cls", b"0"),
    ]
    write_raw_tar(tmp_path / "train-000000.tar", members)
    # the second shard is cut in the middle of its third image: its first two samples survive
    members2 = []
    for key, arr in good[8:12]:
        members2 += [(f"{key}.png", _png(arr)), (f"{key}.cls", b"0")]
    write_raw_tar(tmp_path / "train-000001.tar", members2)
    with tarfile.open(tmp_path / "train-000001.tar") as tar:
        fifth = tar.getmembers()[4]
    whole = (tmp_path / "train-000001.tar").read_bytes()
    (tmp_path / "train-000001.tar").write_bytes(whole[: fifth.offset_data + fifth.size // 2])
    manifest = {
        "version": 1, "complete": True, "source": "test", "classes": ["0", "1", "2", "3"], "image_size": 8,
        "channels": 3, "mean": [0.5] * 3, "std": [0.25] * 3, "seed": 0, "labeled_subsets": {},
        "splits": {"train": {"count": 20, "shards": ["train-000000.tar", "train-000001.tar"],
                             "shard_counts": [16, 4]},
                   "test": {"count": 0, "shards": [], "shard_counts": []}},
    }
    write_manifest(tmp_path, manifest)

    loader = ShardLoader(tmp_path, splits="train", batch_size=4, shuffle=False, equal_batches=False)
    batches = list(loader)
    labels = torch.cat([lab for _, lab in batches])
    assert labels.tolist().count(3) == 1  # the resized image: its pixels (and so its key marker) changed
    keys = [k for images, lab in batches for k, y in zip(keys_of(images), lab) if y != 3]
    assert sorted(keys) == [f"train-{i:08d}" for i in (0, 1, 2, 3, 4, 5, 6, 8, 9)]
    assert dict(loader.skip_reasons) == {
        "decode": 1, "empty": 1, "too_small": 1, "bad_label": 2, "bad_key": 2, "no_image": 1, "truncated_shard": 1,
    }
    assert loader.skipped == 9
    assert loader.fixed == {"mode": 1, "size": 1}
    assert not (tmp_path.parent.parent / "escape.png").exists()  # never extracted

    # training mode, 2 ranks x 2 workers: every rank still yields len(loader) full batches, and the counts
    # made in the worker processes reach the caller
    ranks = read_ranks(tmp_path, 2, batch_size=4, num_workers=2)
    assert len({n for n, _, _ in ranks}) == 1
    for n, batches, loader in ranks:
        assert len(batches) == n and all(len(images) == 4 for images, _ in batches)
        assert loader.skipped > 0
    assert sum(loader.skipped for _, _, loader in ranks) >= 9
    seen = {k for _, batches, _ in ranks for images, _ in batches for k in keys_of(images)}
    assert seen - {"?"} <= set(keys) | {"train-00000007"} and set(keys) <= seen

    images, labels, names = load_split(tmp_path, "train")
    assert len(images) == len(names) == 10 and images.shape[1:] == (3, 8, 8)


def test_a_shard_whose_middle_reads_as_zeros_is_counted_short_not_silently_shorter(tmp_path):
    """A tar with zeroed blocks (a hole in a file a copy or a crash left: reads as zeros) parses as a valid tar
    that ends early, with no error of its own. The reader counts the samples the manifest says are missing
    (`short_shard`), in every way a split is read, and keeps those before the hole."""
    from collections import Counter

    from shards.splits import iter_split

    make_shards(tmp_path, {"train": 12, "test": 2}, shard_size=6, image_size=8)
    first = tmp_path / "train-000000.tar"
    with tarfile.open(first) as tar:
        third = [m for m in tar.getmembers() if m.name.startswith("train-00000002")][0]
    raw = bytearray(first.read_bytes())
    raw[third.offset:third.offset + 1024] = bytes(1024)  # the third sample's header, and the block after, zeroed
    first.write_bytes(bytes(raw))

    skips: Counter = Counter()
    keys = [k for _, _, ks in iter_split(tmp_path, "train", batch_size=4, skips=skips) for k in ks]
    assert keys == [f"train-{i:08d}" for i in (0, 1, *range(6, 12))]
    assert skips == {"short_shard": 4}  # 6 in the manifest, 2 read
    loader = ShardLoader(tmp_path, splits="train", batch_size=4, shuffle=False, equal_batches=False)
    assert sorted(k for images, _ in loader for k in keys_of(images)) == keys
    assert loader.skip_reasons == {"short_shard": 4} and loader.skipped == 4
    # with a key filter (a labeled subset) every shard is still read through, and the damaged one counted
    skips.clear()
    assert [k for _, _, ks in iter_split(tmp_path, "train", keys=["train-00000007"], skips=skips) for k in ks] == [
        "train-00000007"]
    assert skips == {"short_shard": 4}


def test_grayscale_dataset_converts_colour_and_palette_images(tmp_path):
    rng = np.random.default_rng(1)
    rgb = image_for("train", 0, 8, 3, rng)
    palette = Image.fromarray(rgb).convert("P")
    buf = io.BytesIO()
    palette.save(buf, "PNG")
    gray = image_for("train", 2, 8, 1, rng)
    write_raw_tar(tmp_path / "train-000000.tar", [
        ("train-00000000.png", _png(rgb)), ("train-00000000.cls", b"0"),
        ("train-00000001.png", buf.getvalue()), ("train-00000001.cls", b"1"),
        ("train-00000002.png", _png(gray)), ("train-00000002.cls", b"2"),
    ])
    manifest = json.loads(json.dumps({
        "version": 1, "complete": True, "source": "test", "classes": ["0", "1", "2"], "image_size": 8,
        "channels": 1, "mean": [0.5], "std": [0.25], "seed": 0, "labeled_subsets": {},
        "splits": {"train": {"count": 3, "shards": ["train-000000.tar"], "shard_counts": [3]},
                   "test": {"count": 0, "shards": [], "shard_counts": []}},
    }))
    write_manifest(tmp_path, manifest)
    images, labels, names = load_split(tmp_path, "train")
    assert images.shape == (3, 1, 8, 8) and labels.tolist() == [0, 1, 2]
    expected = Image.fromarray(rgb).convert("L")  # PIL's luma, what the decoder's conversion matches
    assert (images[0, 0].int() - torch.from_numpy(np.array(expected)).int()).abs().max() <= 1
    assert torch.equal(images[2, 0], torch.from_numpy(gray[..., 0]))
    bigger, _, _ = load_split(tmp_path, "train", image_size=16)  # a training size other than the shards'
    assert bigger.shape == (3, 1, 16, 16) and bigger.dtype == torch.uint8


def test_an_empty_split_or_a_missing_dir_is_a_user_error(tmp_path):
    make_shards(tmp_path, {"train": 0, "test": 3}, image_size=8)
    with pytest.raises(UserError, match="no samples"):
        ShardLoader(tmp_path, splits=("train", "unlabeled"), batch_size=2)
    with pytest.raises(UserError, match="no readable samples"):
        load_split(tmp_path, "train")
    with pytest.raises(UserError, match="shards not found"):
        ShardLoader(tmp_path / "nowhere", batch_size=2)
    with pytest.raises(UserError, match="no samples"):
        ShardLoader(tmp_path, splits="test", batch_size=2, keys=["test-99999999"])
    # samples listed, none readable: one line, also from a loader worker process
    write_raw_tar(tmp_path / "test-000000.tar", [(f"test-{i:08d}.png", b"garbage") for i in range(3)])
    for workers in (0, 1):
        with pytest.raises(UserError, match="no readable samples") as e:
            list(ShardLoader(tmp_path, splits="test", batch_size=2, num_workers=workers))
        assert "\n" not in str(e.value)


def test_pipe_and_file_urls_and_keys(tmp_path):
    src = tmp_path / "src"
    manifest = make_shards(src, {"train": 30, "test": 5}, shard_size=8, image_size=8)
    d = tmp_path / "urls"
    d.mkdir()
    train = manifest["splits"]["train"]
    # shards named by URL in the manifest: a pipe, file://, and an fsspec filesystem (memory://, standing in
    # for s3:// and the other object stores webdataset's gopen does not know)
    memory = fsspec.filesystem("memory")
    memory.pipe("/shards/train-000000.tar", (src / train["shards"][0]).read_bytes())
    train["shards"] = [f"pipe:cat {src / s}" if i % 2 else f"file://{src / s}" for i, s in enumerate(train["shards"])]
    train["shards"][0] = "memory://shards/train-000000.tar"
    manifest["splits"]["test"]["shards"] = [f"pipe:cat {src / s}" for s in manifest["splits"]["test"]["shards"]]
    write_manifest(d, manifest)
    ranks = read_ranks(d, 2, batch_size=4, num_workers=0)
    seen = {k for _, batches, _ in ranks for images, _ in batches for k in keys_of(images)}
    assert seen == {f"train-{i:08d}" for i in range(30)}
    images, labels, names = load_split(d, "test")
    assert names == [f"test-{i:08d}" for i in range(5)] and keys_of(images) == names

    wanted = ["train-00000003", "train-00000017", "train-00000029"]
    images, labels, names = load_split(d, "train", keys=reversed(wanted))
    assert names == wanted and keys_of(images) == wanted and labels.tolist() == [3, 1, 1]
    ranks = read_ranks(d, 2, batch_size=2, keys=wanted)
    assert len({n for n, _, _ in ranks}) == 1
    assert {k for _, b, _ in ranks for images, _ in b for k in keys_of(images)} == set(wanted)
    shutil.rmtree(src)
    assert Path(d / "manifest.json").exists()
