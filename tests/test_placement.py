"""GPU- and cluster-specific code exercised on the CPU: device placement, CUDA RNG restore with another GPU
count, each DDP rank's share of a batch, and the 2-std verdict with one seed (issue 12).

The device stand-in is PyTorch's `meta` device: a tensor there has a shape but no data, and an operation that
mixes it with CPU tensors fails like CUDA inputs meeting CPU weights do. The CUDA RNG calls are replaced by a
stand-in that has the real functions' contract (`set_rng_state(state, device=i)` raises for a device that does
not exist), since no GPU is here; tests/test_gpu.py does the real thing when CUDA is present.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from finetune import classifier as clf
from finetune.report import build_report, result_row, to_markdown
from pretrain.augment import normalize
from pretrain.knn import extract_features
from pretrain.model import build_model, encoder_meta
from runtime import checkpoint as ckpt
from runtime.config import Config

TINY = {"channels": [8, 16, 32, 64]}


def _arch(num_classes: int = 10) -> dict:
    cfg = Config()
    cfg.model.timm_kwargs = dict(TINY)
    cfg.model.proj_hidden_dim, cfg.model.proj_output_dim = 32, 16
    manifest = {"channels": 1, "image_size": 16, "mean": [0.5], "std": [0.25], "classes": [str(i) for i in range(10)]}
    model = build_model(cfg.model, 1)
    return clf.architecture(encoder_meta(cfg, manifest, model, epochs=0, knn_acc=None), num_classes, "head")


# ------------------------------------------------------------------ device placement (distill's pool)


def test_features_are_computed_with_the_backbone_on_the_given_device():
    """`distill`'s pool features: the encoder arrives on the CPU, the session's device is another one. Old code
    moved only the inputs there ("Tensor on device cpu is not on the expected device")."""
    backbone = clf.build_classifier(_arch()).backbone  # on the CPU, as load_encoder returns it
    images = torch.randint(0, 256, (6, 1, 16, 16), dtype=torch.uint8)
    feats = extract_features(backbone, images, lambda x: normalize(x, [0.5], [0.25]), batch_size=4,
                             device=torch.device("meta"))
    assert feats.device.type == "meta" and feats.shape[0] == 6
    assert {p.device.type for p in backbone.parameters()} | {b.device.type for b in backbone.buffers()} == {"meta"}


def test_features_on_the_cpu_are_unchanged():
    backbone = clf.build_classifier(_arch()).backbone.train()
    images = torch.randint(0, 256, (5, 1, 16, 16), dtype=torch.uint8)
    a = extract_features(backbone, images, lambda x: normalize(x, [0.5], [0.25]), device="cpu")
    assert backbone.training  # the caller's mode is restored
    backbone.eval()
    with torch.no_grad():
        b = backbone(normalize(images, [0.5], [0.25]))
    torch.testing.assert_close(a, b)


# ------------------------------------------------------------------ CUDA RNG states, another GPU count


@pytest.fixture
def gpus(monkeypatch):
    """`torch.cuda` with `n` visible GPUs (no real ones): set_rng_state raises for a missing device like the
    real one ('invalid device ordinal'); restored states are recorded."""
    state = {"n": 0, "restored": {}}

    def set_rng_state(new_state, device="cuda"):
        i = device if isinstance(device, int) else (torch.device(device).index or 0)
        if i >= state["n"]:
            raise RuntimeError("CUDA error: invalid device ordinal")
        state["restored"][i] = new_state.clone()

    monkeypatch.setattr(torch.cuda, "is_available", lambda: state["n"] > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: state["n"])
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_rng_state)
    monkeypatch.setattr(torch.cuda.random, "set_rng_state", set_rng_state)
    monkeypatch.setattr(torch.cuda.random, "device_count", lambda: state["n"], raising=False)
    return state


@pytest.mark.parametrize("saved, visible", [(4, 1), (2, 0), (1, 2), (3, 3)])
def test_a_checkpoint_from_another_gpu_layout_restores(tmp_path, gpus, saved, visible):
    """A checkpoint written with `saved` GPUs visible on rank 0's node, resumed where `visible` GPUs are:
    the common ones are restored, nothing raises (old code: set_rng_state_all raised for fewer GPUs)."""
    cuda_states = [torch.get_rng_state()[:816].clone() + i for i in range(saved)]  # byte tensors, like CUDA's
    rng = {**ckpt.rng_state(), "cuda": cuda_states}
    d = ckpt.save_checkpoint(tmp_path / "c", model_state={"w": torch.zeros(2)}, optimizer_state={}, meta={},
                             rng=rng)
    state = ckpt.load_checkpoint(d)  # weights_only: the list of states loads as plain tensors
    torch.manual_seed(123)
    random.seed(1)
    np.random.seed(1)
    gpus["n"] = visible
    ckpt.set_rng_state(state["rng"])
    assert sorted(gpus["restored"]) == list(range(min(saved, visible)))
    for i, s in gpus["restored"].items():
        assert torch.equal(s, cuda_states[i])
    assert torch.equal(torch.get_rng_state(), rng["torch"])  # the CPU generators are restored as before


# ------------------------------------------------------------------ each DDP rank's share of a batch


@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("n", [1, 2, 3, 7, 15, 16, 64])
def test_every_rank_gets_an_equal_share_of_at_least_two(world, n):
    batch = torch.randperm(100)[:n]
    shares = [clf.rank_share(batch, r, world) for r in range(world)]
    assert len({len(s) for s in shares}) == 1
    assert len(shares[0]) >= 2
    assert set(torch.cat(shares).tolist()) == set(batch.tolist())  # every image of the batch is used
    if world == 1 and n > 1:
        assert torch.equal(shares[0], batch)  # one process: the batch as it was


def test_the_last_of_8_ranks_trains_on_15_labels_with_batchnorm():
    """15 labels on 8 workers: `order[...][rank::8]` gave rank 7 a single image, and the head's BatchNorm1d
    in train mode refuses that ("Expected more than 1 value per channel")."""
    torch.manual_seed(0)
    model = clf.build_classifier(_arch())
    images = torch.randint(0, 256, (15, 1, 16, 16), dtype=torch.uint8)
    labels = torch.arange(15) % 10
    augment = lambda x: normalize(x, [0.5], [0.25])  # noqa: E731
    out = clf.train_supervised(model, images, labels, augment, epochs=1, batch_size=64, lr=0.01,
                               weight_decay=0.0, seed=0, rank=7, world_size=8)
    assert out["steps"] == 1 and np.isfinite(out["final_loss"])


# ------------------------------------------------------------------ the 2-std verdict needs 2 seeds


def test_one_seed_gives_no_verdict_and_no_zero_spread():
    rows = [result_row("pixels", 0.1, 10, [0.5], 1.0), result_row("scratch", 0.1, 10, [0.4], 1.0),
            result_row("finetune", 0.1, 10, [0.9], 1.0)]
    report = build_report("d", None, rows)
    c = report["comparisons"][0]
    assert c["beats_all_baselines_by_2std"] is None
    assert all(a["beats_by_2std"] is None for a in c["against"].values())
    md = to_markdown(report)
    assert "± 0.0" not in md and "90.0 (n=1)" in md
    assert "more than two standard deviations" not in md and "too few seeds" in md

    two = [result_row("pixels", 0.1, 10, [0.5, 0.52], 1.0), result_row("finetune", 0.1, 10, [0.9, 0.91], 1.0)]
    c = build_report("d", None, two)["comparisons"][0]
    assert c["beats_all_baselines_by_2std"] is True


def test_a_lead_smaller_than_the_spread_is_flagged_in_json_and_markdown():
    rows = [result_row("pixels", 0.1, 10, [0.80, 0.84, 0.82], 1.0), result_row("scratch", 0.1, 10, [0.5, 0.52, 0.51], 1.0),
            result_row("finetune", 0.1, 10, [0.78, 0.90, 0.84], 1.0)]  # +2 points over pixels, std 6
    report = build_report("d", None, rows)
    c = report["comparisons"][0]
    assert c["against"]["pixels"]["std_exceeds_margin"] is True
    assert c["against"]["scratch"]["std_exceeds_margin"] is False
    assert c["std_exceeds_margin"] == ["pixels"]
    md = to_markdown(report)
    assert "Flag: at 10% the spread" in md and "margin over `pixels`" in md and "margin over `scratch`" not in md
    one = build_report("d", None, [result_row("pixels", 0.1, 10, [0.8], 1.0), result_row("finetune", 0.1, 10, [0.81], 1.0)])
    assert one["comparisons"][0]["against"]["pixels"]["std_exceeds_margin"] is None  # no spread from one seed
    assert one["comparisons"][0]["std_exceeds_margin"] == []


def test_semi_against_finetune_on_the_same_subsets_unpaired_and_paired():
    """report.json's `semi_vs_finetune`: what the unlabeled images add over the model semi starts from. The spread
    over subsets hides a lead that every subset shows; the per-subset differences do not."""
    rows = [result_row("finetune", 0.01, 10, [0.40, 0.46, 0.49], 1.0),
            result_row("semi", 0.01, 10, [0.48, 0.55, 0.60], 1.0),  # +0.08, +0.09, +0.11 on the same subsets
            result_row("scratch", 0.01, 10, [0.2, 0.25, 0.3], 1.0)]
    c = build_report("d", None, rows, test_samples=300)["semi_vs_finetune"][0]
    assert c["label_fraction"] == 0.01 and c["seeds"] == 3 and c["wins"] == 3
    assert c["margin"] == pytest.approx(0.28 / 3) and c["std"] == pytest.approx(np.std([0.48, 0.55, 0.60], ddof=1))
    assert c["beats_by_2std"] is False  # 0.093 is not more than 2 x 0.060
    assert c["paired_std"] == pytest.approx(np.std([0.08, 0.09, 0.11], ddof=1))  # 0.015
    assert c["beats_by_2std_paired"] is True
    md = to_markdown(build_report("d", None, rows, test_samples=300))
    assert "`semi` is +9.3 points against the `finetune` model it starts from, ahead on 3 of 3 subsets" in md
    assert "not more than two standard deviations of either (std 6.0), more than two of the per-subset" in md
    for few in (build_report("d", None, rows, test_samples=20),  # too few test images to tell
                build_report("d", None, [result_row("finetune", 0.01, 10, [0.4], 1.0),
                                         result_row("semi", 0.01, 10, [0.5], 1.0)])):  # one subset: no spread
        c = few["semi_vs_finetune"][0]
        assert c["beats_by_2std"] is None and c["beats_by_2std_paired"] is None and c["paired_std"] is None
    assert build_report("d", None, rows[:1])["semi_vs_finetune"] == []  # no semi: nothing to compare
