"""`selfsup bench --parts memory`: peak resident memory of every process of each stage, at two data sizes.

For each size (default 10,000 and 100,000 images) it writes a synthetic image folder (32 px PNGs, 100 classes,
listed class by class), then runs the real stages as child processes, one after the other:
`selfsup shard folder`, `selfsup pretrain` (one epoch, capped at `pretrain.max_steps_per_epoch` steps, the kNN
monitor at its end), `selfsup finetune` (a small budget: one subset, one epoch per method), `selfsup select`
(typiclust, budget 100), `selfsup inspect` (the data report) and `selfsup predict` (the shipped classifier on
the whole image folder, given as a directory); `--memory-stages` picks some of them. While a stage
runs, its whole process tree (the stage's driver, the private Ray cluster it starts, Ray Train workers and
Ray tasks, DataLoader workers) is sampled every `INTERVAL_S`; each process's peak is the kernel's high-water
mark of its resident set (`VmHWM`, exact between samples) where Linux has it, else the largest sampled RSS.
The figures that matter are the ratios largest/smallest size per stage: memory flat in the size of the data
means ratios near 1.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from runtime.errors import UserError

SIZES = (10000, 100000)
CLASSES = 100
IMAGE_SIZE = 32
INTERVAL_S = 0.1
TARGET_RATIO = 1.3  # issue 11: peak memory at 100k <= 1.3x the peak at 10k, for every stage
STAGES = ("shard", "pretrain", "finetune", "select", "inspect", "predict")
OLD_STAGES = ("shard", "pretrain", "finetune")  # what a memory.json without `stages` measured
MB = 2**20
# the small model of the measurement, unless --config gives one
MODEL = ["model.name=resnet18", "model.timm_kwargs={channels: [16, 32, 64, 128]}", "model.stem=small",
         "model.proj_hidden_dim=128", "model.proj_output_dim=64", "augment.preset=small"]
# each stage's small budget (the data is what grows; the work per stage stays about the same)
BUDGET = ["pretrain.epochs=1", "pretrain.max_steps_per_epoch=10", "pretrain.knn_every=0", "pretrain.global_batch_size=128",
          "trainer.num_workers=2", "data.loader_workers=0", "wandb.enabled=false",
          "finetune.num_seeds=1", "finetune.fractions=[0.01]", "finetune.epochs=1", "finetune.full_epochs=1",
          "finetune.semi_epochs=1", "finetune.full_fraction_methods=[linear]", "budget=100"]


def make_folder(root: str | os.PathLike, count: int, classes: int = CLASSES, image_size: int = IMAGE_SIZE,
                seed: int = 0) -> Path:
    """`count` PNG images in `classes` folders (`root/c000/0000042.png`, image i in class i % classes):
    smooth colour fields plus noise with a per-class tint, made a chunk at a time (bounded memory)."""
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(seed)
    tints = rng.integers(-40, 40, (classes, 3, 1, 1)).astype(np.float32)
    for c in range(classes):
        (root / f"c{c:03d}").mkdir(parents=True, exist_ok=True)
    chunk = 2048
    for start in range(0, count, chunk):
        n = min(chunk, count - start)
        coarse = rng.integers(0, 256, (n, 3, 4, 4)).astype(np.float32)
        smooth = np.kron(coarse, np.ones((1, 1, image_size // 4 + 1, image_size // 4 + 1), np.float32))
        smooth = smooth[:, :, :image_size, :image_size]
        labels = (start + np.arange(n)) % classes
        images = smooth + tints[labels] + rng.normal(0, 10, smooth.shape).astype(np.float32)
        images = images.clip(0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
        for j, arr in enumerate(images):
            Image.fromarray(arr).save(root / f"c{labels[j]:03d}" / f"{start + j:07d}.png")
    return root


# ------------------------------------------------------------------ measuring a process tree


def _psutil():
    import importlib

    try:
        return importlib.import_module("psutil")
    except ImportError:  # Ray ships it in ray/thirdparty_files, on the path once ray is imported
        importlib.import_module("ray")
        return importlib.import_module("psutil")


def _hwm_bytes(pid: int) -> int | None:
    """The kernel's peak resident set of `pid` (Linux `VmHWM`), or None where unavailable."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _kind(cmd: list[str], name: str, is_root: bool) -> str:
    if is_root:
        return "driver"
    joined = " ".join(cmd)
    if (cmd and cmd[0].startswith("ray::")) or "default_worker.py" in joined:
        return "ray_worker"  # Ray Train workers, Ray tasks and actors (and idle pool workers)
    if name in ("raylet", "gcs_server") or any(s in joined for s in ("ray/dashboard", "ray/_private",
                                                                      "ray/autoscaler", "ray/core/")):
        return "ray_system"
    return "other"  # DataLoader workers, a shard pool, forkservers


