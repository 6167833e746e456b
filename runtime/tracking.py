"""A thin W&B wrapper: only rank 0 talks to wandb; every other rank (or `wandb.enabled: false`) gets a
Tracker whose methods do nothing, so the training loop calls them unconditionally.

Mode: `wandb.mode` in the config, else $WANDB_MODE, else "offline" -- nothing leaves the machine unless the
user asks. The API key is never part of the config: wandb reads WANDB_API_KEY (or its netrc) by itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from runtime.environ import environ

MODES = ("offline", "online", "disabled")


class Tracker:
    """No-op tracker: what non-zero ranks and disabled runs get."""

    enabled = False
    run_dir: Path | None = None  # the wandb run directory (holds run-<id>.wandb); None when disabled
    run_id: str | None = None  # pass back to `init_tracking(run_id=...)` to continue this run on resume

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        pass

    def log_images(self, name: str, grid: np.ndarray, step: int | None = None, caption: str | None = None) -> None:
        pass

    def log_table(self, name: str, columns: list[str], rows: list[list[Any]], step: int | None = None) -> None:
        pass

    def log_artifact(self, name: str, type: str, files: Iterable[str | os.PathLike],
                     metadata: dict[str, Any] | None = None) -> None:
        pass

    def use_artifact(self, name: str, type: str, files: Iterable[str | os.PathLike]) -> None:
        pass

    def save_file(self, path: str | os.PathLike) -> None:
        pass

    def summary(self, values: dict[str, Any]) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


class WandbTracker(Tracker):
    enabled = True

    def __init__(self, run):
        self._run = run
        self.run_id = run.id
        self.run_dir = Path(run.settings.sync_dir).resolve()

    def log(self, metrics, step=None):
        self._run.log(dict(metrics), step=step)

    def log_images(self, name, grid, step=None, caption=None):
        import wandb

        self._run.log({name: wandb.Image(np.asarray(grid), caption=caption)}, step=step)

    def log_table(self, name, columns, rows, step=None):
        import wandb

        self._run.log({name: wandb.Table(columns=list(columns), data=[list(r) for r in rows])}, step=step)

    def _artifact(self, name, type, files, metadata=None):
        import wandb

        # artifact names allow only letters, digits, '-', '_' and '.'
        artifact = wandb.Artifact(re.sub(r"[^\w.-]", "-", name), type=type, metadata=metadata or {})
        for f in files:
            artifact.add_file(str(f))
        return artifact

    def log_artifact(self, name, type, files, metadata=None):
        with artifact_dirs(self.run_dir):
            self._run.log_artifact(self._artifact(name, type, files, metadata))

    def use_artifact(self, name, type, files):
        # the same name, type and files as the run that logged it: W&B matches it to that version by digest
        # (works offline too, and links the stages once both runs are synced)
        with artifact_dirs(self.run_dir):
            artifact = self._artifact(name, type, files)
            if not self._run.settings._offline:
                self._run.use_artifact(artifact)
                return
            # offline, wandb refuses use_artifact; what it does online with a draft artifact is to log it marked
            # "use after commit", which an offline run records and `wandb sync` replays as this run's input
            log = getattr(self._run, "_log_artifact", None)
            if log is not None:
                log(artifact, aliases=[], is_user_created=True, use_after_commit=True)

    def save_file(self, path):
        # a copy in the run's files/ (wandb.save would leave a symlink out of the run directory)
        dest = Path(self._run.dir) / Path(path).name
        shutil.copyfile(path, dest)
        self._run.save(str(dest), base_path=str(dest.parent), policy="now")

    def summary(self, values):
        self._run.summary.update(dict(values))

    def finish(self, exit_code=0):
        if self._run is not None:
            self._run.finish(exit_code=exit_code)
            self._run = None


@contextlib.contextmanager
def artifact_dirs(run_dir: Path | None):
    """wandb stages an artifact's files under `$WANDB_DATA_DIR/artifacts/staging` and caches them under
    `$WANDB_CACHE_DIR`, both in the user's home by default; an offline run syncs them from there. Point both
    inside this run's own directory (`<output_dir>/wandb/offline-run-.../artifacts-data`, `.../artifacts-cache`)
    while the artifact is made, so the run directory carries its artifacts' files wherever it is copied."""
    if run_dir is None:
        yield
        return
    with environ({"WANDB_DATA_DIR": str(run_dir / "artifacts-data"),
                  "WANDB_CACHE_DIR": str(run_dir / "artifacts-cache")}):
        yield


