"""`selfsup pretrain` end to end on real digits shards: local mode, exact resume, interrupted checkpoint
writes, the non-finite guard, bad input; and under a real local Ray cluster with 2 CPU workers: uneven
shards, a worker killed by fault injection, and a worker killed from outside by its pid.

Tiny model (narrow ResNet-18, default stem: 16 px -> 4 px after the stem) so an epoch is a few seconds.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pretrain.cli import add_pretrain_args, pretrain_main
from runtime import checkpoint as ckpt
from runtime.errors import run_cli
from shards.reader import ShardLoader
from shards.writer import write_shards

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "model.timm_kwargs={channels: [8, 16, 32, 64]}",
    "model.stem=default",
    "model.proj_hidden_dim=64",
    "model.proj_output_dim=32",
    "pretrain.global_batch_size=64",
    "optim.warmup_epochs=1",
    "wandb.enabled=false",
    "trainer.torch_threads=1",
]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    # shard_size 500: 1437 train images -> 3 shards, which 2 workers cannot split evenly
    out = tmp_path_factory.mktemp("digits") / "shards"
    m = write_shards("digits", out, shard_size=500, workers=1)
    assert len(m["splits"]["train"]["shards"]) % 2 == 1
    return str(out)


def cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    add_pretrain_args(p)
    args = p.parse_args(argv)
    return run_cli(lambda: pretrain_main(args))


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_run_complete(run: Path, epochs: int) -> list[dict]:
    m = metrics(run)
    assert [r["epoch"] for r in m] == list(range(1, epochs + 1))  # every epoch exactly once, in order
    for r in m:
        for key in ("loss", "lr", "images_per_s", "data_wait_s", "skipped_samples", "nonfinite_steps"):
            assert key in r, key
        assert r["images_per_s"] > 0 and r["loss"] == r["loss"]
    assert "knn_acc" in m[-1] and 0.0 <= m[-1]["knn_acc"] <= 1.0
    for name in ("encoder.safetensors", "head.safetensors", "encoder.json", "config.yaml"):
        assert (run / name).is_file(), name
    meta = json.loads((run / "encoder.json").read_text())
    assert meta["epochs"] == epochs and meta["image_size"] == 16 and meta["in_chans"] == 1
    return m


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert "Traceback" not in err[0]
    return err[0]


# ------------------------------------------------------------------ local mode


def test_local_run_resume_is_exact_and_survives_interrupted_checkpoint(shards, tmp_path, capsys):
    common = [f"data.shards={shards}", *TINY, "pretrain.epochs=4", "pretrain.knn_every=2"]
    straight = tmp_path / "straight"
    assert cli(["--local", f"output_dir={straight}", *common, "wandb.enabled=true"]) == 0
    m = assert_run_complete(straight, 4)
    assert (straight / "wandb").is_dir() and [r for r in m if "knn_acc" in r][0]["epoch"] == 2
    steps_per_epoch = m[0]["step"]

    # the same run, killed hard a few steps into epoch 3 (after the epoch-2 checkpoint)...
    stopped = tmp_path / "stopped"
    kill = ["fault.kill_rank=0", f"fault.at_step={2 * steps_per_epoch + 3}"]
    proc = subprocess.run([sys.executable, "-m", "pretrain", "--local", f"output_dir={stopped}", *common, *kill],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and not (stopped / "encoder.json").exists(), proc.stderr[-2000:]
    assert [r["epoch"] for r in metrics(stopped)] == [1, 2]
    run_path = stopped / "ray" / "digits"
    assert ckpt.epoch_of(ckpt.find_latest(run_path)) == 2
    # ...and a crash while writing the epoch-3 checkpoint: a temp dir and a final-named dir without its JSON
    (run_path / ".tmp-checkpoint_epoch_000003-x").mkdir()
    (run_path / ".tmp-checkpoint_epoch_000003-x" / "model.safetensors").write_bytes(b"half")
    half = run_path / ckpt.checkpoint_dir_name(3)
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"half")
    assert ckpt.epoch_of(ckpt.find_latest(run_path)) == 2  # the previous checkpoint is the usable one

    assert cli(["--local", "--resume", str(stopped)]) == 0
    assert "taking over the stale lock" in capsys.readouterr().err  # the killed run's (issue 17)
    assert_run_complete(stopped, 4)
    events = [json.loads(x) for x in (stopped / "events.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "resume" and events[-1]["from_epoch"] == 2
    assert metrics(stopped)[2].get("resumed_from") == 2
    a, b = load_file(straight / "encoder.safetensors"), load_file(stopped / "encoder.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-5, msg=k)
    for x, y in zip(metrics(straight), metrics(stopped)):
        assert x["step"] == y["step"] and abs(x["loss"] - y["loss"]) < 1e-4

    # --resume with a larger budget continues the finished run: epoch 5 only, appended once
    assert cli(["--local", "--resume", str(stopped), "pretrain.epochs=5"]) == 0
    assert [r["epoch"] for r in metrics(stopped)] == [1, 2, 3, 4, 5]

    # a checkpoint from another architecture is refused in one line, before anything is written
    before = (stopped / "metrics.jsonl").read_text()
    assert cli(["--local", "--resume", str(stopped), "model.timm_kwargs={channels: [8, 16, 32, 32]}"]) == 2
    assert "does not match this run" in one_error_line(capsys)
    assert cli(["--local", "--resume", str(stopped), "pretrain.epochs=3"]) == 2  # fewer epochs than trained
    assert "set pretrain.epochs to 5 or more" in one_error_line(capsys)
    assert (stopped / "metrics.jsonl").read_text() == before
    # a fresh run into a dir that holds one is refused too (it would silently resume or clobber it)
    assert cli(["--local", f"output_dir={stopped}", *common]) == 2
    assert "--resume" in one_error_line(capsys)


def test_nonfinite_loss_is_skipped_counted_then_stops_keeping_last_checkpoint(shards, tmp_path, capsys):
    run = tmp_path / "nan"
    base = ["--local", f"output_dir={run}", f"data.shards={shards}", *TINY, "pretrain.knn_every=0"]
    spe = len(ShardLoader(shards, splits=("train", "unlabeled"), batch_size=64))  # steps per epoch, local
    # non-finite from the last step of epoch 1 on: epoch 1 skips 1 step and is checkpointed, epoch 2 stops
    rc = cli([*base, "pretrain.epochs=3", "pretrain.max_nonfinite=3", f"fault.nan_at_step={spe - 1}"])
    assert rc == 2
    line = one_error_line(capsys)
    assert "non-finite for 3 steps in a row" in line and "checkpoint_epoch_000001" in line
    m = metrics(run)
    assert [r["epoch"] for r in m] == [1] and m[0]["nonfinite_steps"] == 1
    latest = ckpt.find_latest(run / "ray" / "digits")
    assert ckpt.epoch_of(latest) == 1
    state = ckpt.load_checkpoint(latest)
    assert state["meta"]["nonfinite_total"] == 1
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    assert not (run / "encoder.json").exists()


def test_corrupt_sample_is_skipped_and_counted(shards, tmp_path, capsys):
    """A sample with garbage image bytes costs one sample, not the run; the count reaches metrics.jsonl."""
    import shutil
    import tarfile

    bad = tmp_path / "shards"
    shutil.copytree(shards, bad)
    first = bad / json.loads((bad / "manifest.json").read_text())["splits"]["train"]["shards"][0]
    with tarfile.open(first) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    victim = next(m.name for m, _ in members if m.name.endswith(".png"))
    with tarfile.open(first, "w") as tar:
        for m, data in members:
            if m.name == victim:
                data = b"not a png at all"
                m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    run = tmp_path / "run"
    assert cli(["--local", f"output_dir={run}", f"data.shards={bad}", *TINY, "pretrain.epochs=1"]) == 0
    skipped = metrics(run)[0]["skipped_samples"]
    assert skipped >= 1  # once, or again when the equal-batches wrap-around rereads it
    assert f"skipped samples {skipped}" in capsys.readouterr().out


def test_bad_input_is_one_line(shards, tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("keep")
    cases = [
        ([f"output_dir={a_file}"], "is a file"),
        (["pretrain.global_batch_size=5000"], "larger than the 1437 training images"),
        (["pretrain.global_batch_size=63", "trainer.num_workers=2"], "does not split evenly over 2 workers"),
        (["trainer.address=127.0.0.1:1"], "cannot reach Ray at 127.0.0.1:1"),
    ]
    for extra, message in cases:
        t = time.time()
        rc = cli([f"output_dir={tmp_path / 'out'}", f"data.shards={shards}", *TINY, *extra])
        assert rc == 2 and message in one_error_line(capsys), extra
        assert time.time() - t < 15
    assert a_file.read_text() == "keep"
    assert cli(["--resume", str(tmp_path / "missing")]) == 2
    assert "no such run directory" in one_error_line(capsys)


# ------------------------------------------------------------------ Ray Train, 2 CPU workers


@pytest.fixture(scope="module")
def ray_cluster(shards):
    """One private local cluster for the Ray tests (pretrain_main reuses a cluster this process started)."""
    import ray
    from ray._private.authentication.authentication_utils import is_token_auth_enabled

    from runtime.config import load_config
    from runtime.launch import init_ray

    assert init_ray(load_config(None, ["trainer.num_workers=2"]))
    try:
        # the security defaults: loopback only, token authentication on
        assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
        assert is_token_auth_enabled()
        yield
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_ray_two_workers_uneven_shards_survive_a_killed_worker(shards, ray_cluster, tmp_path):
    """2 workers over 3 shards; rank 1 exits hard early in epoch 2; the group restarts from the epoch-1
    checkpoint and finishes, with every epoch in metrics.jsonl once."""
    import ray
    from ray.util.state import list_actors

    run = tmp_path / "ray"
    argv = [f"output_dir={run}", f"data.shards={shards}", *TINY, "trainer.num_workers=2", "trainer.max_failures=1",
            "pretrain.epochs=2", "pretrain.knn_every=1", "fault.kill_rank=1", "fault.at_step=33"]
    ours = signal.getsignal(signal.SIGINT)
    assert cli(argv) == 0
    # Ray Train's SIGINT handler (abort this run's controller) does not outlive the run: a Ctrl-C in whatever
    # the driver does next reaches the driver, and the finished controller's process goes away
    assert signal.getsignal(signal.SIGINT) is ours
    def controllers() -> list:
        return list_actors(address=ray.get_runtime_context().gcs_address,
                           filters=[("class_name", "=", "TrainController"), ("state", "=", "ALIVE")])

    deadline = time.time() + 60
    while controllers() and time.time() < deadline:
        time.sleep(0.5)
    assert not controllers()
    m = assert_run_complete(run, 2)
    assert all("knn_acc" in r for r in m)
    assert (run / ".fault-injected").read_text().startswith("rank 1 killed at step 33")
    assert m[0]["step"] < 33  # the kill came after the epoch-1 checkpoint
    events = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines()]
    assert [e["from_epoch"] for e in events if e["event"] == "resume"] == [1]
    assert m[1].get("resumed_from") == 1
    assert ckpt.epoch_of(ckpt.find_latest(run / "ray" / "digits")) == 2


@pytest.mark.slow
def test_ray_worker_killed_from_outside_by_pid(shards, ray_cluster, tmp_path, monkeypatch):
    """Also: Train's controller polls the workers every `trainer.poll_interval_s` (it reads the interval from
    its environment), and the driver's own setting of that variable is back after the run."""
    import ray
    from ray.util.state import list_actors

    from bench.memory import _psutil

    run = tmp_path / "outside"
    argv = [f"output_dir={run}", f"data.shards={shards}", *TINY, "trainer.num_workers=2", "trainer.max_failures=1",
            "pretrain.epochs=2", "pretrain.knn_every=0", "trainer.poll_interval_s=0.25"]
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "7")
    result: dict = {}
    trainer = threading.Thread(target=lambda: result.update(rc=cli(argv)), daemon=True)
    trainer.start()
    deadline = time.time() + 240
    while ckpt.find_latest(run / "ray" / "digits") is None and time.time() < deadline:
        time.sleep(0.2)
    assert ckpt.find_latest(run / "ray" / "digits"), "epoch 1 never finished"
    ours = ray.get_runtime_context().gcs_address  # our cluster's actors, not a neighbour's
    actors = list_actors(address=ours, detail=True,
                         filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    controllers = list_actors(address=ours, detail=True,
                              filters=[("class_name", "=", "TrainController"), ("state", "=", "ALIVE")])
    assert len(actors) == 2 and len(controllers) == 1  # earlier runs' controllers are gone (their SIGINT handler too)
    assert _psutil().Process(controllers[0].pid).environ().get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S") == "0.25"
    os.kill(max(a.pid for a in actors), signal.SIGKILL)
    trainer.join(timeout=300)
    assert result.get("rc") == 0
    assert_run_complete(run, 2)
    events = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines()]
    assert [e["from_epoch"] for e in events if e["event"] == "resume"] == [1]
    assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "7"


