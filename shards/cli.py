"""`selfsup shard SOURCE --out DIR`: options and entry point."""

from __future__ import annotations

import argparse
import os


def add_shard_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="digits | cifar10 | cifar100 | stl10 | folder | photos | photos-val")
    p.add_argument("--out", required=True, help="output directory for shards and manifest.json")
    p.add_argument("--input", default=None, help="raw data directory (all sources but digits, photos and photos-val)")
    p.add_argument("--shard-size", type=int, default=512, help="samples per shard (default 512)")
    p.add_argument("--image-size", type=int, default=None,
                   help="resize so the shorter side is this many px (default: digits 16, others as given)")
    p.add_argument("--labeled-fractions", default="0.01,0.1",
                   help="labeled subsets to store, comma-separated, each in (0, 1] (default 0.01,0.1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the labeled subsets (default 0)")
    p.add_argument("--test-fraction", type=float, default=0.2,
                   help="folder DIR/<class>/*: share of each class held out as test (default 0.2)")
    p.add_argument("--photos-unlabeled", type=int, default=None,
                   help="photos, photos-val: unlabeled crops per class (default 60; more come from the same "
                        "train cells, drawn after the benchmark's own, which stay the same)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="processes writing shards in parallel (default: min(4, cores))")


def shard_main(args: argparse.Namespace) -> int:
    from shards.writer import write_shards

    m = write_shards(args.source, args.out, input_dir=args.input, shard_size=args.shard_size,
                     image_size=args.image_size, labeled_fractions=args.labeled_fractions, seed=args.seed,
                     test_fraction=args.test_fraction, workers=args.workers,
                     photos_unlabeled=args.photos_unlabeled)
    splits = ", ".join(f"{s['count']} {name}" for name, s in m["splits"].items() if s["count"])
    shards = sum(len(s["shards"]) for s in m["splits"].values())
    print(f"{m['source']}: {splits} images in {shards} shards at {args.out} "
          f"({m['image_size']} px, {m.get('skipped', 0)} skipped)")
    return 0