def run_measured(cmd: list[str], env: dict[str, str], log_path: Path, interval: float = INTERVAL_S,
                 timeout: float | None = None) -> dict[str, Any]:
    """Run `cmd`, sampling the resident memory of its whole process tree until it exits."""
    psutil = _psutil()
    peaks: dict[int, dict[str, Any]] = {}
    tree_peak = 0
    t0 = time.perf_counter()
    with open(log_path, "wb") as log:
        # its own session: whatever the stage leaves behind (a Ray cluster) can be ended by its group id
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            root = psutil.Process(proc.pid)
            while True:
                done = proc.poll() is not None
                try:
                    procs = [root, *root.children(recursive=True)]
                except psutil.Error:
                    procs = []
                total = 0
                for p in procs:
                    try:
                        rss = p.memory_info().rss
                        cmdline, name = p.cmdline(), p.name()
                    except psutil.Error:
                        continue
                    total += rss
                    peak = max(rss, _hwm_bytes(p.pid) or 0)
                    e = peaks.setdefault(p.pid, {"pid": p.pid, "peak_mb": 0.0})
                    kind = _kind(cmdline, name, p.pid == proc.pid)
                    title = (cmdline[0] if kind == "ray_worker" and cmdline else " ".join(cmdline) or name)[:80]
                    if "IDLE" not in title or "title" not in e:  # keep the name of the work it did
                        e["kind"], e["title"] = kind, title
                    e["peak_mb"] = max(e["peak_mb"], round(peak / MB, 1))
                tree_peak = max(tree_peak, total)
                if done:
                    break
                if timeout is not None and time.perf_counter() - t0 > timeout:
                    raise UserError(f"{' '.join(cmd[:4])} ran past {timeout:.0f} s; its log: {log_path}")
                time.sleep(interval)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(30)
    procs_list = sorted(peaks.values(), key=lambda e: -e["peak_mb"])

    def largest(kind: str) -> float:
        return max((e["peak_mb"] for e in procs_list if e["kind"] == kind), default=0.0)

    return {"rc": proc.returncode, "wall_s": round(time.perf_counter() - t0, 1),
            "driver_mb": largest("driver"), "ray_worker_mb": largest("ray_worker"),
            "ray_system_mb": largest("ray_system"), "other_mb": largest("other"),
            "max_process_mb": procs_list[0]["peak_mb"] if procs_list else 0.0,
            "tree_mb": round(tree_peak / MB, 1), "processes": procs_list}


# ------------------------------------------------------------------ the section


