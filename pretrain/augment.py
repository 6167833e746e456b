"""SimCLR's two-view augmentation on whole uint8 batches, with every random parameter drawn per image.

A whole-batch torchvision v2 transform draws one crop, one flip, one jitter for the entire batch; SimCLR
needs independent views per image, so every parameter here is a tensor with one entry per image and the
work is vectorised over the batch on the batch's device: the crop and the flip are one bilinear sampling
grid per image (`F.grid_sample`), the jitter factors are per-image tensors applied in a per-image random
order (as torchvision's ColorJitter), the blur is a separable Gaussian with per-image sigma. The parameter
distributions and the pixel values follow torchvision's RandomResizedCrop / ColorJitter / RandomGrayscale /
GaussianBlur (what SimCLR used): the tests check the rates statistically and the ops against torchvision.

Chosen over kornia.augmentation (0.9, `AugmentationSequential` of the same ops, also per image) after
timing both on the same recipe, 256 images 3x32x32 uint8, CPU, 1 thread, interleaved runs, min (median) of 25,
on the shared 2-core dev machine under load: `imagenet` ours 30 (38) ms vs kornia 108 (122) ms; `small`
ours 23 (32) ms vs kornia 73 (94) ms. On CPU, fresh tensors cost page faults more than arithmetic, hence the
in-place steps below (allocator settings such as MALLOC_MMAP_THRESHOLD_ change these figures by up to 2x).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from runtime.errors import UserError

# SimCLR (Chen et al. 2020, appendix A): crop (0.08, 1) + flip + jitter(0.8s, 0.8s, 0.8s, 0.2s) p=0.8 +
# grayscale p=0.2 + blur p=0.5 (ImageNet only; CIFAR recipes drop it and use s=0.5).
PRESETS: dict[str, dict[str, Any]] = {
    "imagenet": dict(crop_scale=[0.08, 1.0], crop_ratio=[3 / 4, 4 / 3], flip_prob=0.5, jitter_prob=0.8,
                     jitter_strength=1.0, grayscale_prob=0.2, blur_prob=0.5, blur_sigma=[0.1, 2.0]),
    "small": dict(crop_scale=[0.08, 1.0], crop_ratio=[3 / 4, 4 / 3], flip_prob=0.5, jitter_prob=0.8,
                  jitter_strength=0.5, grayscale_prob=0.2, blur_prob=0.0, blur_sigma=[0.1, 2.0]),
    # digits: a flipped 2 or 7 is another glyph and the images have no colour, so crops carry the task;
    # below ~0.2 of a 16 px digit the crop no longer shows which digit it is. Brightness/contrast jitter
    # (the only jitter a 1-channel image gets) stops stroke intensity from identifying a view: measured
    # with temperature 0.1, it lifts the linear probe at 15 labels (h8's table in the commit log).
    "digits": dict(crop_scale=[0.2, 1.0], crop_ratio=[3 / 4, 4 / 3], flip_prob=0.0, jitter_prob=0.8,
                   jitter_strength=0.5, grayscale_prob=0.0, blur_prob=0.0, blur_sigma=[0.1, 2.0]),
}
_GRAY = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as torchvision's rgb_to_grayscale


def resolve_augment(cfg: Any) -> dict[str, Any]:
    """The preset with every field the config sets (not null) laid over it: the concrete recipe in use."""
    raw = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg or {})
    preset = raw.get("preset") or "digits"
    if preset not in PRESETS:
        raise UserError(f"augment.preset must be one of {', '.join(PRESETS)}; got {preset!r}")
    out = {"preset": preset, **PRESETS[preset]}
    for key, value in raw.items():
        if key != "preset" and value is not None:
            if key not in out:
                raise UserError(f"unknown augment key {key!r} (valid: {', '.join(out)})")
            out[key] = list(value) if isinstance(value, (list, tuple)) else value
    _check(out)
    return out


def _check(r: dict[str, Any]) -> None:
    for key, lo_ok in (("crop_scale", lambda a, b: 0 < a <= b <= 1), ("crop_ratio", lambda a, b: 0 < a <= b),
                       ("blur_sigma", lambda a, b: 0 < a <= b)):
        v = r[key]
        if len(v) != 2 or not lo_ok(float(v[0]), float(v[1])):
            raise UserError(f"augment.{key} must be [low, high] with 0 < low <= high"
                            f"{' <= 1' if key == 'crop_scale' else ''}; got {v}")
    for key in ("flip_prob", "jitter_prob", "grayscale_prob", "blur_prob"):
        if not 0 <= r[key] <= 1:
            raise UserError(f"augment.{key} must be in [0, 1], got {r[key]}")
    if r["jitter_strength"] < 0:
        raise UserError(f"augment.jitter_strength must be zero or positive, got {r['jitter_strength']}")


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (or [0, 1] float) [B, C, H, W] -> float, standardised per channel (evaluation: no augmentation)."""
    x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


