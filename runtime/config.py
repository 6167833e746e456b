"""Typed configuration: one tree of dataclasses, loaded from YAML, overridden by `key.sub=value`.

Each field's meaning is written once, here, as `doc=` beside its default: `--help` of every stage lists
them (runtime/confighelp.py) and a test keeps configs/*.yaml from restating them. The defaults are the embedded
digits run, so `selfsup pipeline` with no config works out of the box. Every section checks its own values in
`check()`; every error is a one-line `UserError` naming the key. Renamed keys keep loading (RENAMED).
Over 400 lines because it is the one place every key is documented; the generic parts live in runtime/typed.py
(dataclass from plain data) and runtime/files.py (atomic writes with the umask's mode).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from runtime.errors import UserError
from runtime.files import atomic_write_text as atomic_write_text  # re-exported: callers import it from here
from runtime.files import current_umask as current_umask
from runtime.files import umask_mode as umask_mode
from runtime.typed import build_dataclass

SOURCES = ("digits", "cifar10", "cifar100", "stl10", "folder", "photos", "photos-val")
MIN_IMAGE_SIZE = 8  # the smallest image side anything is stored or trained at (shards refuse smaller images)
# `name` becomes a directory (checkpoints under <storage_path>/<name>) and a W&B group: a plain file name only
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
METHODS = ("pixels", "scratch", "knn", "linear", "finetune", "semi")
# which images to label (finetune/selection.py): chosen from the encoder's features, never from labels
SELECTION_STRATEGIES = ("random", "typiclust", "kcenter")


def _opt(default: Any, doc: str) -> Any:
    """A config field and its one-line meaning (read by `--help` and by the configs/*.yaml check)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


def field_doc(section: type | None, name: str) -> str:
    """The one-line meaning of `section.name` (`section` None: a top-level key)."""
    cls = Config if section is None else section
    return next(f.metadata.get("doc", "") for f in dataclasses.fields(cls) if f.name == name)


@dataclass
class DataConfig:
    """Where the shards are, and how `pipeline` makes them when they are missing."""

    source: Literal["digits", "cifar10", "cifar100", "stl10", "folder", "photos", "photos-val"] = _opt(
        "digits", "image source `pipeline` shards when the shards are missing")
    input: str | None = _opt(None, "raw data dir for cifar10/cifar100/stl10/folder")
    shards: str = _opt("runs/digits/shards", "dir or URL (s3://..., pipe:...) holding manifest.json")
    image_size: int = _opt(16, "shorter side written to the shards, and the training crop size")
    shard_size: int = _opt(512, "samples per shard")
    labeled_fractions: list[float] = _opt([0.01, 0.1], "labeled subsets drawn at shard time, as fractions of train")
    test_fraction: float = _opt(0.2, "share of each class held out for testing, for sources without a test split")
    seed: int = _opt(0, "seed of the labeled subsets (subset i of fine-tuning uses seed + i)")
    loader_workers: int = _opt(0, "DataLoader processes per training worker (0 = in the training process)")
    shuffle_buffer: int = _opt(1000, "samples shuffled in memory per loader, on top of the per-epoch shard shuffle")

    def check(self) -> None:
        if self.image_size < MIN_IMAGE_SIZE:
            raise UserError(f"data.image_size must be at least {MIN_IMAGE_SIZE}, got {self.image_size}")
        _positive("data.shard_size", self.shard_size)
        _non_negative("data.loader_workers", self.loader_workers)
        _non_negative("data.shuffle_buffer", self.shuffle_buffer)
        if not 0 < self.test_fraction < 1:
            raise UserError(f"data.test_fraction must be in (0, 1), got {self.test_fraction}")
        for f in self.labeled_fractions:
            if not 0 < f <= 1:
                raise UserError(f"data.labeled_fractions must each be in (0, 1], got {f}")


@dataclass
class AugmentConfig:
    """SimCLR's two-view recipe. `preset` fills every field left unset (null)."""

    preset: Literal["digits", "small", "imagenet"] = _opt(
        "digits", "digits: no flip, no colour; small: no blur (<= 32 px); imagenet: SimCLR's full recipe")
    crop_scale: list[float] | None = _opt(None, "RandomResizedCrop area range, e.g. [0.08, 1.0]")
    crop_ratio: list[float] | None = _opt(None, "RandomResizedCrop aspect ratio range, e.g. [0.75, 1.333]")
    flip_prob: float | None = _opt(None, "horizontal flip probability")
    jitter_prob: float | None = _opt(None, "colour jitter probability")
    jitter_strength: float | None = _opt(None, "s in SimCLR: brightness/contrast/saturation 0.8s, hue 0.2s")
    grayscale_prob: float | None = _opt(None, "grayscale probability")
    blur_prob: float | None = _opt(None, "Gaussian blur probability")
    blur_sigma: list[float] | None = _opt(None, "Gaussian blur sigma range, e.g. [0.1, 2.0]")

    def check(self) -> None:
        for name in ("flip_prob", "jitter_prob", "grayscale_prob", "blur_prob"):
            if getattr(self, name) is not None:
                _probability(f"augment.{name}", getattr(self, name))


@dataclass
class ModelConfig:
    """The encoder (a timm backbone, built with pretrained=False) and SimCLR's projection head."""

    name: str = _opt("resnet18", "any timm model name")
    timm_kwargs: dict[str, Any] = _opt({"channels": [32, 64, 128, 256]},
                                       "passed to timm.create_model ({} = the model's own widths)")
    stem: Literal["default", "small"] = _opt(
        "small", "small: 3x3 stride-1 first conv, no max-pool (<= 32 px); default: the model's own")
    proj_hidden_dim: int = _opt(512, "projection head: hidden width")
    proj_output_dim: int = _opt(128, "projection head: output width (the NT-Xent embedding)")
    proj_layers: int = _opt(2, "projection head: linear layers")
    sync_batchnorm: bool = _opt(False, "BatchNorm statistics over the global batch (across workers): "
                                "torch's SyncBatchNorm on GPUs, an all-reduce per layer on CPU workers")

    def check(self) -> None:
        _positive("model.proj_hidden_dim", self.proj_hidden_dim)
        _positive("model.proj_output_dim", self.proj_output_dim)
        _positive("model.proj_layers", self.proj_layers)


@dataclass
class OptimConfig:
    """Pretraining's optimiser: linear warm-up, then a cosine schedule."""

    name: Literal["lars", "sgd", "adamw"] = _opt("lars", "lars | sgd | adamw")
    base_lr: float = _opt(0.3, "lr = base_lr * global_batch_size / 256 (SimCLR's rule)")
    weight_decay: float = _opt(1e-6, "weight decay, not applied to norms and biases")
    momentum: float = _opt(0.9, "momentum (lars, sgd)")
    warmup_epochs: int = _opt(2, "epochs of linear learning-rate warm-up")

    def check(self) -> None:
        _positive("optim.base_lr", self.base_lr)
        _non_negative("optim.weight_decay", self.weight_decay)
        _non_negative("optim.warmup_epochs", self.warmup_epochs)


@dataclass
class PretrainConfig:
    """SimCLR pretraining: budget, loss, checkpoints and the kNN monitor."""

    epochs: int = _opt(40, "passes over the train (+ unlabeled) split")
    global_batch_size: int = _opt(128, "images per step over all workers, split evenly over them")
    temperature: float = _opt(0.1, "NT-Xent temperature")
    checkpoint_every: int = _opt(1, "epochs between checkpoints (a lost worker costs at most this)")
    knn_every: int = _opt(5, "epochs between kNN accuracy checks on the test split; 0 = only at the end")
    knn_k: int = _opt(20, "kNN monitor: neighbours")
    knn_bank: int = _opt(10000, "kNN monitor: memory bank = a seeded sample of at most this many train images")
    knn_queries: int = _opt(10000, "kNN monitor: queries = a seeded sample of at most this many test images")
    seed: int = _opt(0, "seed of the model's initialisation, shuffles and augmentation")
    precision: Literal["auto", "bf16", "fp32"] = _opt("auto", "auto: bf16 autocast on GPU and on CPUs with native bf16 (AVX512-BF16/AMX), else fp32")
    channels_last: bool | None = _opt(None, "channels-last memory format; null: where it measured faster (GPU, native-bf16 CPU, AVX2 CPU in fp32)")
    compile: bool = _opt(False, "torch.compile the model (faster steps after minutes of compiling)")
    max_nonfinite: int = _opt(5, "non-finite losses in a row (each step skipped) before the run stops")
    max_steps_per_epoch: int = _opt(0, "cap on steps per epoch, the same on every rank (0 = all of the data once)")

    def check(self) -> None:
        _positive("pretrain.epochs", self.epochs)
        _non_negative("pretrain.max_steps_per_epoch", self.max_steps_per_epoch)
        _positive("pretrain.global_batch_size", self.global_batch_size)
        _positive("pretrain.temperature", self.temperature)
        _positive("pretrain.checkpoint_every", self.checkpoint_every)
        _non_negative("pretrain.knn_every", self.knn_every)
        _positive("pretrain.knn_k", self.knn_k)
        _positive("pretrain.knn_bank", self.knn_bank)
        _positive("pretrain.knn_queries", self.knn_queries)
        _positive("pretrain.max_nonfinite", self.max_nonfinite)


@dataclass
class TrainerConfig:
    """Ray Train: ScalingConfig, RunConfig, CheckpointConfig, FailureConfig."""

    num_workers: int = _opt(2, "Ray Train workers; 0 = local mode: the same loop in this process, no Ray")
    use_gpu: bool = _opt(False, "one GPU per worker")
    resources_per_worker: dict[str, float] = _opt({}, "Ray resources per worker, e.g. {CPU: 4, GPU: 1}")
    max_failures: int = _opt(2, "worker-group restarts from the latest checkpoint")
    num_to_keep: int = _opt(2, "checkpoints kept")
    storage_path: str | None = _opt(None, "local path or URI (s3://, gs://, file://); null: <output_dir>/ray")
    address: str | None = _opt(None, "Ray address; null: a running cluster, else a local one")
    torch_threads: int = _opt(0, "intra-op threads per worker; 0 = cores / workers")
    poll_interval_s: float = _opt(0.5, "seconds between Ray Train's polls of its workers (Ray's own default: 2): "
                                       "how long a run outlives its last step, and the least time between reports")

    def check(self) -> None:
        _non_negative("trainer.num_workers", self.num_workers)
        _positive("trainer.poll_interval_s", self.poll_interval_s)
        _non_negative("trainer.max_failures", self.max_failures)
        _positive("trainer.num_to_keep", self.num_to_keep)
        _non_negative("trainer.torch_threads", self.torch_threads)


@dataclass
class InspectConfig:
    """`selfsup inspect` (and the pipeline after pretraining): a data report from the encoder's features."""

    enabled: bool = _opt(True, "run the data report in `selfsup pipeline` after pretraining")
    duplicate_threshold: float = _opt(0.98, "cosine similarity of features (mirror-averaged, centred) above "
                                            "which two images are reported as near duplicates")
    knn_k: int = _opt(10, "neighbours that vote on each labeled image's label, and whose distance scores outliers")
    label_error_share: float = _opt(0.5, "a labeled image is a likely label error when more than this share of "
                                         "its neighbours carry one other label")
    top: int = _opt(16, "pairs, suspects and outliers listed and drawn as thumbnails")
    max_images: int = _opt(200000, "at most this many images per split enter the search (seeded sample above)")

    def check(self) -> None:
        if not 0 < self.duplicate_threshold <= 1:
            raise UserError(f"inspect.duplicate_threshold must be in (0, 1], got {self.duplicate_threshold}")
        if not 0 <= self.label_error_share < 1:
            raise UserError(f"inspect.label_error_share must be in [0, 1), got {self.label_error_share}")
        _positive("inspect.knn_k", self.knn_k)
        _positive("inspect.top", self.top)
        _positive("inspect.max_images", self.max_images)


@dataclass
class WandbConfig:
    """Weights & Biases tracking (offline unless asked)."""

    enabled: bool = _opt(True, "log runs to W&B")
    project: str = _opt("selfsup", "W&B project")
    group: str | None = _opt(None, "W&B group; null: the run's `name` (pretrain and finetune share it)")
    mode: Literal["offline", "online", "disabled"] | None = _opt(
        None, "null: $WANDB_MODE, else offline; online once you `wandb login`")
    entity: str | None = _opt(None, "W&B entity (user or team); null: your default")
    capture_offline: bool = _opt(
        False, "offline runs record console output and system metrics too (online runs always do)")


@dataclass
class FinetuneConfig:
    """Label-efficient evaluation: methods, labeled subsets, budgets, and the semi-supervised methods."""

    methods: list[str] = _opt(list(METHODS), "methods to run: " + " | ".join(METHODS))
    selection: list[str] = _opt([], "also train every method on subsets chosen by these strategies from the "
                                    "encoder's features, without labels, at each fraction's budget (and "
                                    "`selfsup select`'s strategies; empty there: typiclust): "
                                    + " | ".join(SELECTION_STRATEGIES))
    fractions: list[float] | None = _opt(None, "labeled fractions to run; null: every subset in the manifest")
    full_fraction_methods: list[str] = _opt(["pixels", "linear", "scratch"], "methods also run on all labels")
    num_seeds: int = _opt(5, "labeled subsets per fraction (subset i uses the manifest's seed + i)")
    full_fraction_seeds: int = _opt(1, "runs of the trained methods at fraction 1.0 (one subset, all labels: "
                                       "seeds vary only training; pixels and linear run once)")
    epochs: int = _opt(30, "finetune/scratch budget in passes over the labeled subset (fixed, no early stop)")
    full_epochs: int = _opt(5, "the same budget for fraction 1.0 runs")
    batch_size: int = _opt(64, "labeled batch (over all workers)")
    lr: float = _opt(0.05, "learning rate (SGD + nesterov, cosine schedule)")
    weight_decay: float = _opt(5e-4, "weight decay")
    jitter_prob: float | None = _opt(None, "colour jitter probability while fine-tuning (every trained method, "
                                           "scratch included); null: half of augment.jitter_prob")
    jitter_strength: float | None = _opt(None, "colour jitter strength while fine-tuning; null: half of "
                                               "augment.jitter_strength")
    backbone_lr_scale: float = _opt(1.0, "fine-tuning from the encoder (finetune, semi's fine-tuned model, an "
                                          "ensemble's members): the backbone's learning rate is finetune.lr times "
                                          "this, the head's finetune.lr; scratch always 1")
    mixup: float = _opt(0.0, "training on labels (scratch, finetune, semi's fine-tuned model): mixup's Beta(a, a) "
                             "parameter a, each batch blended with a shuffled copy of itself (Zhang et al., 2018); "
                             "0: off")
    probe_epochs: int = _opt(0, "fine-tuning from the encoder: first fit the classifier's head alone on the frozen "
                                "backbone's features of the labeled images, this many passes (a linear probe, "
                                "then fine-tuning: LP-FT); 0: none")
    wise_alpha: float = _opt(1.0, "fine-tuning from the encoder with finetune.probe_epochs > 0: the weights kept are "
                                  "this share of the fine-tuned ones plus the rest of the probed start's "
                                  "(WiSE-FT); 1: the fine-tuned weights")
    start_from: Literal["head", "backbone"] = _opt(
        "head", "head: keep the first projection layer (SimCLRv2); backbone: the backbone only")
    semi_method: Literal["distill", "fixmatch"] = _opt(
        "distill", "distill: label spreading on the encoder's features, distilled into the fine-tuned model; "
        "fixmatch: FixMatch, streaming the unlabeled shards")
    semi_epochs: int = _opt(0, "passes over the unlabeled pool (distill: per round, of the whole network; 0: the "
                                "head only) or stream (fixmatch)")
    semi_lr: float = _opt(0.05, "learning rate of the semi-supervised methods")
    distill_rounds: int = _opt(1, "distill: rounds; > 1 distils again, blending with the last student")
    distill_head_epochs: int = _opt(20, "distill: passes of the classifier's head over the backbone's features "
                                        "of the pool (computed once) before the semi_epochs passes; 0: none")
    spread_k: int = _opt(3, "distill: neighbours in label spreading's kNN graph")
    spread_alpha: float = _opt(0.95, "distill: label spreading's clamping (0 keeps the labels, 1 takes all "
                                     "from neighbours)")
    spread_prior: Literal["uniform", "labels"] = _opt(
        "uniform", "distill: the class shares label spreading's result is rescaled to: uniform (the labeled classes "
        "alike) | labels (the labeled subset's, add-one smoothed)")
    spread_features: Literal["encoder", "finetuned"] = _opt(
        "encoder", "distill: the features label spreading's kNN graph is built on: encoder (the frozen pretrained "
        "backbone's, once for all subsets) | finetuned (the backbone's of the subset's fine-tuned network)")
    distill_student: Literal["finetuned", "scratch"] = _opt(
        "finetuned", "distill: the student fit to the teacher: finetuned (the subset's fine-tuned model, as "
        "SimCLRv2) | scratch (a freshly initialised network, trained for finetune.semi_epochs passes)")
    teacher_models: int = _opt(1, "distill: fine-tuned models whose mean prediction the teacher blends with "
                                  "label spreading: the subset's own plus teacher_models - 1 more, each fine-tuned "
                                  "from the encoder with another seed (an ensemble teacher; each costs one "
                                  "fine-tuning); 1: the subset's fine-tuned model alone")
    distill_bn_stats: Literal["labeled", "pool"] = _opt(
        "labeled", "distill: the student's batch-norm statistics: labeled (those fine-tuning estimated on the "
        "labeled subset) | pool (re-estimated on the whole unlabeled pool before the head is fit)")
    unlabeled_pool: int = _opt(50000, "distill: at most this many train and as many unlabeled images in memory "
                                      "(seeded samples; 0: the labeled images only)")
    labeled_in_memory: int = _opt(20000, "labeled subsets up to this size are held in memory; larger are streamed")
    pixels_max_samples: int = _opt(20000, "pixels: fit on a seeded sample of this many labeled images when more")
    fixmatch_threshold: float = _opt(0.9, "fixmatch: confidence a pseudo-label needs to count")
    fixmatch_unlabeled_ratio: int = _opt(4, "fixmatch: unlabeled batch = this x the labeled batch (mu)")
    precision: Literal["auto", "bf16", "fp32"] = _opt(
        "auto", "scratch, finetune and semi's training and knn/linear's frozen encode (the test split is scored "
        "in fp32): auto: bf16 autocast where pretrain.precision auto picks it (GPU, native-bf16 CPU), else fp32")
    channels_last: bool | None = _opt(None, "the classifier (and the frozen encoder) in the channels-last memory "
                                            "format; null: where pretrain.channels_last null picks it")
    parallel: Literal["auto", "local", "tasks", "train"] = _opt(
        "auto", "tasks: a Ray task per labeled subset; train: Ray Train DDP; local: this process; auto: train "
        "when finetune.num_workers >= 2, else tasks when trainer.num_workers >= 2 (train for > 100,000 unlabeled), "
        "else local")
    num_workers: int = _opt(0, "Ray Train workers for parallel=train; 0: trainer.num_workers")

    def check(self) -> None:
        for m in self.methods:
            if m not in METHODS:
                raise UserError(f"finetune.methods: unknown method {m!r} (valid: {', '.join(METHODS)})")
        for m in self.full_fraction_methods:
            if m not in METHODS:
                raise UserError(
                    f"finetune.full_fraction_methods: unknown method {m!r} (valid: {', '.join(METHODS)})"
                )
        for f in self.fractions or []:
            if not 0 < f <= 1:
                raise UserError(f"finetune.fractions must each be in (0, 1], got {f}")
        for s in self.selection:
            if s not in SELECTION_STRATEGIES:
                raise UserError(f"finetune.selection: unknown strategy {s!r} (valid: {', '.join(SELECTION_STRATEGIES)})")
        _positive("finetune.num_seeds", self.num_seeds)
        _positive("finetune.full_fraction_seeds", self.full_fraction_seeds)
        _positive("finetune.epochs", self.epochs)
        _positive("finetune.full_epochs", self.full_epochs)
        if self.jitter_prob is not None:
            _probability("finetune.jitter_prob", self.jitter_prob)
        if self.jitter_strength is not None:
            _non_negative("finetune.jitter_strength", self.jitter_strength)
        _positive("finetune.batch_size", self.batch_size)
        _positive("finetune.lr", self.lr)
        _non_negative("finetune.backbone_lr_scale", self.backbone_lr_scale)
        _non_negative("finetune.mixup", self.mixup)
        _non_negative("finetune.probe_epochs", self.probe_epochs)
        _probability("finetune.wise_alpha", self.wise_alpha)
        if self.wise_alpha < 1 and self.probe_epochs == 0:
            raise UserError("finetune.wise_alpha < 1 needs finetune.probe_epochs > 0: the start it averages with "
                            "must have a head fit to the labels")
        _positive("finetune.semi_lr", self.semi_lr)
        _non_negative("finetune.weight_decay", self.weight_decay)
        _non_negative("finetune.semi_epochs", self.semi_epochs)
        _positive("finetune.fixmatch_unlabeled_ratio", self.fixmatch_unlabeled_ratio)
        _positive("finetune.distill_rounds", self.distill_rounds)
        _non_negative("finetune.distill_head_epochs", self.distill_head_epochs)
        _positive("finetune.spread_k", self.spread_k)
        _positive("finetune.teacher_models", self.teacher_models)
        if self.distill_student == "scratch" and self.semi_method == "distill" and self.semi_epochs == 0:
            raise UserError("finetune.distill_student=scratch needs finetune.semi_epochs > 0: a fresh student "
                            "learns only in the whole network's passes")
        if not 0 < self.spread_alpha < 1:
            raise UserError(f"finetune.spread_alpha must be in (0, 1), got {self.spread_alpha}")
        _non_negative("finetune.unlabeled_pool", self.unlabeled_pool)
        _positive("finetune.labeled_in_memory", self.labeled_in_memory)
        _positive("finetune.pixels_max_samples", self.pixels_max_samples)
        _non_negative("finetune.num_workers", self.num_workers)
        if not 0 < self.fixmatch_threshold <= 1:
            raise UserError(f"finetune.fixmatch_threshold must be in (0, 1], got {self.fixmatch_threshold}")


@dataclass
class FaultConfig:
    """Test aid, off by default: rank `kill_rank` exits hard at global step `at_step` (first attempt only)."""

    kill_rank: int = _opt(-1, "the rank that exits hard (-1: none)")
    at_step: int = _opt(-1, "the global step it exits at (-1: never)")
    nan_at_step: int = _opt(-1, "make the loss non-finite from this step on (tests the non-finite guard)")


@dataclass
class Config:
    """The whole run: top-level keys, then one section per part."""

    name: str = _opt("digits", "run name: W&B group and Ray run name; a plain name (it becomes a directory)")
    output_dir: str = _opt("runs/digits", "encoder, metrics, report and checkpoints go here")
    encoder: str | None = _opt(None, "finetune: the pretraining run dir to read (encoder=RUN_DIR); null: output_dir")
    budget: int | None = _opt(None, "select: how many train images to choose for labeling (budget=N)")
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    inspect: InspectConfig = field(default_factory=InspectConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)

    def check(self) -> None:
        if not self.name:
            raise UserError("name must not be empty")
        if not NAME_PATTERN.fullmatch(self.name):
            raise UserError(f"name {self.name!r} is not a plain name: use letters, digits, '.', '_' and '-' "
                            "(starting with a letter or digit, at most 128), e.g. name=digits-run2")
        if not self.output_dir:
            raise UserError("output_dir must not be empty")
        if self.budget is not None and self.budget <= 0:
            raise UserError(f"budget must be a positive number of images to label, got {self.budget}: e.g. budget=15")
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if dataclasses.is_dataclass(section) and hasattr(section, "check"):
                section.check()

    @property
    def encoder_dir(self) -> str:
        return self.encoder or self.output_dir


# ---------------------------------------------------------------- renamed keys

# old dotted key -> new one. The old names keep loading (YAML, overrides, configs saved by earlier runs) with a
# one-line note on stderr; giving both in one file or one command line is refused.
RENAMED = {
    "pretrain.batch_size": "pretrain.global_batch_size",
    "finetune.seeds": "finetune.num_seeds",
    "finetune.threshold": "finetune.fixmatch_threshold",
    "finetune.unlabeled_ratio": "finetune.fixmatch_unlabeled_ratio",
}


def rename_deprecated(raw: dict[str, Any], where: str, note: bool = True) -> dict[str, Any]:
    """Move every old key of `raw` (a config as plain data) to its new name, in place; returns `raw`."""
    for old, new in RENAMED.items():
        section, old_key = old.split(".")
        new_key = new.split(".")[1]
        node = raw.get(section)
        if not isinstance(node, dict) or old_key not in node:
            continue
        if new_key in node:
            raise UserError(f"{where} sets both {old} and {new}: keep only {new} ({old} is its old name)")
        if note:
            print(f"note: config key {old} is deprecated, use {new} (in {where})", file=sys.stderr, flush=True)
        node[new_key] = node.pop(old_key)
    return raw


def _rename_override(key: str, seen: dict[str, str]) -> str:
    """The current name of an override's key (a note when it is an old one); both names given: refused."""
    new = RENAMED.get(key, key)
    if seen.setdefault(new, key) != key:
        raise UserError(f"the overrides set both {seen[new]} and {key}: keep only {new}")
    if new != key:
        print(f"note: config key {key} is deprecated, use {new} (in the overrides)", file=sys.stderr, flush=True)
    return new


# ---------------------------------------------------------------- loading


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML file <- `key.sub=value` overrides; then type- and range-checked."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config file not found: {p}")
        try:
            text = p.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"config file {p} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
                            f"{e.start}): save it as UTF-8") from None
        except OSError as e:
            raise UserError(f"cannot read config file {p}: {e.strerror or e}") from None
        try:
            raw = yaml.load(text, Loader=_UniqueKeyLoader) or {}
        except yaml.YAMLError as e:
            raise UserError(f"config file {p} is not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise UserError(f"config file {p} must hold a mapping at the top level")
        rename_deprecated(raw, str(p))
    seen: dict[str, str] = {}
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(raw, _rename_override(key, seen), value)
    rename_deprecated(raw, "the overrides")  # a whole section given as one override
    cfg = build_dataclass(Config, raw, "")
    _check_finite(to_dict(cfg), "")
    cfg.check()
    return cfg


class _DuplicateKey(yaml.YAMLError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (plain YAML keeps the last, silently)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    first = seen.setdefault(key, line)
                except TypeError:  # an unhashable key: the base class reports it
                    continue
                if first != line:
                    raise _DuplicateKey(f"duplicate key {key!r} on lines {first} and {line}: keep one "
                                        "(YAML would silently use the last)")
        return super().construct_mapping(node, deep=deep)


def _check_finite(tree: Any, key: str) -> None:
    """Every number in the resolved config is finite: NaN or infinity anywhere is refused at load time."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            _check_finite(v, f"{key}.{k}" if key else str(k))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            _check_finite(v, f"{key}[{i}]")
    elif isinstance(tree, float) and not math.isfinite(tree):
        raise UserError(f"config key {key} must be a finite number, got {tree}")


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item or item.startswith("="):
        raise UserError(f"override {item!r} must look like key.sub=value")
    key, text = item.split("=", 1)
    try:
        value = yaml.safe_load(text) if text != "" else None
    except yaml.YAMLError:
        value = text
    return key.strip(), value


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | os.PathLike) -> Path:
    """Write the resolved config atomically (temp file, then rename)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    text = "# resolved config of this run\n" + yaml.safe_dump(to_dict(cfg), sort_keys=False)
    atomic_write_text(p, text)
    return p


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise UserError(f"override {key}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _positive(key: str, value: float) -> None:
    if value <= 0:
        raise UserError(f"{key} must be positive, got {value}")


def _probability(key: str, value: float) -> None:
    if not 0 <= value <= 1:
        raise UserError(f"{key} must be in [0, 1], got {value}")


def _non_negative(key: str, value: float) -> None:
    if value < 0:
        raise UserError(f"{key} must be zero or positive, got {value}")
