"""Reliability, second round (issue 17): one run per directory, names that are not paths, full disks, odd
images, broken configs, Ctrl-C. Everything goes through the real CLI or the real stage functions, on real
files; refused runs must leave every existing file byte for byte as it was.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from datafiles import write_cifar10, write_finished_looking_run, write_image_folder  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.timm_kwargs={channels: [8, 16, 32, 64]}", "model.stem=default", "model.proj_hidden_dim=64",
        "model.proj_output_dim=32", "pretrain.global_batch_size=64", "optim.warmup_epochs=1", "wandb.enabled=false",
        "trainer.torch_threads=1", "pretrain.knn_every=0"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_USAGE_STATS_ENABLED="0", WANDB_MODE="offline")
    return env


def selfsup(argv: list[str], timeout: float = 180, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster", *map(str, argv)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=_env(), **kw)


def _hashes(root: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def one_error_line(r: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, f"{len(lines)} lines on stderr:\n{r.stderr[-3000:]}"
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


def _chattr(path: Path, flag: str) -> bool:
    return shutil.which("chattr") is not None and subprocess.run(
        ["chattr", flag, str(path)], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Real digits shards, a finished-looking run dir, broken config files, an immutable finished dir."""
    from shards.writer import write_shards

    root = tmp_path_factory.mktemp("adv")
    write_shards("digits", root / "shards", labeled_fractions=[0.1], progress=False, workers=1)
    existing = write_finished_looking_run(root / "existing")
    (root / "dup.yaml").write_text("pretrain:\n  epochs: 3\noptim:\n  base_lr: 0.1\npretrain:\n  batch_size: 64\n")
    (root / "latin1.yaml").write_bytes("name: caf\xe9\npretrain:\n  epochs: 1\n".encode("latin-1"))
    (root / "inf.yaml").write_text("pretrain:\n  temperature: .inf\n")
    # two classes of two images, and one of a single image each: refused by `selfsup shard` (see the rows)
    for c in ("a", "b", "c"):
        (root / "singles" / c).mkdir(parents=True)
        Image.new("RGB", (12, 12), (10, 20, 30)).save(root / "singles" / c / "x.png")
    for c in ("a", "b", "c"):
        for i in range(2):
            (root / "pairs" / c).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (12, 12), (10 * i, 20, 30)).save(root / "pairs" / c / f"{i}.png")
    ro = root / "ro-finished"
    ro.mkdir()
    (ro / "report.json").write_text('{"results": []}')
    immutable = _chattr(ro, "+i")
    try:
        yield {"root": root, "shards": root / "shards", "existing": existing, "ro": ro, "immutable": immutable}
    finally:
        if immutable:
            _chattr(ro, "-i")


def _rows():
    """(id, argv with {placeholders}, a piece of the expected one-line message)."""
    s = "data.shards={shards}"
    out = "output_dir={existing}"
    return [
        # 2: `name` is a path segment (checkpoints under <storage>/<name>, the superseded move): a slug only
        ("name-escapes", ["pipeline", out, s, "name=../../escaped"], "name '../../escaped' is not a plain name"),
        ("name-dotdot-force", ["pipeline", out, s, "name=..", "--force", "pretrain"], "name '..' is not a plain"),
        ("name-slash-pretrain", ["pretrain", "--local", "output_dir={root}/n", s, "name=a/b", *TINY], "name 'a/b'"),
        # 6: one image_size bound, checked when the config loads
        ("image-size-3-pipeline", ["pipeline", out, s, "data.image_size=3"], "data.image_size must be at least 8"),
        ("image-size-3-pretrain", ["pretrain", "--local", "output_dir={root}/i3", s, "data.image_size=3", *TINY,
                                   "pretrain.epochs=1"], "data.image_size must be at least 8"),
        # 14: non-finite numbers anywhere
        ("nan-lr", ["pipeline", out, s, "optim.base_lr=.nan"], "optim.base_lr must be a finite number"),
        ("nan-lr-text", ["pipeline", out, s, "optim.base_lr=nan"], "optim.base_lr must be a finite number"),
        ("inf-in-file", ["pipeline", "--config", "{root}/inf.yaml", out, s], "pretrain.temperature must be a finite"),
        ("nan-in-timm-kwargs", ["pipeline", out, s, "model.timm_kwargs={drop_rate: .nan}"],
         "model.timm_kwargs.drop_rate must be a finite number"),
        ("nan-in-list", ["pipeline", out, s, "finetune.fractions=[.nan]"], "finetune.fractions[0] must be a finite"),
        # 7, 8: the config file itself
        ("duplicate-yaml-key", ["pipeline", "--config", "{root}/dup.yaml", out, s],
         "duplicate key 'pretrain' on lines 1 and 5"),
        ("non-utf8-config", ["pipeline", "--config", "{root}/latin1.yaml", out, s], "is not UTF-8 text"),
        # 9: splits that cannot be made
        ("shard-empty-test-split", ["shard", "folder", "--input", "{root}/singles", "--out", "{root}/s-singles"],
         "test split"),
        ("shard-fraction-below-one-per-class", ["shard", "folder", "--input", "{root}/pairs", "--out",
                                                "{root}/s-pairs", "--labeled-fractions", "0.5"],
         "cannot be smaller than one image per class"),
        # 12: an existing output_dir that cannot be written, refused before any work
        ("finetune-immutable-dir", ["finetune", "output_dir={ro}", s, "finetune.methods=[pixels]"],
         "output_dir {ro} is not writable"),
    ]


