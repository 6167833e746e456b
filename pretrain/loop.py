"""The SimCLR training loop: one function, run by every Ray Train worker or in-process in local mode.

Read it top to bottom: data, model, optimiser and schedule, resume; then for each epoch, for each
batch: two views, forward, NT-Xent over the global batch, non-finite guard, backward, step, log;
per epoch: metrics (and kNN accuracy), metrics.jsonl, checkpoint; at the end: export the encoder.
The launcher (`pretrain.launch`) decides where it runs; `session()` hides the difference.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from lightly.loss import NTXentLoss

from pretrain import checkpoint as ckpt
from pretrain.augment import BatchAugment, normalize
from pretrain.errors import UserError
from pretrain.knn import knn_accuracy
from pretrain.launch import session
from pretrain.model import build_model, convert_sync_batchnorm, encoder_meta, save_encoder, unwrap
from pretrain.optim import build_optimizer, lr_at, set_lr
from pretrain.reader import ShardLoader, load_split
from pretrain.shards import read_manifest
from pretrain.tracking import init_tracking, view_grid

METRICS = "metrics.jsonl"
EVENTS = "events.jsonl"
FAULT_MARKER = ".fault-injected"


def train_loop(config: dict[str, Any]) -> dict[str, Any]:
    cfg = config["cfg"]
    p = cfg.pretrain
    sess = session()
    rank, world, device = sess.rank, sess.world_size, sess.device
    torch.set_num_threads(cfg.trainer.torch_threads or max(1, (os.cpu_count() or 1) // world))
    out = Path(cfg.output_dir)
    on_gpu = device.type == "cuda"
    use_bf16 = p.precision == "bf16" or (p.precision == "auto" and on_gpu)
    channels_last = on_gpu if p.channels_last is None else p.channels_last

    # ---- data: train + unlabeled, the same number of batches on every rank (else the all-gather hangs)
    manifest = read_manifest(cfg.data.shards)
    per_rank = per_rank_batch(p.batch_size, world, manifest, cfg.data.shards)
    loader = ShardLoader(cfg.data.shards, splits=("train", "unlabeled"), batch_size=per_rank, rank=rank,
                         world_size=world, seed=p.seed, shuffle=True, num_workers=cfg.data.loader_workers,
                         image_size=cfg.data.image_size, equal_batches=True, shuffle_buffer=cfg.data.shuffle_buffer)
    image_size = cfg.data.image_size
    mean, std = manifest["mean"], manifest["std"]
    augment = BatchAugment(cfg.augment, image_size=image_size, mean=mean, std=std).to(device)

    # ---- model: the same initial weights on every rank (DDP also broadcasts them)
    torch.manual_seed(p.seed)
    model = build_model(cfg.model, in_chans=int(manifest["channels"])).to(device)
    model = convert_sync_batchnorm(model, cfg.model.sync_batchnorm, device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)

    # ---- optimiser and schedule: lr = base_lr * global_batch / 256, linear warmup then cosine, per step
    optimizer = build_optimizer(cfg.optim, model, p.batch_size)
    peak_lr = optimizer.param_groups[0]["lr"]
    steps_per_epoch = len(loader)
    total_steps = p.epochs * steps_per_epoch
    warmup_steps = cfg.optim.warmup_epochs * steps_per_epoch

    # ---- resume: Ray's own checkpoint after a restart, --resume's, or one written to storage but not yet
    # registered when a worker died (the CLI refuses fresh runs over old checkpoints, so all are this run's)
    start_epoch, step, nonfinite_total, skipped_total, last_knn, wandb_id = 0, 0, 0, 0, None, None
    arch = arch_of(cfg, manifest)
    candidates = (sess.get_checkpoint(), config.get("resume_from"), ckpt.find_latest(config["run_path"]))
    resume = max(candidates, key=ckpt.epoch_of)
    if resume is not None:
        with _local_copy(resume) as d:
            state = ckpt.load_checkpoint(d, arch=arch, map_location="cpu")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        ckpt.set_rng_state(state["rng"])
        meta = state["meta"]
        start_epoch, step = meta["epoch"], meta["step"]
        if meta.get("world_size") != world:  # another worker count splits epochs into other step counts
            step = start_epoch * steps_per_epoch
        nonfinite_total, skipped_total = meta.get("nonfinite_total", 0), meta.get("skipped_total", 0)
        last_knn, wandb_id = meta.get("knn_acc"), meta.get("wandb_id")
    if rank == 0:
        _truncate_metrics(out / METRICS, start_epoch)
        # a finished run's encoder (resumed for more epochs) stays until save_encoder has its replacement
        # written in full: a run stopped before that (a full disk, Ctrl-C) loses no finished result
        if resume is not None:
            sess.log(f"[pretrain] resumed from {resume} at epoch {start_epoch}")
            _append_json(out / EVENTS, {"event": "resume", "from_epoch": start_epoch, "checkpoint": str(resume),
                                         "time": time.time()})

    if sess.distributed and world > 1:
        import ray.train.torch

        model = ray.train.torch.prepare_model(model)  # DDP over the process group Ray Train set up
    train_model = torch.compile(model) if p.compile else model
    criterion = NTXentLoss(temperature=p.temperature, gather_distributed=True)
    tracker = init_tracking(cfg, "pretrain", out, rank=rank, run_id=wandb_id)
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16)

    knn_data = None
    nonfinite_run = 0
    grid_logged = start_epoch > 0
    for epoch in range(start_epoch, p.epochs):
        seed_everything(p.seed, epoch, rank)  # resume replays exactly the data and augmentations of this epoch
        loader.set_epoch(epoch)
        model.train()
        t_epoch = time.perf_counter()
        data_wait, loss_sum, loss_n, nonfinite_epoch, skipped_before = 0.0, 0.0, 0, 0, loader.skipped
        batches = iter(loader)
        for _ in sess.progress(range(steps_per_epoch), total=steps_per_epoch, desc=f"epoch {epoch + 1}"):
            t_wait = time.perf_counter()
            images, _labels = next(batches)
            data_wait += time.perf_counter() - t_wait
            inject_kill(cfg.fault, rank, step, out)

            x = images.to(device, non_blocking=True)
            with torch.no_grad():
                v1, v2 = augment(x), augment(x)  # two independent views, parameters drawn per image
            views = torch.cat([v1, v2])
            if channels_last:
                views = views.contiguous(memory_format=torch.channels_last)
            lr = lr_at(step, total_steps, warmup_steps, peak_lr)
            set_lr(optimizer, lr)

            with autocast:
                z1, z2 = train_model(views).float().chunk(2)
            loss = criterion(z1, z2)  # negatives gathered from every rank: 2 x global batch - 2 per sample
            if 0 <= cfg.fault.nan_at_step <= step:
                loss = loss * float("nan")

            # every rank must agree to skip, or DDP's gradient all-reduce would wait forever for the others
            if not all_finite(loss, sess.distributed and world > 1):
                optimizer.zero_grad(set_to_none=True)
                nonfinite_run, nonfinite_epoch, nonfinite_total = nonfinite_run + 1, nonfinite_epoch + 1, nonfinite_total + 1
                step += 1
                if nonfinite_run >= p.max_nonfinite:
                    last = ckpt.find_latest(config["run_path"])
                    message = (f"loss was non-finite for {nonfinite_run} steps in a row at epoch {epoch + 1}, "
                               f"step {step} (pretrain.max_nonfinite={p.max_nonfinite}); last good checkpoint: "
                               f"{last or 'none'}: lower optim.base_lr or check the data, then --resume")
                    tracker.finish(exit_code=1)
                    return {"status": "nonfinite", "message": message, "checkpoint": last}
                continue
            nonfinite_run = 0
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            loss_sum, loss_n = loss_sum + loss.item(), loss_n + 1
            if rank == 0:
                tracker.log({"train/loss": loss.item(), "train/lr": lr}, step=step)
                if not grid_logged:
                    tracker.log_images("views", view_grid(v1, v2, mean, std), step=step,
                                       caption="augmented view pairs (left: view 1, right: view 2)")
                    grid_logged = True

        # ---- end of epoch: global numbers, kNN, metrics.jsonl, checkpoint
        seconds = time.perf_counter() - t_epoch
        loss_sum, loss_n, data_wait, skipped, seconds_sum = reduce_sums(
            [loss_sum, loss_n, data_wait, loader.skipped - skipped_before, seconds], device, sess.distributed and world > 1)
        done, skipped_total = epoch + 1, skipped_total + int(skipped)
        record: dict[str, Any] = {
            "epoch": done,
            "step": step,
            "loss": loss_sum / loss_n if loss_n else float("nan"),
            "lr": lr_at(step - 1, total_steps, warmup_steps, peak_lr),
            "images_per_s": steps_per_epoch * p.batch_size / max(seconds_sum / world, 1e-9),
            "data_wait_s": data_wait / world,
            "epoch_s": seconds_sum / world,
            "skipped_samples": int(skipped),  # corrupt samples skipped this epoch, all ranks
            "nonfinite_steps": nonfinite_epoch,
        }
        if done == start_epoch + 1 and resume is not None:
            record["resumed_from"] = start_epoch
        if rank == 0 and ((p.knn_every and done % p.knn_every == 0) or done == p.epochs):
            knn_data = knn_data or _knn_data(cfg, manifest)
            last_knn = record["knn_acc"] = knn_accuracy(
                unwrap(model).backbone, *knn_data, transform=lambda u: normalize(u, mean, std),
                batch_size=256, device=device, k=p.knn_k, num_classes=len(manifest["classes"]))
        if rank == 0:
            _append_json(out / METRICS, record)
            tracker.log({"epoch": done, **{f"epoch/{k}": v for k, v in record.items() if k != "epoch"}}, step=step)
            sess.log("[pretrain] " + " ".join(f"{k}={_fmt(v)}" for k, v in record.items()))

        if done % p.checkpoint_every == 0 or done == p.epochs:
            meta = {"epoch": done, "step": step, "data_position": {"epoch": done, "batch": 0, "seed": p.seed},
                    "arch": arch, "nonfinite_total": nonfinite_total, "skipped_total": skipped_total, "knn_acc": last_knn,
                    "world_size": world, "global_batch": p.batch_size, "wandb_id": tracker.run_id}
            with tempfile.TemporaryDirectory(prefix="selfsup-ckpt-") as tmp:
                if rank == 0:
                    ckpt.save_checkpoint(tmp, model_state=unwrap(model).state_dict(),
                                         optimizer_state=optimizer.state_dict(), meta=meta)
                sess.report(record, checkpoint_dir=tmp if rank == 0 else None,
                            dir_name=ckpt.checkpoint_dir_name(done))
        else:
            sess.report(record)

    # ---- export: the backbone (and head) for fine-tuning, its JSON last
    if rank == 0:
        meta = encoder_meta(cfg, manifest, unwrap(model), epochs=p.epochs, knn_acc=last_knn)
        path = save_encoder(out, unwrap(model), meta)
        files = [out / "encoder.safetensors", out / "head.safetensors", out / "encoder.json"]
        tracker.log_artifact(f"{cfg.name}-encoder", "model", [f for f in files if f.exists()], metadata=meta)
        tracker.summary({"knn_acc": last_knn, "nonfinite_steps": nonfinite_total, "skipped_samples": skipped_total})
        sess.log(f"[pretrain] encoder written to {path} (knn_acc={_fmt(last_knn)})")
    tracker.finish()
    return {"status": "ok", "epochs": p.epochs, "knn_acc": last_knn, "start_epoch": start_epoch,
            "skipped_samples": skipped_total, "nonfinite_steps": nonfinite_total}


# ------------------------------------------------------------------ helpers


def per_rank_batch(global_batch: int, world: int, manifest: dict[str, Any], shards: str) -> int:
    """Each rank's share of the global batch; refuses batches that do not split or exceed the data."""
    n = sum(int(manifest["splits"].get(s, {}).get("count", 0)) for s in ("train", "unlabeled"))
    if global_batch > n:
        raise UserError(f"pretrain.batch_size={global_batch} is larger than the {n} training images in {shards}: "
                        "lower pretrain.batch_size")
    if global_batch % world:
        raise UserError(f"pretrain.batch_size={global_batch} does not split evenly over {world} workers: "
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


def _knn_data(cfg: Any, manifest: dict[str, Any]):
    """The whole labeled train split as memory bank, the test split as queries (uint8, in memory)."""
    train_x, train_y, _ = load_split(cfg.data.shards, "train", image_size=cfg.data.image_size)
    test_x, test_y, _ = load_split(cfg.data.shards, "test", image_size=cfg.data.image_size)
    keep = train_y >= 0
    return train_x[keep], train_y[keep], test_x, test_y


@contextlib.contextmanager
def _local_copy(path: str):
    """A local directory holding the checkpoint at `path` (downloaded when it is a URI)."""
    if "://" not in str(path):
        yield path
        return
    import ray.train

    with tempfile.TemporaryDirectory(prefix="selfsup-resume-") as tmp:
        yield ray.train.Checkpoint(path).to_directory(tmp)


def _truncate_metrics(path: Path, keep_epochs: int) -> None:
    """Keep the lines of epochs 1..keep_epochs: a restart rewrites the later ones exactly once."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("epoch", 0) <= keep_epochs:
                kept.append(line)
        except ValueError:
            continue  # a line cut short by a crash
    tmp = path.with_suffix(".tmp")
    try:
        tmp.write_text("".join(k + "\n" for k in kept))
    except BaseException:  # a full disk: no temp file left behind
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def _append_json(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)
