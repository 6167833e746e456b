"""Command-line glue for `finetune` and `predict`."""

from __future__ import annotations

import argparse

from pretrain.cli import add_config_args
from pretrain.errors import UserError


def add_finetune_args(p: argparse.ArgumentParser) -> None:
    add_config_args(p)


def finetune_main(args: argparse.Namespace) -> int:
    raise UserError("`selfsup finetune` is not built yet")


def add_predict_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a classifier directory written by `selfsup finetune`")
    p.add_argument("images", nargs="+", help="image files")


def predict_main(args: argparse.Namespace) -> int:
    raise UserError("`selfsup predict` is not built yet")
