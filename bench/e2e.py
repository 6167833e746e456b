"""`selfsup bench --parts reference_e2e`: the whole pretraining race against lightly's documented SimCLR loop.

Both sides train the same network (`build_model(cfg.model)`, the same seed) on the same shards' train and
unlabeled images, at the same global batch, with the same LARS optimiser and warmup-cosine schedule, for the
same number of epochs of the same number of steps, in this one process with the same torch threads:

- ours: the real training loop (`pretrain.loop.train_loop`, the `selfsup pretrain --local` path): `ShardLoader`
  uint8 batches, `BatchAugment` on whole batches, one forward pass over both views (2B), NT-Xent with the
  precision and memory format `pretrain.precision`/`pretrain.channels_last` resolve to here;
- reference: lightly's documented example: webdataset -> PIL decode -> lightly `SimCLRTransform` per image ->
  torch `DataLoader` (same loader worker count as ours), two forward passes (one per view), lightly
  `NTXentLoss`, fp32.

Then both backbones go through the same kNN monitor (`pretrain.loop.knn_monitor`: the same bank and queries).
`images_per_s` counts source images over the epochs' training time (the kNN measurement and, for ours, the
per-epoch checkpoint left out; `wall_s` includes them).
"""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path
from typing import Any

import torch


def bench_reference_e2e(b: Any, epochs: int, seeds: int = 1, log=print) -> dict:
    """Ours against lightly's recipe, trained one after the other, once per seed (`pretrain.seed` + 0, 1, ...);
    figures per side and the ratios. With several seeds, kNN accuracy is compared as mean ± std over them:
    one run's kNN on the demo's 360 test images moves by about one standard error (~0.014) from seed to seed."""
    import statistics

    from pretrain.model import build_model
    from pretrain.precision import resolve_for_model

    cfg = _race_config(b, epochs)
    bf16, channels_last = resolve_for_model(cfg.pretrain.precision, cfg.pretrain.channels_last,
                                            build_model(cfg.model, b.channels), b.channels, b.image_size, b.device)
    runs = []
    for i in range(seeds):
        seeded = copy.deepcopy(cfg)
        seeded.pretrain.seed = cfg.pretrain.seed + i
        log(f"reference_e2e: ours ({epochs} epochs, {'bf16' if bf16 else 'fp32'}"
            f"{', channels_last' if channels_last else ''}, seed {seeded.pretrain.seed}) ...")
        ours = _ours(seeded, b)
        log(f"reference_e2e: lightly's recipe ({epochs} epochs, fp32, seed {seeded.pretrain.seed}) ...")
        ref = _reference(seeded, b, steps_per_epoch=ours["steps_per_epoch"])
        runs.append({"seed": seeded.pretrain.seed, "ours": ours, "reference": ref})

    def spread(side: str, key: str) -> tuple[float, float]:
        xs = [r[side][key] for r in runs]
        return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0

    (ko, ko_sd), (kr, kr_sd) = spread("ours", "knn_acc"), spread("reference", "knn_acc")
    ours, ref = runs[0]["ours"], runs[0]["reference"]
    return {
        "epochs": epochs, "batch": b.batch, "threads": b.threads, "steps_per_epoch": ours["steps_per_epoch"],
        "loader_workers": cfg.data.loader_workers, "ours_precision": "bf16" if bf16 else "fp32",
        "ours_channels_last": channels_last, "reference_precision": "fp32",
        "ours": ours, "reference": ref,  # the first seed's runs, whole
        "ratio": statistics.median(r["ours"]["images_per_s"] / r["reference"]["images_per_s"] for r in runs),
        "knn_delta": ko - kr,
        "seeds": len(runs), "knn_ours_mean": ko, "knn_ours_std": ko_sd,
        "knn_reference_mean": kr, "knn_reference_std": kr_sd,
        "runs": [{"seed": r["seed"], "ours_images_per_s": r["ours"]["images_per_s"],
                  "reference_images_per_s": r["reference"]["images_per_s"],
                  "ours_knn_acc": r["ours"]["knn_acc"], "reference_knn_acc": r["reference"]["knn_acc"]}
                 for r in runs],
    }


