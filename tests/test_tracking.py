"""W&B tracking: a real offline run, read back with wandb's own reader (`wandb leet inspect`)."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from runtime.config import Config
from runtime.tracking import (
    Tracker,
    init_tracking,
    read_run_history,
    read_run_records,
    resolve_mode,
    view_grid,
)

torch.set_num_threads(1)

FAKE_KEY = "local-" + "0123456789abcdef" * 2 + "deadbeef"  # shaped like a real key, valid nowhere


@pytest.fixture
def api_key_env(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setenv("WANDB_MODE", "offline")
    return FAKE_KEY


def test_offline_run_holds_metrics_images_and_artifact_but_no_key(tmp_path, api_key_env):
    cfg = Config()
    cfg.name = "trk"
    out = tmp_path / "run"
    tracker = init_tracking(cfg, "pretrain", out, rank=0)
    assert tracker.enabled and tracker.run_dir.is_dir() and tracker.run_dir.is_relative_to(out / "wandb")

    losses = [2.0, 1.5, 1.25]
    for step, loss in enumerate(losses):
        tracker.log({"train/loss": loss, "train/lr": 0.1 * (step + 1)}, step=step)
    tracker.log({"epoch": 1, "epoch/loss": 1.58, "epoch/knn_acc": 0.42}, step=3)
    v1, v2 = torch.randn(6, 1, 16, 16), torch.randn(6, 1, 16, 16)
    grid = view_grid(v1, v2, mean=[0.3], std=[0.2], n=4)
    tracker.log_images("views", grid, step=3)
    tracker.log_table("knn", ["epoch", "acc"], [[1, 0.42]], step=3)
    encoder = tmp_path / "encoder.json"
    encoder.write_text('{"model": "resnet18"}')
    tracker.log_artifact("trk encoder", "model", [encoder])
    tracker.finish()

    records = read_run_records(tracker.run_dir)
    history = [r["history"]["item"] for r in records if r["type"] == "history"]
    by_step = {row["_step"]: row for row in history}
    assert [by_step[s]["train/loss"] for s in range(3)] == losses
    assert by_step[2]["train/lr"] == pytest.approx(0.3)
    assert by_step[3]["epoch/knn_acc"] == pytest.approx(0.42) and by_step[3]["epoch"] == 1
    # the image: logged as a PNG file of exactly the grid's size, stored in the run
    assert by_step[3]["views._type"] == "image-file"
    png = tracker.run_dir / "files" / by_step[3]["views.path"]
    assert np.array_equal(np.asarray(Image.open(png).convert("RGB")), grid)

    run = next(r["run"] for r in records if r["type"] == "run")
    assert run["project"] == "selfsup" and run["run_group"] == "trk" and run["display_name"] == "trk-pretrain"
    config = run["config"]["update"]
    assert config["pretrain"]["epochs"] == cfg.pretrain.epochs  # the resolved config is the run's config
    assert any(r["type"] == "artifact" for r in records)
    assert next(r for r in records if r["type"] == "exit")["exit"].get("exit_code", 0) == 0

    # the key wandb could read from the environment is written nowhere under the output dir
    files = [p for p in out.rglob("*") if p.is_file()]
    assert files
    for p in files:
        assert FAKE_KEY.encode() not in p.read_bytes(), p


def test_non_zero_rank_and_disabled_get_a_noop(tmp_path, api_key_env):
    cfg = Config()
    t = init_tracking(cfg, "pretrain", tmp_path / "r1", rank=1)
    assert type(t) is Tracker and t.run_dir is None
    t.log({"x": 1}, step=0)
    t.log_images("v", np.zeros((4, 4, 3), np.uint8))
    t.finish()
    cfg.wandb.enabled = False
    assert type(init_tracking(cfg, "pretrain", tmp_path / "r0", rank=0)) is Tracker
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r0").exists()


def test_mode_resolution(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert resolve_mode(None) == "offline"  # nothing leaves the machine unless asked
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_mode(None) == "disabled"
    assert resolve_mode("online") == "online"  # the config wins over the environment


def test_view_grid_shows_denormalised_pairs():
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.2, 0.2]
    pixels1 = torch.rand(3, 3, 8, 8)
    pixels2 = torch.rand(3, 3, 8, 8)
    norm = lambda p: (p - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)  # noqa: E731
    grid = view_grid(norm(pixels1), norm(pixels2), mean, std, n=16, min_side=8)
    assert grid.dtype == np.uint8 and grid.ndim == 3 and grid.shape[2] == 3
    # 6 tiles of 8 px in one row with 2 px padding: 2 + 6 * 10 wide, 2 + 10 high
    assert grid.shape == (12, 62, 3)
    first = grid[2:10, 2:10].astype(int)  # the first tile is image 0's first view
    second = grid[2:10, 12:20].astype(int)  # next to it, its second view
    assert np.abs(first - (pixels1[0].permute(1, 2, 0).numpy() * 255)).max() <= 1
    assert np.abs(second - (pixels2[0].permute(1, 2, 0).numpy() * 255)).max() <= 1
    # tiny grayscale views are upscaled and come back as RGB
    g = view_grid(torch.zeros(2, 1, 16, 16), torch.zeros(2, 1, 16, 16), [0.1], [0.3], min_side=64)
    assert g.shape == (2 + 66, 2 + 4 * 66, 3)  # 64 px tiles + 2 px padding


def test_wandb_dir_is_under_output_dir_not_cwd(tmp_path, api_key_env, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = Config()
    t = init_tracking(cfg, "finetune", "out", rank=0)
    t.log({"acc": 0.5}, step=0)
    t.finish()
    assert read_run_history(t.run_dir)[0]["acc"] == 0.5
    assert Path(t.run_dir).is_relative_to((tmp_path / "out" / "wandb").resolve())
    assert not (tmp_path / "wandb").exists()
    assert os.path.isabs(t.run_dir)


@pytest.mark.slow
def test_a_pretrain_run_writes_and_prints_no_api_key(tmp_path):
    """Issue 7, security defaults: with WANDB_API_KEY set, a whole (tiny, local) `selfsup pretrain` run puts
    the key in no file it writes -- config, metrics, checkpoints, encoder, W&B run -- nor in its output."""
    import subprocess
    import sys

    from shardkit import make_shards

    make_shards(tmp_path / "shards", {"train": 48, "test": 16}, shard_size=16, image_size=8, channels=3)
    out = tmp_path / "run"
    env = {**os.environ, "WANDB_API_KEY": FAKE_KEY, "WANDB_MODE": "offline", "WANDB_SILENT": "false"}
    proc = subprocess.run(
        [sys.executable, "-m", "pretrain", "--local", f"output_dir={out}", f"data.shards={tmp_path / 'shards'}",
         "data.image_size=8", "pretrain.epochs=1", "pretrain.global_batch_size=16", "trainer.torch_threads=1",
         "model.timm_kwargs={channels: [8, 8, 16, 16]}", "model.proj_hidden_dim=16", "model.proj_output_dim=8"],
        capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "encoder.json").is_file() and (out / "config.yaml").is_file()
    assert read_run_history(next((out / "wandb").glob("offline-run-*")))  # the W&B run was really written
    assert FAKE_KEY not in proc.stdout + proc.stderr
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) > 10
    leaked = [p for p in files if FAKE_KEY.encode() in p.read_bytes()]
    assert not leaked, leaked


def _artifacts(records: list[dict]) -> list[dict]:
    return [r["artifact"] for r in records if r["type"] == "artifact"]


def test_artifact_files_travel_with_the_offline_run_directory(tmp_path, api_key_env, monkeypatch):
    """Issue 13: wandb stages artifact files under the user's home by default; here they stay in the run's own
    directory, so a copy of `<output_dir>/wandb` holds them after the original and the home staging are gone."""
    import hashlib
    import shutil

    home, real_home = tmp_path / "home", os.environ.get("HOME", "/root")
    monkeypatch.setenv("HOME", str(home))
    for var in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "XDG_DATA_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    cfg = Config()
    cfg.name = "trk"
    out = tmp_path / "run"
    weights = tmp_path / "encoder.safetensors"
    weights.write_bytes(os.urandom(4096))
    tracker = init_tracking(cfg, "pretrain", out, rank=0)
    tracker.log_artifact("trk-encoder", "model", [weights])
    tracker.finish()
    original = tracker.run_dir

    copy = tmp_path / "elsewhere" / "wandb"
    shutil.copytree(out / "wandb", copy)
    assert not [p for p in home.rglob("*") if p.is_file() and "artifacts" in p.parts]  # nothing staged at home
    shutil.rmtree(out)
    shutil.rmtree(home, ignore_errors=True)  # whatever wandb put in the home staging area is gone too
    weights.unlink()

    run_copy = copy / original.name
    monkeypatch.setenv("HOME", real_home)  # wandb's reader needs a home of its own
    (entry,) = _artifacts(read_run_records(run_copy))[0]["manifest"]["contents"]
    staged = Path(entry["local_path"])
    assert staged.is_relative_to(original)  # staged inside the run directory, not under $HOME
    data = (run_copy / staged.relative_to(original)).read_bytes()
    assert entry["path"] == "encoder.safetensors" and len(data) == 4096
    assert hashlib.md5(data).digest() == __import__("base64").b64decode(entry["digest"])
    assert os.environ.get("WANDB_DATA_DIR") is None  # set only while the artifact was made


def test_finetune_run_uses_the_encoder_artifact_and_saves_files(tmp_path, api_key_env):
    """Lineage: the fine-tuning run declares the encoder artifact (same name, type and files as pretraining
    logged) as its input; report.md is a file of the run."""
    cfg = Config()
    cfg.name = "trk"
    cfg.output_dir = str(tmp_path / "out")
    enc = tmp_path / "encoder.json"
    enc.write_text('{"model": "resnet18"}')
    report = tmp_path / "report.md"
    report.write_text("# report\n")
    t = init_tracking(cfg, "finetune", tmp_path / "out", rank=0)
    t.use_artifact("trk-encoder", "model", [enc])
    t.save_file(report)
    t.finish()
    records = read_run_records(t.run_dir)
    (used,) = [a for a in _artifacts(records) if a["name"] == "trk-encoder"]
    assert used["use_after_commit"] is True and used["type"] == "model"
    assert any(f["path"] == "report.md" for r in records if r["type"] == "files" for f in r["files"]["files"])
    assert (t.run_dir / "files" / "report.md").read_text() == "# report\n"
    run = next(r["run"] for r in records if r["type"] == "run")
    assert run["config"]["update"]["encoder"] == str((tmp_path / "out").resolve())  # not null


def test_console_and_system_metrics_follow_mode_and_config():
    from runtime.tracking import capture_settings

    cfg = Config()
    off = capture_settings(cfg, "offline")
    assert off.x_disable_stats and off.console == "off"
    on = capture_settings(cfg, "online")
    assert not on.x_disable_stats and on.console != "off"
    cfg.wandb.capture_offline = True
    asked = capture_settings(cfg, "offline")
    assert not asked.x_disable_stats and asked.console != "off"
