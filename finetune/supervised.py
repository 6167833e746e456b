"""The trained methods (`scratch`, `finetune`, `semi`) for every labeled subset: one per-worker function.

`supervised_loop` runs in one of three ways (`finetune.placement.execution_mode`): in this process; as one Ray task
per labeled subset (`runtime.launch.run_tasks`, each task a world of 1); or on Ray Train workers, exactly like
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
from finetune.data import encode_keys, labeled_images, pool_images, sample_of, stream_predict
from finetune.linear import encode
from finetune.semi import bn_stats, distill, fit_head, fixmatch, pool_bn_stats, predict_features, propagate
from pretrain.model import unwrap
from pretrain.precision import resolve_for_model
from runtime.launch import session
from shards.manifest import read_manifest
from shards.reader import ShardLoader
from shards.splits import iter_split

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
    """config: cfg, jobs [{fraction, seed_index, seed, keys, methods}], arch, mean, std, image_size (the
    encoder's: every read resizes to it), test_labels (of the streamed test split, in its order).
    Returns (rank 0) {"results": [{method, fraction, seed_index, accuracy, pred, seconds}], "best": {...},
    "formats": {precision, channels_last}} (what finetune.precision / channels_last resolved to on this device)."""
    cfg, ft = config["cfg"], config["cfg"].finetune
    sess = session()
    rank, world, device = sess.rank, sess.world_size, sess.device
    mean, std, size, arch = config["mean"], config["std"], config["image_size"], config["arch"]

    read_manifest(cfg.data.shards)  # a worker that cannot see the shards says so first, in one line
    # read from the shards here, as each needs: small labeled subsets as images (one copy per task or worker,
    # bounded by finetune.labeled_in_memory), larger ones streamed; the test split streamed at evaluation
    semi_jobs = [j for j in config["jobs"] if "semi" in j["methods"]]
    bound = ft.labeled_in_memory
    held = sorted({k for j in config["jobs"] if len(j["keys"]) <= bound for k in j["keys"]})
    held = held if len(held) <= bound else []  # else each subset is read when its turn comes
    labeled_x, held_x, held_y = {k: i for i, k in enumerate(held)}, None, None
    if held:
        held_x, held_y = labeled_images(cfg.data.shards, held, size)
    # the driver's copy of the encoder, not its path: a worker on another node cannot read the driver's disk
    backbone, head = config["encoder"]
    # distill's labels in the pool: a subset's own, or a seeded sample of at most `bound` of a larger one
    pool = _pool(config, [k for j in semi_jobs for k in sample_of(j["keys"], bound, j["seed"])], backbone) \
        if semi_jobs and ft.semi_method == "distill" else None
    mild = clf.mild_augment(cfg.augment, ft.jitter_prob, ft.jitter_strength)
    augs = {name: clf.make_augment(a, size, mean, std, device) for name, a in (
        ("mild", mild), ("weak", clf.weak_augment(cfg.augment)), ("strong", cfg.augment))}
    budget = {"batch_size": ft.batch_size, "lr": ft.lr, "weight_decay": ft.weight_decay, "rank": rank,
              "world_size": world, "device": device}
    # auto/null: what pretraining picks on this device (bf16 autocast + channels_last on GPUs and native-bf16
    # CPUs, channels_last alone on AVX2 CPUs), unless this network at this size sees 1x1 maps (pretrain/precision.py)
    use_bf16, channels_last = resolve_for_model(ft.precision, ft.channels_last, clf.build_classifier(arch),
                                                int(arch["in_chans"]), size, device)
    # around the training below (fit, distill, fixmatch), each context many steps long: without autocast's cache of
    # bf16 weight copies, which would keep the first step's weights for every later forward pass (measured: bf16
    # fine-tuning then stayed at chance). Label spreading and the scoring of the test split stay fp32.
    autocast = torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=use_bf16,
                              cache_enabled=False)

    def place(model: torch.nn.Module) -> torch.nn.Module:
        """On this worker's device, in the memory format picked (DDP under Ray Train)."""
        fmt = torch.channels_last if channels_last else torch.preserve_format
        return _distribute(model.to(device, memory_format=fmt), sess)

    @autocast
    def fit(model: torch.nn.Module, xl, yl, seed: int, fraction: float, keys: list[str],
            pretrained: bool = True) -> torch.nn.Module:
        """Train `model` on the labeled subset (in memory, or streamed from the shards); `pretrained`: it starts
        from the encoder, so finetune.probe_epochs, backbone_lr_scale and wise_alpha apply."""
        model = place(model)
        epochs = ft.full_epochs if fraction >= 1 else ft.epochs
        scale = ft.backbone_lr_scale if pretrained else 1.0
        start = None  # WiSE-FT's other end: the probed model, before fine-tuning moves its backbone
        if pretrained and ft.probe_epochs > 0:
            probe(unwrap(model), xl, yl, keys, seed)
            if ft.wise_alpha < 1:
                start = copy.deepcopy(unwrap(model).state_dict())
        if xl is not None:
            clf.train_supervised(model, xl, yl, augs["mild"], epochs=epochs, seed=seed, backbone_lr_scale=scale,
                                 mix_alpha=ft.mixup, **budget)
        else:  # more labels than finetune.labeled_in_memory: streamed from the shards
            loader = ShardLoader(cfg.data.shards, splits="train", keys=keys, batch_size=max(1, ft.batch_size // world),
                                 rank=rank, world_size=world, seed=seed, num_workers=cfg.data.loader_workers,
                                 image_size=size, shuffle_buffer=cfg.data.shuffle_buffer)
            clf.train_supervised_stream(model, loader, augs["mild"], epochs=epochs, labeled=len(keys),
                                        batch_size=ft.batch_size, lr=ft.lr, weight_decay=ft.weight_decay,
                                        device=device, backbone_lr_scale=scale, mix_alpha=ft.mixup, seed=seed)
        if start is not None:  # WiSE-FT; the averaged weights need their own batch-norm statistics (as SWA's)
            clf.interpolate_weights(unwrap(model), start, ft.wise_alpha)
            if xl is not None:
                pool_bn_stats(unwrap(model), xl, mean, std, device=device)
            else:
                bn_stats(unwrap(model), (x for x, _, _ in iter_split(cfg.data.shards, "train", keys=keys,
                                                                     image_size=size, batch_size=512)),
                         mean, std, device=device)
        return model

    def probe(net: torch.nn.Module, xl, yl, keys: list[str], seed: int) -> None:
        """LP-FT's first stage: the head alone, fit on the frozen backbone's features of the labeled images (no
        augmentation; every rank alike: the same features and seed)."""
        if xl is not None:
            feats, y = predict_features(net, xl, mean, std, device=device), yl
        else:
            feats, y, _ = encode_keys(net.backbone, cfg.data.shards, "train", keys, size, mean, std, device)
        targets = torch.nn.functional.one_hot(y.long(), int(arch["num_classes"])).float()
        fit_head(net, feats, targets, epochs=ft.probe_epochs, batch_size=ft.batch_size, lr=ft.lr,
                 weight_decay=ft.weight_decay, seed=seed, device=device)

    results, best = [], {}
    for job in config["jobs"]:
        seed, fraction = job["seed"], job["fraction"]
        xl = yl = None
        if len(job["keys"]) > bound:
            pass  # streamed by `fit`
        elif held:
            idx = torch.tensor([labeled_x[k] for k in job["keys"] if k in labeled_x], dtype=torch.long)
            xl, yl = held_x[idx], held_y[idx]
        else:
            xl, yl = labeled_images(cfg.data.shards, job["keys"], size)
        n_labels = len(job["keys"])
        tuned, tuned_s = None, 0.0  # this subset's fine-tuned model: `semi` starts from it
        for method in job["methods"]:
            torch.manual_seed(seed)
            t = time.perf_counter()
            reused = tuned is not None
            if method == "scratch":
                model = fit(clf.build_classifier(arch), xl, yl, seed, fraction, job["keys"], pretrained=False)
            else:
                if tuned is None:
                    tuned = fit(clf.build_classifier(arch, copy.deepcopy(backbone), copy.deepcopy(head)),
                                xl, yl, seed, fraction, job["keys"])
                    tuned_s = time.perf_counter() - t
                model = tuned
                fresh = method == "semi" and ft.semi_method == "distill" and ft.distill_student == "scratch"
                if method == "semi":
                    student = clf.build_classifier(arch) if fresh else copy.deepcopy(unwrap(tuned))
                    model = place(student)
                if method == "semi" and ft.semi_method == "distill":
                    # pool indices of the subset's labeled images that the pool holds (all of a small subset)
                    labeled = np.array([pool["index"][k] for k in job["keys"] if k in pool["index"]], dtype=np.int64)
                    pool_y = pool["labels"][labeled].numpy()
                    with autocast:
                        feats = teacher_features(ft.spread_features, pool, unwrap(tuned), mean, std, device)
                    soft = propagate(feats, labeled, pool_y, int(arch["num_classes"]),
                                     k=ft.spread_k, alpha=ft.spread_alpha, prior=ft.spread_prior)
                    # an ensemble's first member is the fine-tuned model, which the student still equals here
                    teachers = [unwrap(tuned)] if fresh else [unwrap(model)] if ft.teacher_models > 1 else []
                    for i in range(1, ft.teacher_models):  # the ensemble teacher's other members
                        torch.manual_seed(ensemble_seed(seed, i))
                        teachers.append(unwrap(fit(clf.build_classifier(arch, copy.deepcopy(backbone),
                                                                        copy.deepcopy(head)),
                                                   xl, yl, ensemble_seed(seed, i), fraction, job["keys"])))
                    with autocast:
                        stats = distill(model, pool["images"], soft, labeled, pool_y, augs["mild"],
                                        rounds=ft.distill_rounds, epochs=ft.semi_epochs, batch_size=ft.batch_size,
                                        lr=ft.semi_lr, weight_decay=ft.weight_decay, seed=seed, mean=mean, std=std,
                                        rank=rank, world_size=world, device=device,
                                        head_epochs=0 if fresh else ft.distill_head_epochs, teachers=teachers,
                                        bn_stats=ft.distill_bn_stats)
                    stats["heldout"] = heldout_accuracy(pool, set(job["keys"]), soft, stats)
                elif method == "semi":
                    loader = ShardLoader(cfg.data.shards, splits=config["unlabeled_splits"],
                                         batch_size=max(1, config["unlabeled_batch"] // world), rank=rank,
                                         world_size=world, seed=seed, num_workers=cfg.data.loader_workers,
                                         image_size=size, shuffle_buffer=cfg.data.shuffle_buffer)
                    labeled_loader = None if xl is not None else ShardLoader(
                        cfg.data.shards, splits="train", keys=job["keys"], batch_size=max(1, ft.batch_size // world),
                        rank=rank, world_size=world, seed=seed, image_size=size, shuffle_buffer=cfg.data.shuffle_buffer)
                    with autocast:
                        stats = fixmatch(model, xl, yl, loader, augs["weak"], augs["strong"], epochs=ft.semi_epochs,
                                         labeled_loader=labeled_loader, batch_size=ft.batch_size, lr=ft.semi_lr,
                                         weight_decay=ft.weight_decay, threshold=ft.fixmatch_threshold, seed=seed,
                                         rank=rank, world_size=world, device=device)
            net = unwrap(model)
            pred = stream_predict(lambda x, net=net: clf.predict_logits(net, x, mean, std, device=device).argmax(1).numpy(),
                                  cfg.data.shards, size)
            acc = float((pred == config["test_labels"]).mean())
            # semi's cost includes the fine-tuning it starts from, even when `finetune` paid for it first
            seconds = time.perf_counter() - t + (tuned_s if method == "semi" and reused else 0.0)
            row = {"method": method, "fraction": fraction, "seed_index": job["seed_index"], "accuracy": acc,
                   "pred": pred.astype(np.int64), "seconds": seconds}
            if method == "semi":
                row.update({k: round(stats[k], 4) for k in ("mask_rate", "model_weight") if k in stats})
                if "heldout" in stats:
                    row["heldout"] = stats["heldout"]
            results.append(row)
            if config.get("report_runs"):  # the driver's display follows the runs (every rank reports)
                sess.report({"run": {k: v for k, v in row.items() if k != "pred"}, "labels": n_labels})
            elif rank == 0:
                print(f"{method:>8}  fraction {fraction:<5g} seed {job['seed_index']}  labels {n_labels:>5}  "
                      f"acc {acc:.4f}  ({seconds:.1f}s)", flush=True)
            if job["seed_index"] == SHIP_SEED_INDEX and method == shipped_method(job["methods"]):
                # the shipped model is fixed before any test accuracy exists (SELECTION)
                # numpy, not tensors: Ray Train cannot return tensors from a worker
                best[fraction] = {**row, "state": {k: v.detach().cpu().numpy().copy()
                                                   for k, v in unwrap(model).state_dict().items()}}
    return {"results": results, "best": best,
            "formats": {"precision": "bf16" if use_bf16 else "fp32", "channels_last": channels_last}}


def ensemble_seed(seed: int, member: int) -> int:
    """The training seed of an ensemble teacher's `member`-th extra model (member 0 is the subset's own
    fine-tuning, at `seed`): far from the next subsets' seeds (seed + 1, ...), so no two runs share one."""
    return seed + 1_000_003 * member


def teacher_features(which: str, pool: dict[str, Any], tuned: torch.nn.Module, mean, std,
                     device: str | torch.device = "cpu") -> np.ndarray:
    """The pool's features label spreading builds its kNN graph on (`finetune.spread_features`): the frozen
    encoder's, computed once for every subset (`encoder`), or the backbone's of this subset's fine-tuned
    network (`finetuned`), which with enough labels separates the classes better than the encoder did."""
    if which == "encoder":
        return pool["features"]
    return predict_features(tuned, pool["images"], mean, std, device=device).numpy()


def heldout_accuracy(pool: dict[str, Any], labeled_keys: set[str], soft: np.ndarray,
                     stats: dict[str, Any]) -> dict[str, float]:
    """A check without the test split: on the pool's train images outside the labeled subset (their labels
    are in the shards but no method trained on them), the accuracy of label spreading's labels (`teacher`),
    of the fine-tuned model `semi` started from (`finetune`), of the ensemble teacher's mean prediction
    (`ensemble`, when `finetune.teacher_models` > 1) and of the distilled model (`semi`)."""
    idx = np.array([i for k, i in pool["index"].items() if k not in labeled_keys and int(pool["labels"][i]) >= 0],
                   dtype=np.int64)
    if not len(idx):
        return {"images": 0}
    y = pool["labels"][idx].numpy()
    return {"images": int(len(idx)), "teacher": round(float((soft[idx].argmax(1) == y).mean()), 4),
            "finetune": round(float((stats["pool_before"][idx] == y).mean()), 4),
            **({"ensemble": round(float((stats["pool_ensemble"][idx] == y).mean()), 4)}
               if "pool_ensemble" in stats else {}),
            "semi": round(float((stats["pool_after"][idx] == y).mean()), 4)}


def _pool(config: dict[str, Any], labeled_keys: list[str], backbone: torch.nn.Module) -> dict[str, Any]:
    """What `distill` reads: a seeded sample of at most `finetune.unlabeled_pool` images of the train split
    (labels unused; all of it, in shard order, when no larger) plus the labeled images it missed, and as many
    of the unlabeled split, drawn by streaming the shards (`finetune.data.pool_images`); the frozen encoder's
    features of all of them (for label spreading), and each key's pool index. Never the test split."""
    cfg, ft = config["cfg"], config["cfg"].finetune
    size = config["image_size"]
    images, labels, keys = pool_images(cfg.data.shards, config["unlabeled_splits"], labeled_keys, ft.unlabeled_pool,
                                       cfg.data.seed, size)
    feats = encode(backbone, images, config["mean"], config["std"], device=session().device).numpy()
    return {"images": images, "labels": labels, "features": feats, "index": {k: i for i, k in enumerate(keys)}}


def _distribute(model: torch.nn.Module, sess) -> torch.nn.Module:
    """DDP under Ray Train (gradients averaged over ranks); the plain model in-process."""
    if not getattr(sess, "distributed", False) or sess.world_size < 2:
        return model
    import ray.train.torch

    return ray.train.torch.prepare_model(unwrap(model), move_to_device=True)
