"""The SimCLR training loop, run by every Ray Train worker or in-process in local mode.

Three parts, in reading order (the shape of DINO's `train_dino`/`train_one_epoch` and torchtitan's `train_step`):
1. `train_loop`: setup (data, model, optimiser and schedule, resume into a `TrainState`); then per epoch:
   `train_one_epoch`, kNN accuracy, metrics.jsonl, a checkpoint; the last checkpoint exports the encoder.
2. `train_one_epoch`: for each batch: fault injection, two views, `train_step`, log; then the epoch's numbers
   summed over every rank.
3. `train_step`: forward, NT-Xent over the global batch, the non-finite guard every rank agrees on, the update.
`TrainState` is what a checkpoint restores besides the weights, the optimiser and the RNG states.
The launcher (`runtime.launch`) decides where it runs; `session()` hides the difference.

Where the outputs go: rank 0 may run on any node of a cluster, so it never writes into `output_dir` (the
driver's disk). Everything the run produces travels in its checkpoints (`trainer.storage_path`, shared by
every node): `metrics.jsonl` and `events.jsonl` in every one, the encoder in the last; rank 0's offline W&B
files come back in the return value. The driver then writes them into `output_dir` (`publish_outputs`).
In local mode the loop runs in the driver's process and also writes metrics.jsonl/events.jsonl as it goes.
Over 400 lines on purpose: the loop, its state and the driver's half of its outputs read in one sitting.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from lightly.loss import NTXentLoss

from pretrain.augment import BatchAugment, normalize
from pretrain.knn import knn_predict, stream_features
from pretrain.model import (
    ENCODER_META,
    build_model,
    convert_sync_batchnorm,
    encoder_meta,
    save_encoder,
    unwrap,
)
from pretrain.optim import build_optimizer, lr_at, set_lr
from pretrain.precision import resolve_for_model
from runtime import checkpoint as ckpt
from runtime.errors import UserError
from runtime.files import atomic_write_text
from runtime.launch import session
from runtime.tracking import init_tracking, view_grid
from shards.manifest import read_manifest
from shards.reader import ShardLoader
from shards.splits import iter_split, sample_keys

METRICS = "metrics.jsonl"
EVENTS = "events.jsonl"
FAULT_MARKER = ".fault-injected"
ENCODER_DIR = "encoder"  # inside the final checkpoint: encoder.safetensors, head.safetensors, encoder.json


@dataclass
class TrainState:
    """Where the run stands. A checkpoint keeps it (the counters in its meta, the records as metrics.jsonl and
    events.jsonl) beside the weights, optimiser and RNG states; a resume restores it."""

    epoch: int = 0  # epochs done
    step: int = 0  # steps taken, skipped ones included: the schedule is a function of the step alone
    nonfinite_total: int = 0
    skipped_total: int = 0  # corrupt samples skipped, all ranks
    knn_acc: float | None = None  # the latest measured (on rank 0)
    wandb_id: str | None = None  # a restart continues the same W&B run
    history: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl's records so far
    events: list[dict[str, Any]] = field(default_factory=list)  # events.jsonl's
    # this process only, never checkpointed: a restart starts them afresh
    nonfinite_run: int = 0  # non-finite steps in a row; a run of them may cross an epoch boundary
    views_logged: bool = False  # one grid of view pairs per fresh run, at its first update

    def meta(self, arch: dict[str, Any], world: int, global_batch: int, seed: int) -> dict[str, Any]:
        """The checkpoint's meta (checkpoint.json): existing checkpoints and tests read these keys."""
        return {"epoch": self.epoch, "step": self.step,
                "data_position": {"epoch": self.epoch, "batch": 0, "seed": seed}, "arch": arch,
                "nonfinite_total": self.nonfinite_total, "skipped_total": self.skipped_total,
                "knn_acc": self.knn_acc, "world_size": world, "global_batch": global_batch,
                "wandb_id": self.wandb_id}

    @classmethod
    def from_meta(cls, meta: dict[str, Any], history: list[dict[str, Any]], events: list[dict[str, Any]],
                  world: int, steps_per_epoch: int) -> TrainState:
        epoch = meta["epoch"]
        # another worker count splits epochs into other step counts
        step = meta["step"] if meta.get("world_size") == world else epoch * steps_per_epoch
        return cls(epoch=epoch, step=step, nonfinite_total=meta.get("nonfinite_total", 0),
                   skipped_total=meta.get("skipped_total", 0), knn_acc=meta.get("knn_acc"),
                   wandb_id=meta.get("wandb_id"),
                   history=[r for r in history if r.get("epoch", 0) <= epoch],  # a restart rewrites later epochs once
                   events=events, views_logged=epoch > 0)


