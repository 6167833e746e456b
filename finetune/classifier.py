"""The classifier that `scratch`, `finetune` and `semi` train: backbone (+ the first projection-head layer)
+ a linear layer, trained on a labeled subset for a fixed budget and evaluated on the test split.

Why the head layer: SimCLRv2 found that fine-tuning from the first layer of the projection head, rather
than from the backbone output, is better when labels are few (`finetune.start_from: head`). `scratch` builds
exactly the same network from random weights, so the only difference between the two is the pretraining.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from lightly.models.modules import SimCLRProjectionHead
from torch import nn

from pretrain.augment import BatchAugment, normalize, resolve_augment
from pretrain.model import build_backbone, unwrap
from pretrain.optim import lr_at, param_groups, set_lr
from runtime.config import AugmentConfig


class Classifier(nn.Module):
    def __init__(self, backbone: nn.Module, hidden: nn.Module | None, in_dim: int, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.hidden = hidden if hidden is not None else nn.Identity()
        self.fc = nn.Linear(in_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.hidden(self.backbone(x)))


def first_head_layer(head: nn.Module) -> nn.Sequential:
    """Linear -> BatchNorm -> ReLU: the modules of lightly's projection head up to its first non-linearity."""
    layers = []
    for m in head.layers:
        layers.append(m)
        if isinstance(m, nn.ReLU):
            break
    return nn.Sequential(*layers)


def architecture(meta: dict[str, Any], num_classes: int, start_from: str) -> dict[str, Any]:
    """What `build_classifier` needs to rebuild the network (stored in model.json)."""
    return {
        "model": meta["model"], "timm_kwargs": dict(meta["timm_kwargs"]), "in_chans": int(meta["in_chans"]),
        "stem": meta["stem"], "num_features": int(meta["num_features"]), "head": dict(meta["head"]),
        "start_from": start_from, "num_classes": int(num_classes),
    }


def build_classifier(arch: dict[str, Any], backbone: nn.Module | None = None, head: nn.Module | None = None) -> Classifier:
    """The network of `arch`; with `backbone`/`head` given their weights are copied in, else random init."""
    if backbone is None:
        backbone = build_backbone(arch["model"], arch["in_chans"], arch["stem"], arch["timm_kwargs"])
    nf = int(arch["num_features"])
    hidden, in_dim = None, nf
    if arch["start_from"] == "head":
        h = arch["head"]
        if head is None:
            head = SimCLRProjectionHead(nf, h["hidden_dim"], h["output_dim"], h["num_layers"])
        hidden, in_dim = first_head_layer(head), int(h["hidden_dim"])
    return Classifier(backbone, hidden, in_dim, int(arch["num_classes"]))


# ------------------------------------------------------------------ augmentation


def _resolved(augment_cfg: AugmentConfig) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(AugmentConfig)} - {"preset"}
    return {k: v for k, v in resolve_augment(augment_cfg).items() if k in names}


def mild_augment(augment_cfg: AugmentConfig, jitter_prob: float | None = None,
                 jitter_strength: float | None = None) -> AugmentConfig:
    """The pretraining recipe, milder: larger crops, half the colour jitter, no grayscale or blur.
    Supervised training on few labels needs variety but not the extreme views contrastive learning wants.
    `jitter_prob` / `jitter_strength` (finetune.jitter_*): the fine-tuning jitter, set apart from pretraining's."""
    r = _resolved(augment_cfg)
    lo, hi = r["crop_scale"]
    r.update(crop_scale=[max(lo, 0.5), hi],
             jitter_prob=r["jitter_prob"] * 0.5 if jitter_prob is None else jitter_prob,
             jitter_strength=r["jitter_strength"] * 0.5 if jitter_strength is None else jitter_strength,
             grayscale_prob=0.0, blur_prob=0.0)
    return AugmentConfig(preset=augment_cfg.preset, **r)


def weak_augment(augment_cfg: AugmentConfig) -> AugmentConfig:
    """FixMatch's weak view: flip (as configured) and a gentle crop, nothing photometric."""
    r = _resolved(augment_cfg)
    r.update(crop_scale=[0.8, 1.0], crop_ratio=[0.9, 1.1], jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0)
    return AugmentConfig(preset=augment_cfg.preset, **r)


def make_augment(augment_cfg: AugmentConfig, image_size: int, mean, std, device) -> BatchAugment:
    return BatchAugment(augment_cfg, image_size=image_size, mean=mean, std=std).to(device)


# ------------------------------------------------------------------ training and evaluation


def make_optimizer(model: nn.Module, lr: float, weight_decay: float,
                   backbone_lr_scale: float = 1.0) -> torch.optim.Optimizer:
    """SGD with nesterov momentum; no weight decay on norms and biases; with `backbone_lr_scale` != 1 the
    backbone's groups learn at that fraction of `lr` (`set_lr` applies each group's `lr_scale`)."""
    groups = param_groups(model, weight_decay)
    if backbone_lr_scale != 1.0:  # each group split in two: its backbone parameters and the rest
        backbone = {id(p) for p in unwrap(model).backbone.parameters()}
        split = []
        for g in groups:
            for part, scale, inside in (("backbone", backbone_lr_scale, True), ("head", 1.0, False)):
                params = [p for p in g["params"] if (id(p) in backbone) == inside]
                if params:
                    split.append({**g, "params": params, "name": f"{g['name']}_{part}", "lr_scale": scale})
        groups = split
    return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)


