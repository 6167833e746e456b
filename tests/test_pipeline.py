"""`selfsup pipeline` end to end in this process: all stages, then skips, --force, stale configs, resume."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from cluster.cli import main


def tiny(tmp: Path) -> list[str]:
    """The digits pipeline on a tiny budget, in local mode (no Ray: that path is tested in test_submit)."""
    return ["pipeline", "--local", "--config", "configs/digits.yaml", f"output_dir={tmp / 'run'}",
            f"data.shards={tmp / 'shards'}", "data.labeled_fractions=[0.1]", "pretrain.epochs=2",
            "pretrain.global_batch_size=128", "pretrain.knn_every=0", "model.timm_kwargs={channels: [8, 16, 32, 64]}",
            "model.proj_hidden_dim=64", "model.proj_output_dim=32", "trainer.torch_threads=1",
            "finetune.num_seeds=2", "finetune.methods=[pixels,scratch,linear]",
            "finetune.full_fraction_methods=[pixels]", "finetune.epochs=2"]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run(capsys, argv: list[str]) -> str:
    assert main(argv) == 0
    return capsys.readouterr().out


def epochs_in(metrics: Path) -> list[int]:
    return [json.loads(ln)["epoch"] for ln in metrics.read_text().splitlines() if ln.strip()]


@pytest.mark.slow
def test_pipeline_runs_skips_forces_and_resumes(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    run_dir = tmp_path / "run"

    # 1. everything runs, and the summary says where things are and what the headline is
    out = run(capsys, tiny(tmp_path))
    for stage in ("shard", "pretrain", "inspect", "finetune"):
        assert f"[pipeline] {stage}: running" in out
    # the data report, after pretraining (a side stage: it feeds no later stage)
    assert json.loads((run_dir / "data_report.json").read_text())["images"]["train"] > 0
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest["complete"] is True
    report = json.loads((run_dir / "report.json").read_text())
    assert {(r["method"], r["label_fraction"]) for r in report["results"]} >= {
        ("pixels", 0.1), ("scratch", 0.1), ("linear", 0.1), ("pixels", 1.0)}
    assert f"report:  {run_dir / 'report.md'}" in out
    assert f"plot:    {run_dir / 'label_efficiency.png'}" in out
    assert f"encoder: {run_dir / 'encoder.safetensors'}" in out
    smallest = [r for r in report["results"] if r["label_fraction"] == 0.1]
    best = max((r for r in smallest if r["method"] not in ("pixels", "scratch")), key=lambda r: r["accuracy_mean"])
    assert "headline at 0.1 of the labels" in out
    assert f"{best['method']} {best['accuracy_mean']:.3f} ± {best['accuracy_std']:.3f}" in out
    assert (run_dir / "pipeline.config.yaml").is_file()
    assert "group: digits" in (run_dir / "pipeline.config.yaml").read_text()  # one W&B group for all stages
    assert epochs_in(run_dir / "metrics.jsonl") == [1, 2]
    # pipeline.json: the printed summary for scripts, each stage's seconds in the order the stages ran
    record = json.loads((run_dir / "pipeline.json").read_text())
    assert list(record["stage_s"]) == ["shard", "pretrain", "inspect", "finetune"]
    # each figure is rounded to 0.1 s, so the stages may sum past the wall time by half a tenth each
    slack = 0.05 * (len(record["stage_s"]) + 1)
    assert all(s > 0 for s in record["stage_s"].values())
    assert record["wall_s"] + slack >= sum(record["stage_s"].values())
    assert f"pipeline done in {record['wall_s']:.0f} s" in out and record["report_json"] == str(run_dir / "report.json")
    from finetune.report import main as report_main

    assert report_main([str(run_dir), "--markdown"]) == 0  # README's table says how long the run took
    table = capsys.readouterr().out
    assert f"The pipeline ran in {record['wall_s']:.0f} s (shard " in table and "finetune " in table

    # 2. a second run skips every stage and changes nothing
    before = {p: digest(p) for p in (run_dir / "encoder.json", run_dir / "report.json",
                                     tmp_path / "shards" / "manifest.json")}
    out = run(capsys, tiny(tmp_path))
    for stage in ("shard", "pretrain", "finetune"):
        assert f"[pipeline] {stage}: done, skipped" in out
    assert "running" not in out and "NOTE" not in out
    assert before == {p: digest(p) for p in before}
    record = json.loads((run_dir / "pipeline.json").read_text())  # this run's record: nothing ran
    assert record["stage_s"] == {} and set(record["stages"].values()) == {"skipped"}
    out = run(capsys, [*tiny(tmp_path), "inspect.enabled=false"])
    assert "[pipeline] inspect: off (inspect.enabled=false)" in out and "running" not in out

    # 3. a changed stage config is pointed out, not silently ignored
    out = run(capsys, [*tiny(tmp_path), "finetune.epochs=3"])
    assert "[pipeline] finetune: done, skipped" in out and "finetune.epochs 2 -> 3" in out

    # 4. --force finetune redoes only finetune, keeping the old report aside
    out = run(capsys, [*tiny(tmp_path), "--force", "finetune"])
    assert "[pipeline] shard: done, skipped" in out and "[pipeline] pretrain: done, skipped" in out
    assert "[pipeline] inspect: done, skipped" in out
    assert "[pipeline] finetune: running" in out
    assert digest(run_dir / "encoder.json") == before[run_dir / "encoder.json"]
    assert (run_dir / "report.json").is_file()
    old = list((run_dir / "superseded").glob("finetune-*/report.json"))
    assert len(old) == 1 and digest(old[0]) == before[run_dir / "report.json"]

    # 5. an interrupted pretraining (checkpoints, no encoder yet) is resumed, not restarted, then finetune reruns
    (run_dir / "encoder.json").unlink()
    out = run(capsys, tiny(tmp_path))
    assert "[pipeline] shard: done, skipped" in out
    assert "pretrain: resuming the interrupted run" in out and "[pipeline] finetune: running" in out
    assert "[pipeline] inspect: running" in out  # a new encoder: its data report again
    assert (run_dir / "encoder.json").is_file()
    assert epochs_in(run_dir / "metrics.jsonl") == [1, 2]  # each epoch exactly once


def test_force_unknown_stage_is_one_line(tmp_path, capsys):
    assert main(["pipeline", f"output_dir={tmp_path / 'x'}", "--force", "everything"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--force everything" in err[0]
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("uri", [False, True], ids=["path", "file-uri"])
def test_force_pretrain_moves_checkpoints_aside(tmp_path, uri):
    """--force pretrain must clear the run's checkpoints (else pretraining refuses to start over them), keeping
    them: under superseded/ for a local storage_path, renamed in place for a URI (file:// here, s3:// alike)."""
    from cluster.pipeline import _set_aside
    from runtime.config import load_config

    storage = tmp_path / "store"
    cfg = load_config(None, [f"output_dir={tmp_path / 'run'}",
                             f"trainer.storage_path={'file://' if uri else ''}{storage}"])
    ckpt = storage / "digits" / "checkpoint_epoch_000001"
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text("{}")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "encoder.json").write_text("{}")
    _set_aside("pretrain", cfg)
    assert not (storage / "digits").exists() and not (tmp_path / "run" / "encoder.json").exists()
    [old] = (tmp_path / "run" / "superseded").glob("pretrain-*")
    assert (old / "encoder.json").is_file()
    if uri:
        [moved] = storage.glob("digits.superseded-*")
    else:
        moved = old / "checkpoints"
    assert (moved / "checkpoint_epoch_000001" / "state.json").is_file()


