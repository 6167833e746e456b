"""`selfsup bench`: our input pipeline and the model, measured side by side on the same shards.

Sections (choose with --parts; each one measures one thing):
- `loader`:     two-view batches per second from shards: ours (ShardLoader + BatchAugment on whole uint8
                batches) against the usual `DataLoader` + lightly's `SimCLRTransform` on PIL images, with the
                same augmentation probabilities, at each loader worker count (default 0 and 2);
- `decode`:     per-core decode rate of the same encoded images: our reader's decoder against PIL;
- `model`:      one SimCLR training step (two views, forward, NT-Xent, backward, optimiser) on tensors already
                in memory: the model's own speed, the ceiling;
- `end_to_end`: the same step fed by the real loader, in-process (`--local`); `pipeline_efficiency` =
                end-to-end / model-only (1.0 = data loading fully hidden);
- `ray`:        the same steps under Ray Train with one worker against in-process, and launch-to-first-step;
                then in-process again with the cluster up, splitting the overhead into the daemons' share
                (`cluster_up_ratio`) and Ray Train's own (`train_ratio`);
- `scaling`:    1 against 2 Ray Train workers at the same global batch;
- `daemons`:    (only when asked for) the same in-process steps alone, beside a private Ray cluster with Ray's
                default system config, beside the one `runtime.launch.init_ray` starts, and beside that one
                with its daemons at nice 19 (`bench/daemons.py`);
- `memory`:     (only when asked for) peak resident memory of every process of `shard`, `pretrain` and
                `finetune` on synthetic folders of 10,000 and 100,000 images (`bench/memory.py`).
Every figure is the median of `repeats` timed runs after a warm-up, with torch's thread count fixed and
written into the output. On a GPU the same code measures there: augmentation on the device, bf16
autocast and channels_last (as the training loop does).

Over 400 lines on purpose: one job, the measurements, each ours-against-the-usual pair side by side so they
read together; the options and the entry point are in `bench.cli`, the table and bench.json in `bench.report`.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from runtime.errors import UserError

PARTS = ("loader", "decode", "model", "formats", "end_to_end", "ray", "scaling", "memory", "reference_e2e", "daemons")
# the `formats` part's variants: (name, bf16 autocast, channels_last)
FORMATS = (("fp32", False, False), ("fp32, channels_last", False, True), ("bf16, channels_last", True, True))
RAY_POLL_INTERVAL_S = 2.0  # Ray Train's DEFAULT_HEALTH_CHECK_INTERVAL_S, the `ray` section's comparison
# Without --config the bench measures the reference setting: CIFAR-like 32 px shards, ResNet-18 at
# full width with the small stem, the `small` (CIFAR) augmentation preset.
BENCH_DEFAULTS = ["model.name=resnet18", "model.timm_kwargs={}", "model.stem=small", "augment.preset=small",
                  "data.image_size=32", "data.loader_workers=0"]


# ------------------------------------------------------------------ harness


def median(runs: list[float]) -> float:
    return float(statistics.median(runs))


def timed(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> list[float]:
    """Seconds per call of `fn`, `repeats` times, after `warmup` untimed calls (allocator, caches, workers)."""
    for _ in range(warmup):
        fn()
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return runs


def sync(device: torch.device) -> None:
    # CUDA is asynchronous: without this a timer measures kernel launches, not work
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class Bench:
    """Everything a section needs: the resolved config, the shards, and how to measure."""

    cfg: Any
    shards: str
    manifest: dict
    image_size: int
    batch: int
    repeats: int
    threads: int
    device: torch.device
    loader_workers: list[int] = field(default_factory=lambda: [0, 2])
    loader_batches: int = 4  # batches per timed loader repeat
    # torch threads of the loader section's main process. 1: at 0 workers the reference's PIL transforms run
    # on one core, so this makes the ratio per core; it also keeps many small OpenMP ops from collapsing
    # when other processes oversubscribe the cores (measured: 5x slower with 2 threads under load 12).
    loader_threads: int = 1
    decode_images: int = 1000
    e2e_epochs: int = 5  # reference_e2e: epochs each side trains
    e2e_seeds: int = 1  # reference_e2e: seeds each side is trained with
    daemon_rounds: int = 3  # daemons: rounds of every variant (medians over them)
    ray_rounds: int = 1  # ray: back-to-back pairs (in-process alone, then Ray Train), the first the section's own
    warmup: int = 1
    splits: tuple[str, ...] = ("train", "unlabeled")

    @property
    def channels(self) -> int:
        return int(self.manifest["channels"])

    @property
    def bf16(self) -> bool:
        from pretrain.precision import resolve_precision

        p = self.cfg.pretrain
        return resolve_precision(p.precision, p.channels_last, self.device)[0]

    @property
    def channels_last(self) -> bool:
        from pretrain.precision import resolve_precision

        p = self.cfg.pretrain
        return resolve_precision(p.precision, p.channels_last, self.device)[1]


# ------------------------------------------------------------------ shards


def make_bench_shards(out_dir: str | os.PathLike, count: int = 6144, image_size: int = 32, seed: int = 0) -> str:
    """Real CIFAR-like shards: `count` PNG images (smooth colour fields plus noise, so they compress like
    photos rather than like noise or flat colour) in 10 class folders, sharded by `selfsup shard folder`."""
    from PIL import Image

    from shards.writer import write_shards

    out = Path(out_dir)
    raw = out / "images"
    rng = np.random.default_rng(seed)
    n_test = max(10, count // 8)
    for split, n in (("train", count - n_test), ("test", n_test)):
        coarse = torch.from_numpy(rng.integers(0, 256, (n, 3, 4, 4)).astype(np.float32))
        smooth = torch.nn.functional.interpolate(coarse, size=image_size, mode="bicubic", align_corners=False)
        noise = torch.from_numpy(rng.normal(0, 10, smooth.shape).astype(np.float32))
        images = (smooth + noise).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        for i, arr in enumerate(images):
            d = raw / split / f"c{i % 10}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(d / f"{i:06d}.png")
    write_shards("folder", out / "shards", input_dir=raw, shard_size=512, image_size=image_size, workers=1,
                 progress=False)
    shutil.rmtree(raw)
    return str(out / "shards")


def encoded_samples(shards: str, manifest: dict, limit: int) -> list[tuple[str, bytes]]:
    """The first `limit` (extension, encoded image) of the train split, as stored: what both decoders get."""
    import tarfile

    from shards.manifest import shard_url

    out: list[tuple[str, bytes]] = []
    for rel in manifest["splits"]["train"]["shards"]:
        url = shard_url(shards, rel)
        if "://" in url or url.startswith("pipe:"):
            raise UserError(f"the decode bench reads local shards; {url} is remote: copy the shards locally")
        with tarfile.open(url) as tar:
            for member in tar:
                ext = member.name.rsplit(".", 1)[-1].lower()
                if member.isfile() and ext in ("png", "jpg", "jpeg", "webp"):
                    out.append((ext, tar.extractfile(member).read()))
                    if len(out) >= limit:
                        return out
    if not out:
        raise UserError(f"no images in the train split of {shards}: shard a dataset with images first")
    return out


# ------------------------------------------------------------------ decode


def bench_decode(b: Bench) -> dict:
    """Images per second per core: our reader's decoder against PIL, on the same encoded bytes."""
    from PIL import Image

    from shards.reader import _Decoder, _Shard

    samples = encoded_samples(b.shards, b.manifest, b.decode_images)
    mode = "L" if b.channels == 1 else "RGB"
    # the reader's own per-sample path: checks, decode to uint8 CHW, resize only when the size differs
    decoder = _Decoder(b.channels, b.image_size, int(b.manifest["image_size"]), len(b.manifest["classes"]))
    shard = _Shard("bench", "train", len(samples))

    def ours() -> None:
        for ext, data in samples:
            decoder({"__key__": "train-0", ext: data, "cls": b"0"}, shard)

    def pil() -> None:
        for _, data in samples:
            np.asarray(Image.open(io.BytesIO(data)).convert(mode))

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # per core: one thread for both
    try:
        ours_runs = timed(ours, b.repeats, b.warmup)
        pil_runs = timed(pil, b.repeats, b.warmup)
    finally:
        torch.set_num_threads(before)
    n = len(samples)
    return {"images": n, "threads": 1,
            "ours_images_per_s": n / median(ours_runs), "pil_images_per_s": n / median(pil_runs),
            "ratio": median(pil_runs) / median(ours_runs),
            "ours_runs_s": ours_runs, "pil_runs_s": pil_runs}


