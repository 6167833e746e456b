"""kNN monitor: near-perfect on separable features, chance on random ones, and through a real backbone."""

import torch
from torch import nn

from pretrain.knn import knn_accuracy, knn_predict

torch.set_num_threads(1)


def _clusters(n_per_class, num_classes, dim, spread, gen):
    centers = torch.randn(num_classes, dim, generator=gen) * 5
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    feats = centers[labels] + spread * torch.randn(len(labels), dim, generator=gen)
    return feats, labels


def test_separable_features_are_classified_almost_perfectly():
    gen = torch.Generator().manual_seed(0)
    train_x, train_y = _clusters(50, 10, 32, 0.5, gen)
    test_x, test_y = _clusters(20, 10, 32, 0.5, torch.Generator().manual_seed(0))
    test_x = test_x + 0.5 * torch.randn(test_x.shape, generator=gen)  # new noise, same centres
    pred = knn_predict(train_x, train_y, test_x, k=20, temperature=0.1, num_classes=10)
    assert pred.shape == test_y.shape
    assert (pred == test_y).float().mean() >= 0.98


def test_random_features_give_chance():
    gen = torch.Generator().manual_seed(1)
    train_x, test_x = torch.randn(2000, 16, generator=gen), torch.randn(2000, 16, generator=gen)
    train_y = torch.randint(0, 10, (2000,), generator=gen)
    test_y = torch.randint(0, 10, (2000,), generator=gen)
    acc = (knn_predict(train_x, train_y, test_x, k=20, num_classes=10, chunk=300) == test_y).float().mean()
    assert 0.05 < acc < 0.15  # chance is 0.1; 2000 queries put 3 std devs at +-0.02


def test_unlabeled_bank_entries_are_ignored_and_k_is_capped():
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1]])
    labels = torch.tensor([0, 1, -1])  # the -1 sample sits next to the query but has no label
    pred = knn_predict(bank, labels, torch.tensor([[1.0, 0.05]]), k=20)
    assert pred.tolist() == [0]


def test_knn_accuracy_runs_a_backbone_on_uint8_images_and_restores_train_mode():
    gen = torch.Generator().manual_seed(0)
    # two classes of 4x4 images: bright left half vs bright right half, plus noise
    def make(n):
        y = torch.arange(n) % 2
        x = torch.randint(0, 60, (n, 1, 4, 4), generator=gen)
        x[y == 0, :, :, :2] += 180
        x[y == 1, :, :, 2:] += 180
        return x.to(torch.uint8), y

    train_x, train_y = make(40)
    test_x, test_y = make(20)
    backbone = nn.Sequential(nn.Flatten(), nn.BatchNorm1d(16))  # features = the (normalised) pixels
    backbone.train()
    seen = []

    def transform(x):
        seen.append(x.dtype)
        return x.float() / 255

    acc = knn_accuracy(backbone, train_x, train_y, test_x, test_y, transform, batch_size=7, device="cpu", k=5)
    assert acc == 1.0
    assert backbone.training  # the caller's mode comes back
    assert set(seen) == {torch.uint8} and len(seen) == 6 + 3  # 40/7 and 20/7 batches, rounded up
