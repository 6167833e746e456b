"""Model, encoder export/reload, and optimiser pieces of pretraining, on tiny CPU tensors."""

import json
import math

import pytest
import timm
import torch
from safetensors.torch import load_file
from torch import nn

from pretrain.model import (
    SimCLRModel,
    build_backbone,
    build_model,
    check_compatible,
    encoder_meta,
    load_encoder,
    save_encoder,
)
from pretrain.optim import build_optimizer, build_scheduler, lr_at, param_groups
from runtime.config import Config
from runtime.errors import UserError, one_line

torch.set_num_threads(1)

TINY = {"channels": [8, 16, 32, 64]}
MANIFEST = {"channels": 1, "image_size": 16, "mean": [0.3], "std": [0.25], "classes": [str(i) for i in range(10)]}


def tiny_cfg(**model) -> Config:
    cfg = Config()
    cfg.model.timm_kwargs = dict(TINY)
    cfg.model.proj_hidden_dim = 32
    cfg.model.proj_output_dim = 16
    for k, v in model.items():
        setattr(cfg.model, k, v)
    return cfg


def test_small_stem_is_3x3_stride1_without_maxpool():
    b = build_backbone("resnet18", 1, "small", TINY)
    assert isinstance(b.conv1, nn.Conv2d)
    assert b.conv1.kernel_size == (3, 3) and b.conv1.stride == (1, 1) and b.conv1.bias is None
    assert b.conv1.in_channels == 1 and b.conv1.out_channels == b.bn1.num_features == 64  # bn1 still fits
    assert isinstance(b.maxpool, nn.Identity)
    x = torch.rand(2, 1, 16, 16)
    # full resolution through the stem: 16 px in, 16 px out of conv1 (the default stem gives 8, then 4)
    assert b.act1(b.bn1(b.conv1(x))).shape[-1] == 16
    assert b(x).shape == (2, 64) and b.num_features == 64

    d = build_backbone("resnet18", 3, "default", TINY)
    assert d.conv1.kernel_size == (7, 7) and d.conv1.stride == (2, 2)
    assert isinstance(d.maxpool, nn.MaxPool2d)

    # a deep (Sequential) stem collapses to one conv whose width still feeds bn1
    deep = build_backbone("resnet10t", 3, "small", {})
    assert isinstance(deep.conv1, nn.Conv2d) and deep.conv1.out_channels == deep.bn1.num_features
    assert deep(torch.rand(2, 3, 8, 8)).shape == (2, deep.num_features)


def test_small_stem_refused_for_models_without_resnet_stem():
    with pytest.raises(UserError) as e:
        build_backbone("vit_tiny_patch16_224", 3, "small", {"img_size": 16, "patch_size": 4})
    assert "model.stem=default" in str(e.value) and "\n" not in str(e.value)


def test_unknown_model_and_kwargs_are_user_errors():
    with pytest.raises(UserError, match="not a timm model"):
        build_backbone("resnet_nope", 3, "default", {})
    with pytest.raises(UserError, match="timm_kwargs"):
        build_backbone("resnet18", 3, "default", {"no_such_arg": 1})


def test_simclr_model_shapes():
    cfg = tiny_cfg()
    model = build_model(cfg.model, in_chans=1)
    x = torch.rand(4, 1, 16, 16)
    assert model(x).shape == (4, 16)
    assert model.embed(x).shape == (4, 64)


