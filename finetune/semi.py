"""`semi`: FixMatch (Sohn et al., 2020), started from the fine-tuned classifier.

Each step: a labeled batch (weak view, cross-entropy) and an unlabeled batch `unlabeled_ratio` times larger
from the unlabeled shards (train + unlabeled splits, labels ignored). The model's prediction on a weak view
(flip/crop) becomes the pseudo-label of a strong view (the full SimCLR recipe) of the same image, counted
only where its confidence reaches `finetune.threshold`. Chosen over SimCLRv2-style distillation because it
needs no separate student run: it refines the fine-tuned model in place for a few passes over the data.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from finetune.classifier import make_optimizer
from pretrain.optim import lr_at, set_lr


def fixmatch(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, unlabeled, weak, strong, *,
             epochs: int, batch_size: int, lr: float, weight_decay: float, threshold: float, seed: int, lambda_u: float = 1.0,
             rank: int = 0, world_size: int = 1, device: str | torch.device = "cpu") -> dict[str, float]:
    """`unlabeled`: a pretrain.reader.ShardLoader (uint8 batches, labels ignored), `epochs` passes over it;
    `batch_size`: the labeled batch (the unlabeled one is the loader's).
    Returns the mean fraction of unlabeled images that passed the threshold (the pseudo-label "mask rate")."""
    n = images.shape[0]
    per_epoch = len(unlabeled)
    steps = max(1, epochs * per_epoch)
    bs = min(n, batch_size)
    g = torch.Generator().manual_seed(seed)
    opt = make_optimizer(model, lr, weight_decay)
    model.to(device).train()
    order, pos, step, mask_sum = torch.randperm(n, generator=g), 0, 0, 0.0
    for epoch in range(epochs):
        unlabeled.set_epoch(epoch)
        for ux, _ in unlabeled:
            if step >= steps:
                break
            if pos + bs > n:
                order, pos = torch.randperm(n, generator=g), 0
            idx = order[pos:pos + bs][rank::world_size]  # every rank its share of the same batch
            pos += bs
            ux = ux.to(device)
            with torch.no_grad():  # pseudo-labels: no gradient flows through the weak view (FixMatch)
                probs = F.softmax(model(weak(ux)), dim=1)
            conf, pseudo = probs.max(dim=1)
            mask = (conf >= threshold).float()
            logits = model(torch.cat([weak(images[idx].to(device)), strong(ux)]))
            nl = len(idx)
            sup = F.cross_entropy(logits[:nl], labels[idx].to(device))
            unsup = (F.cross_entropy(logits[nl:], pseudo, reduction="none") * mask).mean()
            loss = sup + lambda_u * unsup
            set_lr(opt, lr_at(step, steps, 0, lr))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            mask_sum += float(mask.mean())
            step += 1
    return {"steps": step, "mask_rate": mask_sum / max(1, step)}
