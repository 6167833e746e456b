"""`selfsup bench`: options and entry point (the sections are in `bench.run`, the memory part in `bench.memory`)."""

from __future__ import annotations

import argparse

from runtime.args import add_config_args


def add_bench_args(p: argparse.ArgumentParser) -> None:
    add_config_args(p)
    p.add_argument("--backbone", default=None, help="timm model name (default: resnet18, full width)")
    p.add_argument("--image-size", type=int, default=None, help="crop size (default: 32, or the shards' size)")
    p.add_argument("--batch", type=int, default=256, help="global batch of source images (two views each)")
    p.add_argument("--parts", default="loader,decode,model,end_to_end,ray,scaling",
                   help="comma list of sections to run (also: memory, not run by default)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per figure (the median is reported)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--shards", default=None, help="shards dir to read (default: write CIFAR-like shards to a temp dir)")
    p.add_argument("--images", type=int, default=6144, help="images in the generated shards")
    p.add_argument("--loader-workers", default="0,2", help="loader worker counts to compare, comma list")
    p.add_argument("--loader-batches", type=int, default=4, help="batches per timed loader repeat")
    p.add_argument("--loader-threads", type=int, default=1,
                   help="torch threads of the loader section's main process (1: a per-core comparison)")
    p.add_argument("--decode-images", type=int, default=1000, help="images per timed decode repeat")
    p.add_argument("--memory-sizes", default="10000,100000",
                   help="memory part: image counts of the synthetic folders, comma list (default 10000,100000)")
    p.add_argument("--memory-classes", type=int, default=100, help="memory part: classes of the folders (default 100)")
    p.add_argument("--memory-dir", default=None,
                   help="memory part: keep its folders, shards, runs and logs here (default: a temp dir, removed)")
    p.add_argument("--out", default="bench.json", help="where to write the figures (default ./bench.json)")


def bench_main(args: argparse.Namespace) -> int:
    from bench.run import main

    return main(args)
