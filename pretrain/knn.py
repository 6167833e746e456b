"""Weighted kNN classification on frozen features (InstDisc's monitor, as in lightly's benchmarks).

Pretraining uses it to watch representation quality each few epochs; fine-tuning reuses it as the
`knn` method. Labels < 0 (unlabeled samples) never enter the memory bank.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def knn_predict(train_feats: torch.Tensor, train_labels: torch.Tensor, query_feats: torch.Tensor, k: int = 20,
                temperature: float = 0.1, num_classes: int | None = None, chunk: int = 1024) -> torch.Tensor:
    """Top-1 class for each query: cosine similarity to the k nearest train features, votes weighted by
    exp(sim / temperature). Queries go in chunks so the similarity matrix stays small."""
    # imported here: lightly.utils.benchmarking pulls in pytorch_lightning (~1.5 s), which every process that
    # imports this module (each Ray Train worker, each fine-tuning task) would otherwise pay before its first step
    from lightly.utils.benchmarking import knn_predict as _lightly_knn_predict

    keep = train_labels >= 0
    bank = F.normalize(train_feats[keep].float(), dim=1)
    labels = train_labels[keep].long()
    if bank.shape[0] == 0:
        raise ValueError("knn_predict: the memory bank holds no labeled features")
    if num_classes is None:
        num_classes = int(labels.max()) + 1
    k = min(k, bank.shape[0])
    bank_t = bank.t().contiguous()
    preds = []
    for start in range(0, query_feats.shape[0], chunk):
        q = F.normalize(query_feats[start:start + chunk].float().to(bank.device), dim=1)
        ranked = _lightly_knn_predict(q, bank_t, labels, num_classes, knn_k=k, knn_t=temperature)
        preds.append(ranked[:, 0])
    if not preds:
        return torch.empty(0, dtype=torch.long, device=bank.device)
    return torch.cat(preds)


@torch.no_grad()
def extract_features(backbone: nn.Module, images: torch.Tensor, transform: Callable[[torch.Tensor], torch.Tensor],
                     batch_size: int = 256, device: str | torch.device = "cpu") -> torch.Tensor:
    """Backbone features of uint8 images [N, C, S, S], in eval mode (the caller's mode is restored), computed
    on `device`: the backbone is moved there too (a CPU-loaded encoder meeting CUDA inputs would fail)."""
    backbone.to(device)
    was_training = backbone.training
    backbone.eval()
    try:
        feats = [backbone(transform(images[i:i + batch_size].to(device))).float()
                 for i in range(0, images.shape[0], batch_size)]
    finally:
        backbone.train(was_training)
    return torch.cat(feats) if feats else torch.empty(0)


def knn_accuracy(backbone: nn.Module, train_images: torch.Tensor, train_labels: torch.Tensor,
                 test_images: torch.Tensor, test_labels: torch.Tensor,
                 transform: Callable[[torch.Tensor], torch.Tensor], batch_size: int = 256,
                 device: str | torch.device = "cpu", k: int = 20, temperature: float = 0.1,
                 num_classes: int | None = None) -> float:
    """Fraction of test images whose kNN vote (train images as memory bank) is their label."""
    train_feats = extract_features(backbone, train_images, transform, batch_size, device)
    test_feats = extract_features(backbone, test_images, transform, batch_size, device)
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    pred = knn_predict(train_feats, train_labels.to(train_feats.device), test_feats, k, temperature, num_classes)
    return float((pred.cpu() == test_labels.cpu()).float().mean())


@torch.no_grad()
def stream_features(backbone: nn.Module, batches, transform: Callable[[torch.Tensor], torch.Tensor],
                    device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """`(features [N, D] on CPU, labels [N], keys)` of streamed `(images uint8, labels, keys)` batches (e.g.
    `shards.reader.iter_split`), in eval mode: only the features are kept, never the images."""
    was_training = backbone.training
    backbone.eval()
    feats, labels, keys = [], [], []
    try:
        for images, y, k in batches:
            feats.append(backbone(transform(images.to(device))).float().cpu())
            labels.append(y)
            keys += list(k)
    finally:
        backbone.train(was_training)
    if not feats:
        return torch.empty(0), torch.empty(0, dtype=torch.int64), []
    return torch.cat(feats), torch.cat(labels), keys
