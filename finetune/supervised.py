"""The trained methods (`scratch`, `finetune`, `semi`) for every labeled subset: one per-worker function.

`supervised_loop` runs in one of three ways (`finetune.run.execution_mode`): in this process; as one Ray task
per labeled subset (`pretrain.launch.run_tasks`, each task a world of 1); or on Ray Train workers, exactly like
pretraining (`run_training`), where each rank takes its share of every labeled and pool batch (FixMatch: of the
unlabeled stream, `ShardLoader(rank, world_size)`), DDP averages the gradients, and rank 0's results count.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import numpy as np
import torch

from finetune import classifier as clf
from finetune.linear import encode
from finetune.semi import distill, fixmatch, propagate
from pretrain.launch import session
from pretrain.model import unwrap
from pretrain.reader import ShardLoader, load_split

TRAINED = ("scratch", "finetune", "semi")
# The classifier shipped per labeled fraction, by a fixed rule that never looks at the test split: the first
# of these methods that ran, trained on the first labeled subset (seed index 0).
SHIP_METHODS = ("semi", "finetune")
SHIP_SEED_INDEX = 0
SELECTION = ("fixed rule, without the test split: `semi` if it ran, else `finetune`, trained on the first labeled "
             "subset (seed index 0); test_accuracy is that model's")


def shipped_method(methods: list[str] | tuple[str, ...]) -> str | None:
    """Which method's model is shipped for a subset that ran `methods` (None: no classifier to ship)."""
    return next((m for m in SHIP_METHODS if m in methods), None)


