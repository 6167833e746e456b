"""`selfsup submit` against a real Ray head started here (token authentication on), and Ray's own CLI."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from cluster import submit

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SECRET = "wandb-secret-" + uuid.uuid4().hex  # a fake W&B key: it must never be printed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pids_using(marker: str) -> list[int]:
    """Every process whose command line mentions `marker` (our head's temp dir), and all their descendants
    (workers rename themselves `ray::...`; job drivers are their children)."""
    cmd, parent = {}, {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd[int(d.name)] = (d / "cmdline").read_bytes().decode(errors="replace")
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    pids = {p for p, c in cmd.items() if marker in c}
    while True:
        more = {p for p, pp in parent.items() if pp in pids} - pids
        if not more:
            break
        pids |= more
    return sorted(pids - {os.getpid()})


def _kill_all(marker: str) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = _pids_using(marker)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while pids and _pids_using(marker) and time.monotonic() < deadline:
            time.sleep(0.3)


@pytest.fixture(scope="module")
def head():
    """A private Ray head on 127.0.0.1 with token auth; its processes are always killed afterwards."""
    temp = tempfile.mkdtemp(prefix="rayh", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    token = Path(temp) / "auth_token"
    token.write_text(uuid.uuid4().hex)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN_PATH": str(token), "RAY_USAGE_STATS_ENABLED": "0", "WANDB_MODE": "offline"}
    for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "WANDB_API_KEY"):
        env.pop(k, None)
    dash = free_port()
    cmd = [str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(free_port()),
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--num-cpus", "2",
           "--disable-usage-stats", "--temp-dir", temp,
           "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
           "--metrics-export-port", str(free_port()), "--runtime-env-agent-port", str(free_port()),
           "--ray-client-server-port", str(free_port())]
    try:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, r.stdout + r.stderr
        address = f"http://127.0.0.1:{dash}"
        deadline = time.monotonic() + 60
        while True:  # the job API comes up a moment after `ray start` returns
            try:
                with socket.create_connection(("127.0.0.1", dash), timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        yield {"address": address, "env": env, "token": token, "temp": temp}
    finally:
        _kill_all(temp)
        shutil.rmtree(temp, ignore_errors=True)


def _client_env(head, **extra) -> dict[str, str]:
    """The user's shell: the token where Ray looks for it, but no RAY_AUTH_MODE (selfsup finds it anyway)."""
    env = {k: v for k, v in head["env"].items() if k != "RAY_AUTH_MODE"}
    env.update(extra)
    return env


def _selfsup(args: list[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _pipeline_args(tmp: Path, workers: int = 1, storage_uri: bool = False) -> list[str]:
    """The digits pipeline with a tiny budget, every path absolute under tmp (workers=0: no Ray Train).

    storage_uri: checkpoints to a `file://` URI, as a multi-node run would to s3://. Then the methods that
    train through the launcher in local mode (scratch, finetune, semi) are left out: it refuses URIs.
    """
    storage = f"file://{tmp / 'ckpt'}" if storage_uri else str(tmp / "ckpt")
    methods = "[pixels,linear,knn]" if storage_uri else "[pixels,scratch,linear]"
    return ["pipeline", "--config", "configs/digits.yaml", f"output_dir={tmp / 'run'}",
            f"data.shards={tmp / 'shards'}", "data.labeled_fractions=[0.1]", "pretrain.epochs=1",
            "pretrain.global_batch_size=128", "pretrain.knn_every=0", "model.timm_kwargs={channels: [8, 16, 32, 64]}",
            "model.proj_hidden_dim=64", "model.proj_output_dim=32", f"trainer.num_workers={workers}",
            "trainer.torch_threads=1", f"trainer.storage_path={storage}",
            "finetune.num_seeds=1", f"finetune.methods={methods}",
            "finetune.full_fraction_methods=[pixels]", "finetune.epochs=2"]


# ------------------------------------------------------------------ without a cluster


def test_nothing_listening_fails_fast_in_one_line():
    address = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    r = _selfsup(["submit", "--address", address, "--", "shard", "digits", "--out", "/tmp/x"],
                 env={**os.environ, "RAY_ADDRESS": "http://127.0.0.1:1"}, timeout=60)
    assert time.monotonic() - t0 < 15
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and address in lines[0], r.stderr  # --address wins over $RAY_ADDRESS
    assert "Traceback" not in r.stderr


def test_runtime_env_hides_the_key_and_ships_the_project(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    monkeypatch.setenv("WANDB_PROJECT", "p1")
    env = submit.build_runtime_env(requirements=True)
    assert env["env_vars"]["WANDB_API_KEY"] == SECRET and env["env_vars"]["WANDB_PROJECT"] == "p1"
    assert env["env_vars"]["RAY_USAGE_STATS_ENABLED"] == "0"
    assert Path(env["working_dir"]) == ROOT and {".venv", ".git", "runs", "wandb"} <= set(env["excludes"])
    assert any(r.startswith("ray[") for r in env["pip"]) and any(r.startswith("torch") for r in env["pip"])
    shown = submit.masked(env)
    assert SECRET not in json.dumps(shown) and shown["env_vars"]["WANDB_PROJECT"] == "p1"
    assert "pip" not in submit.build_runtime_env(requirements=False)
    assert submit.build_entrypoint(["pretrain", "--local", "a=b c"]) == "python -m pretrain --local 'a=b c'"
    assert submit.build_entrypoint(["pipeline", "--config", "x.yaml"]) == "python -m cluster pipeline --config x.yaml"


def test_every_stage_but_submit_is_submittable():
    from cluster.cli import STAGES

    assert set(submit.SUBMITTABLE) == set(STAGES) - {"submit"}


# ------------------------------------------------------------------ against a real head


@pytest.mark.slow
def test_auth_is_on(head):
    import requests

    r = requests.get(head["address"] + "/api/jobs/", timeout=10)
    assert r.status_code == 401  # no token, no entry: the head really has token authentication on


@pytest.mark.slow
def test_pipeline_as_a_job_with_selfsup_and_with_rays_cli(head, tmp_path):
    """The digits pipeline submitted twice at once: by Ray's own `ray job submit`, and by `selfsup submit`
    (whose pretraining runs Ray Train inside the job, on the same cluster, through its token auth)."""
    from ray.job_submission import JobSubmissionClient

    ray_tmp, ours_tmp = tmp_path / "ray-cli", tmp_path / "selfsup"
    job_id = f"selfsup-test-{uuid.uuid4().hex[:8]}"
    runtime_env = {"working_dir": str(ROOT), "excludes": submit.EXCLUDES,
                   "env_vars": {"WANDB_MODE": "offline", "RAY_USAGE_STATS_ENABLED": "0"}}
    env = {**_client_env(head), "RAY_AUTH_MODE": "token"}  # Ray's CLI sends the token only in token mode
    ray_cli = subprocess.Popen([str(BIN / "ray"), "job", "submit", "--address", head["address"],
                                "--submission-id", job_id, "--runtime-env-json", json.dumps(runtime_env), "--",
                                "python", "-m", "cluster", *_pipeline_args(ray_tmp, workers=0)],
                               cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        r = _selfsup(["submit", "--address", head["address"], "--wait", "--no-requirements", "--",
                      *_pipeline_args(ours_tmp, storage_uri=True)], env=_client_env(head, WANDB_API_KEY=SECRET))
        ray_out, _ = ray_cli.communicate(timeout=600)
    finally:
        if ray_cli.poll() is None:
            ray_cli.kill()

    # selfsup submit: job id, masked runtime env, the job's own output streamed, exit 0 for SUCCEEDED
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "job id:" in out and "SUCCEEDED" in out
    assert "runtime_env:" in out and "'WANDB_API_KEY': '***'" in out and SECRET not in out
    assert "pipeline done" in out and "headline at" in out
    report = json.loads((ours_tmp / "run" / "report.json").read_text())
    assert {r["method"] for r in report["results"]} >= {"pixels", "linear", "knn"}
    assert list((ours_tmp / "ckpt" / "digits").glob("checkpoint_epoch_*"))  # written through the file:// URI
    # the W&B key was passed to the job, but nothing the run wrote holds it
    for f in ours_tmp.rglob("*"):
        if f.is_file() and f.stat().st_size < 5_000_000:
            assert SECRET.encode() not in f.read_bytes(), f

    # Ray's CLI: the same pipeline, checked through the job API and through `selfsup submit --status/--logs`
    assert ray_cli.returncode == 0, ray_out[-4000:]
    client = JobSubmissionClient(head["address"], headers={"authorization": f"Bearer {head['token'].read_text()}"})
    assert str(client.get_job_status(job_id).value) == "SUCCEEDED"
    report = json.loads((ray_tmp / "run" / "report.json").read_text())
    assert {r["method"] for r in report["results"]} >= {"pixels", "scratch", "linear"}
    st = _selfsup(["submit", "--address", head["address"], "--status", job_id], env=_client_env(head))
    assert st.returncode == 0 and "SUCCEEDED" in st.stdout
    logs = _selfsup(["submit", "--address", head["address"], "--logs", job_id], env=_client_env(head))
    assert logs.returncode == 0 and "pipeline done" in logs.stdout


@pytest.mark.slow
def test_failing_jobs_exit_nonzero_with_their_last_lines(head, tmp_path):
    """Missing shards for `-- finetune` and for `-- pretrain` (submitted at once): non-zero, the job's error."""
    missing = tmp_path / "no-shards"
    procs = {stage: subprocess.Popen(
        [sys.executable, "-m", "cluster", "submit", "--address", head["address"], "--no-requirements", "--",
         stage, f"data.shards={missing}", f"output_dir={tmp_path / stage}", "trainer.num_workers=1"],
        cwd=ROOT, env=_client_env(head), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for stage in ("finetune", "pretrain")}
    for stage, p in procs.items():
        _, err = p.communicate(timeout=300)
        assert p.returncode != 0, stage
        assert "FAILED" in err and "last lines" in err, err
        assert f"shards not found at {missing}" in err, err  # the stage's own one-line error, relayed
        assert "Traceback" not in err


@pytest.mark.slow
def test_no_wait_then_stop(head, tmp_path):
    r = _selfsup(["submit", "--address", head["address"], "--no-wait", "--no-requirements", "--",
                  *_pipeline_args(tmp_path)], env=_client_env(head))
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.split("job id:")[1].split()[0]
    stop = _selfsup(["submit", "--address", head["address"], "--stop", job_id], env=_client_env(head))
    assert stop.returncode == 0, stop.stderr
    st = _selfsup(["submit", "--address", head["address"], "--logs", job_id, "--wait"], env=_client_env(head))
    assert st.returncode != 0 and "STOPPED" in st.stderr
    unknown = _selfsup(["submit", "--address", head["address"], "--status", "no-such-job"], env=_client_env(head))
    assert unknown.returncode != 0 and len(unknown.stderr.strip().splitlines()) == 1