def _trained_model(cfg, steps=3):
    """A model whose weights and BN running stats moved away from the init, as after training."""
    torch.manual_seed(0)
    model = build_model(cfg.model, in_chans=1)
    opt = build_optimizer(cfg.optim, model, global_batch=8)
    for _ in range(steps):
        loss = model(torch.rand(8, 1, 16, 16)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_exported_encoder_reloads_with_plain_timm_and_strict_load(tmp_path):
    cfg = tiny_cfg()
    model = _trained_model(cfg)
    meta = encoder_meta(cfg, MANIFEST, model, epochs=3, knn_acc=0.5)
    save_encoder(tmp_path, model, meta)

    on_disk = json.loads((tmp_path / "encoder.json").read_text())
    assert set(on_disk) >= {"model", "timm_kwargs", "in_chans", "stem", "image_size", "mean", "std", "epochs",
                            "knn_acc", "num_features", "head", "classes"}
    assert on_disk["in_chans"] == 1 and on_disk["stem"] == "small" and on_disk["num_features"] == 64

    # rebuild the way docs/interfaces.md tells an outsider to: timm + the stem change + strict load
    rebuilt = timm.create_model(on_disk["model"], pretrained=False, num_classes=0, in_chans=on_disk["in_chans"],
                                **on_disk["timm_kwargs"])
    out_ch = rebuilt.conv1.out_channels
    rebuilt.conv1 = nn.Conv2d(on_disk["in_chans"], out_ch, kernel_size=3, stride=1, padding=1, bias=False)
    rebuilt.maxpool = nn.Identity()
    rebuilt.load_state_dict(load_file(str(tmp_path / "encoder.safetensors")), strict=True)
    rebuilt.eval()

    x = torch.rand(5, 1, 16, 16)
    with torch.no_grad():
        expected = model.embed(x)
        assert torch.allclose(rebuilt(x), expected, atol=1e-6)
        backbone, head, meta2 = load_encoder(tmp_path, with_head=True)
        assert torch.allclose(backbone(x), expected, atol=1e-6)
        assert torch.allclose(head(backbone(x)), model(x), atol=1e-6)
    assert meta2 == on_disk


def test_load_encoder_refuses_other_architecture(tmp_path):
    cfg = tiny_cfg()
    save_encoder(tmp_path, _trained_model(cfg, steps=1), encoder_meta(cfg, MANIFEST, build_model(cfg.model, 1), 1, None))
    meta = json.loads((tmp_path / "encoder.json").read_text())
    meta["timm_kwargs"] = {"channels": [8, 16, 32, 128]}  # a wider last stage
    (tmp_path / "encoder.json").write_text(json.dumps(meta))
    with pytest.raises(UserError) as e:
        load_encoder(tmp_path)
    msg = str(e.value)
    assert msg == one_line(msg)
    assert "resnet18" in msg and "shape mismatch" in msg and "layer4" in msg

    meta["model"], meta["timm_kwargs"] = "resnet34", dict(TINY)  # more blocks: missing keys
    (tmp_path / "encoder.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="resnet34.*missing keys"):
        load_encoder(tmp_path)


def test_load_encoder_missing_pieces_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="encoder not found at .*run `selfsup pretrain` first"):
        load_encoder(tmp_path / "nope")
    cfg = tiny_cfg()
    model = build_model(cfg.model, 1)
    save_encoder(tmp_path, model, encoder_meta(cfg, MANIFEST, model, 1, None))
    (tmp_path / "head.safetensors").unlink()
    with pytest.raises(UserError, match="head.safetensors are missing"):
        load_encoder(tmp_path, with_head=True)
    load_encoder(tmp_path)  # the backbone alone is still fine
    (tmp_path / "encoder.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="encoder.safetensors are unreadable"):
        load_encoder(tmp_path)
    (tmp_path / "encoder.json").unlink()
    with pytest.raises(UserError) as e:
        load_encoder(tmp_path)
    assert "encoder.json is missing" in str(e.value) and "\n" not in str(e.value)


def test_check_compatible_refuses_other_channels_and_size():
    meta = {"in_chans": 1, "image_size": 16}
    check_compatible(meta, MANIFEST)
    with pytest.raises(UserError, match="1-channel images but the shards have 3"):
        check_compatible(meta, {**MANIFEST, "channels": 3})
    with pytest.raises(UserError, match="16 px images but the shards are 32 px"):
        check_compatible(meta, {**MANIFEST, "image_size": 32})


def test_param_groups_exclude_norms_and_biases():
    model = SimCLRModel(build_backbone("resnet18", 1, "small", TINY), 32, 16, 2)
    decay, no_decay = param_groups(model, weight_decay=1e-4)
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    norm_params = {f"{mn}.{pn}" for mn, m in model.named_modules()
                   if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for pn, _ in m.named_parameters()}
    biases = {n for n, _ in model.named_parameters() if n.endswith(".bias")}
    assert norm_params and biases
    assert no_decay_names == norm_params | biases
    assert decay_names.isdisjoint(norm_params | biases)
    assert len(decay_names) + len(no_decay_names) == len(list(model.parameters()))


def test_lars_does_not_adapt_or_decay_the_no_decay_group():
    """lightly's LARS: a group with weight_decay 0 is plain momentum SGD (no trust ratio), as in SimCLR."""
    torch.manual_seed(0)
    cfg = tiny_cfg()
    cfg.optim.weight_decay = 0.1
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    opt = build_optimizer(cfg.optim, model, global_batch=256)  # lr = base_lr
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(torch.randn(6, 4)).pow(2).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    for n, p in model.named_parameters():
        step = before[n] - p.detach()
        if p.ndim <= 1:  # plain SGD step: lr * grad
            assert torch.allclose(step, cfg.optim.base_lr * grads[n], atol=1e-6), n
        else:  # LARS step: scaled by the trust ratio, far smaller than lr * grad
            assert step.norm() < 0.1 * (cfg.optim.base_lr * grads[n]).norm(), n


@pytest.mark.parametrize("name", ["lars", "sgd", "adamw"])
def test_optimizer_lr_scales_with_global_batch(name):
    cfg = tiny_cfg()
    cfg.optim.name = name
    cfg.optim.base_lr = 0.3
    opt = build_optimizer(cfg.optim, nn.Linear(2, 2), global_batch=512)
    assert all(g["lr"] == pytest.approx(0.6) for g in opt.param_groups)


def test_lr_schedule_warmup_then_cosine():
    peak, total, warm = 2.0, 110, 10
    lrs = [lr_at(s, total, warm, peak) for s in range(total + 1)]
    assert lrs[0] == pytest.approx(peak / warm)
    assert lrs[:warm] == pytest.approx([peak * (s + 1) / warm for s in range(warm)])  # linear warmup
    assert lrs[warm] == pytest.approx(peak)
    assert lrs[warm + 50] == pytest.approx(peak / 2)  # halfway through the cosine
    assert lrs[warm + 25] == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lrs[total] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(lrs[warm:], lrs[warm + 1:]))  # never rises after warmup
    assert lr_at(0, 10, 0, 1.0) == pytest.approx(1.0)  # no warmup: starts at the peak


def test_scheduler_state_roundtrips():
    opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=1.0)
    sched = build_scheduler(opt, total_steps=20, warmup_steps=4)
    for _ in range(7):
        opt.step()
        sched.step()
    state = sched.state_dict()
    assert opt.param_groups[0]["lr"] == pytest.approx(lr_at(7, 20, 4, 1.0))
    opt2 = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=1.0)
    sched2 = build_scheduler(opt2, total_steps=1, warmup_steps=1)
    sched2.load_state_dict(state)
    opt2.step()
    sched2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(lr_at(8, 20, 4, 1.0))


def test_load_encoder_names_the_json_when_its_model_cannot_be_built(tmp_path):
    cfg = tiny_cfg()
    model = build_model(cfg.model, 1)
    save_encoder(tmp_path, model, encoder_meta(cfg, MANIFEST, model, 1, None))
    meta = json.loads((tmp_path / "encoder.json").read_text())
    (tmp_path / "encoder.json").write_text(json.dumps({**meta, "model": "resnet_gone"}))
    with pytest.raises(UserError, match="encoder.json describes a model that cannot be built.*resnet_gone"):
        load_encoder(tmp_path)
    (tmp_path / "encoder.json").write_text(json.dumps({**meta, "head": {"hidden_dim": 32}}))
    with pytest.raises(UserError, match="lacks keys head.output_dim, head.num_layers"):
        load_encoder(tmp_path)
    (tmp_path / "encoder.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_encoder(tmp_path)