def interpolate_weights(model: nn.Module, start: dict[str, torch.Tensor], alpha: float) -> None:
    """WiSE-FT (Wortsman et al., 2022): `model`'s weights become `alpha` x its own + (1 - `alpha`) x `start`'s (a
    state dict of the same network, taken before fine-tuning), in place; every floating tensor, batch-norm
    running statistics included. Deterministic: every DDP rank ends with the same weights."""
    with torch.no_grad():
        for name, value in model.state_dict().items():
            if value.is_floating_point():
                value.mul_(alpha).add_(start[name].to(value.device), alpha=1 - alpha)


def rank_share(batch: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's indices of a global batch: the same count on every rank, and at least 2 (a rank holding
    one image breaks BatchNorm in train mode), wrapping around the batch where it does not split evenly
    (15 labels on 8 ranks: 2 each, one image seen twice). One process (world_size 1) keeps the batch as is."""
    n = batch.numel()
    if world_size <= 1 and n != 1:
        return batch
    per = max(2, math.ceil(n / world_size))
    return batch[(rank * per + torch.arange(per)) % n]


def mixup(x: torch.Tensor, y: torch.Tensor, logits_of, alpha: float, rng: np.random.Generator) -> torch.Tensor:
    """Mixup (Zhang et al., 2018): the loss of `logits_of` on the batch blended with a shuffled copy of itself,
    one weight lam ~ Beta(alpha, alpha) per batch, the targets blended alike; `y` class ids or soft labels
    [B, C]. `rng` (seeded by the run) draws lam and the shuffle: every rank alike."""
    lam = float(rng.beta(alpha, alpha))
    perm = torch.from_numpy(rng.permutation(x.shape[0])).to(x.device)
    logits = logits_of(lam * x + (1 - lam) * x[perm])
    if y.dtype.is_floating_point:
        return F.cross_entropy(logits, lam * y + (1 - lam) * y[perm])
    return lam * F.cross_entropy(logits, y) + (1 - lam) * F.cross_entropy(logits, y[perm])


def train_supervised(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, augment, *, epochs: int,
                     batch_size: int, lr: float, weight_decay: float, seed: int, rank: int = 0,
                     world_size: int = 1, device: str | torch.device = "cpu",
                     backbone_lr_scale: float = 1.0, mix_alpha: float = 0.0) -> dict[str, float]:
    """Cross-entropy on augmented labeled images for a fixed budget: `epochs` passes over the subset
    (at least one step per epoch), cosine lr with a short warmup. Nothing here looks at the test split.
    Every rank draws the same batch (same seed) and trains on its equal share of it (`rank_share`).
    `mix_alpha` > 0: each batch mixed with itself (`mixup`)."""
    n = images.shape[0]
    bs = min(batch_size, n)
    steps = max(epochs, math.ceil(epochs * n / bs))
    warmup = max(1, steps // 10)
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)  # mixup's draws, apart from the batch order's
    opt = make_optimizer(model, lr, weight_decay, backbone_lr_scale)
    model.to(device).train()
    order, pos, loss = torch.randperm(n, generator=g), 0, torch.tensor(0.0)
    for step in range(steps):
        if pos + bs > n:
            order, pos = torch.randperm(n, generator=g), 0
        idx = rank_share(order[pos:pos + bs], rank, world_size)
        pos += bs
        x, y = augment(images[idx].to(device)), labels[idx].to(device)
        loss = mixup(x, y, model, mix_alpha, rng) if mix_alpha > 0 else F.cross_entropy(model(x), y)
        set_lr(opt, lr_at(step, steps, warmup, lr))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return {"steps": steps, "final_loss": float(loss.detach())}


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, mean, std, batch_size: int = 512,
                   device: str | torch.device = "cpu") -> torch.Tensor:
    """Eval-mode logits of uint8 images, normalised like the test split (no augmentation)."""
    was = model.training
    model.eval()
    try:
        out = [model(normalize(images[i:i + batch_size].to(device), mean, std)).float().cpu()
               for i in range(0, images.shape[0], batch_size)]
    finally:
        model.train(was)
    return torch.cat(out)


def train_supervised_stream(model: nn.Module, loader, augment, *, epochs: int, labeled: int, batch_size: int,
                            lr: float, weight_decay: float, device: str | torch.device = "cpu",
                            backbone_lr_scale: float = 1.0, mix_alpha: float = 0.0, seed: int = 0) -> dict[str, float]:
    """`train_supervised` for a labeled subset too large to hold: the same budget (steps for `epochs` passes
    over `labeled` images in batches of `batch_size`, cosine lr with a short warmup), reading batches from
    `loader` (a `shards.reader.ShardLoader` over the subset's keys with this rank's share of the batch,
    `equal_batches=True`), epoch after epoch until the steps are done."""
    bs = min(batch_size, labeled)
    steps = max(epochs, math.ceil(epochs * labeled / bs))
    warmup = max(1, steps // 10)
    opt = make_optimizer(model, lr, weight_decay, backbone_lr_scale)
    rng = np.random.default_rng(seed)  # mixup's draws
    model.to(device).train()
    step, epoch, loss = 0, 0, torch.tensor(0.0)
    while step < steps:
        loader.set_epoch(epoch)
        for images, labels in loader:
            if step >= steps:
                break
            x, y = augment(images.to(device)), labels.to(device)
            loss = mixup(x, y, model, mix_alpha, rng) if mix_alpha > 0 else F.cross_entropy(model(x), y)
            set_lr(opt, lr_at(step, steps, warmup, lr))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        epoch += 1
    return {"steps": steps, "final_loss": float(loss.detach())}