# ------------------------------------------------------------------ 1. setup, epochs, export


def train_loop(config: dict[str, Any]) -> dict[str, Any]:
    cfg = config["cfg"]
    p = cfg.pretrain
    sess = session()
    rank, world, device = sess.rank, sess.world_size, sess.device
    torch.set_num_threads(cfg.trainer.torch_threads or max(1, (os.cpu_count() or 1) // world))
    out = Path(cfg.output_dir)

    # ---- data: train + unlabeled, the same number of batches on every rank (else the all-gather hangs)
    manifest = read_manifest(cfg.data.shards)
    per_rank = per_rank_batch(p.global_batch_size, world, manifest, cfg.data.shards)
    loader = ShardLoader(cfg.data.shards, splits=("train", "unlabeled"), batch_size=per_rank, rank=rank,
                         world_size=world, seed=p.seed, shuffle=True, num_workers=cfg.data.loader_workers,
                         image_size=cfg.data.image_size, equal_batches=True, shuffle_buffer=cfg.data.shuffle_buffer)
    augment = BatchAugment(cfg.augment, image_size=cfg.data.image_size, mean=manifest["mean"],
                           std=manifest["std"]).to(device)

    # ---- model: the same initial weights on every rank (DDP also broadcasts them)
    torch.manual_seed(p.seed)
    model = build_model(cfg.model, in_chans=int(manifest["channels"])).to(device)
    model = convert_sync_batchnorm(model, cfg.model.sync_batchnorm, device)
    # auto/null: bf16 autocast + channels_last on GPUs and on CPUs with native bf16, channels_last alone on AVX2
    # CPUs, where this model at this size has no 1x1 maps (pretrain/precision.py); fp32 otherwise
    use_bf16, channels_last = resolve_for_model(p.precision, p.channels_last, model, int(manifest["channels"]),
                                                cfg.data.image_size or int(manifest["image_size"]), device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)

    # ---- optimiser and schedule: lr = base_lr * global_batch / 256, linear warmup then cosine, per step
    optimizer = build_optimizer(cfg.optim, model, p.global_batch_size)
    peak_lr = optimizer.param_groups[0]["lr"]
    steps_per_epoch = len(loader)  # the same on every rank
    if p.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, p.max_steps_per_epoch)
    total_steps = p.epochs * steps_per_epoch
    warmup_steps = cfg.optim.warmup_epochs * steps_per_epoch

    def schedule(step: int) -> float:
        return lr_at(step, total_steps, warmup_steps, peak_lr)

    # ---- resume: Ray's own checkpoint after a restart, --resume's, or one written to storage but not yet
    # registered when a worker died (the CLI refuses fresh runs over old checkpoints, so all are this run's)
    on_driver = not sess.distributed  # local mode: this process is the driver, `out` is its own disk
    arch = arch_of(cfg, manifest)
    candidates = (sess.get_checkpoint(), config.get("resume_from"), ckpt.find_latest(config["run_path"]))
    state, resume = restore(candidates, model, optimizer, arch, out, world, steps_per_epoch)
    start_epoch = state.epoch
    if rank == 0:
        # a finished run's encoder (resumed for more epochs) stays until publish_outputs has its replacement
        # written in full: a run stopped before that (a full disk, Ctrl-C) loses no finished result
        if resume is not None:
            sess.log(f"[pretrain] resumed from {resume} at epoch {start_epoch}")
            state.events.append({"event": "resume", "from_epoch": start_epoch, "checkpoint": str(resume),
                                 "time": time.time()})
        if on_driver and (resume is not None or (out / METRICS).exists()):
            _write_run_files(out, state.history, state.events)

    if sess.distributed and world > 1:
        import ray.train.torch

        model = ray.train.torch.prepare_model(model)  # DDP over the process group Ray Train set up
    train_model = torch.compile(model) if p.compile else model
    criterion = NTXentLoss(temperature=p.temperature, gather_distributed=True)
    # rank 0 on another node keeps its W&B files in a scratch dir and returns them to the driver at the end
    wandb_dir = out if on_driver or rank != 0 else Path(tempfile.mkdtemp(prefix="selfsup-wandb-"))
    tracker = init_tracking(cfg, "pretrain", wandb_dir, rank=rank, run_id=state.wandb_id)
    state.wandb_id = tracker.run_id
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16)

    # ---- epochs: train, measure, record, checkpoint
    knn_data = None
    for epoch in range(start_epoch, p.epochs):
        seed_everything(p.seed, epoch, rank)  # resume replays exactly the data and augmentations of this epoch
        loader.set_epoch(epoch)
        model.train()
        record = train_one_epoch(state, epoch, model=train_model, criterion=criterion, optimizer=optimizer,
                                 loader=loader, augment=augment, schedule=schedule, steps=steps_per_epoch,
                                 cfg=cfg, tracker=tracker, autocast=autocast, channels_last=channels_last,
                                 manifest=manifest)
        if record is None:  # the loss stayed non-finite: stop, pointing at the last good checkpoint
            last = ckpt.find_latest(config["run_path"])
            message = (f"loss was non-finite for {state.nonfinite_run} steps in a row at epoch {epoch + 1}, "
                       f"step {state.step} (pretrain.max_nonfinite={p.max_nonfinite}); last good checkpoint: "
                       f"{last or 'none'}: lower optim.base_lr or check the data, then --resume")
            return {"status": "nonfinite", "message": message, "checkpoint": last,
                    "files": _finish_tracking(tracker, wandb_dir, out, exit_code=1)}

        done = state.epoch
        if done == start_epoch + 1 and resume is not None:
            record["resumed_from"] = start_epoch
        if rank == 0 and ((p.knn_every and done % p.knn_every == 0) or done == p.epochs):
            knn_data = knn_data or _knn_data(cfg, manifest)
            state.knn_acc, record["knn_bank"], record["knn_queries"] = knn_monitor(
                unwrap(model).backbone, cfg, manifest, knn_data, device)
            record["knn_acc"] = state.knn_acc
        if rank == 0:
            state.history.append(record)
            if on_driver:
                _write_run_files(out, state.history, state.events)
            tracker.log({"epoch": done, **{f"epoch/{k}": v for k, v in record.items() if k != "epoch"}}, step=state.step)
            sess.log("[pretrain] " + " ".join(f"{k}={_fmt(v)}" for k, v in record.items()))

        if done % p.checkpoint_every == 0 or done == p.epochs:
            report_with_checkpoint(record, state, model, optimizer, cfg, manifest, arch, tracker)
        else:
            sess.report(record)

    # ---- export: the encoder went out with the last checkpoint; close the W&B run
    if rank == 0:
        tracker.summary({"knn_acc": state.knn_acc, "nonfinite_steps": state.nonfinite_total,
                         "skipped_samples": state.skipped_total})
        sess.log(f"[pretrain] encoder exported with the last checkpoint (knn_acc={_fmt(state.knn_acc)})")
    return {"status": "ok", "epochs": p.epochs, "knn_acc": state.knn_acc, "start_epoch": start_epoch,
            "skipped_samples": state.skipped_total, "nonfinite_steps": state.nonfinite_total,
            "files": _finish_tracking(tracker, wandb_dir, out)}


