"""Command-line glue for the bottom-layer stages: `shard`, `pretrain`, `bench`.

Each stage has `add_*_args(parser)` and `*_main(args)`; `selfsup` (cluster/cli.py) and
`python -m pretrain` both build their parsers from these, so the options are defined once.
"""

from __future__ import annotations

import argparse
import contextlib
import os

from pretrain.errors import UserError, disk_full_message, is_disk_full
from pretrain.runlock import hold, lock_scope


def add_config_args(p: argparse.ArgumentParser) -> None:
    """`--config FILE` and trailing `key.sub=value` overrides, shared by every config-driven stage."""
    p.add_argument("--config", default=None, help="YAML config (default: built-in digits defaults)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")


def load_args_config(args: argparse.Namespace):
    from pretrain.config import load_config

    return load_config(args.config, args.overrides)


# ------------------------------------------------------------------ shard


def add_shard_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="digits | cifar10 | cifar100 | stl10 | folder")
    p.add_argument("--out", required=True, help="output directory for shards and manifest.json")
    p.add_argument("--input", default=None, help="raw data directory (all sources but digits)")
    p.add_argument("--shard-size", type=int, default=512, help="samples per shard (default 512)")
    p.add_argument("--image-size", type=int, default=None,
                   help="resize so the shorter side is this many px (default: digits 16, others as given)")
    p.add_argument("--labeled-fractions", default="0.01,0.1",
                   help="labeled subsets to store, comma-separated, each in (0, 1] (default 0.01,0.1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the labeled subsets (default 0)")
    p.add_argument("--test-fraction", type=float, default=0.2,
                   help="folder DIR/<class>/*: share of each class held out as test (default 0.2)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="processes writing shards in parallel (default: min(4, cores))")


def shard_main(args: argparse.Namespace) -> int:
    from pretrain.shards import write_shards

    m = write_shards(args.source, args.out, input_dir=args.input, shard_size=args.shard_size,
                     image_size=args.image_size, labeled_fractions=args.labeled_fractions, seed=args.seed,
                     test_fraction=args.test_fraction, workers=args.workers)
    splits = ", ".join(f"{s['count']} {name}" for name, s in m["splits"].items() if s["count"])
    shards = sum(len(s["shards"]) for s in m["splits"].values())
    print(f"{m['source']}: {splits} images in {shards} shards at {args.out} "
          f"({m['image_size']} px, {m.get('skipped', 0)} skipped)")
    return 0


# --------------------------------------------------------------- pretrain


def add_pretrain_args(p: argparse.ArgumentParser) -> None:
    add_config_args(p)
    p.add_argument("--local", action="store_true", help="run the loop in this process, without Ray")
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue a finished or stopped run")


@lock_scope
def pretrain_main(args: argparse.Namespace) -> int:
    """Train SimCLR (Ray Train, or in-process with --local); `--resume RUN_DIR` continues a run."""
    from pathlib import Path

    from pretrain.config import load_config, save_config
    from pretrain.shards import read_manifest

    if args.resume:
        run_dir = Path(args.resume)
        if not run_dir.is_dir():
            raise UserError(f"--resume {run_dir}: no such run directory; pass the output_dir of an earlier run")
        base = args.config or run_dir / "config.yaml"
        if not Path(base).is_file():
            raise UserError(f"--resume {run_dir}: it has no config.yaml; pass --config with the run's config")
        cfg = load_config(base, [*args.overrides, f"output_dir={run_dir}"])
    else:
        cfg = load_args_config(args)
    # absolute paths: Ray workers run in their own working directories
    out = Path(cfg.output_dir).resolve()
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir {out} is a file: choose a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output_dir {out}: {e.strerror}; choose a writable directory") from None
    if not os.access(out, os.W_OK):
        raise UserError(f"output_dir {out} is not writable: choose a writable directory")
    hold(out, "selfsup pretrain")  # one run per output_dir: a second one refuses here, before writing anything
    cfg.output_dir = str(out)
    if "://" not in cfg.data.shards:
        cfg.data.shards = str(Path(cfg.data.shards).resolve())

    manifest = read_manifest(cfg.data.shards)
    # torch, Ray and lightly load only once the config and the shards are known to be good
    from pretrain import checkpoint as ckpt
    from pretrain.launch import check_reachable, run_path, run_training
    from pretrain.loop import arch_of, per_rank_batch, publish_outputs, train_loop

    local = args.local or cfg.trainer.num_workers == 0
    per_rank_batch(cfg.pretrain.batch_size, 1 if local else cfg.trainer.num_workers, manifest, cfg.data.shards)
    latest = ckpt.find_latest(run_path(cfg, cfg.name))
    if latest and not args.resume:
        raise UserError(f"{out} already holds a run (latest checkpoint {latest}): add --resume {out} to "
                        "continue it, or choose another output_dir")
    if args.resume:
        if latest is None:
            raise UserError(f"--resume {out}: no complete checkpoint under {run_path(cfg, cfg.name)}; "
                            "run without --resume to start anew")
        meta = ckpt.read_meta(latest)
        ckpt.check_arch(meta.get("arch", {}), arch_of(cfg, manifest), latest)
        if meta["epoch"] > cfg.pretrain.epochs:
            raise UserError(f"--resume {out}: its checkpoint is at epoch {meta['epoch']} but pretrain.epochs="
                            f"{cfg.pretrain.epochs}: set pretrain.epochs to {meta['epoch']} or more")
    address = cfg.trainer.address or os.environ.get("RAY_ADDRESS")
    if address and not local:
        check_reachable(address)  # before anything is written: a typo in the address changes no file
    save_config(cfg, out / "config.yaml")

    try:
        result = run_training(train_loop, {"cfg": cfg}, cfg, local=local, name=cfg.name,
                              resume_from=latest if args.resume else None)
    except UserError:
        with contextlib.suppress(Exception):  # what the checkpointed epochs recorded, even when the run failed
            publish_outputs(None, cfg, local)
        raise
    except Exception as e:  # a full disk: one line naming where and how much (the finished encoder is kept)
        if not is_disk_full(e):
            raise
        need = _dir_size(latest) if latest and "://" not in str(latest) else None
        raise UserError(disk_full_message(run_path(cfg, cfg.name), need, "for one checkpoint")) from None
    # rank 0 may have run on another node: its outputs reach output_dir here, through the checkpoint
    publish_outputs(result, cfg, local)
    if not result or result.get("status") != "ok":
        raise UserError((result or {}).get("message", "pretraining stopped without a result"))
    print(f"pretrained {cfg.pretrain.epochs} epochs: encoder in {out} (knn_acc={result.get('knn_acc')}, "
          f"skipped samples {result.get('skipped_samples', 0)}, non-finite steps {result.get('nonfinite_steps', 0)})")
    return 0


def _dir_size(path: str) -> int:
    from pathlib import Path

    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


# ------------------------------------------------------------------ bench


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
    from pretrain.bench import main

    return main(args)
