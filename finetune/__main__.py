"""`python -m finetune [--config X] [key=value ...]`: the Ray job entry point."""

import argparse
import sys

from finetune.cli import add_finetune_args, finetune_main
from runtime.errors import run_cli


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m finetune", description="Label-efficient fine-tuning and report.")
    add_finetune_args(p)
    args = p.parse_args(argv)
    return run_cli(lambda: finetune_main(args))


if __name__ == "__main__":
    sys.exit(main())
