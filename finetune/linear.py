"""Frozen-encoder evaluations: a linear probe (logistic regression on standardised features) and kNN.

Both read the backbone's features once per run (`encode`), then every subset indexes into them, so the
frozen methods cost one forward pass over the data however many fractions and seeds there are.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

from pretrain.augment import normalize
from pretrain.knn import extract_features, knn_predict


def encode(backbone: nn.Module, images: torch.Tensor, mean, std, batch_size: int = 256,
           device: str | torch.device = "cpu") -> torch.Tensor:
    """Backbone features of uint8 images, eval mode, no augmentation (as at test time)."""
    with torch.no_grad():
        return extract_features(backbone, images, lambda x: normalize(x, mean, std), batch_size, device).cpu()


def linear_predict(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                   seed: int = 0, max_iter: int = 2000) -> np.ndarray:
    """Linear probe: L-BFGS logistic regression on standardised frozen features (SimCLR's linear eval,
    solved exactly instead of by SGD, which is both faster and has no learning rate to tune)."""
    y = train_labels.numpy()
    if len(np.unique(y)) < 2:
        return np.full(test_feats.shape[0], int(y[0]), dtype=np.int64)
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter, random_state=seed))
    clf.fit(train_feats.numpy(), y)
    return clf.predict(test_feats.numpy()).astype(np.int64)


def knn_method_predict(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                       num_classes: int, k: int = 20) -> np.ndarray:
    """kNN (k=20, cosine, temperature-weighted votes) with the labeled subset as memory bank."""
    return knn_predict(train_feats, train_labels, test_feats, k=k, num_classes=num_classes).cpu().numpy()
