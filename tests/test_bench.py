"""`selfsup bench` on a tiny budget: real generated shards, real loaders, real model steps, real Ray.

Checks the shape of bench.json (every section and figure the issue names) and that every measured figure is
a positive number; the figures themselves depend on the machine, so no value is asserted beyond that.
"""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch

from cluster.cli import main
from pretrain.precision import resolve_precision

TINY = ["--backbone", "resnet18", "--image-size", "16", "--batch", "16", "--repeats", "2", "--threads", "1",
        "--images", "320", "--loader-batches", "2", "--decode-images", "50",
        "model.timm_kwargs={channels: [8, 8, 16, 16]}", "model.proj_hidden_dim=32", "model.proj_output_dim=16"]


def numbers(node, path=""):
    """Every number under `node` with its path (booleans are not figures)."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from numbers(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from numbers(v, f"{path}[{i}]")
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        yield path, node


def assert_positive(section: dict, name: str) -> None:
    found = list(numbers(section, name))
    assert found, f"{name} holds no figures"
    for path, value in found:
        assert math.isfinite(value) and value > 0, f"{path} = {value}"


def run_bench(tmp_path, parts: str, *extra: str) -> tuple[dict, str]:
    out = tmp_path / "bench.json"
    rc = main(["bench", "--parts", parts, "--out", str(out), *TINY, *extra])
    assert rc == 0
    return json.loads(out.read_text()), out


def test_cheap_parts_and_end_to_end(tmp_path, capsys):
    r, _ = run_bench(tmp_path, "loader,decode,model,formats,end_to_end", "--loader-workers", "0,2")
    assert set(r) == {"meta", "loader", "decode", "model", "formats", "end_to_end"}
    m = r["meta"]
    assert m["threads"] == 1 and m["batch"] == 16 and m["image_size"] == 16 and m["repeats"] == 2
    assert m["backbone"] == "resnet18" and m["timm_kwargs"] == {"channels": [8, 8, 16, 16]}
    for w in (0, 2):
        row = r["loader"][f"workers_{w}"]
        assert {"ours_images_per_s", "reference_images_per_s", "ratio"} <= set(row)
        assert len(row["ours_runs_s"]) == len(row["reference_runs_s"]) == 2
        assert row["ratio"] == pytest.approx(row["ours_images_per_s"] / row["reference_images_per_s"])
    assert {"ours_images_per_s", "pil_images_per_s", "images"} <= set(r["decode"])
    assert r["decode"]["images"] == 50
    assert {"images_per_s", "steps_per_s"} <= set(r["model"])
    e = r["end_to_end"]
    assert {"steps_per_s", "images_per_s", "pipeline_efficiency", "compute_share", "data_s",
            "launch_to_first_step_s"} <= set(e)
    pairs = [m / s for m, s in zip(r["model"]["runs_s"], e["runs_s"])]
    assert len(pairs) == 2 and e["pipeline_efficiency"] == pytest.approx(sorted(pairs)[0] / 2 + sorted(pairs)[1] / 2)
    # formats: each variant's steps timed in turn; ratios to fp32 in the default format; what auto/null pick here
    # (the SimCLR step on the batch of 16, fine-tuning's classifier step on min(finetune.batch_size, 16))
    f = r["formats"]
    # and the frozen encode of knn/linear on a batch of finetune.encode.BATCH
    from finetune.encode import BATCH

    assert f["classifier"]["batch"] == 16 and f["encode"]["batch"] == BATCH
    for variants, n in ((f["variants"], 16), (f["classifier"]["variants"], 16), (f["encode"]["variants"], BATCH)):
        assert list(variants) == ["fp32", "fp32, channels_last", "bf16, channels_last"]
        base = statistics.median(variants["fp32"]["runs_s"])
        for v in variants.values():
            assert len(v["runs_s"]) == 2 and v["ratio"] == pytest.approx(base / statistics.median(v["runs_s"]))
            assert v["images_per_s"] == pytest.approx(n / statistics.median(v["runs_s"]))
    picked = {(False, False): "fp32", (False, True): "fp32, channels_last", (True, True): "bf16, channels_last"}
    assert f["picked"] == picked[resolve_precision("auto", None, "cpu")]
    assert f["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    for name in ("loader", "decode", "model", "formats", "end_to_end"):
        assert_positive(r[name], name)
    printed = capsys.readouterr().out
    assert "torch threads 1" in printed and "pipeline_efficiency" in printed and "ratio ours/reference" in printed
    assert "fine-tuning step, batch 16, bf16, channels_last" in printed
    assert f"frozen encode (knn/linear), batch {BATCH}, bf16, channels_last" in printed
    assert f"what auto/null pick here {f['picked']} (CPU capability {f['cpu_capability']})" in " ".join(printed.split())


def test_bad_parts_is_one_line_error(tmp_path, capsys):
    rc = main(["bench", "--parts", "loader,warp", "--out", str(tmp_path / "b.json")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "warp" in err and "\n" not in err
    assert not (tmp_path / "b.json").exists()


@pytest.mark.slow
def test_ray_and_scaling(tmp_path):
    r, _ = run_bench(tmp_path, "ray,scaling", "--threads", "2", "--ray-rounds", "2")
    assert set(r) == {"meta", "ray", "scaling"}
    y = r["ray"]
    assert {"ray_images_per_s", "local_images_per_s", "ratio", "ray_launch_to_first_step_s",
            "local_launch_to_first_step_s", "ray_init_s"} <= set(y)
    # launch to first step under Ray includes starting the cluster
    assert y["ray_launch_to_first_step_s"] > y["ray_init_s"]
    s = r["scaling"]
    assert {"workers_1_images_per_s", "workers_2_images_per_s", "speedup"} <= set(s)
    assert s["threads_per_worker_1"] == 2 and s["threads_per_worker_2"] == 1
    # the candidate causes of Ray's overhead, measured: the worker runs at the driver's priority (Ray's
    # default nice 15 is measured apart), with the same threads as in-process; per-epoch report costs
    assert y["ray_worker"]["nice"] == y["local_worker"]["nice"] and y["nice15_worker"]["nice"] == 15
    assert y["ray_worker"]["torch_threads"] == y["local_worker"]["torch_threads"] == 2
    assert y["report_s"] > 0 and y["checkpoint_report_s"] > 0 and y["nice15_images_per_s"] > 0
    assert y["ray_launch_after_init_s"] == pytest.approx(y["ray_launch_to_first_step_s"] - y["ray_init_s"])
    # the launch after ray.init split in two: Train starting its processes, then our own setup in the worker
    assert 0 < y["ray_train_start_s"] < y["ray_launch_after_init_s"]
    assert y["ray_train_start_s"] + y["ray_setup_to_first_step_s"] <= y["ray_launch_after_init_s"] + 0.01
    # the overhead split: in-process again with the cluster up (daemons' cost) against Ray Train's own
    assert y["cluster_up_ratio"] == pytest.approx(y["local_cluster_up_images_per_s"] / y["local_images_per_s"])
    assert y["train_ratio"] == pytest.approx(y["ray_images_per_s"] / y["local_cluster_up_images_per_s"])
    assert y["train_ratio"] * y["cluster_up_ratio"] == pytest.approx(y["ratio"])
    # the cluster's own processes, counted from /proc while the in-process steps ran beside them
    assert y["cluster_processes"] >= 3 and 0 < y["cluster_cpu_cores"] < 2
    # the same worker polled at Ray Train's own 2 s: reports made back to back wait for each poll there
    assert y["poll_interval_s"] == 0.5 and y["ray_poll_interval_s"] == 2.0
    assert y["ray_poll_report_s"] > 1.0 and y["report_s"] < y["ray_poll_report_s"]
    assert y["ray_poll_ratio"] == pytest.approx(y["ray_poll_images_per_s"] / y["local_images_per_s"])
    assert y["ray_exit_s"] > y["local_exit_s"] >= 0
    # a second back-to-back pair (in-process alone, then Ray Train on a fresh cluster); the first is the section's
    assert len(y["ratio_rounds"]) == 2 and y["ratio_rounds"][0] == y["ratio"]
    assert y["ratio_median"] == pytest.approx(sum(y["ratio_rounds"]) / 2)
    for gb in ("16", "256"):
        n = s["ntxent"][gb]
        assert n["global_batch"] == int(gb) and {"world_1_step_s", "world_2_efficiency", "world_4_efficiency"} <= set(n)
    assert_positive({k: v for k, v in y.items() if not k.endswith("worker")}, "ray")
    assert_positive(s, "scaling")


@pytest.mark.slow
def test_daemons_compares_the_private_cluster_with_rays_defaults(tmp_path, capsys):
    """The same in-process steps alone and beside two real private clusters, round by round: Ray's default
    system config prestarts an idle worker, the cluster init_ray starts has none (one process fewer)."""
    r, _ = run_bench(tmp_path, "daemons", "--daemon-rounds", "1")  # the bench's default is 3
    assert set(r) == {"meta", "daemons"}
    d = r["daemons"]
    assert d["rounds"] == 1 and d["steps"] == 2 and set(d["runs"]) == {"alone", "ray_defaults", "init_ray", "init_ray_nice19"}
    for variant in ("ray_defaults", "init_ray", "init_ray_nice19"):
        assert len(d["runs"][variant]["images_per_s"]) == 1
        assert d[f"{variant}_ratio"] == pytest.approx(d[f"{variant}_images_per_s"] / d["alone_images_per_s"])
        # CPU time is counted in clock ticks: over a couple of tiny steps an idle cluster can read 0
        assert d[f"{variant}_first_task_s"] > 0 and 0 <= d[f"{variant}_cluster_cpu_cores"] < 2
        assert d[f"{variant}_cluster_wakeups_per_s"] > 0
    assert d["init_ray_cluster_processes"] < d["ray_defaults_cluster_processes"]
    printed = capsys.readouterr().out
    assert "beside the cluster init_ray starts" in printed and "ratio init_ray's / Ray's defaults" in printed


def test_gathered_ntxent_efficiency_on_two_cpu_ranks():
    """The loss with negatives gathered over 2 real gloo ranks: a time per step and an efficiency."""
    from bench.ntxent import gathered_ntxent

    both = gathered_ntxent((2,), (32, 64), dim=16, repeats=2)  # one group of 2 ranks measures both batches
    assert set(both) == {"32", "64"}
    for gb, n in both.items():
        assert n["global_batch"] == int(gb) and len(n["world_2_runs_s"]) == 2
        assert n["world_2_efficiency"] == pytest.approx(n["world_1_step_s"] / min(2, n["cores"]) / n["world_2_step_s"])
        assert_positive(n, "ntxent")


def test_reference_e2e_races_lightlys_recipe(tmp_path, capsys):
    """Ours (the real loop, --local) against lightly's documented loop on the same shards: images/s and kNN,
    once per seed, kNN compared as mean ± std over the seeds."""
    out = tmp_path / "bench.json"
    assert main(["bench", "--parts", "reference_e2e", "--e2e-epochs", "2", "--e2e-seeds", "2", "--out", str(out),
                 *TINY, "pretrain.max_steps_per_epoch=2"]) == 0
    r = json.loads(out.read_text())
    assert set(r) == {"meta", "reference_e2e"}
    e = r["reference_e2e"]
    assert e["epochs"] == 2 and e["batch"] == 16 and e["threads"] == 1 and e["steps_per_epoch"] == 2
    for side in ("ours", "reference"):
        assert 0 <= e[side]["knn_acc"] <= 1 and len(e[side]["epoch_s"]) == 2 and len(e[side]["loss"]) == 2
        assert e[side]["images_per_s"] == pytest.approx(2 * 2 * 16 / e[side]["train_s"])
    assert e["seeds"] == 2 and [run["seed"] for run in e["runs"]] == [0, 1]
    assert e["runs"][0]["ours_knn_acc"] == e["ours"]["knn_acc"]
    ratios = sorted(run["ours_images_per_s"] / run["reference_images_per_s"] for run in e["runs"])
    assert e["ratio"] == pytest.approx(sum(ratios) / 2)  # the median of two
    for side in ("ours", "reference"):
        accs = [run[f"{side}_knn_acc"] for run in e["runs"]]
        assert e[f"knn_{side}_mean"] == pytest.approx(sum(accs) / 2)
        assert e[f"knn_{side}_std"] == pytest.approx(abs(accs[0] - accs[1]) / 2 ** 0.5)
    assert e["reference_precision"] == "fp32" and e["ours_precision"] in ("fp32", "bf16")
    printed = capsys.readouterr().out
    assert "lightly's recipe" in printed and "kNN accuracy ours / reference, mean ± std of 2 seeds" in printed


# ------------------------------------------------------------------ memory


def test_memory_sampler_sees_every_process_of_the_tree(tmp_path):
    """A driver that starts a child holding 300 MiB: the child's peak is recorded, apart from the driver's."""
    import sys

    from bench.memory import run_measured

    child = "b = bytearray(300 * 2**20); import time; time.sleep(1.0)"
    driver = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {child!r}], check=True)"
    r = run_measured([sys.executable, "-c", driver], dict(__import__("os").environ), tmp_path / "log")
    assert r["rc"] == 0
    kinds = {p["kind"] for p in r["processes"]}
    assert kinds == {"driver", "other"} and len(r["processes"]) == 2
    assert r["other_mb"] >= 300 and r["driver_mb"] < 200 and r["max_process_mb"] == r["other_mb"]
    assert r["tree_mb"] >= 300


def test_memory_bad_sizes_is_one_line_error(tmp_path, capsys):
    rc = main(["bench", "--parts", "memory", "--memory-sizes", "10,x", "--out", str(tmp_path / "b.json")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "--memory-sizes" in err and "\n" not in err
    assert not (tmp_path / "b.json").exists()


@pytest.mark.slow
def test_memory_part_runs_every_stage_at_two_sizes(tmp_path, capsys):
    """The real stages as child processes on 300 and 600 generated images (in-process stages: no Ray)."""
    out = tmp_path / "bench.json"
    rc = main(["bench", "--parts", "memory", "--memory-sizes", "300,600", "--memory-classes", "10",
               "--image-size", "16", "--out", str(out), "trainer.num_workers=0", "trainer.torch_threads=1",
               "model.timm_kwargs={channels: [8, 8, 16, 16]}", "model.proj_hidden_dim=32", "model.proj_output_dim=16",
               "pretrain.max_steps_per_epoch=2", "pretrain.global_batch_size=32",
               "finetune.methods=[pixels, knn, linear, finetune]"])
    assert rc == 0
    r = json.loads(out.read_text())
    m = r["memory"]
    assert m["sizes"] == [300, 600] and m["classes"] == 10 and m["image_size"] == 16
    for n in ("300", "600"):
        for stage in ("shard", "pretrain", "finetune", "select", "inspect", "predict"):
            row = m["runs"][n][stage]
            assert row["rc"] == 0 and row["wall_s"] > 0
            assert row["driver_mb"] > 0 and row["max_process_mb"] >= row["driver_mb"]
            assert row["tree_mb"] >= row["driver_mb"] * 0.9 and row["processes"]
    assert m["stages"] == ["shard", "pretrain", "finetune", "select", "inspect", "predict"]
    for stage in m["stages"]:
        assert set(m["ratios"][stage]) == {"driver_mb", "ray_worker_mb", "max_process_mb", "tree_mb"}
        assert m["ratios"][stage]["driver_mb"] == pytest.approx(
            m["runs"]["600"][stage]["driver_mb"] / m["runs"]["300"][stage]["driver_mb"], rel=1e-2)
        assert isinstance(m["within_target"][stage], bool)
    printed = capsys.readouterr().out
    assert "memory pretrain" in printed and "ratio" in printed


def test_bench_figures_fill_the_readme_block_from_bench_json(tmp_path):
    """bench/README.md's figures come from a bench.json by `python -m bench.figures`, never typed by hand."""
    from bench import figures

    r = {"meta": {"started": "2026-11-25T18:00:00Z", "cpu_count": 2, "load_average": [0.5, 0.4, 0.3]},
         "decode": {"ours_images_per_s": 1234.0, "pil_images_per_s": 567.0}}
    src = tmp_path / "bench.json"
    src.write_text(json.dumps(r))
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- figures:decode -->\nold figures\n<!-- /figures:decode -->\nrest\n")
    assert figures.main([str(src), "--section", "decode", "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old figures" not in text and text.startswith("intro\n") and text.endswith("rest\n")
    assert "1,234 img/s" in text and "567 img/s" in text and "2 cores" in text and "[0.5, 0.4, 0.3]" in text
    assert figures.main([str(src), "--section", "memory", "--readme", str(readme)]) == 2  # no such block: one line


def test_every_readme_writer_refuses_a_missing_or_broken_json_in_one_line(tmp_path, capsys):
    """The five bench scripts that write README tables share one reader: a bad results file is one line, exit 2,
    and the README is left as it was."""
    import importlib

    readme = tmp_path / "README.md"
    readme.write_text("x\n<!-- figures:s -->\nold\n<!-- /figures:s -->\n")
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    for script in ("figures", "semi", "teacher", "semi_cost", "digits_semi"):
        for src, says in ((tmp_path / "missing.json", "no results file at"), (broken, "cannot read the results file")):
            argv = {"figures": [str(src)], "semi": ["figures", str(src)], "teacher": ["figures", str(src)],
                    "semi_cost": ["--json", str(src)], "digits_semi": ["--json", str(src)]}[script]
            rc = importlib.import_module(f"bench.{script}").main([*argv, "--section", "s", "--readme", str(readme)])
            err = capsys.readouterr().err
            assert rc == 2 and err.startswith(f"error: {says}") and err.count("\n") == 1, (script, err)
            assert "old" in readme.read_text()


def test_semi_cost_figures_fill_the_readme_block_from_its_json(tmp_path):
    """bench/README.md's semi-cost table comes from bench/results/semi_cost.json, never typed by hand."""
    from pathlib import Path

    from bench import semi_cost

    src = Path(__file__).resolve().parents[1] / "bench" / "results" / "semi_cost.json"
    readme = tmp_path / "README.md"
    readme.write_text("x\n<!-- figures:semi-cost -->\nold\n<!-- /figures:semi-cost -->\ny\n")
    assert semi_cost.main(["--json", str(src), "--section", "semi-cost", "--readme", str(readme)]) == 0
    text = readme.read_text()
    r = json.loads(src.read_text())
    assert "old" not in text and text.startswith("x\n") and text.rstrip().endswith("y")
    for run in r["runs"]:
        assert f"| {run['semi_cpu_ratio_current_over_former']} |" in text
    assert semi_cost.table(r) in (src.parents[1] / "README.md").read_text()  # the shipped table is this JSON's
    stage = json.loads((src.parent / "semi_stage.json").read_text())
    text = semi_cost.table(stage)
    assert "| whole stage, wall |" in text and f"| `semi` | {stage['before']['compute_s']['semi']} |" in text
    assert text in (src.parents[1] / "README.md").read_text()
