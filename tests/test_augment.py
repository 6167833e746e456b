"""BatchAugment: the SimCLR recipe's statistics, measured on the outputs, per image within one batch."""

import math

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from scipy.stats import ks_2samp
from torchvision.transforms import RandomResizedCrop

from pretrain.augment import PRESETS, BatchAugment, normalize, resolve_augment
from runtime.config import AugmentConfig, load_config
from runtime.errors import UserError

torch.set_num_threads(1)
N = 4000  # images per statistic: a rate p is measured within 4 standard errors, sqrt(p(1-p)/N) <= 0.008
MEAN, STD = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
ONLY = dict(crop_scale=[1.0, 1.0], crop_ratio=[1.0, 1.0], flip_prob=0.0, jitter_prob=0.0, grayscale_prob=0.0,
            blur_prob=0.0)  # every op off: the identity, plus normalisation


def close_rate(measured, p, n=N):
    return abs(measured - p) <= 4 * math.sqrt(p * (1 - p) / n) + 1e-9


def random_images(n, size=16, channels=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=g)


def unnormalize(x, mean=MEAN, std=STD):
    return x * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)


def ramp_images(n, size, channels=3):
    """Channel 0 = 8 * column, channel 1 = 8 * row: a resampled crop shows its own box exactly."""
    idx = torch.arange(size, dtype=torch.float32) * 8
    img = torch.zeros(channels, size, size)
    img[0] = idx.view(1, -1)
    if channels > 1:
        img[1] = idx.view(-1, 1)
    return img.to(torch.uint8).expand(n, -1, -1, -1).contiguous()


def test_presets_resolve_and_config_fields_override_them():
    assert resolve_augment(AugmentConfig()) == {"preset": "digits", **PRESETS["digits"]}
    cfg = load_config(None, ["augment.preset=small", "augment.flip_prob=0.3", "augment.crop_scale=[0.5, 1.0]"])
    r = resolve_augment(cfg.augment)
    assert r["flip_prob"] == 0.3 and r["crop_scale"] == [0.5, 1.0]
    assert r["jitter_strength"] == 0.5 and r["blur_prob"] == 0.0 and r["grayscale_prob"] == 0.2
    full = resolve_augment({"preset": "imagenet"})
    assert full["blur_prob"] == 0.5 and full["crop_scale"] == [0.08, 1.0] and full["jitter_strength"] == 1.0
    with pytest.raises(UserError, match="augment.crop_scale"):
        resolve_augment({"preset": "small", "crop_scale": [0.5, 0.1]})
    with pytest.raises(UserError, match="augment.preset"):
        resolve_augment({"preset": "cifar"})


def test_fine_tuning_jitter_is_half_of_pretrainings_unless_finetune_sets_its_own():
    """finetune.jitter_prob / jitter_strength set the colour jitter of every fine-tuning method apart from the
    pretraining recipe's; unset, fine-tuning keeps half of it. Measured on the images, not only the fields."""
    from finetune.classifier import mild_augment

    cfg = load_config(None, ["augment.preset=small", "augment.jitter_strength=0.2"])
    half = resolve_augment(mild_augment(cfg.augment))
    assert half["jitter_prob"] == 0.4 and abs(half["jitter_strength"] - 0.1) < 1e-12
    own = load_config(None, ["augment.preset=small", "augment.jitter_prob=0", "finetune.jitter_prob=1",
                             "finetune.jitter_strength=0.4"])
    ft = own.finetune
    recipe = resolve_augment(mild_augment(own.augment, ft.jitter_prob, ft.jitter_strength))
    assert recipe["jitter_prob"] == 1.0 and recipe["jitter_strength"] == 0.4 and recipe["grayscale_prob"] == 0.0
    torch.manual_seed(3)
    flat = torch.full((64, 3, 16, 16), 120, dtype=torch.uint8)  # one colour: crops and flips cannot change it
    no_colour = {**recipe, "jitter_prob": 0.0}
    for r, changed in ((recipe, True), (no_colour, False)):
        out = BatchAugment({"preset": "small", **r}, 16, MEAN, STD)(flat)
        moved = (out - normalize(flat, MEAN, STD)).abs().amax((1, 2, 3)) > 1e-3
        assert bool(moved.float().mean() > 0.9) is changed