# ------------------------------------------------------------------ loader


def reference_transform(b: Bench):
    """lightly's SimCLRTransform with the probabilities our resolved augmentation uses."""
    from lightly.transforms import SimCLRTransform

    from pretrain.augment import resolve_augment

    a = resolve_augment(b.cfg.augment)
    gray = b.channels == 1  # saturation, hue and grayscale mean nothing on one channel (as in ours)
    return SimCLRTransform(
        input_size=b.image_size,
        cj_prob=a["jitter_prob"], cj_strength=a["jitter_strength"],
        cj_sat=0.0 if gray else 0.8, cj_hue=0.0 if gray else 0.2,
        min_scale=a["crop_scale"][0],
        random_gray_scale=0.0 if gray else a["grayscale_prob"],
        gaussian_blur=a["blur_prob"], sigmas=tuple(a["blur_sigma"]),
        hf_prob=a["flip_prob"],
        normalize={"mean": list(b.manifest["mean"]), "std": list(b.manifest["std"])},
    )


def reference_batches(b: Bench, workers: int) -> Iterator[int]:
    """The usual pipeline: webdataset -> PIL decode -> SimCLRTransform per image -> DataLoader collate."""
    import webdataset as wds

    from shards.manifest import shard_url

    urls = [shard_url(b.shards, rel) for s in b.splits if s in b.manifest["splits"]
            for rel in b.manifest["splits"][s]["shards"]]
    transform = reference_transform(b)
    ds = (wds.WebDataset(urls, shardshuffle=False, empty_check=False).repeat()  # webdataset 1.0: repeat=True ends after one pass
          .shuffle(b.cfg.data.shuffle_buffer).decode("pill" if b.channels == 1 else "pil").to_tuple("png;jpg;jpeg;webp", "cls")
          .map_tuple(transform, int))
    dl = torch.utils.data.DataLoader(ds, batch_size=b.batch, num_workers=workers,
                                     pin_memory=b.device.type == "cuda")
    for (v1, v2), _ in dl:
        v1, v2 = v1.to(b.device, non_blocking=True), v2.to(b.device, non_blocking=True)
        sync(b.device)
        yield len(v1)


