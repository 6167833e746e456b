"""`semi`: the semi-supervised methods, both started from the fine-tuned classifier of the same subset.

- `distill` (the default): SimCLRv2-style self-distillation (Chen et al., 2020) with a teacher that also
  uses the unlabeled data's structure. Label spreading (Zhou et al., 2004) carries the few labels along the
  symmetric kNN graph of the frozen encoder's features of the unlabeled pool (cosine**3 edges, Iscen et al.,
  2019), each class's seeds with equal mass and the result rescaled to the class shares of
  `finetune.spread_prior` (`propagate`);
  the fine-tuned model, as the student, is then fit to those soft labels blended with its own predictions
  (`blend`; the labeled images keep their one-hot labels): first its head on the pool's backbone features,
  computed once (`finetune.distill_head_epochs`; nearly free), then, for `finetune.semi_epochs` passes, the
  whole network under fine-tuning's augmentation (as in SimCLRv2). Later rounds blend with the last student.
  `finetune.teacher_models` > 1 blends with the mean prediction of that many models fine-tuned on the subset with
  different seeds (an ensemble teacher) instead of the one fine-tuned model; the student is still that one.
  `finetune.distill_student=scratch` trains a freshly initialised network instead (Noisy Student's way, Xie et
  al., 2020) for the `semi_epochs` passes, on the same teacher (the fine-tuned model's predictions blended with
  the spread labels).
  `finetune.distill_bn_stats=pool` re-estimates the student's batch-norm statistics on the whole pool (no
  labels) before its head is fit, instead of keeping those fine-tuning estimated on the few labeled images.
- `fixmatch` (Sohn et al., 2020): the prediction on a weak view (flip/crop) of an unlabeled image becomes
  the pseudo-label of a strong view (the full SimCLR recipe) of the same image, counted only where its
  confidence reaches `finetune.fixmatch_threshold`. Streams the unlabeled shards, so it suits pools too large to hold.

On the digits default (one encoder, the same 5 labeled subsets per fraction; bench/README.md has the runs)
the teacher's accuracy on the pool went from 81.0 / 95.6% (scikit-learn's LabelSpreading,
k=10, alpha=0.8) to 89.1 / 97.7% at 1% / 10% of the labels (k=5, alpha=0.95, balanced); with it, the head
alone (semi_epochs=0) scored 86.7 / 97.5% on the test split against 89.0% (1%) for 10 passes of the whole
network, at a small fraction of the cost, so digits ships semi_epochs=0. FixMatch scored 74.4 / 95.6% with the
old teacher's distill at 85.6 / 97.2%; `finetune.semi_method=fixmatch` picks it.

Then (`python -m bench.digits_semi`, bench/README.md "Digits: the distill teacher's k and class prior"; a fresh
20-epoch encoder, kNN 0.969, the same 5 subsets): rescaling to uniform class shares instead of the labels' took
the student from 83.8 +- 5.3 to 87.8 +- 5.2% at 1% (10%: 97.8 -> 97.9), and k=3 instead of 5 to 90.1 +- 3.1 / 97.6
+- 0.9%. k and the prior were chosen on train data only: the teacher's accuracy on the pool's unlabeled train
images, and the student's on a fifth of the train split held out of the pool (`--holdout 0.2`); never on the
test split. Features other than the backbone's (projection head, centred, whitened, averaged over augmented
views), other alphas and ensembles of k did not validate better. A 40-epoch encoder did (teacher on the pool
88.7 / 96.1 -> 92.0 / 97.3%, student 91.4 +- 2.7 / 97.8 +- 0.8% on test); it put the demo over 5 minutes then,
and since the demo got faster (issue 15) digits pretrains 40 epochs (bench/README.md has today's figures).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from finetune.classifier import make_optimizer, predict_logits, rank_share, train_supervised
from pretrain.augment import normalize
from pretrain.model import unwrap
from pretrain.optim import lr_at, set_lr


def propagate(features: np.ndarray, labeled: np.ndarray, labels: np.ndarray, num_classes: int,
              k: int = 3, alpha: float = 0.95, balance: bool = True, prior: str = "uniform") -> np.ndarray:
    """Soft labels [N, num_classes] for every pool image (rows sum to 1; the `labeled` pool indices keep their
    one-hot `labels`): label spreading (Zhou et al., 2004) over the symmetric kNN graph of the L2-normalised
    `features`, edges weighted by cosine similarity cubed (Iscen et al., 2019), solved exactly by conjugate
    gradients. `balance`: every class's seeds carry the same total mass, and the result is rescaled
    (Sinkhorn) until the classes' shares of the pool match `prior`: `uniform`, every labeled class alike, or
    `labels`, the classes' shares of the labels (add-one smoothed); so that a class seeded by one label is not
    swallowed by a neighbour seeded by two. A balanced labeled subset (the default draw) holds each class as
    often as the others up to one, so its counts say nothing about the classes' sizes: on digits' 15 labels
    (1 or 2 per class) the `labels` prior gave a class seeded once two thirds of the share of one seeded twice.
    A class without a label is never predicted."""
    from scipy.sparse.linalg import LinearOperator, cg

    if prior not in ("uniform", "labels"):
        raise ValueError(f"prior must be 'uniform' or 'labels', got {prior!r}")

    n = len(features)
    graph = knn_graph(features, min(k, n - 1))
    y = np.zeros((n, num_classes))
    y[labeled, labels] = 1.0
    seen = y.sum(0) > 0
    if balance:
        y[:, seen] /= y[:, seen].sum(0)
    op = LinearOperator((n, n), matvec=lambda v: v - alpha * (graph @ v), dtype=np.float64)
    z = np.zeros_like(y)
    for c in np.flatnonzero(seen):
        z[:, c] = cg(op, y[:, c], rtol=1e-6, maxiter=200)[0]
    z = np.clip(z, 0.0, None)
    z[:, ~seen] = 0.0
    lost = z.sum(1) <= 0  # an image with no path to any label: no opinion, the seen classes alike
    z[lost] = seen / seen.sum()
    if balance:
        share = np.where(seen, np.bincount(labels, minlength=num_classes) + 1.0 if prior == "labels" else 1.0, 0.0)
        z = sinkhorn(z, share / share.sum())
    out = (z / z.sum(1, keepdims=True)).astype(np.float32)
    out[labeled] = np.eye(num_classes, dtype=np.float32)[labels]
    return out


def knn_graph(features: np.ndarray, k: int, power: float = 3.0, max_block: int = 2 ** 24):
    """D^-1/2 W D^-1/2 for W the symmetrised kNN graph (W + W^T) of the L2-normalised features, weighted by
    max(cos, 0)**power; built in row chunks of at most `max_block` similarities (64 MiB), so memory is
    O(n k), not O(n^2)."""
    from scipy import sparse

    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    x = F.normalize(x, dim=1)
    n = len(x)
    chunk = max(1, min(n, max_block // max(1, n)))
    rows, cols, vals = [], [], []
    for i in range(0, n, chunk):
        sim = x[i:i + chunk] @ x.T
        sim[torch.arange(len(sim)), torch.arange(i, i + len(sim))] = -2.0  # no self-loops
        v, j = sim.topk(k, dim=1)
        rows.append(np.repeat(np.arange(i, i + len(sim)), k))
        cols.append(j.reshape(-1).numpy())
        vals.append(v.clamp(min=0).pow(power).reshape(-1).numpy().astype(np.float64))
    w = sparse.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))
    w = w + w.T
    d = np.asarray(w.sum(1)).ravel()
    inv = sparse.diags(1.0 / np.sqrt(np.where(d > 0, d, 1.0)))
    return (inv @ w @ inv).tocsr()


def sinkhorn(scores: np.ndarray, prior: np.ndarray, iters: int = 20) -> np.ndarray:
    """Rows of `scores` made distributions, then columns rescaled in turn with rows until the mean row is
    `prior` (rows that are all zero stay so)."""
    p = scores / np.maximum(scores.sum(1, keepdims=True), 1e-12)
    for _ in range(iters):
        p = p * (prior / np.maximum(p.mean(0), 1e-12))
        p = p / np.maximum(p.sum(1, keepdims=True), 1e-12)
    return p


def distill(model: nn.Module, pool: torch.Tensor, propagated: np.ndarray, labeled: np.ndarray,
            labels: np.ndarray, augment, *, rounds: int, epochs: int, batch_size: int, lr: float,
            weight_decay: float, seed: int, mean, std, rank: int = 0, world_size: int = 1,
            device: str | torch.device = "cpu", head_epochs: int = 0,
            teachers: Sequence[nn.Module] = (), bn_stats: str = "labeled") -> dict[str, float]:
    """Train `model` (in place, the fine-tuned classifier) on the uint8 `pool` images against soft teacher
    labels, `rounds` times. Each round's teacher blends the `propagated` labels with the model's own
    predictions, weighted by how much the two agree (`blend`); the labeled pool images (`labeled`, with
    `labels`) always keep their one-hot labels. `head_epochs` > 0: first the classifier's head (everything
    after the backbone) is fit to the teacher on the backbone's features of the pool, computed once (a
    forward pass, no augmentation: nearly free), so the `epochs` passes of the whole network start from a
    model that already agrees with the teacher. Besides `rounds` and `model_weight`, returns every pool image's
    predicted class before (`pool_before`: the fine-tuned model's) and after (`pool_after`).
    `teachers`: fine-tuned models whose mean prediction the first round blends with instead of the model's own:
    the fine-tuned model when `model` is a fresh student (`finetune.distill_student=scratch`), and the ensemble
    of `finetune.teacher_models` (the first is the subset's fine-tuned model: `pool_before` is its; with more
    than one, `pool_ensemble` is their mean's predicted class). The first member may be `model` itself (a
    student that starts as the fine-tuned model): its pool features are then computed once, for both roles.
    `bn_stats="pool"`: once the first round's teacher is made, the student's backbone takes its batch-norm
    statistics from the whole pool (`pool_bn_stats`) instead of keeping those fine-tuning left, estimated on the
    labeled subset's augmented images alone (`finetune.distill_bn_stats`)."""
    onehot = np.eye(propagated.shape[1], dtype=np.float32)[labels]
    weights, before, extra = [], None, {}
    for r in range(rounds):
        net = unwrap(model)
        feats = None  # the student's backbone features of the pool, once its statistics are final for the round
        if r == 0 and teachers:
            probs = []
            for t in teachers:
                f = predict_features(t, pool, mean, std, device=device)
                if t is net:  # the student itself, untrained yet (an ensemble's first member): one pass serves both
                    feats = f
                probs.append(head_probs(t, f, device))
            own, before = np.mean(probs, axis=0), probs[0].argmax(1)
            if len(probs) > 1:
                extra["pool_ensemble"] = own.argmax(1)
        else:
            feats = predict_features(net, pool, mean, std, device=device)
            own = head_probs(net, feats, device)
        if before is None:
            before = own.argmax(1)
        if r == 0 and bn_stats == "pool":  # the teacher keeps the fine-tuned model's view; the student the pool's
            pool_bn_stats(net, pool, mean, std, device=device)
            feats = None
        if feats is None:
            feats = predict_features(net, pool, mean, std, device=device)
        teacher, w = blend(propagated, own)
        weights.append(w)
        teacher[labeled] = onehot
        if head_epochs > 0:
            fit_head(net, feats, torch.from_numpy(teacher), epochs=head_epochs, batch_size=batch_size, lr=lr,
                     weight_decay=weight_decay, seed=seed + r, device=device)
        if epochs > 0:
            train_supervised(model, pool, torch.from_numpy(teacher), augment, epochs=epochs, batch_size=batch_size,
                             lr=lr, weight_decay=weight_decay, seed=seed + r, rank=rank, world_size=world_size,
                             device=device)
    if epochs > 0:  # the backbone moved: its features again (head-only rounds leave them as they were)
        feats = predict_features(net, pool, mean, std, device=device)
    return {"rounds": rounds, "model_weight": float(np.mean(weights)), "pool_before": before,
            "pool_after": head_probs(net, feats, device).argmax(1), **extra}


@torch.no_grad()
def pool_bn_stats(net: nn.Module, images: torch.Tensor, mean, std, batch_size: int = 512,
                  device: str | torch.device = "cpu") -> None:
    """Re-estimate the batch-norm running statistics of the classifier's backbone on uint8 `images` (the
    pool: no labels, no augmentation, normalised like the test split), in near-equal batches (`bn_stats`)."""
    if len(images):
        splits = torch.arange(len(images)).tensor_split(max(1, -(-len(images) // batch_size)))
        bn_stats(net, (images[idx] for idx in splits), mean, std, device=device)


def bn_stats(net: nn.Module, batches: Iterable[torch.Tensor], mean, std, device: str | torch.device = "cpu") -> None:
    """The backbone's batch-norm running statistics from uint8 `batches` (held in memory or streamed from the
    shards): a forward pass in train mode, each layer's statistics the plain mean over the batches (momentum
    None), then the layers' momentum restored; kept as they were when no batch comes. No weight changes. The
    same on every rank given the same batches: the ranks' statistics stay identical."""
    backbone = net.backbone
    bns = [m for m in backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    batches = iter(batches)
    first = next(batches, None)
    if not bns or first is None:
        return
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    was = backbone.training
    backbone.train()
    try:
        with torch.no_grad():
            for x in itertools.chain([first], batches):
                backbone(normalize(x.to(device), mean, std))
    finally:
        backbone.train(was)
        for m, momentum in zip(bns, momenta):
            m.momentum = momentum


def head_probs(net: nn.Module, feats: torch.Tensor, device: str | torch.device = "cpu") -> np.ndarray:
    """Eval-mode class probabilities of the classifier's head (`hidden` + `fc`) on backbone features."""
    with torch.no_grad():
        was = net.training
        net.eval()
        out = F.softmax(net.fc(net.hidden(feats.to(device))).float().cpu(), dim=1).numpy()
        net.train(was)
    return out


def predict_features(net: nn.Module, images: torch.Tensor, mean, std, batch_size: int = 512,
                     device: str | torch.device = "cpu") -> torch.Tensor:
    """Eval-mode backbone features of uint8 images (the classifier's `backbone` alone)."""
    return predict_logits(net.backbone, images, mean, std, batch_size=batch_size, device=device)


def fit_head(net: nn.Module, feats: torch.Tensor, targets: torch.Tensor, *, epochs: int, batch_size: int,
             lr: float, weight_decay: float, seed: int, device: str | torch.device = "cpu") -> None:
    """Soft-label cross-entropy of the classifier's head (`hidden` + `fc`) on fixed backbone features:
    `epochs` passes in batches of `batch_size`, SGD with a cosine lr. The same on every rank (same seed, same
    features): the head's weights stay identical across DDP ranks without a gradient exchange."""
    params = [*net.hidden.parameters(), *net.fc.parameters()]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    n = len(feats)
    bs = min(batch_size, n)
    steps = max(1, epochs * n // bs)
    g = torch.Generator().manual_seed(seed)
    net.hidden.train()
    feats, targets = feats.to(device), targets.to(device)
    for step in range(steps):
        idx = torch.randint(n, (bs,), generator=g).to(device)
        set_lr(opt, lr_at(step, steps, 0, lr))
        loss = -(targets[idx] * F.log_softmax(net.fc(net.hidden(feats[idx])), dim=1)).sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def blend(propagated: np.ndarray, own: np.ndarray) -> tuple[np.ndarray, float]:
    """The teacher: (propagated + w * own) / (1 + w) with w = agreement**4, where agreement is the share of
    pool images whose most likely class is the same under both. The network's predictions add what the
    labels taught it beyond the encoder's neighbourhoods, but only once it has learned enough to agree with
    them: on digits a model fine-tuned on 1% of the labels agreed on ~55% of the pool (w ~ 0.1; blending it
    equally cost 10 points of teacher accuracy), one fine-tuned on 10% on ~94% (w ~ 0.8; +1.2 points)."""
    agreement = float((propagated.argmax(1) == own.argmax(1)).mean())
    w = agreement ** 4
    return ((propagated + w * own) / (1 + w)).astype(np.float32), w


def fixmatch(model: nn.Module, images: torch.Tensor | None, labels: torch.Tensor | None, unlabeled, weak, strong, *,
             epochs: int, batch_size: int, lr: float, weight_decay: float, threshold: float, seed: int, lambda_u: float = 1.0,
             rank: int = 0, world_size: int = 1, device: str | torch.device = "cpu",
             labeled_loader=None) -> dict[str, float]:
    """`unlabeled`: a shards.reader.ShardLoader (uint8 batches, labels ignored), `epochs` passes over it;
    `batch_size`: the labeled batch (the unlabeled one is the loader's). A labeled subset too large to hold
    comes as `labeled_loader` instead of `images`/`labels` (a ShardLoader over its keys, this rank's share of
    the batch), cycled.
    Returns the mean fraction of unlabeled images that passed the threshold (the pseudo-label "mask rate")."""
    streamed = images is None
    n = 0 if streamed else images.shape[0]
    per_epoch = len(unlabeled)
    steps = max(1, epochs * per_epoch)
    bs = min(n, batch_size)
    g = torch.Generator().manual_seed(seed)
    opt = make_optimizer(model, lr, weight_decay)
    model.to(device).train()
    order, pos, step, mask_sum = torch.randperm(n, generator=g), 0, 0, 0.0
    labeled_batches = _cycle(labeled_loader) if streamed else None
    for epoch in range(epochs):
        unlabeled.set_epoch(epoch)
        for ux, _ in unlabeled:
            if step >= steps:
                break
            if streamed:
                xb, yb = next(labeled_batches)
            else:
                if pos + bs > n:
                    order, pos = torch.randperm(n, generator=g), 0
                idx = rank_share(order[pos:pos + bs], rank, world_size)  # every rank its equal share of one batch
                pos += bs
                xb, yb = images[idx], labels[idx]
            ux = ux.to(device)
            with torch.no_grad():  # pseudo-labels: no gradient flows through the weak view (FixMatch)
                probs = F.softmax(model(weak(ux)), dim=1)
            conf, pseudo = probs.max(dim=1)
            mask = (conf >= threshold).float()
            logits = model(torch.cat([weak(xb.to(device)), strong(ux)]))
            nl = len(xb)
            sup = F.cross_entropy(logits[:nl], yb.to(device))
            unsup = (F.cross_entropy(logits[nl:], pseudo, reduction="none") * mask).mean()
            loss = sup + lambda_u * unsup
            set_lr(opt, lr_at(step, steps, 0, lr))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            mask_sum += float(mask.mean())
            step += 1
    return {"steps": step, "mask_rate": mask_sum / max(1, step)}


def _cycle(loader):
    """The loader's batches, epoch after epoch, for as long as they are wanted."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1