def restore(candidates: tuple[str | None, ...], model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            arch: dict[str, Any], out: Path, world: int, steps_per_epoch: int) -> tuple[TrainState, str | None]:
    """(state, checkpoint): the newest of `candidates` loaded into `model`, `optimizer` and the RNGs, or a fresh
    state and None when there is none."""
    resume = max(candidates, key=ckpt.epoch_of)
    if resume is None:
        return TrainState(), None
    with _local_copy(resume) as d:
        saved = ckpt.load_checkpoint(d, arch=arch, map_location="cpu")
        # a checkpoint written before the files travelled in it: the run's own files, where readable
        history = _read_jsonl(Path(d) / METRICS) if (Path(d) / METRICS).exists() else _read_jsonl(out / METRICS)
        events = _read_jsonl(Path(d) / EVENTS) if (Path(d) / EVENTS).exists() else _read_jsonl(out / EVENTS)
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    ckpt.set_rng_state(saved["rng"])
    return TrainState.from_meta(saved["meta"], history, events, world, steps_per_epoch), resume


def report_with_checkpoint(record: dict[str, Any], state: TrainState, model: torch.nn.Module,
                           optimizer: torch.optim.Optimizer, cfg: Any, manifest: dict[str, Any],
                           arch: dict[str, Any], tracker: Any) -> None:
    """Every rank reports the epoch; rank 0 hands over the checkpoint: weights, optimiser and RNG states, the
    state's meta and records, and after the last epoch the exported encoder."""
    sess, p = session(), cfg.pretrain
    meta = state.meta(arch, sess.world_size, p.global_batch_size, p.seed)
    with tempfile.TemporaryDirectory(prefix="selfsup-ckpt-") as tmp:
        if sess.rank == 0:
            if state.epoch == p.epochs:
                export_encoder(Path(tmp) / ENCODER_DIR, unwrap(model), cfg, manifest, state.knn_acc, tracker)
            ckpt.save_checkpoint(tmp, model_state=unwrap(model).state_dict(),
                                 optimizer_state=optimizer.state_dict(), meta=meta,
                                 extra_files={METRICS: _jsonl(state.history), EVENTS: _jsonl(state.events)})
        sess.report(record, checkpoint_dir=tmp if sess.rank == 0 else None,
                    dir_name=ckpt.checkpoint_dir_name(state.epoch))