def our_batches(b: Bench, workers: int, batch: int | None = None, rank: int = 0, world: int = 1
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Ours: uint8 batches from the shard reader, both views augmented on the device, epoch after epoch."""
    from pretrain.augment import BatchAugment
    from shards.reader import ShardLoader

    loader = ShardLoader(b.shards, splits=tuple(s for s in b.splits if s in b.manifest["splits"]),
                         batch_size=batch or b.batch, rank=rank, world_size=world, seed=b.cfg.data.seed,
                         shuffle=True, num_workers=workers, image_size=b.image_size,
                         shuffle_buffer=b.cfg.data.shuffle_buffer)
    aug = BatchAugment(b.cfg.augment, image_size=b.image_size, mean=b.manifest["mean"],
                       std=b.manifest["std"]).to(b.device)
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        for images, _ in loader:
            x = images.to(b.device, non_blocking=True)
            yield aug(x), aug(x)
        epoch += 1


def _count(views: Iterator[tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> Iterator[int]:
    for v1, _ in views:
        sync(device)
        yield len(v1)


def bench_loader(b: Bench) -> dict:
    """Source images per second, each delivered as two augmented views on the device, per worker count."""
    out: dict[str, Any] = {"batch": b.batch, "batches_per_repeat": b.loader_batches, "threads": b.loader_threads}
    before = torch.get_num_threads()
    torch.set_num_threads(b.loader_threads)
    try:
        for workers in b.loader_workers:
            out[f"workers_{workers}"] = _loader_row(b, workers)
    finally:
        torch.set_num_threads(before)
    return out


def _loader_row(b: Bench, workers: int) -> dict:
    """Ours against the reference at one worker count.

    At 0 workers the two pipelines' timed repeats alternate, so both see the same load from whatever else
    runs on the machine. With workers they run one after the other: a paused pipeline's workers keep
    filling their prefetch queue, which would hand its next repeat batches made in the other's time.
    """
    makers = {"ours": lambda: _count(our_batches(b, workers), b.device), "reference": lambda: reference_batches(b, workers)}
    runs: dict[str, list[float]] = {name: [] for name in makers}
    counts: dict[str, int] = {}
    for group in ([[name] for name in makers] if workers else [list(makers)]):
        its = {name: makers[name]() for name in group}
        for _ in range(max(1, b.warmup) + 1):  # the first pays for worker start-up and the first shards' open
            for it in its.values():
                for _ in range(b.loader_batches):
                    next(it)
        for _ in range(b.repeats):
            for name, it in its.items():
                t0 = time.perf_counter()
                counts[name] = sum(next(it) for _ in range(b.loader_batches))
                runs[name].append(time.perf_counter() - t0)
        for it in its.values():
            it.close()  # stops the DataLoader's worker processes before the next measurement
    row: dict[str, Any] = {}
    for name in makers:
        row[f"{name}_images_per_s"] = counts[name] / median(runs[name])
        row[f"{name}_runs_s"] = runs[name]
    row["ratio"] = row["ours_images_per_s"] / row["reference_images_per_s"]
    return row


# ------------------------------------------------------------------ one training step


class Step:
    """One SimCLR step as the training loop takes it: both views through the model, NT-Xent, update."""

    def __init__(self, b: Bench, global_batch: int, distributed: bool = False, bf16: bool | None = None,
                 channels_last: bool | None = None):
        """`bf16`/`channels_last`: as given, else as `pretrain.precision`/`pretrain.channels_last` resolve here."""
        from lightly.loss import NTXentLoss

        from pretrain.model import build_model
        from pretrain.optim import build_optimizer

        bf16 = b.bf16 if bf16 is None else bf16
        channels_last = b.channels_last if channels_last is None else channels_last
        torch.manual_seed(0)
        model = build_model(b.cfg.model, b.channels).to(b.device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        if distributed:
            import ray.train.torch

            model = ray.train.torch.prepare_model(model)  # DDP: gradients all-reduced as in training
        self.model = model
        self.loss = NTXentLoss(temperature=b.cfg.pretrain.temperature, gather_distributed=distributed)
        self.optimizer = build_optimizer(b.cfg.optim, model, global_batch)
        self.device = b.device
        self.bf16 = bf16
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, v1: torch.Tensor, v2: torch.Tensor) -> float:
        x = torch.cat([v1, v2]).contiguous(memory_format=self.memory_format)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            z1, z2 = self.model(x).float().chunk(2)
            loss = self.loss(z1, z2)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        sync(self.device)
        return float(loss.detach())


def views_in_memory(b: Bench) -> tuple[torch.Tensor, torch.Tensor]:
    """Two seeded batches of normalised views on the device: what the in-memory steps train on."""
    g = torch.Generator().manual_seed(0)
    shape = (b.batch, b.channels, b.image_size, b.image_size)
    v1, v2 = (torch.randn(shape, generator=g).to(b.device) for _ in range(2))
    return v1, v2


def bench_model(b: Bench) -> dict:
    """The ceiling: training steps on normalised views already in memory."""
    step = Step(b, b.batch)
    v1, v2 = views_in_memory(b)
    runs = timed(lambda: step(v1, v2), b.repeats, b.warmup)
    return {"images_per_s": b.batch / median(runs), "steps_per_s": 1 / median(runs),
            "views_per_step": 2 * b.batch, "runs_s": runs}


class ClassifierStep:
    """One fine-tuning step as `finetune.classifier.train_supervised` takes it: the classifier built on the bench's
    encoder (backbone + the first projection layer + a linear layer, `finetune.start_from: head`), cross-entropy,
    SGD with nesterov momentum."""

    def __init__(self, b: Bench, bf16: bool, channels_last: bool, num_classes: int = 10):
        import torch.nn.functional as F

        from finetune import classifier as clf
        from pretrain.model import build_model, encoder_meta

        torch.manual_seed(0)
        enc = build_model(b.cfg.model, b.channels)
        arch = clf.architecture(encoder_meta(b.cfg, b.manifest, enc, epochs=0, knn_acc=None), num_classes, "head")
        fmt = torch.channels_last if channels_last else torch.preserve_format
        self.model = clf.build_classifier(arch, enc.backbone, enc.head).to(b.device, memory_format=fmt).train()
        ft = b.cfg.finetune
        self.optimizer = clf.make_optimizer(self.model, ft.lr, ft.weight_decay)
        self.autocast = torch.autocast(b.device.type, dtype=torch.bfloat16, enabled=bf16)
        self.loss, self.device = F.cross_entropy, b.device

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> float:
        with self.autocast:
            loss = self.loss(self.model(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        sync(self.device)
        return float(loss.detach())


class EncodeStep:
    """One batch of the frozen encoder's features as `finetune.encode.encode_part` computes them for `knn` and
    `linear`: the backbone in eval mode, no gradient, float32 features out."""

    def __init__(self, b: Bench, bf16: bool, channels_last: bool):
        from pretrain.model import build_model

        torch.manual_seed(0)
        self.fmt = torch.channels_last if channels_last else torch.preserve_format
        self.model = build_model(b.cfg.model, b.channels).backbone.to(b.device, memory_format=self.fmt).eval()
        self.autocast = torch.autocast(b.device.type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=False)
        self.device = b.device

    def __call__(self, x: torch.Tensor) -> float:
        with torch.no_grad(), self.autocast:
            f = self.model(x.contiguous(memory_format=self.fmt)).float()
        sync(self.device)
        return float(f[0, 0])


def in_turn(steps: dict[str, Any], args: tuple, b: Bench) -> dict[str, list[float]]:
    """Each step's timed runs, taken in turn (1, 2, 3, 1, 2, 3, ...) so that all see the same machine."""
    runs: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(b.warmup):
        for step in steps.values():
            step(*args)
    for _ in range(b.repeats):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step(*args)
            runs[name].append(time.perf_counter() - t0)
    return runs


def bench_formats(b: Bench) -> dict:
    """The model step of `bench_model` in each number format and memory format (`FORMATS`), each its own model
    from the same initial weights, their timed steps taken in turn (`in_turn`); images/s, and the ratio to fp32
    in the default format. `classifier`: the same for fine-tuning's step (`ClassifierStep`, a batch of
    `finetune.batch_size` images); `encode`: for the frozen encoder's forward pass of knn/linear (`EncodeStep`,
    a batch of `finetune.encode.BATCH` images). `picked`: what `pretrain.precision: auto` and `pretrain.channels_last: null`
    (and fine-tuning's `finetune.precision` / `channels_last` at their defaults) resolve to on this device (the
    precision module's rule, without the per-model fallback), for comparing with the fastest measured."""
    from pretrain.precision import cpu_capability, resolve_precision

    def variants(runs: dict[str, list[float]], images: int) -> dict:
        base = median(runs["fp32"])
        return {name: {"images_per_s": images / median(r), "ratio": base / median(r), "runs_s": r}
                for name, r in runs.items()}

    v1, v2 = views_in_memory(b)
    simclr = in_turn({name: Step(b, b.batch, bf16=bf16, channels_last=cl) for name, bf16, cl in FORMATS}, (v1, v2), b)
    n = min(b.cfg.finetune.batch_size, b.batch)
    x, y = v1[:n], (torch.arange(n) % 10).to(b.device)
    tuned = in_turn({name: ClassifierStep(b, bf16, cl) for name, bf16, cl in FORMATS}, (x, y), b)
    from finetune.encode import BATCH

    xe = torch.randn((BATCH, b.channels, b.image_size, b.image_size), generator=torch.Generator().manual_seed(1))
    encoded = in_turn({name: EncodeStep(b, bf16, cl) for name, bf16, cl in FORMATS}, (xe.to(b.device),), b)
    picked = {(bf16, cl): name for name, bf16, cl in FORMATS}[resolve_precision("auto", None, b.device)]
    return {"variants": variants(simclr, b.batch),
            "classifier": {"batch": n, "variants": variants(tuned, n)},
            "encode": {"batch": BATCH, "variants": variants(encoded, BATCH)},
            "picked": picked,
            "cpu_capability": cpu_capability() if b.device.type == "cpu" else None}


def steps_loop(config: dict) -> dict:
    """The per-worker function of `end_to_end`, `ray` and `scaling`: real loader, augmentation and step.

    Runs through `runtime.launch.run_training`, so in-process and under Ray Train it is the same code.
    Returns per-step seconds after the warm-up, the part of them spent getting both views (`data_s`), and
    the wall-clock time the first step ended. With `model_only`, each timed step is followed by a step on
    the same views already in memory: the model-only figure, measured alternately with the end-to-end one
    so that both see the same machine (others' load comes and goes).
    """
    entered_at = time.time()  # under Ray: after Train's controller and worker processes have started
    from runtime.launch import session

    sess = session()
    b: Bench = config["bench"]
    if config.get("niceness"):  # the `ray` section's measurement of Ray's default worker priority (nice 15)
        os.nice(max(0, config["niceness"] - os.nice(0)))
    torch.set_num_threads(config["threads"])
    worker = worker_settings()
    b.device = sess.device
    world = sess.world_size
    views = our_batches(b, b.cfg.data.loader_workers, b.batch // world, sess.rank, world)
    step = Step(b, b.batch, distributed=sess.distributed and world > 1)
    step_s, data_s, model_s, first_step_at = [], [], [], 0.0
    for i in range(b.warmup + b.repeats):
        t0 = time.perf_counter()
        v1, v2 = next(views)
        sync(b.device)
        t1 = time.perf_counter()
        step(v1, v2)
        t2 = time.perf_counter()
        if i == 0:
            first_step_at = time.time()
        if i >= b.warmup:
            step_s.append(t2 - t0)
            data_s.append(t1 - t0)
            if config.get("model_only"):
                t3 = time.perf_counter()
                step(v1, v2)
                model_s.append(time.perf_counter() - t3)
    views.close()
    out = {"step_s": step_s, "data_s": data_s, "model_s": model_s, "first_step_at": first_step_at,
           "entered_at": entered_at,
           "world_size": world, "threads": config["threads"], "worker": worker}
    if config.get("time_reports"):
        out["report_s"], out["checkpoint_report_s"] = _time_reports(sess, step, min(3, b.repeats))
    out["returned_at"] = time.time()
    return out


def worker_settings() -> dict:
    """What the process running the steps was given: thread counts, OpenMP/MKL variables, CPU affinity, nice."""
    return {"torch_threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
            "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_PROC_BIND")},
            "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "nice": os.nice(0)}


def _time_reports(sess: Any, step: Step, repeats: int = 3) -> tuple[float, float]:
    """Median seconds of a metrics-only `report` and of a report with the model's checkpoint (weights and
    optimiser, as the training loop hands over once per epoch)."""
    from runtime import checkpoint as ckpt

    plain, with_ckpt = [], []
    for i in range(repeats):
        t0 = time.perf_counter()
        sess.report({"bench_report": i})
        plain.append(time.perf_counter() - t0)
        with tempfile.TemporaryDirectory(prefix="selfsup-bench-ckpt-") as tmp:
            t0 = time.perf_counter()
            if sess.rank == 0:
                ckpt.save_checkpoint(tmp, model_state=step.model.state_dict(),
                                     optimizer_state=step.optimizer.state_dict(), meta={"epoch": i + 1})
            sess.report({"bench_report": i}, checkpoint_dir=tmp if sess.rank == 0 else None,
                        dir_name=ckpt.checkpoint_dir_name(i + 1))
            with_ckpt.append(time.perf_counter() - t0)
    return median(plain), median(with_ckpt)


def _run_steps(b: Bench, workers: int, tmp: str, started: float | None = None, model_only: bool = False,
               poll_interval_s: float | None = None, **extra: Any) -> dict:
    """`steps_loop` in-process (workers=0) or on `workers` Ray Train workers; figures for the whole batch.
    `poll_interval_s` replaces the config's `trainer.poll_interval_s`."""
    from runtime.launch import run_training

    cfg = copy.deepcopy(b.cfg)
    b = dataclasses.replace(b, cfg=cfg)
    cfg.output_dir = tmp
    if poll_interval_s is not None:
        cfg.trainer.poll_interval_s = poll_interval_s
    cfg.trainer.num_workers = workers
    cfg.trainer.max_failures = 0
    cfg.trainer.use_gpu = b.device.type == "cuda"
    # the machine's threads shared evenly by the workers; Ray reserves the matching CPUs
    threads = max(1, b.threads // max(1, workers))
    cfg.trainer.torch_threads = threads
    cfg.trainer.resources_per_worker = {} if workers == 0 else {"CPU": b.threads / workers}
    if cfg.trainer.use_gpu and workers:
        cfg.trainer.resources_per_worker["GPU"] = 1
    fit_at = time.time()
    launched = started if started is not None else fit_at
    r = run_training(steps_loop, {"bench": b, "threads": threads, "model_only": model_only, **extra}, cfg,
                     local=workers == 0,
                     name=f"bench-{workers or 'local'}-{int(time.time() * 1000)}")
    exit_s = time.time() - r["returned_at"]  # from the loop's return to the caller's: under Ray, Train's shutdown
    step = median(r["step_s"])
    return {"workers": max(1, workers), "threads_per_worker": threads, "images_per_s": b.batch / step,
            "steps_per_s": 1 / step, "data_s": median(r["data_s"]),
            "launch_to_first_step_s": r["first_step_at"] - launched, "runs_s": r["step_s"],
            # launch split in two: up to our function running (under Ray: Train's controller and worker
            # processes starting), then our own setup (loader, model, first step)
            "start_to_entry_s": r["entered_at"] - fit_at, "entry_to_first_step_s": r["first_step_at"] - r["entered_at"],
            "model_runs_s": r["model_s"], "data_runs_s": r["data_s"], "worker": r["worker"], "exit_s": exit_s,
            **{k: r[k] for k in ("report_s", "checkpoint_report_s") if k in r}}


# ------------------------------------------------------------------ running


def run_bench(b: Bench, parts: list[str], log: Callable[[str], None] = print) -> dict:
    """Run the chosen sections in a cheap-first order; returns the bench.json dict."""
    import ray

    torch.set_num_threads(b.threads)
    results: dict[str, Any] = {"meta": meta(b, parts)}
    t_all = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix="selfsup-bench-runs-")
    try:
        if "decode" in parts:
            log("decode ...")
            results["decode"] = bench_decode(b)
        if "loader" in parts:
            log("loader ...")
            results["loader"] = bench_loader(b)
        if "model" in parts and "end_to_end" not in parts:
            log("model ...")
            results["model"] = bench_model(b)
        if "formats" in parts:
            log("formats (the step in fp32 / channels_last / bf16, in turn) ...")
            results["formats"] = bench_formats(b)
        local = None
        if {"end_to_end", "ray"} & set(parts):
            log("end_to_end (in-process, alternating with model-only steps) ..." if "end_to_end" in parts
                else "in-process steps ...")
            local = _run_steps(b, 0, tmp, model_only="end_to_end" in parts)
            torch.set_num_threads(b.threads)
        if "end_to_end" in parts:
            model_runs = local.pop("model_runs_s")
            local_data_runs = local.pop("data_runs_s")
            results["model"] = {"images_per_s": b.batch / median(model_runs), "steps_per_s": 1 / median(model_runs),
                                "views_per_step": 2 * b.batch, "runs_s": model_runs,
                                "measured": "alternating with end_to_end steps, same process and model"}
            e2e = {k: v for k, v in local.items() if k != "worker"}  # the process's settings: in `ray`
            # per pair of neighbouring steps (end-to-end, then model-only on the same views), then the median:
            # a pair shares the machine's load of the moment, which on a shared machine drifts by 2x in minutes
            pairs = [m / s for m, s in zip(model_runs, e2e["runs_s"])]
            e2e["pipeline_efficiency"] = median(pairs)
            e2e["pipeline_efficiency_pairs"] = pairs
            # the cross-check that load swings cannot move: the share of each end-to-end step not spent getting
            # its views (equal to pipeline_efficiency when the model's own speed holds still)
            e2e["compute_share"] = median([(s - d) / s for s, d in zip(e2e["runs_s"], local_data_runs)])
            results["end_to_end"] = e2e
        if {"ray", "scaling"} & set(parts):
            results.update(_ray_parts(b, parts, local, tmp, log))
            torch.set_num_threads(b.threads)
        if "daemons" in parts:
            from bench.daemons import bench_daemons

            results["daemons"] = bench_daemons(b, tmp, _run_steps, log)
            torch.set_num_threads(b.threads)
        if "reference_e2e" in parts:
            from bench.e2e import bench_reference_e2e

            results["reference_e2e"] = bench_reference_e2e(b, b.e2e_epochs, b.e2e_seeds, log)
            torch.set_num_threads(b.threads)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    results["meta"]["wall_s"] = time.perf_counter() - t_all
    return results


def _ray_parts(b: Bench, parts: list[str], local: dict | None, tmp: str, log: Callable[[str], None]) -> dict:
    """One Ray cluster for both sections; its start-up counts in the first launch-to-first-step (`ray_rounds`
    > 1: later pairs each start and stop a cluster of their own)."""
    import ray

    from runtime.launch import init_ray

    out: dict[str, Any] = {}
    launched = time.time()
    cfg = copy.deepcopy(b.cfg)
    cfg.trainer.num_workers = 1
    cfg.trainer.use_gpu = b.device.type == "cuda"
    cfg.trainer.resources_per_worker = {"CPU": float(b.threads)}
    init_ray(cfg)
    ray_init_s = time.time() - launched
    log("ray: 1 worker ...")
    one = _run_steps(b, 1, tmp, started=launched, time_reports="ray" in parts)
    if "ray" in parts:
        after_init = one["launch_to_first_step_s"] - ray_init_s
        out["ray"] = {
            "ray_images_per_s": one["images_per_s"], "local_images_per_s": local["images_per_s"],
            "ratio": one["images_per_s"] / local["images_per_s"],
            "ray_launch_to_first_step_s": one["launch_to_first_step_s"], "ray_init_s": ray_init_s,
            "ray_launch_after_init_s": after_init,
            "local_launch_to_first_step_s": local["launch_to_first_step_s"],
            "launch_ratio": after_init / local["launch_to_first_step_s"],
            "ray_train_start_s": one["start_to_entry_s"], "ray_setup_to_first_step_s": one["entry_to_first_step_s"],
            "local_setup_to_first_step_s": local["entry_to_first_step_s"],
            "ray_runs_s": one["runs_s"], "local_runs_s": local["runs_s"],
            # the candidate causes, measured: what each process was given, and the per-epoch report costs
            "ray_worker": one["worker"], "local_worker": local["worker"],
            "report_s": one["report_s"], "checkpoint_report_s": one["checkpoint_report_s"],
            "step_s": median(one["runs_s"]),
            # from the loop's return to run_training's: Train noticing the end (its next poll) and shutting down
            "ray_exit_s": one["exit_s"], "local_exit_s": local["exit_s"],
            "poll_interval_s": b.cfg.trainer.poll_interval_s,
        }
    if "scaling" in parts:
        from bench.ntxent import gathered_ntxent

        # the loss with gathered negatives alone, on 1, 2 and 4 CPU processes: at the bench's batch and at a
        # 16x larger one (the large-batch regime SimCLR is run in)
        log("scaling: gathered NT-Xent at 2 and 4 ranks ...")
        ntxent = gathered_ntxent((2, 4), (b.batch, 16 * b.batch))
        gpus = torch.cuda.device_count() if b.device.type == "cuda" else 0
        if b.device.type == "cuda" and gpus < 2:
            out["scaling"] = {"skipped": f"2 workers need 2 GPUs, this machine has {gpus}", "ntxent": ntxent}
            return out
        log("scaling: 2 workers ...")
        two = _run_steps(b, 2, tmp)
        out["scaling"] = {"ntxent": ntxent,
            "cores": os.cpu_count(), "workers_1_images_per_s": one["images_per_s"],
            "workers_2_images_per_s": two["images_per_s"], "speedup": two["images_per_s"] / one["images_per_s"],
            "threads_per_worker_1": one["threads_per_worker"], "threads_per_worker_2": two["threads_per_worker"],
            "workers_2_launch_to_first_step_s": two["launch_to_first_step_s"],
            "workers_1_runs_s": one["runs_s"], "workers_2_runs_s": two["runs_s"],
        }
    if "ray" in parts:
        # last: the same worker at Ray's default priority (nice 15, what every Ray worker got before
        # runtime.launch set worker_niceness=0), to show what that cost
        log("ray: 1 worker at Ray's default nice 15 ...")
        nice = _run_steps(b, 1, tmp, niceness=15)
        out["ray"]["nice15_images_per_s"] = nice["images_per_s"]
        out["ray"]["nice15_ratio"] = nice["images_per_s"] / local["images_per_s"]
        out["ray"]["nice15_runs_s"] = nice["runs_s"]
        out["ray"]["nice15_worker"] = nice["worker"]
        # the same worker with Ray Train's own poll interval (2 s) instead of trainer.poll_interval_s: what a
        # report and the end of a run cost there, and whether polling more often costs steps
        log(f"ray: 1 worker polled at Ray's default {RAY_POLL_INTERVAL_S:g} s ...")
        slow = _run_steps(b, 1, tmp, time_reports=True, poll_interval_s=RAY_POLL_INTERVAL_S)
        out["ray"].update({"ray_poll_interval_s": RAY_POLL_INTERVAL_S,
                           "ray_poll_images_per_s": slow["images_per_s"],
                           "ray_poll_ratio": slow["images_per_s"] / local["images_per_s"],
                           "ray_poll_report_s": slow["report_s"],
                           "ray_poll_checkpoint_report_s": slow["checkpoint_report_s"],
                           "ray_poll_exit_s": slow["exit_s"], "ray_poll_runs_s": slow["runs_s"]})
        # the in-process steps again, with the Ray cluster (GCS, raylet, dashboard) still up: splits the
        # overhead into the daemons' share of the 2 cores and Ray Train's own (worker process, session)
        log("ray: in-process again, with the Ray cluster up ...")
        cpu0, t0 = children_cpu_s(), time.perf_counter()
        up = _run_steps(b, 0, tmp)
        cpu1, wall = children_cpu_s(), time.perf_counter() - t0
        y = out["ray"]
        if cpu0 and cpu1:
            # what the cluster's own processes (GCS, raylet, dashboard and its agents, idle workers: all started
            # by this driver's ray.init, so running before the steps; loader workers start after) took of the
            # cores meanwhile, in cores; plus how many of them there are
            cluster = cpu0.keys() & cpu1.keys()
            y["cluster_cpu_cores"] = sum(max(0.0, cpu1[p] - cpu0[p]) for p in cluster) / wall
            y["cluster_processes"] = len(cluster)
        y["local_cluster_up_images_per_s"] = up["images_per_s"]
        y["local_cluster_up_runs_s"] = up["runs_s"]
        y["train_ratio"] = one["images_per_s"] / up["images_per_s"]
        y["cluster_up_ratio"] = up["images_per_s"] / local["images_per_s"]
        # more pairs, each back to back: the in-process steps alone (no cluster), then the Ray Train worker on a
        # fresh private cluster (run_training starts it and stops it). On 2 cores the in-process figure itself
        # moves by 10-15 % between moments of one run; the median of the pairs' ratios is the figure to read.
        y["ratio_rounds"] = [y["ratio"]]
        for i in range(1, b.ray_rounds):
            log(f"ray: round {i + 1} of {b.ray_rounds}: in-process alone, then Ray Train on a fresh cluster ...")
            ray.shutdown()
            alone = _run_steps(b, 0, tmp)
            torch.set_num_threads(b.threads)
            again = _run_steps(b, 1, tmp)
            y["ratio_rounds"].append(again["images_per_s"] / alone["images_per_s"])
        y["ratio_median"] = median(y["ratio_rounds"])
    return out


def children_cpu_s() -> dict[int, float]:
    """{pid: CPU seconds (user + system) used so far} of every living descendant of this process (psutil, as
    `bench.memory` walks a process tree)."""
    from bench.memory import _psutil

    psutil = _psutil()
    out = {}
    for child in psutil.Process().children(recursive=True):
        try:
            t = child.cpu_times()
        except psutil.Error:  # ended meanwhile
            continue
        out[child.pid] = t.user + t.system
    return out


def meta(b: Bench, parts: list[str]) -> dict:
    import ray

    from pretrain.augment import resolve_augment

    return {
        "device": str(b.device), "device_name": torch.cuda.get_device_name(b.device) if b.device.type == "cuda"
        else platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "threads": b.threads, "loader_threads": b.loader_threads, "parts": parts,
        "backbone": b.cfg.model.name, "timm_kwargs": dict(b.cfg.model.timm_kwargs), "stem": b.cfg.model.stem,
        "image_size": b.image_size, "channels": b.channels, "batch": b.batch, "repeats": b.repeats,
        "warmup": b.warmup, "precision": "bf16" if b.bf16 else "fp32", "channels_last": b.channels_last,
        "augment": resolve_augment(b.cfg.augment), "loader_workers": b.loader_workers,
        "train_loader_workers": b.cfg.data.loader_workers, "shards": b.shards,
        "torch": torch.__version__, "ray": ray.__version__,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
