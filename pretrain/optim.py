"""Optimiser and learning-rate schedule for SimCLR: LARS/SGD/AdamW, lr scaled with the global batch,
linear warmup then cosine decay, no weight decay on norms and biases.

The schedule is a pure function of the global step (`lr_at`), so the loop sets the lr each step with
`set_lr` and resuming needs nothing but the step saved in the checkpoint. `build_scheduler` wraps the same
function in a `LambdaLR` for callers that prefer a scheduler object; its `state_dict()` is plain numbers.
"""

from __future__ import annotations

import math

import torch
from lightly.utils.lars import LARS
from torch import nn

from runtime.errors import UserError


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: weights with decay, and norms + biases (every tensor with ndim <= 1) without.

    lightly's LARS skips its layer-wise trust ratio for every group whose weight_decay is 0, so the
    second group is also excluded from LARS adaptation, as in SimCLR.
    """
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """SimCLR's linear scaling rule."""
    return base_lr * global_batch / 256


def build_optimizer(optim_cfg, model: nn.Module, global_batch: int) -> torch.optim.Optimizer:
    """The optimiser at its peak lr; the schedule then sets each step's lr (see `lr_at`)."""
    lr = scaled_lr(optim_cfg.base_lr, global_batch)
    groups = param_groups(model, optim_cfg.weight_decay)
    if optim_cfg.name == "lars":
        return LARS(groups, lr=lr, momentum=optim_cfg.momentum)
    if optim_cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=optim_cfg.momentum)
    if optim_cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise UserError(f"optim.name must be one of lars, sgd, adamw; got {optim_cfg.name!r}")


def lr_at(step: int, total_steps: int, warmup_steps: int, peak_lr: float) -> float:
    """Linear warmup to `peak_lr` over `warmup_steps` (the first step already gets peak/warmup), then a
    half cosine from `peak_lr` at the end of warmup down to 0 at `total_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return peak_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group's lr: `lr`, times the group's `lr_scale` where it has one."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


class WarmupCosine:
    """`lr_at` as a LambdaLR factor; an object (not a closure) so LambdaLR.state_dict() saves its fields."""

    def __init__(self, total_steps: int, warmup_steps: int):
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)

    def __call__(self, step: int) -> float:
        return lr_at(step, self.total_steps, self.warmup_steps, 1.0)


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(total_steps, warmup_steps))
