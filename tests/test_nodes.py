"""Two Ray nodes on one machine: the workers' outputs reach the driver's `output_dir` and nowhere else.

A multi-node cluster has one disk per node: rank 0 and the fine-tuning tasks run on some node, the driver on
another, and only `trainer.storage_path` (and the shards) are shared. To show that here:
- a Ray head and a second node (`ray start --address ... --temp-dir ...`) that alone offers the custom resource
  `selfsup_node`, which the training workers and tasks require (`trainer.resources_per_worker`), each started
  in a working directory of its own, different from the driver's;
- the driver (`selfsup pipeline`, paths relative to its own working directory) runs in a private mount
  namespace where its `output_dir` is another directory (`driver_disk`): the driver's disk. Anything a worker
  writes into the path `output_dir` lands in the directory the nodes see under that name, which must stay
  empty (without user namespaces, e.g. in a locked-down container, the driver runs unisolated and that part
  of the check is weaker);
- `trainer.storage_path` is a shared `file://` directory.
Both nodes are stopped afterwards, by the process trees that name their temp dirs, even when the test fails.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from test_submit import _kill_all, free_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow


def _ray_cli() -> list[str]:
    ray = BIN / "ray"
    return [str(ray)] if ray.exists() else [sys.executable, "-m", "ray.scripts.scripts"]


def _ports() -> list[str]:
    return ["--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
            "--metrics-export-port", str(free_port()), "--runtime-env-agent-port", str(free_port()),
            "--node-manager-port", str(free_port()), "--object-manager-port", str(free_port())]


def _can_unshare() -> bool:
    if not shutil.which("unshare"):
        return False
    try:
        r = subprocess.run(["unshare", "-Urm", "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return r.returncode == 0


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """A head (1 CPU, no custom resource) and a second node (2 CPUs, `selfsup_node: 2`) on 127.0.0.1, token
    auth on; every process of both is killed afterwards."""
    head_temp = tempfile.mkdtemp(prefix="rayH", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    node_temp = tempfile.mkdtemp(prefix="rayN", dir="/tmp")
    token = Path(head_temp) / "auth_token"
    token.write_text(uuid.uuid4().hex)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN_PATH": str(token), "RAY_USAGE_STATS_ENABLED": "0", "WANDB_MODE": "offline"}
    # what earlier tests leave in this process's environment: RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (an in-process
    # local cluster, runtime.launch.init_ray), under which a second node refuses to start; WANDB_SERVICE (an
    # in-process wandb.init), which would hand the nodes' W&B runs to this test process's wandb service
    for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "WANDB_API_KEY", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER",
              "WANDB_SERVICE"):
        env.pop(k, None)
    tmp_path = tmp_path_factory.mktemp("nodes")
    cwd = {name: tmp_path / name for name in ("head_cwd", "node_cwd")}
    for d in cwd.values():
        d.mkdir()
    gcs = free_port()
    head = [*_ray_cli(), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
            "--dashboard-host", "127.0.0.1", "--dashboard-port", str(free_port()), "--num-cpus", "1",
            "--disable-usage-stats", "--temp-dir", head_temp, "--ray-client-server-port", str(free_port()),
            *_ports()]
    node = [*_ray_cli(), "start", "--address", f"127.0.0.1:{gcs}", "--node-ip-address", "127.0.0.1",
            "--num-cpus", "2", "--resources", json.dumps({"selfsup_node": 2}), "--disable-usage-stats",
            "--temp-dir", node_temp, *_ports()]
    try:
        for cmd, where in ((head, cwd["head_cwd"]), (node, cwd["node_cwd"])):
            r = subprocess.run(cmd, env=env, cwd=where, capture_output=True, text=True, timeout=180)
            assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        yield {"address": f"127.0.0.1:{gcs}", "env": env, "root": tmp_path, **cwd}
    finally:
        _kill_all(node_temp)
        _kill_all(head_temp)
        shutil.rmtree(node_temp, ignore_errors=True)
        shutil.rmtree(head_temp, ignore_errors=True)


def _files(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*") if not p.is_dir())


COMMON = ["trainer.num_workers=2", "trainer.resources_per_worker={CPU: 1, selfsup_node: 1}", "trainer.torch_threads=1",
          "finetune.epochs=2", "finetune.semi_epochs=1", "finetune.distill_rounds=1"]


@pytest.fixture(scope="module")
def driver(two_nodes):
    """Runs `selfsup ARGS` as the driver: in driver_cwd, with `out` there bind-mounted from driver_disk."""
    root = two_nodes["root"]
    paths = {"driver_cwd": root / "driver_cwd", "shared": root / "shared", "driver_disk": root / "driver_disk"}
    paths["out_seen_by_nodes"] = paths["driver_cwd"] / "out"  # the path `output_dir=out` names, on the nodes
    for d in paths.values():
        d.mkdir(parents=True)
    isolated = _can_unshare()
    paths["drivers"] = paths["driver_disk"] if isolated else paths["out_seen_by_nodes"]

    def run(args: list[str]) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "cluster", *args, f"trainer.address={two_nodes['address']}",
               f"trainer.storage_path=file://{paths['shared']}", *COMMON]
        if isolated:  # the driver's own view of `out`: driver_disk bind-mounted over it, in a private namespace
            cmd = ["unshare", "-Urm", "sh", "-c", 'mount --bind "$0" "$1" && shift && exec "$@"',
                   str(paths["driver_disk"]), str(paths["out_seen_by_nodes"]), *cmd]
        env = dict(two_nodes["env"])  # the token, where Ray's client reads it
        env["PYTHONPATH"] = str(ROOT)  # the driver imports this checkout; Ray workers get the driver's sys.path
        t0 = time.monotonic()
        r = subprocess.run(cmd, cwd=paths["driver_cwd"], env=env, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        print(f"`selfsup {args[0]}` on two nodes: {time.monotonic() - t0:.0f} s (isolated driver disk: {isolated})")
        return r

    return {"run": run, "isolated": isolated, **paths}


def test_pipeline_on_two_nodes_writes_only_into_the_drivers_output_dir(two_nodes, driver):
    driver["run"](["pipeline", "--config", str(ROOT / "configs" / "digits.yaml"), "output_dir=out", "data.shards=shards",
                   "data.labeled_fractions=[0.1]", "pretrain.epochs=1", "pretrain.global_batch_size=128",
                   "pretrain.knn_every=1", "model.timm_kwargs={channels: [8, 16, 32, 64]}", "model.proj_hidden_dim=64",
                   "model.proj_output_dim=32", "finetune.num_seeds=1", "finetune.methods=[pixels,linear,finetune,semi]",
                   "finetune.full_fraction_methods=[pixels]"])
    drivers, isolated, out_seen_by_nodes, shared = (driver[k] for k in ("drivers", "isolated", "out_seen_by_nodes",
                                                                       "shared"))

    # the driver's output_dir holds every stage's output ...
    for name in ("encoder.safetensors", "head.safetensors", "encoder.json", "metrics.jsonl", "config.yaml",
                 "report.json", "report.md", "label_efficiency.png"):
        assert (drivers / name).is_file(), (name, _files(drivers))
    metrics = [json.loads(x) for x in (drivers / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1] and "knn_acc" in metrics[0]
    report = json.loads((drivers / "report.json").read_text())
    assert report["execution"] == "tasks"
    assert {(x["method"], x["label_fraction"]) for x in report["results"]} >= {("finetune", 0.1), ("semi", 0.1)}
    classifiers = list((drivers / "classifiers").iterdir())
    assert [c.name for c in classifiers] == ["semi-0.1"]
    assert {"model.safetensors", "model.json", "predictions.csv"} <= {p.name for p in classifiers[0].iterdir()}
    wandb_runs = list((drivers / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(wandb_runs) >= 2  # rank 0's pretraining run (returned by the worker) and the fine-tuning run
    # ... and nothing was written where the workers run: not their working dirs, not the path `out` on their disk
    if isolated:
        assert _files(out_seen_by_nodes) == []
    assert _files(two_nodes["node_cwd"]) == [] and _files(two_nodes["head_cwd"]) == []
    # the checkpoints are in the shared storage
    assert list((shared / "digits").glob("checkpoint_epoch_000001/encoder/encoder.json"))


def test_finetune_under_ray_train_ddp_on_the_second_node(two_nodes, driver):
    """finetune.parallel=train: the DDP workers (on the second node) return rows and the shipped model's
    weights; the driver writes the report and the classifier. Uses the pipeline's encoder and shards."""
    if not (driver["drivers"] / "encoder.json").is_file():
        pytest.skip("needs the encoder of test_pipeline_on_two_nodes_writes_only_into_the_drivers_output_dir")
    driver["run"](["finetune", "--config", str(ROOT / "configs" / "digits.yaml"), "output_dir=out/ddp", "encoder=out",
                   "data.shards=shards", "finetune.parallel=train", "finetune.methods=[finetune,semi]",
                   "finetune.fractions=[0.1]", "finetune.num_seeds=1", "finetune.full_fraction_methods=[]",
                   "wandb.enabled=false"])
    ddp = driver["drivers"] / "ddp"
    report = json.loads((ddp / "report.json").read_text())
    assert report["execution"] == "train" and report["num_workers"] == 2
    assert [c.name for c in (ddp / "classifiers").iterdir()] == ["semi-0.1"]
    if driver["isolated"]:
        assert _files(driver["out_seen_by_nodes"]) == []
    assert _files(two_nodes["node_cwd"]) == [] and _files(two_nodes["head_cwd"]) == []