def _race_config(b: Any, epochs: int) -> Any:
    cfg = copy.deepcopy(b.cfg)
    cfg.data.shards = b.shards
    cfg.data.image_size = b.image_size
    cfg.pretrain.epochs = epochs
    cfg.pretrain.global_batch_size = b.batch
    cfg.pretrain.knn_every = 0  # the kNN monitor once, after the last epoch, as for the reference
    cfg.optim.warmup_epochs = min(cfg.optim.warmup_epochs, max(0, epochs - 1))
    cfg.trainer.num_workers = 0
    cfg.trainer.torch_threads = b.threads
    cfg.trainer.use_gpu = b.device.type == "cuda"
    cfg.wandb.enabled = False
    cfg.fault.kill_rank = cfg.fault.at_step = cfg.fault.nan_at_step = -1
    return cfg


def _ours(cfg: Any, b: Any) -> dict:
    from pretrain.loop import METRICS, _read_jsonl, train_loop
    from runtime.launch import run_training

    with tempfile.TemporaryDirectory(prefix="selfsup-bench-e2e-") as tmp:
        cfg = copy.deepcopy(cfg)
        cfg.output_dir = tmp
        t0 = time.perf_counter()
        result = run_training(train_loop, {"cfg": cfg}, cfg, local=True, name="bench-e2e-ours")
        wall = time.perf_counter() - t0
        records = _read_jsonl(Path(tmp) / METRICS)
    torch.set_num_threads(b.threads)
    train_s = sum(r["epoch_s"] for r in records)
    steps = records[-1]["step"] // len(records)
    return {"images_per_s": len(records) * steps * b.batch / train_s, "train_s": train_s, "wall_s": wall,
            "epoch_s": [r["epoch_s"] for r in records], "knn_acc": float(result["knn_acc"]),
            "loss": [r["loss"] for r in records], "steps_per_epoch": steps}


def _reference(cfg: Any, b: Any, steps_per_epoch: int) -> dict:
    """lightly's SimCLR example on our shards: PIL + SimCLRTransform + DataLoader, two forward passes."""
    import webdataset as wds
    from lightly.loss import NTXentLoss

    from bench.run import reference_transform
    from pretrain.loop import _knn_data, knn_monitor, seed_everything
    from pretrain.model import build_model
    from pretrain.optim import build_optimizer, lr_at, set_lr
    from shards.manifest import shard_url

    torch.set_num_threads(b.threads)
    t_wall = time.perf_counter()
    p = cfg.pretrain
    urls = [shard_url(b.shards, rel) for s in ("train", "unlabeled") if s in b.manifest["splits"]
            for rel in b.manifest["splits"][s]["shards"]]
    ds = (wds.WebDataset(urls, shardshuffle=False, empty_check=False).repeat()  # webdataset 1.0: repeat=True ends after one pass
          .shuffle(cfg.data.shuffle_buffer).decode("pill" if b.channels == 1 else "pil").to_tuple("png;jpg;jpeg;webp", "cls")
          .map_tuple(reference_transform(b), int))
    loader = torch.utils.data.DataLoader(ds, batch_size=b.batch, num_workers=cfg.data.loader_workers,
                                         drop_last=True, pin_memory=b.device.type == "cuda")
    torch.manual_seed(p.seed)
    model = build_model(cfg.model, in_chans=b.channels).to(b.device)
    optimizer = build_optimizer(cfg.optim, model, b.batch)
    peak = optimizer.param_groups[0]["lr"]
    total, warmup = p.epochs * steps_per_epoch, cfg.optim.warmup_epochs * steps_per_epoch
    criterion = NTXentLoss(temperature=p.temperature)
    batches = iter(loader)
    epoch_s, losses, step = [], [], 0
    for epoch in range(p.epochs):
        seed_everything(p.seed, epoch, 0)
        model.train()
        t0, total_loss = time.perf_counter(), 0.0
        for _ in range(steps_per_epoch):
            (x0, x1), _labels = next(batches)
            x0, x1 = x0.to(b.device), x1.to(b.device)
            set_lr(optimizer, lr_at(step, total, warmup, peak))
            z0, z1 = model(x0), model(x1)  # the example's two forward passes
            loss = criterion(z0, z1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total_loss += loss.item()
            step += 1
        epoch_s.append(time.perf_counter() - t0)
        losses.append(total_loss / steps_per_epoch)
    del batches  # stops the DataLoader's workers
    train_s = sum(epoch_s)
    model.eval()
    knn_acc, _, _ = knn_monitor(model.backbone, cfg, b.manifest, _knn_data(cfg, b.manifest), b.device)
    return {"images_per_s": p.epochs * steps_per_epoch * b.batch / train_s, "train_s": train_s,
            "wall_s": time.perf_counter() - t_wall, "epoch_s": epoch_s, "knn_acc": float(knn_acc), "loss": losses}
