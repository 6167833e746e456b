"""The SimCLR network (a timm backbone + lightly's projection head) and the exported encoder's files.

The export is meant to be rebuilt by anyone with timm alone:
`timm.create_model(model, pretrained=False, num_classes=0, in_chans=in_chans, **timm_kwargs)`,
plus, for `stem: small`, the first conv swapped for a 3x3 stride-1 conv and the max-pool for `Identity`,
then `load_state_dict(strict=True)`. `build_backbone` is exactly that recipe.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import timm
import torch
import torch.distributed as dist
from lightly.models.modules import SimCLRProjectionHead
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from runtime.config import umask_mode
from runtime.errors import UserError

ENCODER_WEIGHTS = "encoder.safetensors"
HEAD_WEIGHTS = "head.safetensors"
ENCODER_META = "encoder.json"
STEMS = ("default", "small")


# ---------------------------------------------------------------- building


def build_backbone(name: str, in_chans: int, stem: str = "default", timm_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """A timm model without classifier (`forward` returns pooled features of size `num_features`)."""
    if stem not in STEMS:
        raise UserError(f"model.stem must be one of {', '.join(STEMS)}; got {stem!r}")
    kwargs = dict(timm_kwargs or {})
    try:
        backbone = timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_chans, **kwargs)
    except RuntimeError as e:  # timm's "Unknown model (...)"
        raise UserError(f"model.name {name!r} is not a timm model ({_first_line(e)}): see `timm.list_models()`") from None
    except TypeError as e:
        raise UserError(f"model.timm_kwargs {kwargs} are not accepted by timm model {name!r}: {_first_line(e)}") from None
    if stem == "small":
        _small_stem(backbone, name)
    return backbone


def _small_stem(backbone: nn.Module, name: str) -> None:
    """CIFAR-style stem: on 32 px and smaller images a 7x7/2 conv + max-pool throws away most of the pixels."""
    conv1 = getattr(backbone, "conv1", None)
    if conv1 is None or not hasattr(backbone, "maxpool"):
        raise UserError(
            f"model.stem=small needs a ResNet-style model with `conv1` and `maxpool`; {name!r} has none: "
            "set model.stem=default"
        )
    convs = [m for m in conv1.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise UserError(f"model.stem=small: {name!r}'s conv1 holds no Conv2d: set model.stem=default")
    # a deep stem (resnet*d) is a Sequential of convs; bn1 follows its last one, so keep that width
    in_chans, out_chans = convs[0].in_channels, convs[-1].out_channels
    backbone.conv1 = nn.Conv2d(in_chans, out_chans, kernel_size=3, stride=1, padding=1, bias=False)
    backbone.maxpool = nn.Identity()


def convert_sync_batchnorm(model: nn.Module, enabled: bool, device: torch.device | str) -> nn.Module:
    """Batch norm over the global batch (across workers) when asked: torch's SyncBatchNorm on accelerators,
    `CPUSyncBatchNorm` on CPU workers, where torch has none."""
    if not enabled:
        return model
    if torch.device(device).type == "cpu":
        return CPUSyncBatchNorm.convert(model)
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


class CPUSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the global batch, for CPU workers under DDP.

    torch's SyncBatchNorm runs on accelerators only. This one does what it does with CPU ops: each layer's
    forward gathers every rank's per-channel mean, variance and count (one small all-gather, combined exactly),
    normalises with torch's fused batch norm, and its backward all-reduces the two per-channel sums the input
    gradient needs, so N workers normalise and back-propagate like one process over the whole batch, as SimCLR's
    global BN does across accelerators. Weight and bias gradients stay local: DDP averages them. In eval mode, or
    without a process group of more than one rank, it is plain BatchNorm. The state dict is BatchNorm's, so the
    exported encoder loads into the plain timm model.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        c = x.shape[1]
        dims = [0, *range(2, x.dim())]
        with torch.no_grad():
            var, mean = torch.var_mean(x.float(), dims, correction=0)
            local = torch.cat([mean, var, mean.new_full((1,), x.numel() // c)])
            ranks = [torch.empty_like(local) for _ in range(dist.get_world_size())]
            dist.all_gather(ranks, local)
            every = torch.stack(ranks)  # rank x (means, variances, count)
            counts = every[:, -1:]
            n = counts.sum()
            mean = (every[:, :c] * counts).sum(0) / n
            var = ((every[:, c:2 * c] + (every[:, :c] - mean) ** 2) * counts).sum(0) / n  # exact, as Chan et al.
            if self.track_running_stats:
                self.num_batches_tracked.add_(1)
                f = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), f)
                self.running_var.lerp_((var * n / (n - 1).clamp_min(1.0)).to(self.running_var.dtype), f)
        return _GlobalBatchNorm.apply(x, self.weight, self.bias, mean, var, float(n), self.eps)

    @classmethod
    def convert(cls, module: nn.Module) -> nn.Module:
        """Every BatchNorm layer of `module` as a `CPUSyncBatchNorm` with the same parameters and buffers."""
        out = module
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, cls):
            out = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
            out.load_state_dict(module.state_dict())
            out.train(module.training)
            if hasattr(module, "qconfig"):
                out.qconfig = module.qconfig
        for name, child in module.named_children():
            out.add_module(name, cls.convert(child))
        return out


class _GlobalBatchNorm(torch.autograd.Function):
    """Batch norm with given global statistics; the backward adds the terms through them (SyncBatchNorm's)."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, var, n, eps):
        xf = x.float()
        y = nn.functional.batch_norm(xf, mean, var, weight, bias, False, 0.0, eps)
        ctx.save_for_backward(xf, weight, mean, torch.rsqrt(var + eps))
        ctx.n, ctx.dtype = n, x.dtype
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        xf, weight, mean, invstd = ctx.saved_tensors
        shape = [1, -1] + [1] * (xf.dim() - 2)
        dims = [0, *range(2, xf.dim())]
        dy = dy.float()
        xmu = xf - mean.view(shape)
        sum_dy, sum_dy_xmu = dy.sum(dims), (dy * xmu).sum(dims)
        grad_weight = sum_dy_xmu * invstd if weight is not None and ctx.needs_input_grad[1] else None
        grad_bias = sum_dy if weight is not None and ctx.needs_input_grad[2] else None
        dx = None
        if ctx.needs_input_grad[0]:
            both = torch.cat([sum_dy, sum_dy_xmu])
            dist.all_reduce(both)  # every rank's samples moved the statistics this rank normalised with
            c = mean.numel()
            mean_dy, mean_dy_xmu = both[:c] / ctx.n, both[c:] / ctx.n
            scale = invstd if weight is None else invstd * weight
            dx = (dy - mean_dy.view(shape) - xmu * (invstd * invstd * mean_dy_xmu).view(shape)) * scale.view(shape)
            dx = dx.to(ctx.dtype)
        return dx, grad_weight, grad_bias, None, None, None, None


class SimCLRModel(nn.Module):
    """backbone -> pooled features -> projection head. `forward` gives projections, `embed` features."""

    def __init__(self, backbone: nn.Module, hidden_dim: int = 512, output_dim: int = 128, num_layers: int = 2):
        super().__init__()
        self.backbone = backbone
        self.num_features = int(backbone.num_features)
        self.head_config = {"hidden_dim": hidden_dim, "output_dim": output_dim, "num_layers": num_layers}
        self.head = SimCLRProjectionHead(self.num_features, hidden_dim, output_dim, num_layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)


def build_model(model_cfg, in_chans: int) -> SimCLRModel:
    """`SimCLRModel` from the `model` config section."""
    backbone = build_backbone(model_cfg.name, in_chans, model_cfg.stem, model_cfg.timm_kwargs)
    return SimCLRModel(backbone, model_cfg.proj_hidden_dim, model_cfg.proj_output_dim, model_cfg.proj_layers)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


# ---------------------------------------------------------------- export


def encoder_meta(cfg, manifest: dict, model: nn.Module, epochs: int, knn_acc: float | None) -> dict[str, Any]:
    """Everything needed to rebuild the backbone and feed it data like in training (docs/interfaces.md)."""
    m = unwrap(model)
    return {
        "model": cfg.model.name,
        "timm_kwargs": dict(cfg.model.timm_kwargs),
        "in_chans": int(manifest["channels"]),
        "stem": cfg.model.stem,
        "image_size": int(cfg.data.image_size or manifest["image_size"]),  # the size it was trained at
        "mean": [float(v) for v in manifest["mean"]],
        "std": [float(v) for v in manifest["std"]],
        "epochs": int(epochs),
        "knn_acc": None if knn_acc is None else float(knn_acc),
        "num_features": int(m.num_features),
        "head": dict(m.head_config),
        "classes": list(manifest.get("classes", [])),
    }


def save_encoder(out_dir: str | os.PathLike, model: nn.Module, meta: dict[str, Any]) -> Path:
    """Write encoder.safetensors, head.safetensors, then encoder.json (its presence = complete)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    m = unwrap(model)
    # Every new file is written in full under a temporary name first (a full disk fails here, with the old
    # encoder untouched); then the old encoder.json goes (it must not vouch for weights being replaced) and
    # renames, which need no space, put the new files in place, encoder.json last.
    staged = []
    try:
        for state, name in ((m.backbone.state_dict(), ENCODER_WEIGHTS), (m.head.state_dict(), HEAD_WEIGHTS)):
            staged.append((_stage(state, out / name), out / name))
        tmp_meta = out / f".{ENCODER_META}.tmp"
        staged.append((tmp_meta, out / ENCODER_META))
        with open(tmp_meta, "w") as f:
            f.write(json.dumps(meta, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise
    (out / ENCODER_META).unlink(missing_ok=True)
    for tmp, final in staged:
        os.replace(tmp, final)
    return out / ENCODER_META


def _stage(state: dict[str, torch.Tensor], path: Path) -> Path:
    """`state` written in full to a temporary sibling of `path` (removed again on failure)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in state.items()}, str(tmp))
        os.chmod(tmp, umask_mode())  # safetensors creates 0600 files: the user's umask, like any other file
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def read_encoder_meta(run_dir: str | os.PathLike) -> dict[str, Any]:
    d = Path(run_dir)
    if not d.is_dir():
        raise UserError(f"encoder not found at {d}: run `selfsup pretrain` first")
    meta_path = d / ENCODER_META
    if not meta_path.is_file():
        raise UserError(f"{meta_path} is missing (pretraining did not finish?): run `selfsup pretrain` (or --resume) first")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{meta_path} is not valid JSON ({e}): rerun `selfsup pretrain`") from None
    needed = ("model", "timm_kwargs", "in_chans", "stem", "num_features", "head")
    missing = [k for k in needed if not isinstance(meta, dict) or k not in meta]
    if not missing:
        head = meta["head"]
        missing = [f"head.{k}" for k in ("hidden_dim", "output_dim", "num_layers")
                   if not isinstance(head, dict) or k not in head]
    if missing:
        raise UserError(f"{meta_path} lacks keys {', '.join(missing)}: rerun `selfsup pretrain`")
    return meta


