"""The cluster definitions parse, have what Ray / KubeRay need, and name only real commands of this project."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cluster.cli import build_parser
from runtime.config import load_config

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = ROOT / "cluster" / "launcher.yaml"
RAYJOB = ROOT / "cluster" / "kuberay-rayjob.yaml"


def _check_command(argv: list[str]) -> None:
    """`selfsup ...` / `python -m cluster ...`: parse it with the real parser and run its --help."""
    if argv[:3] == ["python", "-m", "cluster"]:
        argv = argv[3:]
    elif argv[:1] == ["selfsup"]:
        argv = argv[1:]
    else:
        raise AssertionError(f"not a command of this project: {shlex.join(argv)}")
    args = build_parser().parse_args(argv)  # argparse exits (SystemExit) on an unknown option
    r = subprocess.run([sys.executable, "-m", "cluster", argv[0], "--help"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "usage:" in r.stdout
    if getattr(args, "config", None):  # the config it names exists and takes the overrides
        load_config(ROOT / args.config, [o for o in args.overrides])
    stage_args = [a for a in getattr(args, "stage_args", []) if a != "--"]
    if stage_args:  # `selfsup submit -- <stage> ...`: the submitted command is checked too
        _check_command(["selfsup", *stage_args])


def _commented_commands(path: Path) -> list[list[str]]:
    """`selfsup ...` commands in a file's header comments, joining `\\` continuations."""
    text = "\n".join(ln.lstrip("# ").rstrip() for ln in path.read_text().splitlines() if ln.startswith("#"))
    text = text.replace("\\\n", " ")
    return [shlex.split(m) for m in re.findall(r"^(selfsup .*)$", text, flags=re.M)]


def test_launcher_is_a_valid_ray_cluster_config():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(LAUNCHER.read_text())
    cfg = prepare_config(raw)  # fills Ray's defaults, then checks against ray-schema.json
    validate_config(cfg)
    assert raw["provider"]["type"] == "aws"
    assert raw["head_node_type"] in raw["available_node_types"]
    assert any("GPU" in t.get("resources", {}) or "g5" in str(t["node_config"]) for t in
               raw["available_node_types"].values())
    assert any("pip install" in c and "-e" in c for c in raw["setup_commands"]), "project install missing"
    assert any("ray start --head" in c for c in raw["head_start_ray_commands"])
    assert any("ray start --address" in c for c in raw["worker_start_ray_commands"])


def test_launcher_commands_are_real():
    commands = _commented_commands(LAUNCHER)
    assert commands, "the launcher names no selfsup command to run on the cluster"
    for argv in commands:
        _check_command(argv)


def test_rayjob_has_what_kuberay_needs():
    job = yaml.safe_load(RAYJOB.read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["image"] and "rayStartParams" in cluster["headGroupSpec"]
    for group in cluster["workerGroupSpecs"]:
        assert group["groupName"] and group["replicas"] >= 1 and "rayStartParams" in group
        worker = group["template"]["spec"]["containers"][0]
        assert worker["resources"]["limits"].get("nvidia.com/gpu"), "workers should be GPU pods"
    # The W&B key comes from a Secret, in every pod that runs training code, and is never written inline.
    for c in [head] + [g["template"]["spec"]["containers"][0] for g in cluster["workerGroupSpecs"]]:
        keys = {e["name"]: e for e in c["env"]}
        assert keys["WANDB_API_KEY"]["valueFrom"]["secretKeyRef"]["name"]
        assert "value" not in keys["WANDB_API_KEY"]
    assert "WANDB_API_KEY" not in spec.get("runtimeEnvYAML", "")
    yaml.safe_load(spec["runtimeEnvYAML"])


def test_rayjob_entrypoint_is_the_pipeline():
    argv = shlex.split(yaml.safe_load(RAYJOB.read_text())["spec"]["entrypoint"])
    assert argv[:4] == ["python", "-m", "cluster", "pipeline"]
    _check_command(argv)


@pytest.mark.parametrize("path", [LAUNCHER, RAYJOB])
def test_no_secret_values_in_files(path):
    text = path.read_text()
    assert not re.search(r"WANDB_API_KEY\s*[:=]\s*\S{8,}", text)