def test_output_shape_dtype_and_normalisation():
    x = random_images(8)
    aug = BatchAugment(ONLY, image_size=16, mean=MEAN, std=STD)
    out = aug(x)
    assert out.shape == (8, 3, 16, 16) and out.dtype == torch.float32
    assert torch.allclose(out, normalize(x, MEAN, STD), atol=1e-5)  # all ops off: exactly the normalisation
    expected = (x.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    assert torch.allclose(normalize(x, MEAN, STD), expected)
    full = BatchAugment({"preset": "imagenet"}, image_size=12, mean=MEAN, std=STD)(x)
    assert full.shape == (8, 3, 12, 12) and torch.isfinite(full).all()
    gray = BatchAugment({"preset": "small"}, image_size=16, mean=[0.5], std=[0.2])(random_images(8, channels=1))
    assert gray.shape == (8, 1, 16, 16) and torch.isfinite(gray).all()


def test_crop_areas_and_flips_follow_torchvision_random_resized_crop():
    torch.manual_seed(0)
    size = 32
    recipe = {**ONLY, "crop_scale": [0.08, 1.0], "crop_ratio": [3 / 4, 4 / 3], "flip_prob": 0.5}
    out = unnormalize(BatchAugment(recipe, size, MEAN, STD)(ramp_images(N, size))) * 255 / 8
    # the ramp resampled inside the box runs from its first to its last pixel centre: width = span + 1
    first, last = out[:, 0, 0, 0], out[:, 0, 0, -1]
    w = (last - first).abs().round() + 1
    h = (out[:, 1, -1, 0] - out[:, 1, 0, 0]).round() + 1
    flipped = last < first
    assert close_rate(flipped.float().mean().item(), 0.5)
    ours = (w * h / size**2).numpy()
    boxes = (RandomResizedCrop.get_params(torch.empty(3, size, size), [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(N))
    ref = [b[2] * b[3] / size**2 for b in boxes]
    assert ks_2samp(ours, ref).pvalue > 1e-3, "crop-area distribution differs from torchvision's"
    assert abs(ours.mean() - sum(ref) / N) < 0.02
    assert ours.min() >= 0.05 and ours.max() <= 1.0
    ratio = (w / h).numpy()
    assert ratio.min() >= 0.6 and ratio.max() <= 1.6  # 3/4..4/3 up to the rounding of small boxes


@pytest.mark.parametrize("op,p", [("jitter_prob", 0.8), ("grayscale_prob", 0.2), ("blur_prob", 0.5)])
def test_each_colour_op_fires_at_its_configured_rate(op, p):
    torch.manual_seed(1)
    x = random_images(N)
    # sigma from 0.5: a blur with sigma 0.1 moves pixels by < 1e-20, which no output could show
    recipe = {**ONLY, op: p, "jitter_strength": 1.0, "blur_sigma": [0.5, 2.0]}
    out = BatchAugment(recipe, 16, MEAN, STD)(x)
    if op == "grayscale_prob":
        rgb = unnormalize(out)
        fired = ((rgb[:, 0] - rgb[:, 1]).abs().amax((1, 2)) < 1e-4) & ((rgb[:, 1] - rgb[:, 2]).abs().amax((1, 2)) < 1e-4)
    else:
        fired = (out - normalize(x, MEAN, STD)).abs().amax((1, 2, 3)) > 1e-4
    assert close_rate(fired.float().mean().item(), p)


def test_jitter_factors_follow_simclr_ranges():
    torch.manual_seed(2)
    x = torch.full((N, 3, 4, 4), 100, dtype=torch.uint8)  # flat grey: only brightness changes it
    out = unnormalize(BatchAugment({**ONLY, "jitter_prob": 1.0, "jitter_strength": 0.5}, 4, MEAN, STD)(x))
    factor = out[:, 0, 0, 0] / (100 / 255)
    # brightness ~ U(1 - 0.8s, 1 + 0.8s) = U(0.6, 1.4): contrast, saturation and hue leave grey alone
    assert factor.min() >= 0.6 - 1e-4 and factor.max() <= 1.4 + 1e-4
    assert abs(factor.mean().item() - 1.0) < 0.02 and abs(factor.std().item() - 0.8 / math.sqrt(12)) < 0.02


def test_parameters_differ_per_image_within_one_batch_and_views_are_independent():
    torch.manual_seed(3)
    x = random_images(1, size=32).expand(256, -1, -1, -1).contiguous()  # one image, 256 times
    aug = BatchAugment({"preset": "imagenet"}, 32, MEAN, STD)
    v1, v2 = aug(x), aug(x)
    distinct = {tuple(v.flatten()[:64].round(decimals=4).tolist()) for v in v1}
    assert len(distinct) > 250  # a whole-batch transform would give 1
    assert (v1 - v2).abs().amax((1, 2, 3)).min() > 1e-3
    ramp = unnormalize(aug(ramp_images(256, 32)))
    flips = (ramp[:, 0, 0, -1] < ramp[:, 0, 0, 0]).float().mean().item()
    assert 0.3 < flips < 0.7  # both flipped and unflipped images in the same batch


def test_digits_preset_never_flips_and_crops_at_least_a_fifth():
    torch.manual_seed(4)  # jitter off: the ramp's values measure the crop width
    out = unnormalize(BatchAugment({"preset": "digits", "jitter_prob": 0.0}, 16, [0.1], [0.2])(ramp_images(2000, 16, channels=1)),
                      [0.1], [0.2]) * 255 / 8
    first, last = out[:, 0, 0, 0], out[:, 0, 0, -1]
    assert (last > first).all()  # the x ramp always increases: no image flipped
    width = (last - first).round() + 1
    assert width.min() >= math.floor(math.sqrt(0.2 * 3 / 4) * 16) - 1


def test_matches_torchvision_ops_on_fixed_parameters():
    """The vectorised ops are torchvision's: a box crop, the jitter ops and the blur, on fixed values."""
    torch.manual_seed(5)
    x = torch.rand(4, 3, 32, 32)
    aug = BatchAugment({"preset": "imagenet", "flip_prob": 0.0}, 32, MEAN, STD)
    torch.manual_seed(6)
    boxes = aug.crop_boxes(4, 32, 32, x.device)
    torch.manual_seed(6)
    ours = aug.crop_flip(x)
    for i, (t, left, h, w) in enumerate(boxes.int().tolist()):
        assert torch.allclose(ours[i], TF.resized_crop(x[i], t, left, h, w, [32, 32], antialias=True), atol=1e-5)
    f = torch.full((4, 3), 1.3)
    assert torch.allclose(aug._colour_op(1, x.clone(), f, None), TF.adjust_contrast(x, 1.3), atol=1e-4)
    assert torch.allclose(aug._colour_op(2, x.clone(), f, None), TF.adjust_saturation(x, 1.3), atol=1e-4)
    assert torch.allclose(aug._colour_op(3, x.clone(), f, torch.full((4,), 0.3)), TF.adjust_hue(x, 0.3), atol=1e-4)
    blur = BatchAugment({"preset": "imagenet", "blur_prob": 1.0, "blur_sigma": [1.5, 1.5]}, 96, MEAN, STD)
    x96 = torch.rand(2, 3, 96, 96)
    assert blur.blur_kernel == 9  # ~10% of the image, odd
    assert torch.allclose(blur.blur(x96), TF.gaussian_blur(x96, [9, 9], [1.5, 1.5]), atol=1e-5)