def resolve_mode(cfg_mode: str | None) -> str:
    mode = cfg_mode or os.environ.get("WANDB_MODE") or "offline"
    # wandb itself also accepts "dryrun" / "run" in $WANDB_MODE
    return {"dryrun": "offline", "run": "online"}.get(mode, mode)


def current_rank() -> int:
    """Global rank: torch.distributed's when a process group is up (Ray Train workers), else $RANK, else 0."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def init_tracking(cfg, stage: str, output_dir: str | os.PathLike, rank: int | None = None,
                  run_id: str | None = None) -> Tracker:
    """Start the W&B run of `stage` ("pretrain", "finetune") in `output_dir/wandb`, on rank 0 only.

    Group = `wandb.group` or the run name, so pretrain and finetune of one run sit together.
    `run_id` continues an earlier run (resume after a restart) instead of starting a new one.
    """
    rank = current_rank() if rank is None else rank
    if not cfg.wandb.enabled or rank != 0:
        return Tracker()
    mode = resolve_mode(cfg.wandb.mode)
    if mode == "disabled":
        return Tracker()
    import wandb

    out = Path(output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    config = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)
    if stage == "finetune" and config.get("encoder") is None and hasattr(cfg, "encoder_dir"):
        config["encoder"] = str(Path(cfg.encoder_dir).resolve())  # the default (output_dir), spelled out
    run = wandb.init(
        project=cfg.wandb.project,
        entity=cfg.wandb.entity,
        group=cfg.wandb.group or cfg.name,
        name=f"{cfg.name}-{stage}",
        job_type=stage,
        config=config,
        mode=mode,
        dir=str(out),
        id=run_id,
        resume="allow" if run_id else None,
        settings=capture_settings(cfg, mode),
    )
    # epoch-level metrics ("epoch/...") plot against the epoch, per-step ones against the global step
    run.define_metric("epoch")
    run.define_metric("epoch/*", step_metric="epoch")
    return WandbTracker(run)


def capture_settings(cfg, mode: str):
    """Console output and system metrics: recorded online, and offline with `wandb.capture_offline: true`
    (off otherwise: the sampler costs CPU the training workers could use, and the console is in the job log)."""
    import wandb

    capture = mode == "online" or bool(getattr(cfg.wandb, "capture_offline", False))
    return wandb.Settings(x_disable_stats=not capture, console="auto" if capture else "off")


def read_run_records(run_dir: str | os.PathLike, timeout: float = 120) -> list[dict[str, Any]]:
    """The records of a local run's .wandb log as dicts, read by wandb's own reader (`wandb leet inspect`)."""
    proc = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_dir)],
                          capture_output=True, text=True, timeout=timeout, check=True)
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip().startswith("{")]


def read_run_history(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The logged history rows (one dict per step, with `_step`) of a local run."""
    return [r["history"]["item"] for r in read_run_records(run_dir) if r.get("type") == "history"]


# ---------------------------------------------------------------- images


@torch.no_grad()
def view_grid(v1: torch.Tensor, v2: torch.Tensor, mean, std, n: int = 16, min_side: int = 64) -> np.ndarray:
    """uint8 HxWx3 image of `n` augmented pairs: each row holds 4 pairs, view 1 left of view 2.

    Normalised views are mapped back to pixels; tiny images are upscaled (nearest) to `min_side` so the
    grid is readable in the W&B UI.
    """
    from torchvision.utils import make_grid

    n = min(n, v1.shape[0])
    m = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    pairs = torch.stack([v1[:n].detach().float().cpu(), v2[:n].detach().float().cpu()], dim=1).flatten(0, 1)
    pixels = (pairs * s + m).clamp(0, 1)
    scale = max(1, -(-min_side // pixels.shape[-1]))
    if scale > 1:
        pixels = torch.nn.functional.interpolate(pixels, scale_factor=scale, mode="nearest")
    grid = make_grid(pixels, nrow=8, padding=2, pad_value=1.0)  # 1-channel input comes back as 3 channels
    return (grid.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