def supervised_loop(config: dict[str, Any]) -> dict[str, Any]:
    """config: cfg, jobs [{fraction, seed_index, seed, keys, methods}], arch, mean, std, image_size.
    Returns (rank 0) {"results": [{method, fraction, seed_index, accuracy, pred, seconds}], "best": {...}}."""
    cfg, ft = config["cfg"], config["cfg"].finetune
    sess = session()
    rank, world, device = sess.rank, sess.world_size, sess.device
    mean, std, size, arch = config["mean"], config["std"], config["image_size"], config["arch"]

    train_x, train_y, train_keys = load_split(cfg.data.shards, "train")
    test_x, test_y, _ = load_split(cfg.data.shards, "test")
    index = {k: i for i, k in enumerate(train_keys)}
    # the driver's copy of the encoder, not its path: a worker on another node cannot read the driver's disk
    backbone, head = config["encoder"]
    pool = _pool(config, train_x, backbone) if "semi" in {m for j in config["jobs"] for m in j["methods"]} \
        and ft.semi_method == "distill" else None
    augs = {name: clf.make_augment(a, size, mean, std, device) for name, a in (
        ("mild", clf.mild_augment(cfg.augment)), ("weak", clf.weak_augment(cfg.augment)), ("strong", cfg.augment))}
    budget = {"batch_size": ft.batch_size, "lr": ft.lr, "weight_decay": ft.weight_decay, "rank": rank,
              "world_size": world, "device": device}

    def fit(model: torch.nn.Module, xl, yl, seed: int, fraction: float) -> torch.nn.Module:
        model = _distribute(model.to(device), sess)
        epochs = ft.full_epochs if fraction >= 1 else ft.epochs
        clf.train_supervised(model, xl, yl, augs["mild"], epochs=epochs, seed=seed, **budget)
        return model

    results, best = [], {}
    for job in config["jobs"]:
        idx = torch.tensor([index[k] for k in job["keys"]])
        xl, yl, seed, fraction = train_x[idx], train_y[idx], job["seed"], job["fraction"]
        tuned, tuned_s = None, 0.0  # this subset's fine-tuned model: `semi` starts from it
        for method in job["methods"]:
            torch.manual_seed(seed)
            t = time.perf_counter()
            reused = tuned is not None
            if method == "scratch":
                model = fit(clf.build_classifier(arch), xl, yl, seed, fraction)
            else:
                if tuned is None:
                    tuned = fit(clf.build_classifier(arch, copy.deepcopy(backbone), copy.deepcopy(head)),
                                xl, yl, seed, fraction)
                    tuned_s = time.perf_counter() - t
                model = tuned
                if method == "semi":
                    model = _distribute(copy.deepcopy(unwrap(tuned)), sess)
                if method == "semi" and ft.semi_method == "distill":
                    labeled = idx.numpy()  # the train split leads the pool, so train indices are pool indices
                    soft = propagate(pool["features"], labeled, yl.numpy(), int(arch["num_classes"]),
                                     k=ft.spread_k, alpha=ft.spread_alpha)
                    stats = distill(model, pool["images"], soft, labeled, yl.numpy(), augs["mild"],
                                    rounds=ft.distill_rounds, epochs=ft.semi_epochs, batch_size=ft.batch_size,
                                    lr=ft.semi_lr, weight_decay=ft.weight_decay, seed=seed, mean=mean, std=std,
                                    rank=rank, world_size=world, device=device)
                elif method == "semi":
                    loader = ShardLoader(cfg.data.shards, splits=config["unlabeled_splits"],
                                         batch_size=max(1, config["unlabeled_batch"] // world), rank=rank,
                                         world_size=world, seed=seed, num_workers=cfg.data.loader_workers,
                                         shuffle_buffer=cfg.data.shuffle_buffer)
                    stats = fixmatch(model, xl, yl, loader, augs["weak"], augs["strong"], epochs=ft.semi_epochs,
                                     batch_size=ft.batch_size, lr=ft.semi_lr, weight_decay=ft.weight_decay,
                                     threshold=ft.threshold, seed=seed, rank=rank, world_size=world, device=device)
            pred = clf.predict_logits(unwrap(model), test_x, mean, std, device=device).argmax(1).numpy()
            acc = float((pred == test_y.numpy()).mean())
            # semi's cost includes the fine-tuning it starts from, even when `finetune` paid for it first
            seconds = time.perf_counter() - t + (tuned_s if method == "semi" and reused else 0.0)
            row = {"method": method, "fraction": fraction, "seed_index": job["seed_index"], "accuracy": acc,
                   "pred": pred.astype(np.int64), "seconds": seconds}
            if method == "semi":
                row.update({k: round(stats[k], 4) for k in ("mask_rate", "model_weight") if k in stats})
            results.append(row)
            if rank == 0:
                print(f"{method:>8}  fraction {fraction:<5g} seed {job['seed_index']}  labels {len(idx):>5}  "
                      f"acc {acc:.4f}  ({seconds:.1f}s)", flush=True)
            if job["seed_index"] == SHIP_SEED_INDEX and method == shipped_method(job["methods"]):
                # the shipped model is fixed before any test accuracy exists (SELECTION)
                # numpy, not tensors: Ray Train cannot return tensors from a worker
                best[fraction] = {**row, "state": {k: v.detach().cpu().numpy().copy()
                                                   for k, v in unwrap(model).state_dict().items()}}
    return {"results": results, "best": best}


def _pool(config: dict[str, Any], train_x: torch.Tensor, backbone: torch.nn.Module) -> dict[str, Any]:
    """What `distill` reads: the train split's images (labels unused) followed by up to
    `finetune.unlabeled_pool` images of the unlabeled split (a seeded sample when it holds more), and the
    frozen encoder's features of all of them (for label spreading). Never the test split."""
    cfg, ft = config["cfg"], config["cfg"].finetune
    parts = [train_x]
    if "unlabeled" in config["unlabeled_splits"] and ft.unlabeled_pool > 0:
        ux, _, _ = load_split(cfg.data.shards, "unlabeled")
        if len(ux) > ft.unlabeled_pool:
            g = torch.Generator().manual_seed(cfg.data.seed)
            ux = ux[torch.randperm(len(ux), generator=g)[: ft.unlabeled_pool]]
        parts.append(ux)
    images = torch.cat(parts) if len(parts) > 1 else train_x
    feats = encode(backbone, images, config["mean"], config["std"], device=session().device).numpy()
    return {"images": images, "features": feats}


def _distribute(model: torch.nn.Module, sess) -> torch.nn.Module:
    """DDP under Ray Train (gradients averaged over ranks); the plain model in-process."""
    if not getattr(sess, "distributed", False) or sess.world_size < 2:
        return model
    import ray.train.torch

    return ray.train.torch.prepare_model(unwrap(model), move_to_device=True)