def _id(row) -> str:
    return row[0]


def _fill(text: str, values: dict[str, str]) -> str:
    for k, v in values.items():
        text = text.replace("{" + k + "}", v)
    return text


@pytest.mark.parametrize("name,argv,expected", _rows(), ids=[_id(r) for r in _rows()])
def test_refused_in_one_line_changing_nothing(ws, name, argv, expected):
    if name == "finetune-immutable-dir" and not ws["immutable"]:
        pytest.skip("chattr +i unavailable here (tests run as root, which can write anywhere else)")
    values = {k: str(v) for k, v in ws.items()}
    argv = [_fill(a, values) for a in argv]
    before = _hashes(ws["root"])
    r = selfsup(argv)
    assert r.returncode != 0, f"exit 0 for {argv}: {r.stdout[-1000:]}"
    line = one_error_line(r)
    assert _fill(expected, values) in line, line
    changed = [p for p, h in before.items() if _hashes(ws["root"]).get(p) != h]
    assert not changed, f"existing files changed or removed: {changed}"
    assert not (ws["root"].parent / "escaped").exists()


# ---------------------------------------------------------------- 1: one run per directory


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_held_lock_refuses_in_one_line_and_a_stale_one_is_taken_over(tmp_path):
    from runtime.runlock import LOCK_FILE, run_lock

    out = tmp_path / "shards"
    out.mkdir()
    with run_lock(out, "a test holding it"):
        t = time.monotonic()
        r = selfsup(["shard", "digits", "--out", out])
        line = one_error_line(r)
        assert r.returncode == 2 and time.monotonic() - t < 60
        assert f"pid {os.getpid()}" in line and "in use by another run" in line, line
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing written beside the lock
    assert not (out / LOCK_FILE).exists()
    # a lock left by a killed run (its pid gone): taken over with a warning, the run goes on
    dead = _dead_pid()
    (out / LOCK_FILE).write_text(json.dumps({"pid": dead, "host": os.uname().nodename, "started": time.time(),
                                             "command": "selfsup shard digits"}) + "\n")
    r = selfsup(["shard", "digits", "--out", out])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "warning: taking over the stale lock" in r.stderr and f"pid {dead}" in r.stderr, r.stderr
    assert json.loads((out / "manifest.json").read_text())["complete"] is True
    assert not (out / LOCK_FILE).exists()