def bench_memory(cfg: Any, sizes: list[int], classes: int = CLASSES, image_size: int = IMAGE_SIZE,
                 work_dir: str | None = None, log: Callable[[str], None] = print,
                 stage_timeout: float | None = None, stages: tuple[str, ...] | list[str] = STAGES) -> dict[str, Any]:
    """bench.json's `memory` section: every stage at every size, and the largest/smallest ratios."""
    from runtime.config import save_config

    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise UserError(f"--memory-stages: unknown or no stage {unknown} (valid: {', '.join(STAGES)})")
    if "shard" not in stages or (any(s in stages for s in STAGES[2:]) and "pretrain" not in stages):
        raise UserError("--memory-stages: the later stages read the shards and the encoder: include shard and pretrain")
    if "predict" in stages and "finetune" not in stages:
        raise UserError("--memory-stages: predict uses the classifier fine-tuning ships: include finetune")
    stages = tuple(s for s in STAGES if s in stages)
    if len(sizes) < 1 or min(sizes) < 2 * classes:
        raise UserError(f"--memory-sizes must each be at least 2 x --memory-classes ({2 * classes}), got {sizes}")
    keep = work_dir is not None
    work = Path(work_dir or tempfile.mkdtemp(prefix="selfsup-bench-memory-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    config = save_config(cfg, work / "config.yaml")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
    env.pop("RAY_ADDRESS", None)  # a private local cluster: its processes are this tree's, so they are measured
    selfsup = [sys.executable, "-m", "cluster"]
    runs: dict[str, dict[str, Any]] = {}
    failed = False
    try:
        for n in sizes:
            d = work / f"images_{n}"
            log(f"memory: {n} images: writing a {classes}-class folder of {image_size} px PNGs ...")
            t = time.perf_counter()
            make_folder(d / "raw", n, classes, image_size, seed=cfg.data.seed)
            row: dict[str, Any] = {"make_images_s": round(time.perf_counter() - t, 1)}
            shards, run = d / "shards", d / "run"
            common = [f"data.shards={shards}", f"output_dir={run}", f"name=bench-memory-{n}"]
            commands = {
                "shard": [*selfsup, "shard", "folder", "--input", str(d / "raw"), "--out", str(shards),
                          "--image-size", str(image_size), "--labeled-fractions", "0.01,0.1"],
                "pretrain": [*selfsup, "pretrain", "--config", str(config), *common],
                "finetune": [*selfsup, "finetune", "--config", str(config), *common, f"encoder={run}"],
                "select": [*selfsup, "select", "--config", str(config), *common, f"encoder={run}"],
                "inspect": [*selfsup, "inspect", "--config", str(config), *common, f"encoder={run}"],
                "predict": [*selfsup, "predict", str(run), str(d / "raw")],  # every image of the folder
            }
            for stage in stages:
                log(f"memory: {n} images: {stage} ...")
                r = run_measured(commands[stage], env, d / f"{stage}.log", timeout=stage_timeout)
                row[stage] = r
                if r["rc"] != 0:
                    failed = True
                    tail = (d / f"{stage}.log").read_text(errors="replace").strip().splitlines()[-1:]
                    raise UserError(f"bench memory: {stage} at {n} images exited {r['rc']} "
                                    f"({tail[0][:200] if tail else 'no output'}); logs in {d}")
                log(f"memory: {n} images: {stage}: {r['wall_s']:.0f} s, driver {r['driver_mb']:.0f} MiB, "
                    f"largest Ray worker {r['ray_worker_mb']:.0f} MiB, tree {r['tree_mb']:.0f} MiB")
            shutil.rmtree(d / "raw", ignore_errors=True)
            runs[str(n)] = row
    finally:
        if not keep and not failed:
            shutil.rmtree(work, ignore_errors=True)
    small, large = str(min(sizes)), str(max(sizes))
    figures = ("driver_mb", "ray_worker_mb", "max_process_mb", "tree_mb")
    ratios = {stage: {f: (round(runs[large][stage][f] / runs[small][stage][f], 3) if runs[small][stage][f] else None)
                      for f in figures} for stage in stages}
    return {
        "sizes": sorted(sizes), "stages": list(stages), "classes": classes, "image_size": image_size, "interval_s": INTERVAL_S,
        "budget": BUDGET, "model": cfg.model.name, "timm_kwargs": dict(cfg.model.timm_kwargs),
        "trainer_num_workers": cfg.trainer.num_workers, "runs": runs, "ratios": ratios,
        "target_ratio": TARGET_RATIO,
        # per stage: the driver's, the largest Ray worker's/task's and the largest process's ratios all within
        "within_target": {s: all(ratios[s][f] is None or ratios[s][f] <= TARGET_RATIO
                                 for f in ("driver_mb", "ray_worker_mb", "max_process_mb")) for s in stages},
    }


def memory_rows(m: dict[str, Any]) -> list[tuple[str, str, str]]:
    """Table rows: per stage and figure, the MiB at each size and the largest/smallest ratio."""
    sizes = [str(s) for s in m["sizes"]]
    names = {"driver_mb": "driver", "ray_worker_mb": "largest Ray worker/task", "max_process_mb": "largest process",
             "tree_mb": "whole process tree"}
    rows = []
    for stage in m.get("stages", OLD_STAGES):
        for f, label in names.items():
            values = " / ".join(f"{m['runs'][s][stage][f]:,.0f}" for s in sizes)
            ratio = m["ratios"][stage][f]
            rows.append((f"memory {stage}", f"{label}, MiB at {' / '.join(sizes)} images",
                         f"{values}  ratio {ratio:.2f}x" if ratio is not None else values))
    return rows