@pytest.mark.slow
def test_ray_restarts_exhausted_is_one_line_naming_the_dead_worker(shards, ray_cluster, tmp_path, capsys):
    run = tmp_path / "exhausted"
    argv = [f"output_dir={run}", f"data.shards={shards}", *TINY, "trainer.num_workers=2", "trainer.max_failures=0",
            "pretrain.epochs=1", "fault.kill_rank=1", "fault.at_step=3"]
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()  # Ray streams the workers' logs to stderr too
    assert [x for x in err if x.startswith("error: ")] == err[-1:]
    assert "training failed after 0 restart(s): rank 1's worker process died" in err[-1]
    assert not (run / "encoder.json").exists()


def test_the_encoder_and_metrics_travel_in_the_checkpoint(shards, tmp_path):
    """Issue 12: what rank 0 produces is in its checkpoints (metrics.jsonl, events.jsonl, and the encoder in the
    last), which is how it reaches the driver from another node; a finished run checkpointed before that (no
    encoder inside) still gets its encoder back on --resume."""
    run = tmp_path / "travel"
    assert cli(["--local", f"output_dir={run}", f"data.shards={shards}", *TINY, "pretrain.epochs=1",
                "pretrain.knn_every=0"]) == 0
    last = Path(ckpt.find_latest(run / "ray" / "digits"))
    assert (last / "metrics.jsonl").read_text() == (run / "metrics.jsonl").read_text()
    for name in ("encoder.safetensors", "head.safetensors", "encoder.json"):
        assert (last / "encoder" / name).read_bytes() == (run / name).read_bytes()
    meta = json.loads((last / "checkpoint.json").read_text())
    assert {"encoder/encoder.json", "metrics.jsonl", "events.jsonl"} <= set(meta["files"])

    # the same checkpoint as an older version wrote it: model, state and scalars only
    shutil.rmtree(last / "encoder")
    for name in ("metrics.jsonl", "events.jsonl"):
        (last / name).unlink()
    meta["files"] = {k: v for k, v in meta["files"].items() if k in ("model.safetensors", "train_state.pt")}
    (last / "checkpoint.json").write_text(json.dumps(meta))
    before = load_file(run / "encoder.safetensors")
    assert cli(["--local", "--resume", str(run)]) == 0
    after = load_file(run / "encoder.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert [r["epoch"] for r in metrics(run)] == [1]


def test_max_steps_per_epoch_caps_every_epoch(shards, tmp_path):
    run = tmp_path / "capped"
    assert cli(["--local", f"output_dir={run}", f"data.shards={shards}", *TINY, "pretrain.epochs=2",
                "pretrain.knn_every=0", "pretrain.max_steps_per_epoch=3"]) == 0
    assert [r["step"] for r in metrics(run)] == [3, 6]  # uncapped: 23 steps of 64 per epoch