def export_encoder(directory: Path, model: torch.nn.Module, cfg: Any, manifest: dict[str, Any],
                   knn_acc: float | None, tracker: Any) -> None:
    """The backbone (and head) for fine-tuning, its JSON last; also a W&B model artifact."""
    enc = encoder_meta(cfg, manifest, model, epochs=cfg.pretrain.epochs, knn_acc=knn_acc)
    save_encoder(directory, model, enc)
    files = [directory / f for f in ("encoder.safetensors", "head.safetensors", ENCODER_META)]
    tracker.log_artifact(f"{cfg.name}-encoder", "model", files, metadata=enc)


# ------------------------------------------------------------------ 2. one epoch


def train_one_epoch(state: TrainState, epoch: int, *, model: torch.nn.Module, criterion: NTXentLoss,
                    optimizer: torch.optim.Optimizer, loader: ShardLoader, augment: BatchAugment,
                    schedule: Callable[[int], float], steps: int, cfg: Any, tracker: Any,
                    autocast: torch.autocast, channels_last: bool, manifest: dict[str, Any]) -> dict[str, Any] | None:
    """`steps` steps on every rank; returns the epoch's metrics.jsonl record (summed over the ranks), or None
    once the loss has been non-finite for `pretrain.max_nonfinite` steps in a row (on every rank at the same
    step, since they agree on each skip)."""
    sess = session()
    rank, world, device = sess.rank, sess.world_size, sess.device
    p = cfg.pretrain
    t_epoch = time.perf_counter()
    data_wait, loss_sum, loss_n, nonfinite, skipped_before = 0.0, 0.0, 0, 0, loader.skipped
    batches = iter(loader)
    for _ in sess.progress(range(steps), total=steps, desc=f"epoch {epoch + 1}"):
        t_wait = time.perf_counter()
        images, _labels = next(batches)
        data_wait += time.perf_counter() - t_wait
        inject_kill(cfg.fault, rank, state.step, Path(cfg.output_dir))

        x = images.to(device, non_blocking=True)
        with torch.no_grad():
            v1, v2 = augment(x), augment(x)  # two independent views, parameters drawn per image
        views = torch.cat([v1, v2])
        if channels_last:
            views = views.contiguous(memory_format=torch.channels_last)
        lr = schedule(state.step)
        loss = train_step(model, criterion, optimizer, views, lr, autocast,
                          distributed=sess.distributed and world > 1,
                          poison=0 <= cfg.fault.nan_at_step <= state.step)
        state.step += 1  # a skipped step counts too: the schedule moves on
        if loss is None:
            state.nonfinite_run, state.nonfinite_total = state.nonfinite_run + 1, state.nonfinite_total + 1
            nonfinite += 1
            if state.nonfinite_run >= p.max_nonfinite:
                return None
            continue
        state.nonfinite_run = 0
        loss_sum, loss_n = loss_sum + loss, loss_n + 1
        if rank == 0:
            tracker.log({"train/loss": loss, "train/lr": lr}, step=state.step)
            if not state.views_logged:
                tracker.log_images("views", view_grid(v1, v2, manifest["mean"], manifest["std"]), step=state.step,
                                   caption="augmented view pairs (left: view 1, right: view 2)")
                state.views_logged = True

    # ---- the epoch's numbers over every rank
    seconds = time.perf_counter() - t_epoch
    loss_sum, loss_n, data_wait, skipped, seconds_sum = reduce_sums(
        [loss_sum, loss_n, data_wait, loader.skipped - skipped_before, seconds], device, sess.distributed and world > 1)
    state.epoch, state.skipped_total = epoch + 1, state.skipped_total + int(skipped)
    return {
        "epoch": state.epoch,
        "step": state.step,
        "loss": loss_sum / loss_n if loss_n else float("nan"),
        "lr": schedule(state.step - 1),
        "images_per_s": steps * p.global_batch_size / max(seconds_sum / world, 1e-9),
        "data_wait_s": data_wait / world,
        "epoch_s": seconds_sum / world,
        "skipped_samples": int(skipped),  # corrupt samples skipped this epoch, all ranks
        "nonfinite_steps": nonfinite,
    }


