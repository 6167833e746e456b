"""`selfsup pretrain`: `add_pretrain_args(parser)` and `pretrain_main(args)`; `selfsup` (cluster/cli.py) and
`python -m pretrain` both build their parsers from these, so the options are defined once.
"""

from __future__ import annotations

import argparse
import contextlib
import os

from runtime.args import add_config_args, load_args_config
from runtime.errors import UserError, disk_full_message, is_disk_full
from runtime.runlock import hold, lock_scope

# --------------------------------------------------------------- pretrain


def add_pretrain_args(p: argparse.ArgumentParser) -> None:
    add_config_args(p, ["selfsup pretrain --local pretrain.epochs=5 trainer.num_workers=0",
                        "selfsup pretrain --config configs/cifar10.yaml pretrain.global_batch_size=256",
                        "selfsup pretrain --resume runs/digits pretrain.epochs=40   # continue a run to 40 epochs"])
    p.add_argument("--local", action="store_true", help="run the loop in this process, without Ray")
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue a finished or stopped run")


@lock_scope
def pretrain_main(args: argparse.Namespace) -> int:
    """Train SimCLR (Ray Train, or in-process with --local); `--resume RUN_DIR` continues a run."""
    from pathlib import Path

    from runtime.config import load_config, save_config
    from shards.manifest import read_manifest

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
    from pretrain.loop import arch_of, per_rank_batch, publish_outputs, train_loop
    from runtime import checkpoint as ckpt
    from runtime.launch import check_reachable, run_path, run_training

    local = args.local or cfg.trainer.num_workers == 0
    per_rank_batch(cfg.pretrain.global_batch_size, 1 if local else cfg.trainer.num_workers, manifest, cfg.data.shards)
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

    from runtime.console import Progress, epoch_fields

    # one display for the stage, on the driver, following the epochs the workers report
    progress = Progress("pretrain", cfg.pretrain.epochs, unit="epochs",
                        start=int(ckpt.read_meta(latest)["epoch"]) if args.resume and latest else 0)

    def on_report(metrics: dict) -> None:
        if isinstance(metrics.get("epoch"), int):
            progress.update(metrics["epoch"], epoch_fields(metrics))

    try:
        result = run_training(train_loop, {"cfg": cfg}, cfg, local=local, name=cfg.name,
                              resume_from=latest if args.resume else None, on_report=on_report)
    except UserError:
        with contextlib.suppress(Exception):  # what the checkpointed epochs recorded, even when the run failed
            publish_outputs(None, cfg, local)
        raise
    except Exception as e:  # a full disk: one line naming where and how much (the finished encoder is kept)
        if not is_disk_full(e):
            raise
        need = _dir_size(latest) if latest and "://" not in str(latest) else None
        raise UserError(disk_full_message(run_path(cfg, cfg.name), need, "for one checkpoint")) from None
    finally:
        progress.close()
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
