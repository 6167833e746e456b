"""What a run prints: the project's lines and one progress display per stage; Ray Train's own lines only with
--verbose. The pipeline runs as the real command (a subprocess), under Ray, so Ray's worker and controller
output reaches the streams it would reach for a user."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.console import Progress

ROOT = Path(__file__).resolve().parents[1]
RAY_LINES = ("Reporting training result", "Checkpoint successfully created", "PreemptionWatcher")


def tiny_ray(tmp: Path) -> list[str]:
    """The digits pipeline on a tiny budget, pretraining on 2 Ray Train workers, fine-tuning as Ray tasks."""
    return ["--config", "configs/digits.yaml", f"output_dir={tmp / 'run'}", f"data.shards={tmp / 'shards'}",
            "data.labeled_fractions=[0.1]", "pretrain.epochs=2", "pretrain.global_batch_size=128", "pretrain.knn_every=0",
            "model.timm_kwargs={channels: [8, 16, 32, 64]}", "model.proj_hidden_dim=64", "model.proj_output_dim=32",
            "trainer.torch_threads=1", "finetune.num_seeds=1", "finetune.methods=[pixels,scratch,linear]",
            "finetune.full_fraction_methods=[]", "finetune.epochs=2"]


def selfsup(*argv: str, verbose: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "WANDB_MODE": "offline"}
    env.pop("SELFSUP_VERBOSE", None)
    env.pop("RAY_ADDRESS", None)
    if verbose:
        env["SELFSUP_VERBOSE"] = "1"
    return subprocess.run([sys.executable, "-m", "cluster", *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_pipeline_console_is_quiet_with_progress(tmp_path):
    p = selfsup("pipeline", *tiny_ray(tmp_path))
    assert p.returncode == 0, p.stderr[-3000:]
    both = p.stdout + p.stderr
    for line in RAY_LINES:
        assert line not in both, line
    # pretraining: epoch k/N with loss, images/s and time left, on the driver, from what the workers reported
    assert re.search(r"^\[pretrain\] 1/2 epochs  loss \d+\.\d{4}  \d+ img/s  elapsed \d+:\d\d  left \d+:\d\d$",
                     p.stdout, re.M), p.stdout
    assert re.search(r"^\[pretrain\] 2/2 epochs .* left 0:00$", p.stdout, re.M)
    # fine-tuning: runs done / total with time left, and a line as each run finishes
    assert re.search(r"^\[finetune\] 3/3 runs  elapsed \d+:\d\d  left 0:00$", p.stdout, re.M), p.stdout
    for method in ("pixels", "linear", "scratch"):
        assert re.search(rf"^ *{method}  fraction 0.1 .* acc \d\.\d{{4}}", p.stdout, re.M)
    assert "\r" not in p.stdout and "\x1b" not in p.stdout  # not a terminal: plain lines
    assert f"embedding: {tmp_path / 'run' / 'embedding.png'}" in p.stdout  # in the pipeline by default
    assert (tmp_path / "run" / "embedding.png").stat().st_size > 0


@pytest.mark.slow
def test_verbose_brings_back_ray_trains_lines(tmp_path):
    shard = selfsup("shard", "digits", "--out", str(tmp_path / "shards"), "--image-size", "16")
    assert shard.returncode == 0, shard.stderr[-2000:]
    args = [a for a in tiny_ray(tmp_path) if not a.startswith("finetune.")]
    p = selfsup("pretrain", *args, "--verbose")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Reporting training result" in p.stdout + p.stderr
    assert "[pretrain] 2/2 epochs" in p.stdout


def test_progress_plain_lines_off_a_terminal_and_one_live_line_on_one():
    plain = io.StringIO()
    pr = Progress("finetune", 3, unit="runs", stream=plain, tty=False)
    pr.update()
    pr.message("  pixels  done")
    pr.update()  # within PLAIN_EVERY_S of the last line: not printed
    pr.update()  # the last one always is
    pr.close()
    lines = plain.getvalue().splitlines()
    assert lines[0].startswith("[finetune] 1/3 runs  elapsed 0:00  left ")
    assert lines[1] == "  pixels  done"
    assert lines[2].startswith("[finetune] 3/3 runs") and lines[2].endswith("left 0:00")
    assert len(lines) == 3 and "\r" not in plain.getvalue() and "\x1b" not in plain.getvalue()

    live = io.StringIO()
    pr = Progress("pretrain", 2, unit="epochs", stream=live, tty=True)
    pr.update(1, "loss 1.0000")
    pr.message("[pretrain] epoch=1")
    pr.update(2, "loss 0.5000")
    pr.close()
    out = live.getvalue()
    assert out.count("\n") == 2  # the message's line and the final newline: the display rewrites one line
    assert "\r\x1b[2K[pretrain] 2/2 epochs  loss 0.5000" in out
