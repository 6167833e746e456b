"""`selfsup bench`: options and entry point (the sections are in `bench.run`, the memory part in `bench.memory`,
the table and bench.json in `bench.report`)."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

from runtime.args import add_config_args
from runtime.errors import UserError


def add_bench_args(p: argparse.ArgumentParser) -> None:
    add_config_args(p, ["selfsup bench --parts loader,decode --repeats 1",
                        "selfsup bench --shards runs/cifar10/shards --backbone resnet50 --batch 512"])
    p.add_argument("--backbone", default=None, help="timm model name (default: resnet18, full width)")
    p.add_argument("--image-size", type=int, default=None, help="crop size (default: 32, or the shards' size)")
    p.add_argument("--batch", type=int, default=256, help="global batch of source images (two views each)")
    p.add_argument("--parts", default="loader,decode,model,end_to_end,ray,scaling",
                   help="comma list of sections to run (also: formats, memory, reference_e2e and daemons, not run by default)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per figure (the median is reported)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--shards", default=None, help="shards dir to read (default: write CIFAR-like shards to a temp dir)")
    p.add_argument("--images", type=int, default=6144, help="images in the generated shards")
    p.add_argument("--loader-workers", default="0,2", help="loader worker counts to compare, comma list")
    p.add_argument("--loader-batches", type=int, default=4, help="batches per timed loader repeat")
    p.add_argument("--loader-threads", type=int, default=1,
                   help="torch threads of the loader section's main process (1: a per-core comparison)")
    p.add_argument("--decode-images", type=int, default=1000, help="images per timed decode repeat")
    p.add_argument("--e2e-epochs", type=int, default=5,
                   help="reference_e2e: epochs each side trains before the kNN accuracy (default 5)")
    p.add_argument("--e2e-seeds", type=int, default=1,
                   help="reference_e2e: seeds each side is trained with; kNN is then compared as mean ± std (default 1)")
    p.add_argument("--ray-rounds", type=int, default=1,
                   help="ray: pairs of in-process steps alone, then the Ray Train worker on a fresh private cluster, "
                        "the first being the section's own; the ratio's median over them (default 1)")
    p.add_argument("--daemon-rounds", type=int, default=3,
                   help="daemons: rounds, each running every variant once; figures are medians over them (default 3)")
    p.add_argument("--memory-sizes", default="10000,100000",
                   help="memory part: image counts of the synthetic folders, comma list (default 10000,100000)")
    p.add_argument("--memory-classes", type=int, default=100, help="memory part: classes of the folders (default 100)")
    p.add_argument("--memory-stages", default=None,
                   help="memory part: comma list of stages to measure (default all: shard,pretrain,finetune,select,"
                        "inspect,predict; shard and pretrain are always needed, predict needs finetune)")
    p.add_argument("--memory-dir", default=None,
                   help="memory part: keep its folders, shards, runs and logs here (default: a temp dir, removed)")
    p.add_argument("--note", default=None,
                   help="a line on the machine and its load, kept in bench.json's meta and the README block")
    p.add_argument("--out", default="bench.json", help="where to write the figures (default ./bench.json)")


def bench_main(args: argparse.Namespace) -> int:
    """`selfsup bench`: check the options, run the sections, print the table and write bench.json."""
    import torch

    from bench.report import table, write_json
    from bench.run import BENCH_DEFAULTS, PARTS
    from runtime.config import load_config

    load_start = [round(x, 2) for x in os.getloadavg()]
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise UserError(f"--parts {args.parts!r}: unknown part(s) {', '.join(unknown) or '(none given)'}; "
                        f"choose from {','.join(PARTS)}")
    for name in ("batch", "repeats", "threads", "images", "loader_batches", "decode_images", "loader_threads", "e2e_epochs",
                 "e2e_seeds", "daemon_rounds", "ray_rounds"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    try:
        loader_workers = [int(w) for w in args.loader_workers.split(",") if w.strip()]
    except ValueError:
        loader_workers = [-1]
    if not loader_workers or min(loader_workers) < 0:
        raise UserError(f"--loader-workers must be a comma list of counts >= 0, got {args.loader_workers!r}")
    memory_sizes = _memory_sizes(args) if "memory" in parts else []
    overrides = ([] if args.config else list(BENCH_DEFAULTS)) + list(args.overrides)
    if args.backbone:
        overrides.append(f"model.name={args.backbone}")
    cfg = load_config(args.config, overrides)
    others = [p for p in parts if p != "memory"]
    results: dict[str, Any] = {"meta": {"parts": parts, "cpu_count": os.cpu_count(), "torch": torch.__version__,
                                        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}}
    if others:
        results = _run_parts(args, cfg, others, loader_workers)
        results["meta"]["parts"] = parts
    if memory_sizes:
        from bench.memory import BUDGET, MODEL, bench_memory

        t0 = time.perf_counter()
        mem_overrides = ([] if args.config else list(BENCH_DEFAULTS) + MODEL) + BUDGET + list(args.overrides)
        if args.backbone:
            mem_overrides.append(f"model.name={args.backbone}")
        mem_cfg = load_config(args.config, mem_overrides + [f"data.image_size={args.image_size or 32}"])
        results["memory"] = bench_memory(mem_cfg, memory_sizes, classes=args.memory_classes,
                                         image_size=args.image_size or 32, work_dir=args.memory_dir,
                                         log=lambda s: print(s, flush=True),
                                         **({"stages": [x.strip() for x in args.memory_stages.split(",") if x.strip()]}
                                            if args.memory_stages else {}))
        results["meta"]["wall_s"] = results["meta"].get("wall_s", 0) + time.perf_counter() - t0
    results["meta"]["load_average"] = [round(x, 2) for x in os.getloadavg()]  # 1, 5, 15 min: how busy it was
    results["meta"]["load_average_start"] = load_start
    if args.note:
        results["meta"]["note"] = args.note
    out = write_json(results, args.out)
    print(table(results))
    print(f"wrote {out}")
    return 0


def _memory_sizes(args: Any) -> list[int]:
    try:
        sizes = sorted({int(s) for s in str(args.memory_sizes).split(",") if s.strip()})
    except ValueError:
        sizes = []
    if not sizes or args.memory_classes < 1 or min(sizes) < 2 * args.memory_classes:
        raise UserError(f"--memory-sizes must be a comma list of image counts, each at least 2 x --memory-classes "
                        f"({2 * max(1, args.memory_classes)}), got {args.memory_sizes!r}")
    return sizes


def _run_parts(args: Any, cfg: Any, parts: list[str], loader_workers: list[int]) -> dict:
    """The sections other than memory, on the given or generated shards."""
    import shutil
    import tempfile

    from bench.run import Bench, make_bench_shards, pick_device, run_bench
    from shards.manifest import read_manifest

    threads = args.threads or os.cpu_count() or 1
    made = None
    if args.shards:
        shards = args.shards if "://" in args.shards else str(Path(args.shards).resolve())
        manifest = read_manifest(shards)
        image_size = args.image_size or int(manifest["image_size"])
    else:
        image_size = args.image_size or cfg.data.image_size
        made = tempfile.mkdtemp(prefix="selfsup-bench-shards-")
        print(f"writing {args.images} CIFAR-like {image_size} px images as shards in {made} ...", flush=True)
        shards = make_bench_shards(made, args.images, image_size, seed=cfg.data.seed)
        manifest = read_manifest(shards)
    try:
        b = Bench(cfg=cfg, shards=shards, manifest=manifest, image_size=image_size, batch=args.batch,
                  repeats=args.repeats, threads=threads, device=pick_device(), loader_workers=loader_workers,
                  loader_batches=args.loader_batches, decode_images=args.decode_images,
                  loader_threads=args.loader_threads, e2e_epochs=args.e2e_epochs,
                  e2e_seeds=args.e2e_seeds, daemon_rounds=args.daemon_rounds, ray_rounds=args.ray_rounds)
        results = run_bench(b, parts, log=lambda s: print(s, flush=True))
    finally:
        if made:
            shutil.rmtree(made, ignore_errors=True)
    return results