def test_a_run_saved_with_old_key_names_is_not_stale(tmp_path):
    """Configs saved before the renames (pretrain.batch_size, finetune.seeds, ...) compare equal to the same
    settings under the new names; a real change is still reported, under its new name."""
    import yaml

    from cluster.pipeline import FINETUNE_KEYS, PRETRAIN_KEYS, _changes
    from runtime.config import RENAMED, load_config, save_config

    cfg = load_config(None, [f"output_dir={tmp_path}"])
    saved = yaml.safe_load(save_config(cfg, tmp_path / "config.yaml").read_text())
    for old, new in RENAMED.items():  # write it as an earlier version did
        section, old_key, new_key = old.split(".")[0], old.split(".")[1], new.split(".")[1]
        saved[section][old_key] = saved[section].pop(new_key)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    assert _changes(tmp_path / "config.yaml", cfg, PRETRAIN_KEYS) == ""
    assert _changes(tmp_path / "config.yaml", cfg, FINETUNE_KEYS) == ""
    cfg.finetune.num_seeds = 2
    assert _changes(tmp_path / "config.yaml", cfg, FINETUNE_KEYS) == "finetune.num_seeds 5 -> 2"


def _cluster_address(config: dict) -> str:
    """A Ray task's view of the cluster it runs on."""
    import ray

    return ray.get_runtime_context().gcs_address


@pytest.mark.slow
def test_stages_inside_one_cluster_share_the_private_cluster(tmp_path):
    """`selfsup pipeline` runs its stages inside `runtime.launch.one_cluster()`: pretraining's private cluster
    serves fine-tuning too, and is shut down at the end; outside the block each stage starts and stops its own."""
    import sys

    import ray

    from runtime.config import load_config
    from runtime.launch import one_cluster, run_tasks

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this module
    cfg = load_config(None, ["trainer.num_workers=2", f"output_dir={tmp_path}"])
    assert not ray.is_initialized()
    with one_cluster():
        first = run_tasks(_cluster_address, [{}], cfg, "first")
        assert ray.is_initialized()
        second = run_tasks(_cluster_address, [{}], cfg, "second")
    assert not ray.is_initialized()
    assert first == second and first[0].startswith("127.0.0.1:")
    alone = run_tasks(_cluster_address, [{}], cfg, "alone")
    assert not ray.is_initialized() and alone != first
