"""`selfsup bench`'s outputs: the human-readable table and bench.json."""

from __future__ import annotations

import json
import os
from pathlib import Path


def table(r: dict) -> str:
    """The human-readable summary of bench.json."""
    m = r["meta"]
    lines = [f"selfsup bench: {m['backbone']} {m['timm_kwargs'] or '(timm defaults)'} stem={m['stem']}, "
             f"{m['image_size']} px x {m['channels']} ch, batch {m['batch']}, {m['precision']}, device "
             f"{m['device']} ({m['device_name']}), torch threads {m['threads']} of {m['cpu_count']} cores, "
             f"median of {m['repeats']} after {m['warmup']} warm-up"] if "backbone" in m else []
    if "memory" in r:
        mm = r["memory"]
        lines.append(f"selfsup bench memory: {mm['model']} {mm['timm_kwargs'] or '(timm defaults)'}, "
                     f"{mm['image_size']} px, {mm['classes']} classes, trainer.num_workers={mm['trainer_num_workers']}, "
                     f"peak resident memory per process (MiB), ratio = largest / smallest size")
    rows: list[tuple[str, str, str]] = []

    def add(section: str, what: str, value: float, unit: str) -> None:
        rows.append((section, what, f"{value:.3g} {unit}" if value < 100 else f"{value:,.0f} {unit}"))

    if "loader" in r:
        t = r["loader"]["threads"]
        for key, row in r["loader"].items():
            if key.startswith("workers_"):
                w = key.split("_")[1]
                add("loader", f"ours, {w} workers, {t} main thread", row["ours_images_per_s"], "img/s (2 views)")
                add("loader", f"reference, {w} workers, {t} main thread", row["reference_images_per_s"],
                    "img/s (2 views)")
                add("loader", f"ratio ours/reference, {w} workers", row["ratio"], "x")
    if "decode" in r:
        d = r["decode"]
        add("decode", "ours, 1 thread", d["ours_images_per_s"], "img/s")
        add("decode", "PIL, 1 thread", d["pil_images_per_s"], "img/s")
    if "model" in r:
        add("model", "fwd+bwd+step, in memory", r["model"]["images_per_s"], "img/s (2 views)")
    if "formats" in r:
        f = r["formats"]
        for name, v in f["variants"].items():
            add("formats", f"fwd+bwd+step, in memory, {name}", v["images_per_s"],
                f"img/s ({v['ratio']:.3g}x fp32)")
        for part, what in (("classifier", "fine-tuning step"), ("encode", "frozen encode (knn/linear)")):
            for name, v in f.get(part, {}).get("variants", {}).items():
                add("formats", f"{what}, batch {f[part]['batch']}, {name}", v["images_per_s"],
                    f"img/s ({v['ratio']:.3g}x fp32)")
        rows.append(("formats", "what auto/null pick here", f["picked"]
                     + (f" (CPU capability {f['cpu_capability']})" if f.get("cpu_capability") else "")))
    if "end_to_end" in r:
        e = r["end_to_end"]
        add("end_to_end", "steps with the real loader", e["steps_per_s"], "steps/s")
        add("end_to_end", "images", e["images_per_s"], "img/s (2 views)")
        add("end_to_end", "pipeline_efficiency", e["pipeline_efficiency"], "(end-to-end / model)")
        add("end_to_end", "compute_share", e["compute_share"], "(step time not spent getting views)")
    if "ray" in r:
        y = r["ray"]
        add("ray", "Ray Train, 1 worker", y["ray_images_per_s"], "img/s")
        add("ray", "in-process (--local)", y["local_images_per_s"], "img/s")
        add("ray", "launch to first step, Ray (incl. cluster start)", y["ray_launch_to_first_step_s"], "s")
        add("ray", "launch to first step, --local", y["local_launch_to_first_step_s"], "s")
        if "nice15_images_per_s" in y:
            add("ray", "ratio Ray / in-process", y["ratio"], "x")
            if len(y.get("ratio_rounds", [])) > 1:
                add("ray", f"  median of {len(y['ratio_rounds'])} back-to-back pairs (in-process alone, then Ray)",
                    y["ratio_median"], "x (" + ", ".join(f"{v:.3g}" for v in y["ratio_rounds"]) + ")")
            add("ray", "Ray Train, 1 worker at Ray's default nice 15", y["nice15_images_per_s"], "img/s")
            add("ray", "ratio nice 15 / in-process", y["nice15_ratio"], "x")
        if "local_cluster_up_images_per_s" in y:
            add("ray", "in-process with the Ray cluster up", y["local_cluster_up_images_per_s"], "img/s")
            add("ray", "  ratio in-process with cluster up / without (the daemons' cost)", y["cluster_up_ratio"], "x")
            add("ray", "  ratio Ray / in-process with cluster up (Ray Train's own cost)", y["train_ratio"], "x")
            if "cluster_cpu_cores" in y:
                add("ray", f"  CPU the cluster's {y['cluster_processes']} processes took meanwhile", y["cluster_cpu_cores"],
                    "cores")
        if "ray_launch_after_init_s" in y:
            add("ray", f"launch to first step, Ray, after ray.init ({y['ray_init_s']:.3g} s)",
                y["ray_launch_after_init_s"], "s")
            add("ray", "launch ratio Ray (after ray.init) / --local", y["launch_ratio"], "x")
            if "ray_train_start_s" in y:
                add("ray", "  of which Ray Train starting its controller and worker processes", y["ray_train_start_s"], "s")
                add("ray", "  of which setup to first step in the worker / in-process", y["ray_setup_to_first_step_s"],
                    f"s / {y['local_setup_to_first_step_s']:.3g} s")
            add("ray", "per-epoch report: metrics only / with checkpoint", y["report_s"],
                f"s / {y['checkpoint_report_s']:.3g} s (step {y['step_s']:.3g} s)")
        if "ray_poll_images_per_s" in y:
            add("ray", f"  Ray Train polled every {y['poll_interval_s']:g} s (trainer.poll_interval_s): last step "
                "to run's end", y["ray_exit_s"], f"s (in-process {y['local_exit_s']:.2g} s)")
            add("ray", f"  polled every {y['ray_poll_interval_s']:g} s (Ray's default): last step to run's end",
                y["ray_poll_exit_s"], "s")
            add("ray", "  polled at Ray's default: report metrics only / with checkpoint", y["ray_poll_report_s"],
                f"s / {y['ray_poll_checkpoint_report_s']:.3g} s")
            add("ray", "  polled at Ray's default: Ray Train, 1 worker", y["ray_poll_images_per_s"],
                f"img/s ({y['ray_poll_ratio']:.3g}x in-process)")
    if "daemons" in r:
        d = r["daemons"]
        add("daemons", "in-process steps alone", d["alone_images_per_s"], "img/s")
        for v, what in (("ray_defaults", "beside a private cluster, Ray's defaults"),
                        ("init_ray", "beside the cluster init_ray starts"),
                        ("init_ray_nice19", "the same, its daemons at nice 19")):
            add("daemons", what, d[f"{v}_images_per_s"], f"img/s ({d[f'{v}_ratio']:.3g}x alone)")
            add("daemons", f"  its {d[f'{v}_cluster_processes']:.0f} processes: CPU / wake-ups",
                d[f"{v}_cluster_cpu_cores"], f"cores / {d[f'{v}_cluster_wakeups_per_s']:.0f} per s")
            add("daemons", "  first task after the start", d[f"{v}_first_task_s"], "s")
        add("daemons", f"ratio init_ray's / Ray's defaults, median of {d['rounds']} rounds", d["init_ray_vs_defaults"], "x")
        add("daemons", f"ratio daemons at nice 19 / init_ray's, median of {d['rounds']} rounds", d["nice19_vs_init_ray"], "x")
    if "scaling" in r:
        s = r["scaling"]
        if "skipped" in s:
            rows.append(("scaling", "skipped", s["skipped"]))
        else:
            add("scaling", f"1 worker x {s['threads_per_worker_1']} threads", s["workers_1_images_per_s"], "img/s")
            add("scaling", f"2 workers x {s['threads_per_worker_2']} threads", s["workers_2_images_per_s"], "img/s")
            add("scaling", f"speedup on {s['cores']} cores", s["speedup"], "x")
        for gb, n in s.get("ntxent", {}).items():
            for w in (2, 4):
                if f"world_{w}_efficiency" in n:
                    add("scaling", f"gathered NT-Xent, global batch {gb}, {w} ranks x 1 thread: efficiency",
                        n[f"world_{w}_efficiency"], f"(step {n[f'world_{w}_step_s'] * 1000:.3g} ms, 1 rank "
                        f"{n['world_1_step_s'] * 1000:.3g} ms)")
    if "reference_e2e" in r:
        e = r["reference_e2e"]
        how = f"{e['epochs']} epochs, batch {e['batch']}, {e['threads']} threads"
        add("reference_e2e", f"ours ({e['ours_precision']}{', channels_last' if e['ours_channels_last'] else ''}), {how}",
            e["ours"]["images_per_s"], "img/s")
        add("reference_e2e", f"lightly's recipe ({e['reference_precision']}), {how}", e["reference"]["images_per_s"],
            "img/s")
        if e.get("seeds", 1) > 1:
            add("reference_e2e", f"ratio ours/reference, median of {e['seeds']} seeds", e["ratio"], "x")
            rows.append(("reference_e2e", f"kNN accuracy ours / reference, mean ± std of {e['seeds']} seeds",
                         f"{e['knn_ours_mean']:.3f} ± {e['knn_ours_std']:.3f} / "
                         f"{e['knn_reference_mean']:.3f} ± {e['knn_reference_std']:.3f}"))
            for run in e["runs"]:
                rows.append(("reference_e2e", f"  seed {run['seed']}: img/s, kNN ours / reference",
                             f"{run['ours_images_per_s']:.3g} / {run['reference_images_per_s']:.3g} img/s, "
                             f"{run['ours_knn_acc']:.3f} / {run['reference_knn_acc']:.3f}"))
        else:
            add("reference_e2e", "ratio ours/reference", e["ratio"], "x")
            rows.append(("reference_e2e", "kNN accuracy ours / reference",
                         f"{e['ours']['knn_acc']:.3f} / {e['reference']['knn_acc']:.3f}"))
    if "memory" in r:
        from bench.memory import memory_rows

        rows += memory_rows(r["memory"])
    w0, w1 = max(len(x[0]) for x in rows) if rows else 0, max(len(x[1]) for x in rows) if rows else 0
    lines += [f"{a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in rows]
    lines.append(f"total {m.get('wall_s', 0):.0f} s")
    return "\n".join(lines)


def write_json(r: dict, path: str | os.PathLike) -> Path:
    from runtime.config import atomic_write_text

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(p, json.dumps(r, indent=2) + "\n")
    return p
