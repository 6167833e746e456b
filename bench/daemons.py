"""`selfsup bench --parts daemons`: what a private Ray cluster's own processes cost a training step beside them.

The same in-process steps (`--local`, no Ray Train) run alone, beside a private cluster started with Ray's
default system config (one idle worker prestarted per CPU), beside the cluster `runtime.launch.init_ray` starts
(`PRIVATE_CLUSTER_CONFIG`), and beside that one with its daemons (all but the raylet) at nice 19. Every cluster
has worker_niceness 0, so the second and third differ only by what init_ray trims. The four alternate round by
round, so a drift in the machine's load hits them alike. Meanwhile the cluster's processes are counted from
/proc: how much CPU they take and how often their threads wake (voluntary context switches), which is what
costs an OpenMP step that holds every core: each wake-up takes a core from one of its threads and the others
wait for it at the next barrier. Also timed, after the steps: the first Ray task on the cluster (it carries the
job's runtime_env, as fine-tuning's parallel runs do).
"""

from __future__ import annotations

import copy
import glob
import statistics
import time
from collections.abc import Callable
from typing import Any

VARIANTS = ("alone", "ray_defaults", "init_ray", "init_ray_nice19")


def _cluster_counters() -> dict[str, float]:
    """CPU seconds (`bench.run.children_cpu_s`, summed) and wake-ups (voluntary context switches: each one a
    sleep, then a wake-up; every thread) of this process's descendants."""
    from bench.run import children_cpu_s

    cpu = children_cpu_s()
    return {"cpu_s": sum(cpu.values()), "switches": sum(_wakeups(pid) for pid in cpu), "processes": len(cpu)}


def _wakeups(pid: int) -> int:
    """Voluntary context switches so far of every thread of `pid`, from /proc (0 once it has ended)."""
    n = 0
    for status in glob.glob(f"/proc/{pid}/task/*/status"):
        try:
            with open(status) as f:
                n += sum(int(line.split()[1]) for line in f if line.startswith("voluntary_ctxt"))
        except (OSError, ValueError, IndexError):
            continue
    return n


def _renice_daemons(niceness: int = 19) -> int:
    """Put the cluster's daemons (GCS, dashboard and its modules and agents, log and autoscaler monitors) at
    `niceness`; not the raylet, whose worker processes would start from it. How many were reniced."""
    from bench.memory import _psutil

    psutil = _psutil()
    done = 0
    for child in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(child.cmdline())
            if "raylet/raylet" in cmd or (cmd.startswith("ray::") and "Agent" not in cmd):
                continue  # the raylet, and worker processes (the steps' neighbours, as they would be)
            child.nice(niceness)
            done += 1
        except psutil.Error:
            continue
    return done


def _first_task_s() -> float:
    """Seconds until a first trivial task on the running cluster returns."""
    import ray

    @ray.remote(num_cpus=0)
    def first() -> int:
        return 1

    t0 = time.perf_counter()
    ray.get(first.remote())
    return time.perf_counter() - t0


def bench_daemons(b: Any, tmp: str, run_steps: Callable[..., dict], log: Callable[[str], None]) -> dict:
    """`b.daemon_rounds` rounds of the variants (`--daemon-rounds`), each round: start the cluster, let it settle, run the steps in-process
    (`b.repeats` timed steps) while counting the cluster's processes, stop it. Figures are medians over the
    rounds."""
    import ray

    from runtime.launch import init_ray

    cfg = copy.deepcopy(b.cfg)
    cfg.trainer.address = None
    cfg.trainer.num_workers = 1
    cfg.trainer.resources_per_worker = {"CPU": float(b.threads)}
    if ray.is_initialized():  # a cluster of an earlier section: every variant starts from none
        ray.shutdown()
    rows: dict[str, dict[str, list[float]]] = {v: {} for v in VARIANTS}
    rounds = b.daemon_rounds
    for r in range(rounds):
        for variant in VARIANTS:
            log(f"daemons: round {r + 1}/{rounds}, {variant} ...")
            if variant != "alone":
                init_ray(cfg, system_config={"worker_niceness": 0} if variant == "ray_defaults" else None)
            if variant == "init_ray_nice19":
                _renice_daemons()
            try:
                time.sleep(3.0)  # past the cluster's start-up work, as during a long run
                c0, t0 = _cluster_counters(), time.perf_counter()
                steps = run_steps(b, 0, tmp)
                c1, wall = _cluster_counters(), time.perf_counter() - t0
                # after the steps: the worker this task starts stays on as an idle worker
                first_task_s = _first_task_s() if variant != "alone" else 0.0
            finally:
                if ray.is_initialized():
                    ray.shutdown()
            # the cluster's processes (the loader's worker processes, if any, count too: alike in all four)
            got = {"images_per_s": steps["images_per_s"], "first_task_s": first_task_s,
                   "cluster_cpu_cores": max(0.0, c1["cpu_s"] - c0["cpu_s"]) / wall,
                   "cluster_wakeups_per_s": max(0.0, c1["switches"] - c0["switches"]) / wall,
                   "cluster_processes": c1["processes"]}
            for k, v in got.items():
                rows[variant].setdefault(k, []).append(float(v))
    out: dict[str, Any] = {"rounds": rounds, "steps": b.repeats, "runs": rows}
    for variant in VARIANTS:
        for k, runs in rows[variant].items():
            out[f"{variant}_{k}"] = statistics.median(runs)
    for variant in VARIANTS[1:]:
        out[f"{variant}_ratio"] = out[f"{variant}_images_per_s"] / out["alone_images_per_s"]
    # per round, the trimmed cluster against Ray's defaults (the pair shares the round's load), then the median
    out["init_ray_vs_defaults"] = statistics.median(
        t / d for t, d in zip(rows["init_ray"]["images_per_s"], rows["ray_defaults"]["images_per_s"]))
    out["nice19_vs_init_ray"] = statistics.median(
        n / t for n, t in zip(rows["init_ray_nice19"]["images_per_s"], rows["init_ray"]["images_per_s"]))
    return out