class BatchAugment(nn.Module):
    """`aug(images_uint8)` -> one normalised random view per image, float [B, C, S, S] on the input's device.

    Call it twice for SimCLR's two views. 1-channel input skips saturation, hue and grayscale. Randomness
    comes from torch's generator on the input's device (seed it with `torch.manual_seed`).
    """

    def __init__(self, cfg: Any, image_size: int, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.recipe = resolve_augment(cfg)
        self.size = int(image_size)
        self.channels = len(mean)
        # ~10% of the image, odd (SimCLR: 23 px at 224), at least 3
        self.blur_kernel = max(3, int(0.1 * self.size) // 2 * 2 + 1)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def extra_repr(self) -> str:
        return f"size={self.size}, " + ", ".join(f"{k}={v}" for k, v in self.recipe.items())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != self.channels:
            raise ValueError(f"expected [B, {self.channels}, H, W] images, got {tuple(images.shape)}")
        r = self.recipe
        x = images.float().div_(255) if images.dtype == torch.uint8 else images.float()
        x = self.crop_flip(x)
        x = self.jitter(x, inplace=True)  # x is our own buffer here
        if self.channels == 3 and r["grayscale_prob"] > 0:
            gray = _bernoulli(len(x), r["grayscale_prob"], x.device)
            x = torch.where(gray.view(-1, 1, 1, 1), _luma(x).expand_as(x), x)
        if r["blur_prob"] > 0:
            x = self.blur(x, inplace=True)
        return x.sub_(self.mean.to(x.dtype)).div_(self.std.to(x.dtype))

    # -------------------------------------------------------------- crop + flip

    def crop_boxes(self, n: int, height: int, width: int, device: torch.device) -> torch.Tensor:
        """RandomResizedCrop's boxes, vectorised: [n, 4] = (top, left, h, w) in pixels.

        As torchvision: up to 10 draws of (area, log-ratio) per image, the first that fits wins; if none
        fits, the centre crop with the ratio clamped into range."""
        r = self.recipe
        trials = 10
        area = height * width * torch.empty(n, trials, device=device).uniform_(*r["crop_scale"])
        log_ratio = torch.empty(n, trials, device=device).uniform_(math.log(r["crop_ratio"][0]),
                                                                   math.log(r["crop_ratio"][1]))
        ratio = log_ratio.exp()
        w = (area * ratio).sqrt().round()
        h = (area / ratio).sqrt().round()
        ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1, device=device))
        pick = first.clamp(min=0).view(-1, 1)
        w, h = w.gather(1, pick).squeeze(1), h.gather(1, pick).squeeze(1)
        # fallback (no trial fitted): centre crop, ratio clamped
        in_ratio = width / height
        lo, hi = r["crop_ratio"]
        if in_ratio < lo:
            fw, fh = width, round(width / lo)
        elif in_ratio > hi:
            fw, fh = round(height * hi), height
        else:
            fw, fh = width, height
        miss = first < 0
        w = torch.where(miss, torch.full_like(w, fw), w)
        h = torch.where(miss, torch.full_like(h, fh), h)
        # torch.randint(0, H - h + 1) per image: floor(U * (H - h + 1))
        top = (torch.rand(n, device=device) * (height - h + 1)).floor()
        left = (torch.rand(n, device=device) * (width - w + 1)).floor()
        top = torch.where(miss, ((height - h) / 2).round(), top)
        left = torch.where(miss, ((width - w) / 2).round(), left)
        return torch.stack([top, left, h, w], 1)

    def crop_flip(self, x: torch.Tensor) -> torch.Tensor:
        """Crop each image's box and resize it to S x S (bilinear, as torchvision's resize with
        align_corners=False), mirrored where the flip fires: one sampling grid per image."""
        n, _, height, width = x.shape
        top, left, h, w = self.crop_boxes(n, height, width, x.device).unbind(1)
        flip = _bernoulli(n, self.recipe["flip_prob"], x.device)
        # output pixel u samples the box at left + (u + 0.5) * w / S - 0.5 (resize with align_corners=False),
        # clamped to the box's edge pixel centres as resizing the cropped image does; mirrored when flipped.
        # Built per axis ([n, S] each) rather than with affine_grid: no batched matmul over every pixel.
        u = (torch.arange(self.size, device=x.device, dtype=x.dtype) + 0.5) / self.size  # [S]
        u_x = torch.where(flip.view(-1, 1), 1 - u, u)  # [n, S]
        px = (left.view(-1, 1) + u_x * w.view(-1, 1) - 0.5).clamp(left.view(-1, 1), (left + w - 1).view(-1, 1))
        py = (top.view(-1, 1) + u * h.view(-1, 1) - 0.5).clamp(top.view(-1, 1), (top + h - 1).view(-1, 1))
        gx = (2 * px + 1) / width - 1  # grid_sample's normalised coordinates (align_corners=False)
        gy = (2 * py + 1) / height - 1
        grid = torch.stack(torch.broadcast_tensors(gx.view(n, 1, -1), gy.view(n, -1, 1)), dim=-1)
        return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="border", align_corners=False)

    # -------------------------------------------------------------- colour

    def jitter(self, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """ColorJitter(0.8s, 0.8s, 0.8s, 0.2s) with probability p, per image: factors and op order drawn
        per image, each op then applied to the images whose turn it is."""
        r = self.recipe
        s = r["jitter_strength"]
        if r["jitter_prob"] <= 0 or s <= 0:
            return x
        n, dev = len(x), x.device
        apply = _bernoulli(n, r["jitter_prob"], dev)
        ops = 4 if self.channels == 3 else 2  # saturation and hue need colour
        lo = max(0.0, 1 - 0.8 * s)
        factors = torch.empty(n, 3, device=dev).uniform_(lo, 1 + 0.8 * s)  # brightness, contrast, saturation
        hue = torch.empty(n, device=dev).uniform_(-min(0.5, 0.2 * s), min(0.5, 0.2 * s))
        order = torch.rand(n, ops, device=dev).argsort(1)  # a random permutation per image
        one, zero = torch.ones(n, device=dev), torch.zeros(n, device=dev)
        x = x.clone() if not inplace else x
        for step in range(ops):
            op = torch.where(apply, order[:, step], -1)  # -1: this image is not jittered
            # brightness, contrast and saturation are all clamp(a*x + (1-a)*m) with m = 0, the mean grey
            # level, or the grey image: one in-place pass for all images, factor 1 (exactly the identity)
            # where another op (or none) has this step
            a = torch.where(op == 0, factors[:, 0], torch.where(op == 1, factors[:, 1],
                            torch.where(op == 2, factors[:, 2], one)))
            beta = torch.where(op == 1, 1 - factors[:, 1], zero).view(-1, 1, 1, 1)
            gamma = torch.where(op == 2, 1 - factors[:, 2], zero).view(-1, 1, 1, 1)
            gray = _luma(x)
            offset = beta * gray.mean((1, 2, 3), keepdim=True)
            x.mul_(a.view(-1, 1, 1, 1)).addcmul_(gamma, gray).add_(offset).clamp_(0, 1)
            idx = (op == 3).nonzero().squeeze(1)
            if len(idx):  # hue is costly: only on the images whose turn it is
                x[idx] = _shift_hue(x[idx], hue[idx])
        return x

    @staticmethod
    def _colour_op(op: int, x: torch.Tensor, factors: torch.Tensor, hue: torch.Tensor) -> torch.Tensor:
        """One jitter op with per-image factors (the reference the batched `jitter` step computes)."""
        if op == 3:
            return _shift_hue(x, hue)
        m = torch.zeros_like(x[:, :1]) if op == 0 else _luma(x)
        if op == 1:
            m = m.mean((1, 2, 3), keepdim=True)
        a = factors[:, op].view(-1, 1, 1, 1)
        return (a * x + (1 - a) * m).clamp(0, 1)

    # -------------------------------------------------------------- blur

    def blur(self, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """GaussianBlur(kernel ~10% of S, sigma ~ U(blur_sigma)) with probability p, per image sigma."""
        r = self.recipe
        idx = _bernoulli(len(x), r["blur_prob"], x.device).nonzero().squeeze(1)
        if not len(idx):
            return x
        n, h, w = len(idx), x.shape[2], x.shape[3]
        k = self.blur_kernel
        sigma = torch.empty(n, 1, device=x.device, dtype=x.dtype).uniform_(*r["blur_sigma"])
        t = torch.arange(k, device=x.device, dtype=x.dtype) - (k - 1) / 2
        kernel = torch.exp(-(t**2) / (2 * sigma**2))
        kernel = kernel / kernel.sum(1, keepdim=True)  # [n, k]
        # separable, as k shifted multiply-adds per axis with per-image weights (cheaper on CPU than a
        # grouped convolution with n*c groups), reflect padding as torchvision
        y = x[idx]
        pad = k // 2
        wts = kernel.view(n, 1, 1, 1, k)
        p = F.pad(y, (pad, pad, 0, 0), mode="reflect")
        y = sum(wts[..., j] * p[..., j : j + w] for j in range(k))
        p = F.pad(y, (0, 0, pad, pad), mode="reflect")
        y = sum(wts[..., j] * p[:, :, j : j + h, :] for j in range(k))
        x = x if inplace else x.clone()
        x[idx] = y
        return x


def _bernoulli(n: int, p: float, device: torch.device) -> torch.Tensor:
    return torch.rand(n, device=device) < p


def _luma(x: torch.Tensor) -> torch.Tensor:
    """[B, 1, H, W] grey level (one allocation: on CPU fresh buffers cost page faults, not arithmetic)."""
    if x.shape[1] == 1:
        return x
    g = x[:, 0:1] * _GRAY[0]
    return g.add_(x[:, 1:2], alpha=_GRAY[1]).add_(x[:, 2:3], alpha=_GRAY[2])


def _shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """RGB -> HSV, hue + shift (mod 1), -> RGB, per image shift (torchvision's adjust_hue, same values).

    Written for CPU speed: amax/amin (max also computes indices), in-place steps on few buffers."""
    maxc = x.amax(1, keepdim=True)
    delta = x.amin(1, keepdim=True).neg_().add_(maxc)
    # zero where the pixel is grey or black: the numerators below are then 0 too, so hue = 0 as torchvision
    sat = delta / maxc.clamp(min=1e-12)
    d = delta.clamp_(min=1e-12)
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    h = torch.where(maxc == r, g - b, torch.where(maxc == g, (b - r).add_(d, alpha=2), (r - g).add_(d, alpha=4)))
    h.div_(d).div_(6).add_(shift.view(-1, 1, 1, 1))
    h.sub_(h.floor())  # in [0, 1)
    # HSV -> RGB: channel n = v - v*s*clamp(min(k, 4-k), 0, 1), k = (n + 6h) mod 6 with n = 5, 3, 1
    n = torch.tensor([5.0, 3.0, 1.0], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    k = (6 * h).add(n)  # in [1, 11): one subtraction is the modulo
    k.sub_((k >= 6).to(x.dtype), alpha=6)
    k = torch.minimum(k, 4 - k).clamp_(0, 1)
    return k.mul_(sat).mul_(maxc).neg_().add_(maxc)