# ------------------------------------------------------------------ 3. one step


def train_step(model: torch.nn.Module, criterion: NTXentLoss, optimizer: torch.optim.Optimizer,
               views: torch.Tensor, lr: float, autocast: torch.autocast, distributed: bool,
               poison: bool = False) -> float | None:
    """One update on `views` (the batch's first views, then its second views, in one tensor): the loss, or None
    when it was non-finite on any rank and every rank skipped the update. `poison` makes the loss NaN (the
    test aid fault.nan_at_step)."""
    set_lr(optimizer, lr)
    with autocast:
        z1, z2 = model(views).float().chunk(2)
    loss = criterion(z1, z2)  # negatives gathered from every rank: 2 x global batch - 2 per sample
    if poison:
        loss = loss * float("nan")
    optimizer.zero_grad(set_to_none=True)
    # every rank must agree to skip, or DDP's gradient all-reduce would wait forever for the others
    if not all_finite(loss, distributed):
        return None
    loss.backward()
    optimizer.step()
    return loss.item()


# ------------------------------------------------------------------ helpers


def per_rank_batch(global_batch: int, world: int, manifest: dict[str, Any], shards: str) -> int:
    """Each rank's share of the global batch; refuses batches that do not split or exceed the data."""
    n = sum(int(manifest["splits"].get(s, {}).get("count", 0)) for s in ("train", "unlabeled"))
    if global_batch > n:
        raise UserError(f"pretrain.global_batch_size={global_batch} is larger than the {n} training images in "
                        f"{shards}: lower pretrain.global_batch_size")
    if global_batch % world:
        raise UserError(f"pretrain.global_batch_size={global_batch} does not split evenly over {world} workers: "
                        f"use a multiple of {world}")
    return global_batch // world


