"""Typed configuration: one tree of dataclasses, loaded from YAML, overridden by `key.sub=value`.

The defaults are the embedded digits run, so `selfsup pipeline` with no config works out of the box.
Every section checks its own values in `check()`; every error is a one-line `UserError` naming the key.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tempfile
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from runtime.errors import UserError

SOURCES = ("digits", "cifar10", "cifar100", "stl10", "folder")
MIN_IMAGE_SIZE = 8  # the smallest image side anything is stored or trained at (shards refuse smaller images)
# `name` becomes a directory (checkpoints under <storage_path>/<name>) and a W&B group: a plain file name only
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
METHODS = ("pixels", "scratch", "knn", "linear", "finetune", "semi")


@dataclass
class DataConfig:
    """Where the shards are, and how `pipeline` makes them when they are missing."""

    source: Literal["digits", "cifar10", "cifar100", "stl10", "folder"] = "digits"
    input: str | None = None  # raw data dir for cifar10/cifar100/stl10/folder
    shards: str = "runs/digits/shards"  # dir or URL holding manifest.json
    image_size: int = 16  # shorter side written to the shards, and the training crop size
    shard_size: int = 512  # samples per shard
    labeled_fractions: list[float] = field(default_factory=lambda: [0.01, 0.1])
    test_fraction: float = 0.2  # for sources without a test split
    seed: int = 0
    loader_workers: int = 0  # DataLoader processes per training worker (0 = in the training process)
    shuffle_buffer: int = 1000

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

    preset: Literal["digits", "small", "imagenet"] = "digits"
    crop_scale: list[float] | None = None  # RandomResizedCrop area range, e.g. [0.08, 1.0]
    crop_ratio: list[float] | None = None  # aspect ratio range, e.g. [0.75, 1.333]
    flip_prob: float | None = None
    jitter_prob: float | None = None
    jitter_strength: float | None = None  # s in SimCLR: brightness/contrast/saturation 0.8s, hue 0.2s
    grayscale_prob: float | None = None
    blur_prob: float | None = None
    blur_sigma: list[float] | None = None

    def check(self) -> None:
        for name in ("flip_prob", "jitter_prob", "grayscale_prob", "blur_prob"):
            p = getattr(self, name)
            if p is not None and not 0 <= p <= 1:
                raise UserError(f"augment.{name} must be in [0, 1], got {p}")


@dataclass
class ModelConfig:
    name: str = "resnet18"  # any timm model name
    # passed to timm.create_model; the default is a narrow ResNet-18 that trains fast on a CPU
    timm_kwargs: dict[str, Any] = field(default_factory=lambda: {"channels": [32, 64, 128, 256]})
    stem: Literal["default", "small"] = "small"  # small: 3x3 stride-1 first conv, no max-pool
    proj_hidden_dim: int = 512
    proj_output_dim: int = 128
    proj_layers: int = 2
    sync_batchnorm: bool = False

    def check(self) -> None:
        _positive("model.proj_hidden_dim", self.proj_hidden_dim)
        _positive("model.proj_output_dim", self.proj_output_dim)
        _positive("model.proj_layers", self.proj_layers)


@dataclass
class OptimConfig:
    name: Literal["lars", "sgd", "adamw"] = "lars"
    base_lr: float = 0.3  # lr = base_lr * global_batch / 256 (SimCLR's rule)
    weight_decay: float = 1e-6  # not applied to norms and biases
    momentum: float = 0.9
    warmup_epochs: int = 2

    def check(self) -> None:
        _positive("optim.base_lr", self.base_lr)
        _non_negative("optim.weight_decay", self.weight_decay)
        _non_negative("optim.warmup_epochs", self.warmup_epochs)


@dataclass
class PretrainConfig:
    epochs: int = 20  # digits: kNN plateaus ~0.96 by 15-20 epochs at temperature 0.1
    batch_size: int = 128  # global: split evenly over the workers (digits: 11 steps/epoch)
    temperature: float = 0.1  # digits: 0.1 gave tighter classes than 0.5 (linear probe at 15 labels)
    checkpoint_every: int = 1  # epochs
    knn_every: int = 5  # epochs; 0 = only at the end
    knn_k: int = 20
    knn_bank: int = 10000  # kNN monitor: memory bank = a seeded sample of at most this many labeled train images
    knn_queries: int = 10000  # kNN monitor: queries = a seeded sample of at most this many test images
    seed: int = 0
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    channels_last: bool | None = None  # None: on GPU only
    compile: bool = False
    max_nonfinite: int = 5  # non-finite losses in a row before the run stops
    # at most this many steps per epoch (0 = no cap: every rank's part of the data once); for quick runs and
    # benchmarks on large data. Every rank runs the same number of steps either way.
    max_steps_per_epoch: int = 0

    def check(self) -> None:
        _positive("pretrain.epochs", self.epochs)
        _non_negative("pretrain.max_steps_per_epoch", self.max_steps_per_epoch)
        _positive("pretrain.batch_size", self.batch_size)
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

    num_workers: int = 2  # 0 = local mode: the same loop in this process, no Ray
    use_gpu: bool = False
    resources_per_worker: dict[str, float] = field(default_factory=dict)  # e.g. {CPU: 4, GPU: 1}
    max_failures: int = 2  # worker-group restarts from the latest checkpoint
    num_to_keep: int = 2  # checkpoints kept
    storage_path: str | None = None  # local path or URI (s3://, gs://, file://); default <output_dir>/ray
    address: str | None = None  # Ray address; None: connect to a running cluster or start a local one
    torch_threads: int = 0  # intra-op threads per worker; 0 = cores / workers

    def check(self) -> None:
        _non_negative("trainer.num_workers", self.num_workers)
        _non_negative("trainer.max_failures", self.max_failures)
        _positive("trainer.num_to_keep", self.num_to_keep)
        _non_negative("trainer.torch_threads", self.torch_threads)


@dataclass
class WandbConfig:
    enabled: bool = True
    project: str = "selfsup"
    group: str | None = None  # default: the run's `name`; pretrain and finetune share it
    mode: Literal["offline", "online", "disabled"] | None = None  # None: $WANDB_MODE, else offline
    entity: str | None = None
    # online runs record console output and system metrics; offline runs do too only when this is true
    capture_offline: bool = False


@dataclass
class FinetuneConfig:
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    fractions: list[float] | None = None  # None: every labeled subset in the manifest
    full_fraction_methods: list[str] = field(default_factory=lambda: ["pixels", "linear", "scratch"])
    seeds: int = 5  # labeled subsets per fraction (seed i = the manifest's seed + i)
    full_fraction_seeds: int = 1  # runs at fraction 1.0 (one subset: all labels; seeds vary only the training)
    epochs: int = 30  # fine-tune and scratch budget, in passes over the labeled subset (fixed budget)
    full_epochs: int = 5  # the same budget for fraction 1.0 runs (scratch on all labels)
    batch_size: int = 64
    lr: float = 0.05
    weight_decay: float = 5e-4
    start_from: Literal["head", "backbone"] = "head"  # head: keep the first projection layer (SimCLRv2)
    # distill: label spreading on the encoder's features as teacher, distilled into the fine-tuned model;
    # fixmatch: FixMatch from the fine-tuned model (streams the unlabeled shards)
    semi_method: Literal["distill", "fixmatch"] = "distill"
    semi_epochs: int = 10  # passes over the unlabeled pool (distill: per round) or stream (fixmatch)
    semi_lr: float = 0.05
    distill_rounds: int = 1  # distill: rounds > 1 distil again, blending with the last student's predictions
    spread_k: int = 10  # distill: neighbours in label spreading's kNN graph
    spread_alpha: float = 0.8  # distill: label spreading's clamping (0: keep the labels, 1: all from neighbours)
    # distill: at most this many images of the train split (besides the labeled subset) and as many of the
    # unlabeled split held in memory: seeded samples drawn by streaming (0: the labeled images, no unlabeled)
    unlabeled_pool: int = 50000
    # labeled subsets of at most this many images are held in memory; larger ones are streamed from the shards
    # (distill's pool then holds a seeded sample of this many of its labels)
    labeled_in_memory: int = 20000
    pixels_max_samples: int = 20000  # pixels: fit on a seeded sample of this many labeled images when more
    threshold: float = 0.9  # FixMatch confidence for pseudo-labels
    unlabeled_ratio: int = 4  # FixMatch: unlabeled batch = ratio x labeled batch
    # Where scratch/finetune/semi run. auto: Ray Train DDP over finetune.num_workers when that is >= 2; else,
    # when trainer.num_workers >= 2, one Ray task per labeled subset, many at once (DDP over trainer.num_workers
    # instead when the unlabeled splits hold more than 100,000 images); else in this process.
    parallel: Literal["auto", "local", "tasks", "train"] = "auto"
    # Ray Train workers for parallel=train (the trainer section's other settings apply); 0: trainer.num_workers
    num_workers: int = 0

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
        _positive("finetune.seeds", self.seeds)
        _positive("finetune.full_fraction_seeds", self.full_fraction_seeds)
        _positive("finetune.epochs", self.epochs)
        _positive("finetune.full_epochs", self.full_epochs)
        _positive("finetune.batch_size", self.batch_size)
        _positive("finetune.lr", self.lr)
        _positive("finetune.semi_lr", self.semi_lr)
        _non_negative("finetune.weight_decay", self.weight_decay)
        _non_negative("finetune.semi_epochs", self.semi_epochs)
        _positive("finetune.unlabeled_ratio", self.unlabeled_ratio)
        _positive("finetune.distill_rounds", self.distill_rounds)
        _positive("finetune.spread_k", self.spread_k)
        if not 0 < self.spread_alpha < 1:
            raise UserError(f"finetune.spread_alpha must be in (0, 1), got {self.spread_alpha}")
        _non_negative("finetune.unlabeled_pool", self.unlabeled_pool)
        _positive("finetune.labeled_in_memory", self.labeled_in_memory)
        _positive("finetune.pixels_max_samples", self.pixels_max_samples)
        _non_negative("finetune.num_workers", self.num_workers)
        if not 0 < self.threshold <= 1:
            raise UserError(f"finetune.threshold must be in (0, 1], got {self.threshold}")


@dataclass
class FaultConfig:
    """Test aid, off by default: rank `kill_rank` exits hard at global step `at_step` (first attempt only)."""

    kill_rank: int = -1
    at_step: int = -1
    nan_at_step: int = -1  # make the loss non-finite from this step on (tests the non-finite guard)


@dataclass
class Config:
    name: str = "digits"  # run name: W&B group and Ray run name; a plain name (NAME_PATTERN), it becomes a dir
    output_dir: str = "runs/digits"
    encoder: str | None = None  # finetune: the pretrain run dir; default output_dir
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
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
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if dataclasses.is_dataclass(section) and hasattr(section, "check"):
                section.check()

    @property
    def encoder_dir(self) -> str:
        return self.encoder or self.output_dir


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
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(raw, key, value)
    cfg = _build(Config, raw, "")
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


def current_umask() -> int:
    """This process's umask, read without changing it where the OS allows (Linux: /proc)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def umask_mode(directory: bool = False) -> int:
    """The mode a plain open() or mkdir() would give: 0o666 (files) or 0o777 (dirs) less the umask.
    `mkstemp`/`mkdtemp` use 0o600/0o700 whatever the umask; what they create and is kept gets this mode."""
    return (0o777 if directory else 0o666) & ~current_umask()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    p = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        os.fchmod(fd, umask_mode())  # the user's umask, like any other file they write (not mkstemp's 0600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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


