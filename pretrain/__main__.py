"""`python -m pretrain [--config X] [--local] [--resume DIR] [key=value ...]`: the Ray job entry point."""

import argparse
import sys

from pretrain.cli import add_pretrain_args, pretrain_main
from runtime.errors import run_cli


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pretrain", description="SimCLR pretraining on shards.")
    add_pretrain_args(p)
    args = p.parse_args(argv)
    return run_cli(lambda: pretrain_main(args))


if __name__ == "__main__":
    sys.exit(main())
