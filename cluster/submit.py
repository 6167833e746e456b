"""`selfsup submit -- <stage> [args]`: run any stage as a Ray job on a cluster, and follow it.

A thin layer over Ray's `JobSubmissionClient`: the project directory is shipped as the job's `working_dir`,
the W&B settings travel as environment variables (never printed), and the exit status is the job's outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import socket
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from runtime.errors import UserError, one_line

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# Never shipped to the cluster: environments, history, data and outputs (they can be gigabytes).
EXCLUDES = [".venv", ".git", "runs", "data", "wandb", "__pycache__", "shards", ".pytest_cache",
            ".ruff_cache", "*.egg-info"]
# The W&B settings a run needs on the cluster; only those set here are passed on.
PASSTHROUGH_ENV = ("WANDB_API_KEY", "WANDB_MODE", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_BASE_URL")
SECRET_ENV = ("WANDB_API_KEY",)
# Stages with their own `python -m` entry point; every other stage goes through `python -m cluster <stage>`.
OWN_ENTRY = ("pretrain", "finetune")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
CONNECT_TIMEOUT_S = 5.0


def project_root() -> Path:
    return Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- address and auth


def resolve_address(address: str | None, env: dict[str, str] | None = None) -> str:
    """--address, else $RAY_API_SERVER_ADDRESS / $RAY_ADDRESS (Ray's own order), else the local dashboard."""
    env = os.environ if env is None else env
    address = address or env.get("RAY_API_SERVER_ADDRESS") or env.get("RAY_ADDRESS") or DEFAULT_ADDRESS
    if address.startswith("ray://"):
        raise UserError(f"--address {address} is a Ray Client address: give the dashboard URL instead, "
                        f"e.g. http://<head>:8265")
    if "://" not in address:
        address = "http://" + address
    return address.rstrip("/")


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Fail within seconds, naming the address, when nothing listens there (requests alone may hang)."""
    parts = urlsplit(address)
    host = parts.hostname
    try:
        port = parts.port or (443 if parts.scheme == "https" else 8265)
    except ValueError:
        raise UserError(f"Ray address {address} has an invalid port: give e.g. http://127.0.0.1:8265") from None
    if not host:
        raise UserError(f"Ray address {address} has no host: give e.g. http://127.0.0.1:8265")
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as e:
        raise UserError(f"no Ray dashboard reachable at {address} ({e.strerror or e}): start one with "
                        f"`ray start --head` or pass --address / $RAY_ADDRESS") from None


def auth_headers() -> dict[str, str]:
    """The token header, found the way Ray's own CLI finds it.

    Ray's loader reads $RAY_AUTH_TOKEN, then $RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token. `ray job submit`
    sends it only with RAY_AUTH_MODE=token; we send it whenever a token exists (as `ray start` enables auth
    whenever a token exists), unless RAY_AUTH_MODE=disabled says not to.
    """
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return {}
    from ray._raylet import AuthenticationTokenLoader

    loader = AuthenticationTokenLoader.instance()
    try:
        if not loader.has_token(ignore_auth_mode=True):
            return {}
        return dict(loader.get_token_for_http_header(ignore_auth_mode=True))
    except Exception as e:  # a token file that cannot be read: say which setting to fix
        raise UserError(f"cannot read the Ray auth token ({one_line(e)}): check $RAY_AUTH_TOKEN, "
                        f"$RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token") from None


@contextlib.contextmanager
def _without_address_env():
    # JobSubmissionClient lets $RAY_ADDRESS override its `address` argument; --address must win.
    saved = {k: os.environ.pop(k) for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS") if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def connect(address: str | None = None):
    """A JobSubmissionClient for the resolved address, with the auth token attached."""
    from ray.job_submission import JobSubmissionClient

    address = resolve_address(address)
    check_reachable(address)
    try:
        with _without_address_env():
            return JobSubmissionClient(address, headers=auth_headers())
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"cannot use the Ray job API at {address}: {one_line(e)[:300]}") from None


# ---------------------------------------------------------------- what is submitted


def read_requirements(root: Path | None = None) -> list[str]:
    """The project's dependencies from pyproject.toml: what the job needs on a bare cluster image."""
    import tomllib

    path = (root or project_root()) / "pyproject.toml"
    try:
        return list(tomllib.loads(path.read_text())["project"]["dependencies"])
    except (OSError, KeyError, tomllib.TOMLDecodeError) as e:
        raise UserError(f"cannot read dependencies from {path} ({one_line(e)}): "
                        f"pass --no-requirements if the cluster image has them") from None


# every `selfsup` stage but submit itself; a test keeps this equal to cluster.cli.STAGES (submit must not
# import the CLI, which imports it)
SUBMITTABLE = ("shard", "pretrain", "finetune", "pipeline", "bench", "predict", "select", "inspect")


def build_entrypoint(stage_args: list[str]) -> str:
    if not stage_args:
        raise UserError("nothing to submit: give a stage after `--`, e.g. `selfsup submit -- pipeline "
                        "--config configs/digits.yaml`")
    stage, rest = stage_args[0], stage_args[1:]
    if stage not in SUBMITTABLE:
        raise UserError(f"unknown stage {stage!r} to submit (valid: {', '.join(SUBMITTABLE)})")
    cmd = ["python", "-m", stage] if stage in OWN_ENTRY else ["python", "-m", "cluster", stage]
    return shlex.join(cmd + rest)


def build_runtime_env(requirements: bool = True, root: Path | None = None,
                      env: dict[str, str] | None = None) -> dict[str, Any]:
    env = os.environ if env is None else env
    root = root or project_root()
    env_vars = {k: env[k] for k in PASSTHROUGH_ENV if env.get(k)}
    env_vars["RAY_USAGE_STATS_ENABLED"] = "0"
    runtime_env: dict[str, Any] = {"working_dir": str(root), "excludes": list(EXCLUDES), "env_vars": env_vars}
    if requirements:
        runtime_env["pip"] = read_requirements(root)
    return runtime_env


def masked(runtime_env: dict[str, Any]) -> dict[str, Any]:
    """The runtime env as it may be printed: every environment value but the harmless ones hidden."""
    shown = dict(runtime_env)
    shown["env_vars"] = {k: ("***" if k in SECRET_ENV or k.endswith(("_KEY", "_TOKEN", "_SECRET")) else v)
                         for k, v in runtime_env.get("env_vars", {}).items()}
    return shown


# ---------------------------------------------------------------- following a job


def stream_logs(client, job_id: str, out=None) -> None:
    """Print the job's output as it comes; returns when the job ends (the server closes the stream)."""
    out = out or sys.stdout

    async def follow() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    asyncio.run(follow())


def wait_terminal(client, job_id: str, timeout_s: float = 60.0) -> str:
    """The log stream can close a moment before the status settles: poll until it is terminal."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = str(client.get_job_status(job_id).value)
        if status in TERMINAL or time.monotonic() > deadline:
            return status
        time.sleep(0.5)


def last_error_lines(client, job_id: str, n: int = 10) -> list[str]:
    info = client.get_job_info(job_id)
    logs = [ln for ln in client.get_job_logs(job_id).splitlines() if ln.strip()]
    lines = logs[-n:]
    if info.message and not lines:
        lines = [ln for ln in info.message.splitlines() if ln.strip()][-n:]
    return lines


def follow(client, job_id: str, stream: bool = True) -> int:
    """Stream a job to its end; 0 only for SUCCEEDED, else print its last error lines and return 1."""
    try:
        if stream:
            try:
                stream_logs(client, job_id)
            except Exception as e:  # a dropped stream is not the job's outcome: fall back to polling
                print(f"(log stream ended: {one_line(e)}; waiting for the job)", file=sys.stderr)
        status = wait_terminal(client, job_id, timeout_s=60.0 if stream else float("inf"))
    except KeyboardInterrupt:
        # Ctrl-C stops following, not the job: say how to get back to it or end it
        print(f"error: stopped following job {job_id}; it keeps running: `selfsup submit --logs {job_id} "
              f"--wait` to follow it again, `selfsup submit --stop {job_id}` to stop it", file=sys.stderr)
        return 130
    if status == "SUCCEEDED":
        print(f"job {job_id} SUCCEEDED")
        return 0
    info = client.get_job_info(job_id)
    lines = last_error_lines(client, job_id)
    # Ray appends the whole log tail to the message; its first clause is the outcome, the tail is printed below
    message = one_line((info.message or "").split(", last available logs")[0])[:300]
    print(f"error: job {job_id} {status}: {message}", file=sys.stderr)
    if lines:
        print("last lines of the job's output:", file=sys.stderr)
        for ln in lines:
            print(f"  {ln}", file=sys.stderr)
    return 1


# ---------------------------------------------------------------- the CLI


def run_submit(address: str | None, stage_args: list[str], wait: bool = True, requirements: bool = True,
               submission_id: str | None = None) -> int:
    entrypoint = build_entrypoint(stage_args)
    runtime_env = build_runtime_env(requirements=requirements)
    # Ray logs every file it leaves out of the upload at INFO; the user needs the job's output, not that.
    for name in ("ray._private.runtime_env", "ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk"):
        logging.getLogger(name).setLevel(logging.ERROR)
    client = connect(address)
    print(f"submitting to {client.get_address()}: {entrypoint}")
    print(f"runtime_env: {masked(runtime_env)}")
    try:
        job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, submission_id=submission_id)
    except Exception as e:
        raise UserError(f"the Ray job API at {client.get_address()} refused the job: {one_line(e)[:300]}") from None
    print(f"job id: {job_id}")
    if not wait:
        print(f"follow it with `selfsup submit --logs {job_id}`; status: `selfsup submit --status {job_id}`")
        return 0
    return follow(client, job_id)


def _job_call(fn, job_id: str, address: str):
    try:
        return fn(job_id)
    except RuntimeError as e:
        raise UserError(f"job {job_id} at {address}: {one_line(e)[:300]}") from None


def run_status(address: str | None, job_id: str) -> int:
    client = connect(address)
    info = _job_call(client.get_job_info, job_id, client.get_address())
    print(f"{job_id}\t{info.status.value}\t{one_line(info.message or '')}")
    return 0 if str(info.status.value) in ("SUCCEEDED", "RUNNING", "PENDING") else 1


def run_logs(address: str | None, job_id: str, follow_logs: bool = False) -> int:
    client = connect(address)
    if follow_logs:
        _job_call(client.get_job_status, job_id, client.get_address())
        return follow(client, job_id)
    print(_job_call(client.get_job_logs, job_id, client.get_address()), end="")
    return 0


def run_stop(address: str | None, job_id: str) -> int:
    client = connect(address)
    stopped = _job_call(client.stop_job, job_id, client.get_address())
    print(f"job {job_id}: {'stop requested' if stopped else 'already finished'}")
    return 0
