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
    ("finetune.distill_head_epochs=-1", "finetune.distill_head_epochs"),
    ("finetune.spread_prior=median", "uniform, labels"),
    ("finetune.spread_features=pixels", "encoder, finetuned"),
    ("finetune.distill_student=teacher", "finetuned, scratch"),
    ("finetune.distill_student=scratch", "semi_epochs > 0"),
    ("finetune.teacher_models=0", "finetune.teacher_models must be positive"),
    ("finetune.jitter_prob=1.5", "finetune.jitter_prob must be in [0, 1]"),
    ("finetune.jitter_strength=-0.1", "finetune.jitter_strength must be zero or positive"),
    ("trainer.poll_interval_s=0", "trainer.poll_interval_s must be positive"),
    ("nonsense", "key.sub=value"),
])
def test_bad_values_are_one_line_errors(override, needle):
    with pytest.raises(UserError) as e:
        load_config(None, [override])
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_key_lists_valid_choices():
    with pytest.raises(UserError, match="valid keys in pretrain: epochs, global_batch_size"):
        load_config(None, ["pretrain.epoch=3"])


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["pretrain.epochs=7", "name=x"])
    path = save_config(cfg, tmp_path / "config.yaml")
    assert yaml.safe_load(path.read_text())["pretrain"]["epochs"] == 7
    assert to_dict(load_config(path)) == to_dict(cfg)


# ------------------------------------------------------------ one place for each field's meaning


def _walk_fields(cls, prefix=""):
    import dataclasses

    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.type) or (isinstance(f.type, str) and f.type.endswith("Config")):
            yield from _walk_fields(type(getattr(cls(), f.name)), f"{f.name}.")
        else:
            yield f"{prefix}{f.name}", f


def test_every_field_has_a_one_line_doc():
    for key, f in _walk_fields(Config):
        doc = f.metadata.get("doc", "")
        assert doc and "\n" not in doc, f"{key} has no one-line doc in runtime/config.py"


def _yaml_keys(tree, prefix=""):
    for k, v in tree.items():
        if isinstance(v, dict) and k in Config.__dataclass_fields__:
            yield from _yaml_keys(v, f"{k}.")
        else:
            yield f"{prefix}{k}"


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_carry_no_stale_field_description(path, capsys):
    """Every key is a current field (no old names: loading prints no note), and a key's trailing comment only
    explains a value this file changes from the default: the meaning of a key lives in runtime/config.py."""
    raw = yaml.safe_load(path.read_text())
    fields = {k for k, _ in _walk_fields(Config)}
    assert set(_yaml_keys(raw)) <= fields, set(_yaml_keys(raw)) - fields
    # each file's header says "Every key is listed": a user reads the whole surface in the file they copy
    assert "Every key is listed" in path.read_text()
    assert fields <= set(_yaml_keys(raw)), f"{path.name} does not list {sorted(fields - set(_yaml_keys(raw)))}"
    load_config(path)
    assert "deprecated" not in capsys.readouterr().err
    defaults = to_dict(Config())
    section = None
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, _, rest = line.partition(":")
        if not line.startswith(" "):
            section = key
        value, hash_, comment = rest.partition("#")
        if not hash_ or not value.strip():
            assert not hash_, f"{path.name}:{n}: a comment on a section or mapping key restates a field's meaning"
            continue
        default = defaults[section][key.strip()] if line.startswith(" ") else defaults[key]
        assert yaml.safe_load(value) != default, (
            f"{path.name}:{n}: '{comment.strip()}' comments a default value: say what a key means in "
            f"runtime/config.py (doc=...), not in the YAML")


# ------------------------------------------------------------ renamed keys


def test_old_key_names_load_with_a_one_line_note(tmp_path, capsys):
    old = tmp_path / "old.yaml"
    old.write_text("pretrain:\n  batch_size: 64\nfinetune:\n  seeds: 2\n  threshold: 0.8\n  unlabeled_ratio: 3\n")
    cfg = load_config(old)
    assert (cfg.pretrain.global_batch_size, cfg.finetune.num_seeds) == (64, 2)
    assert (cfg.finetune.fixmatch_threshold, cfg.finetune.fixmatch_unlabeled_ratio) == (0.8, 3)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 4 and "pretrain.batch_size is deprecated, use pretrain.global_batch_size" in err[0]
    cfg = load_config(None, ["finetune.seeds=3"])
    assert cfg.finetune.num_seeds == 3
    assert capsys.readouterr().err.strip() == ("note: config key finetune.seeds is deprecated, use "
                                               "finetune.num_seeds (in the overrides)")
    # an old run's saved config (old names) loads, and a new-name override on top of it is not "both given"
    assert load_config(old, ["pretrain.global_batch_size=32"]).pretrain.global_batch_size == 32
    saved = save_config(cfg, tmp_path / "config.yaml").read_text()
    assert "num_seeds: 3" in saved and "seeds: 3\n" not in saved.replace("num_seeds", "")


def test_old_and_new_name_together_is_a_one_line_error(tmp_path):
    both = tmp_path / "both.yaml"
    both.write_text("pretrain:\n  batch_size: 64\n  global_batch_size: 128\n")
    with pytest.raises(UserError, match="sets both pretrain.batch_size and pretrain.global_batch_size") as e:
        load_config(both)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="the overrides set both finetune.num_seeds and finetune.seeds"):
        load_config(None, ["finetune.num_seeds=2", "finetune.seeds=3"])
