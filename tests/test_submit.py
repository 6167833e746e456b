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
    """Every process whose command line mentions `marker` (our head's temp dir), and their children."""
    pids = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if marker in (d / "cmdline").read_bytes().decode(errors="replace"):
                    pids.add(int(d.name))
            except OSError:
                continue
    children = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid in pids:
                children.add(int(d.name))
    return sorted((pids | children) - {os.getpid()})


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


def _pipeline_args(tmp: Path) -> list[str]:
    """The digits pipeline with a tiny budget, every path absolute under tmp."""
    return ["pipeline", "--config", "configs/digits.yaml", f"output_dir={tmp / 'run'}",
            f"data.shards={tmp / 'shards'}", "data.labeled_fractions=[0.1]", "pretrain.epochs=1",
            "pretrain.batch_size=128", "pretrain.knn_every=0", "model.timm_kwargs={channels: [8, 16, 32, 64]}",
            "model.proj_hidden_dim=64", "model.proj_output_dim=32", "trainer.num_workers=1",
            "trainer.torch_threads=1", f"trainer.storage_path=file://{tmp / 'ckpt'}",
            "finetune.seeds=1", "finetune.methods=[pixels,scratch,linear]",
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


# ------------------------------------------------------------------ against a real head


@pytest.mark.slow
def test_auth_is_on(head):
    import requests

    r = requests.get(head["address"] + "/api/jobs/", timeout=10)
    assert r.status_code == 401  # no token, no entry: the head really has token authentication on


@pytest.mark.slow
def test_selfsup_submit_runs_the_pipeline(head, tmp_path):
    r = _selfsup(["submit", "--address", head["address"], "--wait", "--no-requirements", "--",
                  *_pipeline_args(tmp_path)], env=_client_env(head, WANDB_API_KEY=SECRET))
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "job id:" in out and "SUCCEEDED" in out
    assert "runtime_env:" in out and SECRET not in out  # the key travels, masked in every printout
    assert "pipeline done" in out  # the job's own output was streamed
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert {r["method"] for r in report["results"]} >= {"pixels", "scratch", "linear"}
    # the W&B key was passed to the job but never written into what it produced
    for f in tmp_path.rglob("*"):
        if f.is_file() and f.stat().st_size < 5_000_000:
            assert SECRET.encode() not in f.read_bytes(), f


@pytest.mark.slow
def test_ray_job_submit_cli_runs_the_pipeline(head, tmp_path):
    from ray.job_submission import JobSubmissionClient

    job_id = f"selfsup-test-{uuid.uuid4().hex[:8]}"
    runtime_env = {"working_dir": str(ROOT), "excludes": submit.EXCLUDES,
                   "env_vars": {"WANDB_MODE": "offline", "RAY_USAGE_STATS_ENABLED": "0"}}
    env = {**_client_env(head), "RAY_AUTH_MODE": "token"}  # Ray's CLI sends the token only in token mode
    r = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", head["address"],
                        "--submission-id", job_id, "--runtime-env-json", json.dumps(runtime_env), "--",
                        "python", "-m", "cluster", *_pipeline_args(tmp_path)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    client = JobSubmissionClient(head["address"], headers=submit.auth_headers(_client_env(head)))
    assert str(client.get_job_status(job_id).value) == "SUCCEEDED"
    assert (tmp_path / "run" / "report.json").is_file()
    # and the rest of a job's life through selfsup
    st = _selfsup(["submit", "--address", head["address"], "--status", job_id], env=_client_env(head))
    assert st.returncode == 0 and "SUCCEEDED" in st.stdout
    logs = _selfsup(["submit", "--address", head["address"], "--logs", job_id], env=_client_env(head))
    assert logs.returncode == 0 and "pipeline done" in logs.stdout


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["finetune", "pretrain"])
def test_failing_job_exits_nonzero_with_its_last_lines(head, tmp_path, stage):
    missing = tmp_path / "no-shards"
    r = _selfsup(["submit", "--address", head["address"], "--no-requirements", "--", stage,
                  f"data.shards={missing}", f"output_dir={tmp_path / 'out'}", "trainer.num_workers=1"],
                 env=_client_env(head), timeout=300)
    assert r.returncode != 0
    assert "FAILED" in r.stderr and "last lines" in r.stderr
    assert str(missing) in r.stderr  # the stage's own one-line error, relayed from the job
    assert "Traceback" not in r.stderr


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
