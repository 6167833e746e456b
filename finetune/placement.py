"""Where fine-tuning's work runs: this process, Ray tasks, or Ray Train (`finetune.parallel`, `auto` resolved),
and the trainer settings the runs there use. The frozen encodes (`finetune.encode`: knn/linear, `selfsup select`,
`selfsup inspect`, `finetune.selection`) follow the same choice, so the cluster that trains is the one that
encodes."""

from __future__ import annotations

import copy
import os
from typing import Any

from runtime.errors import UserError

TASKS_MAX_UNLABELED = 100_000  # above this, `auto` spreads each run over DDP workers instead of one task each


def unlabeled_splits(manifest: dict) -> tuple[str, ...]:
    """The splits semi-supervised training reads without labels: train + unlabeled, never test."""
    return tuple(s for s in ("train", "unlabeled") if manifest["splits"].get(s, {}).get("count", 0) > 0)


def unlabeled_count(manifest: dict) -> int:
    return sum(manifest["splits"][s]["count"] for s in unlabeled_splits(manifest))


def execution_mode(cfg: Any, manifest: dict) -> tuple[str, int]:
    """(mode, workers) for the trained methods: `finetune.parallel`, with `auto` resolved (see the config)."""
    ft, t = cfg.finetune, cfg.trainer
    mode = ft.parallel
    if mode == "auto":
        big = unlabeled_count(manifest) > TASKS_MAX_UNLABELED
        mode = ("train" if ft.num_workers >= 2 else "local" if t.num_workers < 2 else "train" if big else "tasks")
    if mode == "train":
        workers = ft.num_workers or t.num_workers
        if workers < 2:
            raise UserError(f"finetune.parallel=train needs 2 or more Ray Train workers, got {workers}: set "
                            "finetune.num_workers (or trainer.num_workers) >= 2, or finetune.parallel=local")
        return mode, workers
    return mode, 0


def run_settings(cfg: Any, manifest: dict) -> tuple[str, int, Any]:
    """(mode, workers, run_cfg): `execution_mode`, and a copy of `cfg` with the trainer settings the trained
    methods and the frozen encodes run with."""
    mode, workers = execution_mode(cfg, manifest)
    run_cfg = copy.deepcopy(cfg)
    if mode != "tasks":  # tasks: trainer.num_workers sizes the local cluster the tasks share
        run_cfg.trainer.num_workers = workers  # train: the cluster the encodes start must fit Ray Train's workers
    if mode != "train" and "://" in (cfg.trainer.storage_path or ""):
        run_cfg.trainer.storage_path = None  # local-mode runs keep their checkpoints beside the report
    if mode == "local":
        # small batches of small images gain little from intra-op threads, and spinning OpenMP threads
        # on a busy machine cost 10x: half the cores by default (trainer.torch_threads overrides)
        run_cfg.trainer.torch_threads = cfg.trainer.torch_threads or max(1, (os.cpu_count() or 2) // 2)
    return mode, workers, run_cfg
