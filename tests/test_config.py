from pathlib import Path

import pytest
import yaml

from runtime.config import Config, load_config, save_config, to_dict
from runtime.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def test_digits_yaml_equals_the_defaults():
    assert to_dict(load_config(ROOT / "configs/digits.yaml")) == to_dict(Config())


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.trainer.max_failures >= 1


def test_overrides_are_typed():
    cfg = load_config(None, ["pretrain.epochs=3", "data.labeled_fractions=0.01,0.5", "optim.base_lr=1e-3",
                             "model.timm_kwargs={channels: [8, 16, 32, 64]}", "encoder=/tmp/run"])
    assert cfg.pretrain.epochs == 3
    assert cfg.data.labeled_fractions == [0.01, 0.5]
    assert cfg.optim.base_lr == pytest.approx(1e-3)
    assert cfg.model.timm_kwargs == {"channels": [8, 16, 32, 64]}
    assert cfg.encoder_dir == "/tmp/run"


@pytest.mark.parametrize("override,needle", [
    ("pretrain.epoch=3", "pretrain.epoch "),
    ("pretrain.epochs=abc", "pretrain.epochs"),
    ("pretrain.epochs=-1", "pretrain.epochs"),
    ("trainer.use_gpu=3", "trainer.use_gpu"),
    ("augment.preset=foo", "digits, small, imagenet"),
    ("data.labeled_fractions=0", "labeled_fractions"),
    ("data.labeled_fractions=1.5", "labeled_fractions"),
    ("finetune.methods=[pixels,magic]", "magic"),
    ("nonsense", "key.sub=value"),
])
def test_bad_values_are_one_line_errors(override, needle):
    with pytest.raises(UserError) as e:
        load_config(None, [override])
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_key_lists_valid_choices():
    with pytest.raises(UserError, match="valid keys in pretrain: epochs, batch_size"):
        load_config(None, ["pretrain.epoch=3"])


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["pretrain.epochs=7", "name=x"])
    path = save_config(cfg, tmp_path / "config.yaml")
    assert yaml.safe_load(path.read_text())["pretrain"]["epochs"] == 7
    assert to_dict(load_config(path)) == to_dict(cfg)