def test_the_lock_of_a_killed_run_is_stale(big_cifar, tmp_path):
    from runtime.runlock import LOCK_FILE

    out = tmp_path / "s"
    argv = ["shard", "cifar10", "--input", str(big_cifar), "--out", str(out), "--shard-size", "200", "--workers", "1"]
    p = subprocess.Popen([sys.executable, "-m", "cluster", *argv], cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(out.glob("train-*.tar")):
        assert p.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    p.kill()  # SIGKILL: no cleanup runs, the lock file stays behind
    p.wait()
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == p.pid
    r = selfsup(argv, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "warning: taking over the stale lock" in r.stderr and f"pid {p.pid}" in r.stderr, r.stderr
    assert json.loads((out / "manifest.json").read_text())["splits"]["train"]["count"] == 6000
    assert not (out / LOCK_FILE).exists()


@pytest.mark.slow
def test_two_pipelines_on_one_output_dir(tmp_path):
    run = tmp_path / "run"
    argv = ["pipeline", "--local", f"output_dir={run}", f"data.shards={run}/shards", *TINY, "pretrain.epochs=2",
            "finetune.methods=[pixels,linear]", "finetune.full_fraction_methods=[]", "finetune.num_seeds=1",
            "data.labeled_fractions=[0.1]"]
    first = subprocess.Popen([sys.executable, "-m", "cluster", *argv], cwd=ROOT, env=_env(), text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (run / ".selfsup.lock").exists():
            assert first.poll() is None and time.monotonic() < deadline, "the first pipeline never took its lock"
            time.sleep(0.05)
        t = time.monotonic()
        second = selfsup(argv, timeout=120)
        took = time.monotonic() - t
        out, err = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
    line = one_error_line(second)
    assert second.returncode == 2 and f"pid {first.pid}" in line and "in use by another run" in line, line
    assert took < 60, f"the second run took {took:.0f} s to refuse"
    assert first.returncode == 0, err[-3000:]
    epochs = [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]
    assert json.loads((run / "shards" / "manifest.json").read_text())["complete"] is True
    report = json.loads((run / "report.json").read_text())
    assert {r["method"] for r in report["results"]} == {"pixels", "linear"}
    assert not (run / ".selfsup.lock").exists() and not list(run.rglob("*.tmp"))
    # 13: with the usual umask, what the run keeps is readable by others, like any file the user writes
    umask = os.umask(0o022)
    os.umask(umask)
    for rel in ("shards/manifest.json", "shards/subsets/labeled-0.1-seed0.txt", "config.yaml", "encoder.json",
                "encoder.safetensors", "report.json", "pipeline.config.yaml", "pipeline.json"):
        assert (run / rel).stat().st_mode & 0o777 == 0o666 & ~umask, rel
    for f in (run / "classifiers").rglob("*"):
        if f.is_file():
            assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f


# ---------------------------------------------------------------- 13: file modes follow the umask


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_kept_files_follow_the_umask(tmp_path, umask):
    from runtime.config import atomic_write_text
    from shards.writer import write_shards

    old = os.umask(umask)
    try:
        write_shards("digits", tmp_path / "s", labeled_fractions=[0.1], workers=1, progress=False)
        atomic_write_text(tmp_path / "x.json", "{}")
    finally:
        os.umask(old)
    for p in [tmp_path / "x.json", *(tmp_path / "s").rglob("*")]:
        want = (0o777 if p.is_dir() else 0o666) & ~umask
        assert p.stat().st_mode & 0o777 == want, f"{p}: {oct(p.stat().st_mode & 0o777)} != {oct(want)}"


# ---------------------------------------------------------------- 4: 16-bit PNGs, EXIF orientation


def _exif_rotated_jpeg(path: Path, upright: np.ndarray) -> None:
    """A JPEG whose pixels are stored turned (landscape) with EXIF Orientation 6: upright it is `upright`."""
    stored = np.rot90(upright, k=1)  # orientation 6 means: rotate 90 degrees clockwise to display
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.ascontiguousarray(stored)).save(path, format="JPEG", quality=98, exif=exif)


def _upright() -> np.ndarray:
    """Portrait 24 wide x 48 high: white top half, black bottom half."""
    a = np.zeros((48, 24, 3), np.uint8)
    a[:24] = 255
    return a


def _shard_images(shards: Path) -> dict[str, list[np.ndarray]]:
    """label -> decoded images, read straight from the tar files."""
    m = json.loads((shards / "manifest.json").read_text())
    out: dict[str, list[np.ndarray]] = {}
    for split in m["splits"].values():
        for rel in split["shards"]:
            with tarfile.open(shards / rel) as tf:
                members = {mm.name: tf.extractfile(mm).read() for mm in tf.getmembers()}
            for name, data in members.items():
                key, ext = name.split(".", 1)
                if ext in ("png", "jpg", "webp"):
                    label = m["classes"][int(members[f"{key}.cls"])]
                    out.setdefault(label, []).append(np.asarray(Image.open(io.BytesIO(data))))
    return out


def test_16bit_png_scaled_and_exif_upright_in_shard_and_predict(tmp_path):
    from finetune.predict import load_image
    from shards.writer import write_shards

    raw = tmp_path / "raw"
    for c in ("grey16", "portrait"):
        (raw / c).mkdir(parents=True)
    for i in range(4):
        Image.fromarray(np.full((20, 20), 127 * 257, np.uint16)).save(raw / "grey16" / f"{i}.png")
        _exif_rotated_jpeg(raw / "portrait" / f"{i}.jpg", _upright())
    assert Image.open(raw / "grey16" / "0.png").mode.startswith("I")
    write_shards("folder", tmp_path / "s", input_dir=raw, labeled_fractions=[0.5], workers=1, progress=False)
    imgs = _shard_images(tmp_path / "s")
    for a in imgs["grey16"]:
        assert abs(float(a.mean()) - 127) < 1.5, a.mean()  # not clipped to white
    for a in imgs["portrait"]:
        assert a.shape[:2] == (48, 24)  # upright: portrait, white on top
        assert a[:20].mean() > 200 and a[28:].mean() < 50
    # predict decodes the same way
    grey = load_image(raw / "grey16" / "0.png", 16, 1)
    assert abs(float(grey.float().mean()) - 127) < 1.5
    x = load_image(raw / "portrait" / "0.jpg", 24, 3).float()  # 24 x 48 upright -> centre 24 x 24 crop
    Image.fromarray(_upright()).save(tmp_path / "upright.png")
    ref = load_image(tmp_path / "upright.png", 24, 3).float()
    assert (x - ref).abs().mean() < 6, "predict must see the image upright, as sharding stored it"


# ---------------------------------------------------------------- 5: symlink loops


def test_symlink_loop_is_not_a_class(tmp_path):
    raw = tmp_path / "raw"
    write_image_folder(raw, classes=("cat", "dog"), per_class=4, with_unlabeled=False)
    (raw / "loop").symlink_to(raw, target_is_directory=True)
    (raw / "cat" / "back").symlink_to(raw / "dog", target_is_directory=True)  # nested: os.walk does not follow
    r = selfsup(["shard", "folder", "--input", raw, "--out", tmp_path / "s", "--labeled-fractions", "0.5"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "warning: not following" in r.stderr and str(raw / "loop") in r.stderr, r.stderr
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert m["classes"] == ["cat", "dog"]
    assert m["splits"]["train"]["count"] + m["splits"]["test"]["count"] == 8


# ---------------------------------------------------------------- 11: predict on a decompression bomb


def _png_header_only(path: Path, w: int, h: int) -> None:
    """A PNG whose header claims w x h pixels (no image data): Pillow refuses it as a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def test_predict_reports_a_decompression_bomb_in_one_line_and_predicts_the_rest(tmp_path):
    import torch

    from finetune.classifier import build_classifier
    from finetune.predict import save_classifier

    arch = {"model": "resnet18", "timm_kwargs": {"channels": [8, 16, 32, 64]}, "in_chans": 1, "stem": "default",
            "num_features": 64, "head": {"hidden_dim": 64, "output_dim": 32, "num_layers": 2},
            "start_from": "backbone", "num_classes": 2}
    torch.manual_seed(0)
    state = build_classifier(arch).state_dict()
    manifest = {"image_size": 16, "channels": 1, "mean": [0.5], "std": [0.25]}
    model = save_classifier(tmp_path / "clf", state, arch, ["a", "b"], manifest, method="finetune", fraction=0.1,
                            seed=0, accuracy=0.5, test_keys=[], test_labels=np.array([]), test_pred=np.array([]))
    good = []
    for i in range(2):
        good.append(tmp_path / f"ok{i}.png")
        Image.new("L", (20, 20), 60 * i).save(good[-1])
    bomb = tmp_path / "bomb.png"
    _png_header_only(bomb, 20000, 10000)  # 200 megapixels claimed
    r = selfsup(["predict", model, good[0], bomb, good[1]])
    line = one_error_line(r)
    assert r.returncode == 2 and str(bomb) in line, line
    printed = [x.split("\t") for x in r.stdout.strip().splitlines()]
    # path, class, probability per readable image
    assert [x[0] for x in printed] == [str(g) for g in good] and all(x[1] in ("a", "b") for x in printed)


# ---------------------------------------------------------------- 10: Ctrl-C during `selfsup shard`


@pytest.fixture(scope="module")
def big_cifar(tmp_path_factory) -> Path:
    raw = tmp_path_factory.mktemp("bigcifar")
    write_cifar10(raw, n_train=6000, n_test=100)  # above the pool threshold: --workers 2 runs a real pool
    return raw


def _terminal_sigint() -> None:
    """In the child: Ctrl-C's default action, as in a terminal's foreground. A suite started with `&` from a
    non-interactive shell hands its children SIGINT ignored, and Python keeps it ignored (POSIX's rule for
    background jobs), so without this the shard would run on through the Ctrl-C and exit 0."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_ctrl_c_during_shard_is_one_line_and_exit_130(big_cifar, tmp_path, workers):
    out = tmp_path / "s"
    p = subprocess.Popen([sys.executable, "-m", "cluster", "shard", "cifar10", "--input", str(big_cifar), "--out",
                          str(out), "--shard-size", "200", "--workers", str(workers)], cwd=ROOT, env=_env(),
                         text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                         preexec_fn=_terminal_sigint)
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("train-*.tar")):  # mid-run: one shard done, others being written
            assert p.poll() is None and time.monotonic() < deadline, p.stderr.read() if p.poll() is not None else ""
            time.sleep(0.02)
        os.killpg(p.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 130, err[-3000:]
    assert err.strip() == "error: interrupted; rerun to continue", err[-3000:]
    assert not [x for x in out.iterdir() if x.name.endswith(".tmp")]
    r = selfsup(["shard", "cifar10", "--input", big_cifar, "--out", out, "--shard-size", "200", "--workers",
                 workers], timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((out / "manifest.json").read_text())["splits"]["train"]["count"] == 6000


# ---------------------------------------------------------------- 3: a full disk


@pytest.fixture
def small_fs(tmp_path):
    """A 1.5 MB tmpfs (root only); skipped where it cannot be mounted."""
    d = tmp_path / "small"
    d.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1536k", "tmpfs", str(d)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)


def test_shard_onto_a_full_disk_is_one_line_without_temp_files(small_fs, tmp_path):
    raw = tmp_path / "raw"
    write_cifar10(raw, n_train=1500, n_test=100)  # ~5 MB of shards
    for workers in (1, 2):
        out = small_fs / f"s{workers}"
        r = selfsup(["shard", "cifar10", "--input", raw, "--out", out, "--shard-size", "200", "--workers", workers])
        line = one_error_line(r)
        assert r.returncode == 2 and "no space left on the device" in line and str(out) in line, line
        assert "MB needed" in line and "free there" in line, line
        assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
        shutil.rmtree(out)


@pytest.mark.slow
def test_resume_on_a_full_disk_keeps_the_finished_encoder(tmp_path, ws):
    run = tmp_path / "run"
    r = selfsup(["pretrain", "--local", f"output_dir={run}", f"data.shards={ws['shards']}", *TINY,
                 "pretrain.epochs=1"], timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    used = sum(p.stat().st_size for p in run.rglob("*") if p.is_file())
    small = tmp_path / "small"
    small.mkdir()
    # room for the finished run and a little more, not for another checkpoint
    size_k = (used + 512 * 1024) // 1024
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_k}k", "tmpfs", str(small)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        shutil.copytree(run, small / "run")
        finished = {n: (small / "run" / n).read_bytes() for n in ("encoder.json", "encoder.safetensors",
                                                                   "head.safetensors")}
        r = selfsup(["pretrain", "--local", "--resume", small / "run", "pretrain.epochs=3"], timeout=400)
        assert r.returncode == 2
        err = [x for x in r.stderr.strip().splitlines() if not x.startswith("[pretrain]")]
        assert len(err) == 1 and "no space left on the device" in err[0] and "needed" in err[0], r.stderr[-3000:]
        assert "Traceback" not in r.stderr
        for n, data in finished.items():
            assert (small / "run" / n).read_bytes() == data, f"{n} of the finished run was changed or removed"
        assert not [p for p in (small / "run").rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".tmp")]
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


# ---------------------------------------------------------------- 9: no verdict on a handful of test images


def test_no_2std_verdict_on_two_test_images():
    from cluster.pipeline import format_summary, headline
    from finetune.report import build_report, result_row

    rows = [result_row("semi", 0.1, 3, [1.0, 1.0, 1.0], 1.0), result_row("pixels", 0.1, 3, [0.5, 0.5, 0.5], 1.0),
            result_row("scratch", 0.1, 3, [0.0, 0.0, 0.0], 1.0)]
    tiny = build_report("folder", None, rows, test_samples=2)
    assert tiny["comparisons"][0]["beats_all_baselines_by_2std"] is False
    assert tiny["comparisons"][0]["too_few_test_samples"] is True
    assert build_report("folder", None, rows, test_samples=300)["comparisons"][0]["beats_all_baselines_by_2std"]
    s = {"report": "r", "report_json": "j", "plot": "p", "encoder": "e", "wandb_group": "g",
         "headline": headline(tiny["results"]), "test_samples": 2}
    text = format_summary(s)
    assert "more than 2 std" not in text and "too few test images (2)" in text, text


def test_an_empty_test_split_made_earlier_says_what_to_do(tmp_path):
    """Shards from before `selfsup shard` refused empty splits: rerunning it as it was cannot help, so the
    message says what can."""
    from shardkit import make_shards

    from runtime.errors import UserError
    from shards.splits import load_split

    make_shards(tmp_path / "s", {"train": 8, "test": 0}, num_classes=8)
    with pytest.raises(UserError, match="holds no images .* at least 2 images per class"):
        load_split(str(tmp_path / "s"), "test")