def load_encoder(run_dir: str | os.PathLike, with_head: bool = False, device: str | torch.device = "cpu"):
    """-> (backbone, head or None, meta), rebuilt from encoder.json and loaded strictly, in eval mode."""
    d = Path(run_dir)
    meta = read_encoder_meta(d)
    try:
        backbone = build_backbone(meta["model"], int(meta["in_chans"]), meta["stem"], meta["timm_kwargs"])
    except UserError as e:  # the architecture named in the JSON no longer builds (edited file, other timm)
        raise UserError(f"{d / ENCODER_META} describes a model that cannot be built: {e}") from None
    _load_strict(backbone, d / ENCODER_WEIGHTS, meta)
    head = None
    if with_head:
        h = meta["head"]
        head = SimCLRProjectionHead(int(meta["num_features"]), h["hidden_dim"], h["output_dim"], h["num_layers"])
        _load_strict(head, d / HEAD_WEIGHTS, meta)
        head = head.to(device).eval()
    return backbone.to(device).eval(), head, meta


def _load_strict(module: nn.Module, path: Path, meta: dict[str, Any]) -> None:
    what = f"{meta['model']} (timm_kwargs={meta['timm_kwargs']}, in_chans={meta['in_chans']}, stem={meta['stem']})"
    if not path.is_file():
        raise UserError(f"encoder weights {path} are missing: rerun `selfsup pretrain`")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise UserError(f"encoder weights {path} are unreadable ({_first_line(e)}): rerun `selfsup pretrain`") from None
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (e.g. {'; '.join(shapes[:2])})")
        raise UserError(
            f"weights {path} do not match {what}: {'; '.join(parts)}: the weights and encoder.json come from "
            "different runs, rerun `selfsup pretrain`"
        )
    module.load_state_dict(state, strict=True)


def check_compatible(meta: dict[str, Any], manifest: dict, image_size: int | None = None) -> None:
    """Refuse an encoder trained on differently shaped data than the shards given: other channels, or
    another size than `image_size` (the fine-tuning run's `data.image_size`: one resolution end to end;
    without it, the shards' own size)."""
    if int(meta["in_chans"]) != int(manifest["channels"]):
        raise UserError(
            f"encoder expects {meta['in_chans']}-channel images but the shards have {manifest['channels']}: "
            "use an encoder pretrained on this data (set `encoder`) or pretrain again"
        )
    size = meta.get("image_size")
    if size is not None and image_size is not None and int(size) != int(image_size):
        raise UserError(
            f"encoder was pretrained on {size} px images but data.image_size={image_size}: set "
            f"data.image_size={size} (fine-tuning runs at the encoder's size) or use an encoder pretrained at "
            f"{image_size} px"
        )
    if size is not None and image_size is None and int(size) != int(manifest["image_size"]):
        raise UserError(
            f"encoder was pretrained on {size} px images but the shards are {manifest['image_size']} px: "
            "use an encoder pretrained on this data (set `encoder`) or pretrain again"
        )


def _first_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:200]