def arch_of(cfg: Any, manifest: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint must agree on to be loadable into this run's model."""
    m = cfg.model
    return {"model": m.name, "timm_kwargs": dict(m.timm_kwargs), "stem": m.stem,
            "in_chans": int(manifest["channels"]), "image_size": int(cfg.data.image_size),
            "proj_hidden_dim": m.proj_hidden_dim, "proj_output_dim": m.proj_output_dim, "proj_layers": m.proj_layers}


def seed_everything(seed: int, epoch: int, rank: int) -> None:
    s = (seed * 1_000_003 + epoch * 1_009 + rank) % (2**31 - 1)
    torch.manual_seed(s)
    np.random.seed(s)
    random.seed(s)


def inject_kill(fault: Any, rank: int, step: int, out: Path) -> None:
    """Test aid (fault.kill_rank/at_step): exit hard on that step, on the first attempt only."""
    if fault.kill_rank != rank or fault.at_step != step:
        return
    marker = out / FAULT_MARKER
    if marker.exists():
        return  # the restarted attempt runs on
    marker.write_text(f"rank {rank} killed at step {step}\n")
    session().log(f"[pretrain] fault injection: rank {rank} exits at step {step}")
    os._exit(1)


def all_finite(loss: torch.Tensor, distributed: bool) -> bool:
    ok = torch.isfinite(loss.detach()).float().reshape(1)
    if distributed:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item() > 0)


def reduce_sums(values: list[float], device: torch.device, distributed: bool) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
    if distributed:
        dist.all_reduce(t)
    return t.tolist()


def _knn_data(cfg: Any, manifest: dict[str, Any]) -> tuple[list[str] | None, list[str] | None]:
    """Which images the kNN monitor reads, drawn once per run: a seeded sample of at most `pretrain.knn_bank`
    labeled train images (the memory bank) and `pretrain.knn_queries` test images (the queries), as key lists
    (None: the whole split, when it is no larger). Keys only: the images are streamed at each measurement."""
    p = cfg.pretrain
    return (sample_keys(cfg.data.shards, "train", p.knn_bank, seed=p.seed, labeled=True),
            sample_keys(cfg.data.shards, "test", p.knn_queries, seed=p.seed))


def knn_monitor(backbone: torch.nn.Module, cfg: Any, manifest: dict[str, Any],
                knn_data: tuple[list[str] | None, list[str] | None], device: torch.device,
                batch_size: int = 256) -> tuple[float, int, int]:
    """(k=20 cosine kNN accuracy, bank size, query count): the bank's and queries' shards streamed through
    the backbone in batches of `batch_size` at the training size; only their features are held."""
    bank_keys, query_keys = knn_data
    mean, std, size = manifest["mean"], manifest["std"], cfg.data.image_size

    def features(split: str, keys: list[str] | None):
        batches = iter_split(cfg.data.shards, split, keys=keys, image_size=size, batch_size=batch_size)
        return stream_features(backbone, batches, lambda u: normalize(u, mean, std), device)

    bank, bank_y, _ = features("train", bank_keys)
    keep = bank_y >= 0
    bank, bank_y = bank[keep], bank_y[keep]
    queries, query_y, _ = features("test", query_keys)
    if not len(bank) or not len(queries):
        return float("nan"), len(bank), len(queries)
    pred = knn_predict(bank, bank_y, queries, cfg.pretrain.knn_k, 0.1, len(manifest["classes"]))
    return float((pred.cpu() == query_y).float().mean()), len(bank), len(queries)