def _build(cls: type, raw: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "the config"
    if not isinstance(raw, dict):
        raise UserError(f"{where} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in names:
            raise UserError(f"unknown config key {prefix}{key} (valid keys in {where}: {', '.join(names)})")
        kwargs[key] = _coerce(hints[key], value, f"{prefix}{key}")
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value if value is not None else {}, key + ".")
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key)
    if origin is Literal:
        if value not in args:
            raise UserError(f"config key {key} must be one of {', '.join(map(str, args))}; got {value!r}")
        return value
    if origin is list:
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            value = [v for v in str(value).split(",") if v != ""] if isinstance(value, str) else [value]
        if not isinstance(value, (list, tuple)):
            raise UserError(f"config key {key} must be a list, got {value!r}")
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"config key {key} must be a mapping, got {value!r}")
        return {str(k): _coerce(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"config key {key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise UserError(f"config key {key} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise UserError(f"config key {key} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise UserError(f"config key {key} must be a string, got {value!r}")
    raise TypeError(f"unsupported config type {tp!r} for {key}")


def _positive(key: str, value: float) -> None:
    if value <= 0:
        raise UserError(f"{key} must be positive, got {value}")


def _non_negative(key: str, value: float) -> None:
    if value < 0:
        raise UserError(f"{key} must be zero or positive, got {value}")
