"""`--help` of every config-driven stage lists the config keys from the one place they are documented."""

from __future__ import annotations

import importlib
import importlib.metadata

import pytest

from cluster.cli import main
from runtime.config import PretrainConfig, field_doc


def _help(entry, argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        entry(argv)
    assert e.value.code == 0
    return capsys.readouterr().out


def _python_m(package):
    return importlib.import_module(f"{package}.__main__").main



@pytest.mark.parametrize("argv", [["pretrain", "--help"], ["finetune", "--help"], ["pipeline", "--help"],
                                  ["bench", "--help"], "pretrain", "finetune"],
                         ids=["selfsup pretrain", "selfsup finetune", "selfsup pipeline", "selfsup bench",
                              "python -m pretrain", "python -m finetune"])
def test_help_lists_every_config_key_with_default_and_meaning(argv, capsys):
    out = (_help(main, argv, capsys) if isinstance(argv, list) else _help(_python_m(argv), ["--help"], capsys))
    doc = field_doc(PretrainConfig, "global_batch_size")
    assert f"pretrain.global_batch_size = 128  -- {doc}" in out
    for section in ("data:", "augment:", "model:", "optim:", "pretrain:", "trainer:", "wandb:", "finetune:"):
        assert f"\n{section} " in out
    assert "finetune.fixmatch_threshold = 0.9" in out and "model.timm_kwargs = {channels: [32, 64, 128, 256]}" in out
    assert "pretrain.batch_size -> pretrain.global_batch_size" in out  # the renamed keys are named
    examples = out.split("\nexamples:\n", 1)[1].splitlines()
    assert len(examples) >= 2 and all(e.strip() for e in examples)
    if "finetune" in argv:
        assert "encoder=RUN_DIR" in out.split("positional arguments")[0]


def test_version(capsys):
    out = _help(main, ["--version"], capsys)
    assert out.strip() == f"selfsup {importlib.metadata.version('selfsup')}"