@contextlib.contextmanager
def _local_copy(path: str):
    """A local directory holding the checkpoint at `path` (downloaded when it is a URI)."""
    if "://" not in str(path):
        yield path
        return
    import ray.train

    with tempfile.TemporaryDirectory(prefix="selfsup-resume-") as tmp:
        yield ray.train.Checkpoint(path).to_directory(tmp)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file ([] when missing); a line cut short by a crash is dropped."""
    try:
        text = path.read_text()
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def _jsonl(records: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def _write_run_files(out: Path, history: list[dict[str, Any]], events: list[dict[str, Any]]) -> None:
    """metrics.jsonl (and events.jsonl when there are events) as a whole, each by an atomic rename."""
    out.mkdir(parents=True, exist_ok=True)
    for name, records in ((METRICS, history), (EVENTS, events)):
        if records or name == METRICS:
            atomic_write_text(out / name, _jsonl(records))


def _finish_tracking(tracker: Any, wandb_dir: Path, out: Path, exit_code: int = 0) -> dict[str, bytes]:
    """Close the W&B run; on a worker, hand its files (scratch dir) to the driver as {relative path: bytes}."""
    tracker.finish(exit_code=exit_code)
    if wandb_dir == out:
        return {}
    try:
        return pack_files(wandb_dir)
    finally:
        shutil.rmtree(wandb_dir, ignore_errors=True)


def publish_outputs(result: dict[str, Any] | None, cfg: Any, local: bool) -> list[str]:
    """The driver's half: write what the workers produced into `output_dir`. From the run's latest checkpoint
    in `trainer.storage_path`: metrics.jsonl and events.jsonl (Ray mode: local mode wrote them as it went) and,
    when the run finished, the encoder (encoder.json last: it marks the stage done); from rank 0's return
    value: its W&B files. Called after a failed run too, so the epochs that were checkpointed are on record.
    Returns the names written."""
    from runtime.launch import run_path

    out = Path(cfg.output_dir)
    written = unpack_files((result or {}).get("files") or {}, out)
    latest = ckpt.find_latest(run_path(cfg, cfg.name))
    if latest is None:
        return written
    with _local_copy(latest) as d:
        d = Path(d)
        if not local:
            for name in (METRICS, EVENTS):
                if (d / name).is_file():
                    atomic_write_text(out / name, (d / name).read_text())
                    written.append(name)
        enc = d / ENCODER_DIR
        if (result or {}).get("status") != "ok":
            return written
        if (enc / ENCODER_META).is_file():
            (out / ENCODER_META).unlink(missing_ok=True)  # the old done-marker must not vouch for new weights
            for f in sorted(enc.iterdir(), key=lambda f: f.name == ENCODER_META):  # encoder.json last
                tmp = out / f".{f.name}.tmp"
                shutil.copyfile(f, tmp)
                os.replace(tmp, out / f.name)
                written.append(f.name)
        else:  # a finished run checkpointed before the encoder travelled in it (resumed with no epoch to add)
            manifest = read_manifest(cfg.data.shards)
            state = ckpt.load_checkpoint(d, arch=arch_of(cfg, manifest))
            model = build_model(cfg.model, in_chans=int(manifest["channels"]))
            model.load_state_dict(state["model"])
            save_encoder(out, model, encoder_meta(cfg, manifest, model, epochs=state["meta"]["epoch"],
                                                  knn_acc=state["meta"].get("knn_acc")))
            written.append(ENCODER_META)
    return written


def pack_files(root: Path) -> dict[str, bytes]:
    """Every regular file under `root` as {path relative to root: bytes} (symlinks skipped)."""
    root = Path(root)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.is_symlink()}


def unpack_files(files: dict[str, bytes], out: Path) -> list[str]:
    """Write `pack_files`' result under `out`; a name that would leave `out` is refused."""
    written = []
    base = Path(out).resolve()
    for rel, data in files.items():
        target = (base / rel).resolve()
        if not target.is_relative_to(base) or target == base:
            raise UserError(f"refusing to write {rel!r} outside {base}")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        written.append(rel)
    return written


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)
