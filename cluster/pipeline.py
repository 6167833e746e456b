"""`selfsup pipeline`: shard -> pretrain -> finetune + report in one resumable run, then a summary.

Each stage is skipped when its last-written file exists (docs/interfaces.md, "Done markers"): a complete
`manifest.json`, `encoder.json`, `report.json`. The stage functions run in this process, on one resolved
config saved as `<output_dir>/pipeline.config.yaml`, so every stage sees the same settings and W&B group.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from finetune.report import MIN_TEST_SAMPLES_FOR_VERDICT
from runtime.config import Config, rename_deprecated, save_config, to_dict
from runtime.errors import UserError
from runtime.files import atomic_write_text
from runtime.runlock import hold, lock_scope

STAGES = ("shard", "pretrain", "finetune")
# Side stages: run after the stage named, only read its outputs, and feed no later stage (so doing one again
# redoes nothing else, and `--force` of one redoes only it). The data report: `inspect.enabled`.
SIDE_STAGES = {"inspect": "pretrain"}
# The config sections whose change makes a finished stage stale (the rest -- trainer, wandb -- only say how
# it ran, not what it computed).
PRETRAIN_KEYS = ("data.shards", "augment", "model", "optim", "pretrain")
FINETUNE_KEYS = ("finetune", "encoder")


@lock_scope
def run_pipeline(cfg: Config, force: list[str] | tuple[str, ...] = (), local: bool = False) -> dict[str, Any]:
    """Run the stages not yet done (and every stage from the first forced one on); return the summary."""
    for stage in force:
        if stage not in STAGES and stage not in SIDE_STAGES:
            raise UserError(f"--force {stage}: unknown stage (valid: {', '.join((*STAGES, *SIDE_STAGES))})")
    first_forced = min((STAGES.index(s) for s in force if s in STAGES), default=len(STAGES))
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir {out} is a file: choose a directory (output_dir=...)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output_dir {out} ({e.strerror or e}): choose a writable directory "
                        f"(output_dir=...)") from None
    hold(out, "selfsup pipeline")  # one run per output_dir: a second one refuses here, before any stage runs
    # One W&B group for both stages' runs, whatever each stage would default to.
    cfg.wandb.group = cfg.wandb.group or cfg.name
    from runtime.launch import one_cluster

    with tempfile.TemporaryDirectory(prefix="selfsup-pipeline-") as tmp:
        # The stages read the resolved config from a scratch file; the run's record is written only on success,
        # so a failed run changes nothing it did not have to.
        config_path = save_config(cfg, Path(tmp) / "pipeline.config.yaml")
        with one_cluster():  # pretraining's private Ray cluster serves fine-tuning's tasks too
            summary = _run_stages(cfg, config_path, first_forced, local,
                                  forced_side=[s for s in force if s in SIDE_STAGES])
    save_config(cfg, out / "pipeline.config.yaml")
    atomic_write_text(out / "pipeline.json", json.dumps(summary, indent=2) + "\n")  # the run's stages and their seconds, for scripts
    print(format_summary(summary), flush=True)
    return summary


def _run_stages(cfg: Config, config_path: Path, first_forced: int, local: bool,
                forced_side: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    t0 = time.monotonic()
    done: dict[str, str] = {}
    seconds: dict[str, float] = {}  # each stage that ran (side stages too), in the order they ran
    redo = False  # once a stage runs, every later stage runs too: its inputs changed
    for i, stage in enumerate(STAGES):
        if i > 0:
            for side, after in SIDE_STAGES.items():
                if after == STAGES[i - 1]:
                    _side_stage(side, cfg, config_path, local, redo or side in forced_side, done, seconds)
        is_done, stale = _status(stage, cfg)
        redo = redo or i >= first_forced or not is_done
        if not redo:
            msg = f"[pipeline] {stage}: done, skipped ({_marker(stage, cfg)})"
            if stale:
                msg += f"; NOTE its config changed since: {stale} -- rerun with `--force {stage}` to redo it"
                if stage == "pretrain" and stale.startswith("pretrain.epochs") and "," not in stale:
                    msg += (f", or continue it: `selfsup pretrain --resume {cfg.output_dir} "
                            f"pretrain.epochs={cfg.pretrain.epochs}` then `--force finetune`")
            print(msg, flush=True)
            done[stage] = "skipped"
            continue
        if is_done:
            _set_aside(stage, cfg)
        print(f"[pipeline] {stage}: running", flush=True)
        s0 = time.monotonic()
        STAGE_FUNCS[stage](cfg, config_path, local)
        if not _status(stage, cfg)[0]:
            raise UserError(f"stage {stage} finished without writing {_marker(stage, cfg)}: see its output above")
        seconds[stage] = round(time.monotonic() - s0, 1)
        done[stage] = f"ran in {seconds[stage]:.0f} s"
        print(f"[pipeline] {stage}: done in {seconds[stage]:.0f} s", flush=True)

    summary = summarize(cfg)
    summary["stages"] = done
    summary["stage_s"] = seconds
    summary["wall_s"] = round(time.monotonic() - t0, 1)
    return summary


# ---------------------------------------------------------------- the stages


def _shard(cfg: Config, config_path: Path, local: bool) -> None:
    from shards.writer import write_shards

    d = cfg.data
    if "://" in d.shards or d.shards.startswith("pipe:"):
        raise UserError(f"shards not found at {d.shards}, and the pipeline writes shards only to a local "
                        f"directory: run `selfsup shard {d.source} --out DIR`, upload DIR, or set data.shards")
    write_shards(d.source, d.shards, input_dir=d.input, shard_size=d.shard_size, image_size=d.image_size,
                 labeled_fractions=list(d.labeled_fractions), seed=d.seed, test_fraction=d.test_fraction)


def _pretrain(cfg: Config, config_path: Path, local: bool) -> None:
    from pretrain.cli import add_pretrain_args, pretrain_main

    argv = ["--config", str(config_path)]
    if local:
        argv.append("--local")
    if _interrupted_pretrain(cfg):
        # An earlier attempt left checkpoints: continue from the latest instead of starting over.
        print(f"[pipeline] pretrain: resuming the interrupted run in {cfg.output_dir}", flush=True)
        argv += ["--resume", str(cfg.output_dir)]
    _call(add_pretrain_args, pretrain_main, argv)


def _finetune(cfg: Config, config_path: Path, local: bool) -> None:
    from finetune.cli import add_finetune_args, finetune_main

    _call(add_finetune_args, finetune_main, ["--config", str(config_path)])


def _call(add_args, main, argv: list[str]) -> None:
    """Call a stage's CLI entry in this process, with its own parser filling its defaults."""
    p = argparse.ArgumentParser()
    add_args(p)
    rc = main(p.parse_args(argv))
    if rc:
        raise UserError(f"stage {main.__module__}.{main.__name__} exited with status {rc}: see its output above")


def _inspect(cfg: Config, config_path: Path, local: bool) -> None:
    from finetune.datacli import add_inspect_args, inspect_main

    _call(add_inspect_args, inspect_main, ["--config", str(config_path)])


def _side_stage(stage: str, cfg: Config, config_path: Path, local: bool, redo: bool, done: dict[str, str],
                seconds: dict[str, float]) -> None:
    """A side stage (SIDE_STAGES): off by its config key, skipped when done unless its input was redone or it
    was forced; its outcome never makes a later stage run."""
    if not getattr(cfg, stage).enabled:
        print(f"[pipeline] {stage}: off ({stage}.enabled=false)", flush=True)
        done[stage] = "off"
        return
    is_done = _status(stage, cfg)[0]
    if is_done and not redo:
        print(f"[pipeline] {stage}: done, skipped ({_marker(stage, cfg)})", flush=True)
        done[stage] = "skipped"
        return
    if is_done:
        _set_aside(stage, cfg)
    print(f"[pipeline] {stage}: running", flush=True)
    s0 = time.monotonic()
    STAGE_FUNCS[stage](cfg, config_path, local)
    seconds[stage] = round(time.monotonic() - s0, 1)
    done[stage] = f"ran in {seconds[stage]:.0f} s"
    print(f"[pipeline] {stage}: done in {seconds[stage]:.0f} s ({_marker(stage, cfg)})", flush=True)


STAGE_FUNCS = {"shard": _shard, "pretrain": _pretrain, "finetune": _finetune, "inspect": _inspect}


# ---------------------------------------------------------------- done markers


def _marker(stage: str, cfg: Config) -> str:
    if stage == "shard":
        return str(Path(cfg.data.shards) / "manifest.json") if "://" not in cfg.data.shards else cfg.data.shards
    return str(Path(cfg.output_dir) / {"pretrain": "encoder.json", "finetune": "report.json",
                                       "inspect": "data_report.json"}[stage])


def _status(stage: str, cfg: Config) -> tuple[bool, str]:
    """(done, what changed in the config since it was done: '' when nothing or unknown)."""
    if stage == "shard":
        from shards.manifest import read_manifest

        try:
            manifest = read_manifest(cfg.data.shards)
        except UserError:
            return False, ""
        return True, _shard_changes(manifest, cfg)
    out = Path(cfg.output_dir)
    if stage == "inspect":
        return (out / "data_report.json").is_file(), ""
    if stage == "pretrain":
        if not (out / "encoder.json").is_file():
            return False, ""
        return True, _changes(out / "config.yaml", cfg, PRETRAIN_KEYS)
    if not (out / "report.json").is_file():
        return False, ""
    return True, _changes(out / "finetune.config.yaml", cfg, FINETUNE_KEYS)


def _shard_changes(manifest: dict[str, Any], cfg: Config) -> str:
    d = cfg.data
    diffs = []
    if manifest.get("source") != d.source:
        diffs.append(f"data.source {manifest.get('source')} -> {d.source}")
    if d.image_size and manifest.get("image_size") != d.image_size:
        diffs.append(f"data.image_size {manifest.get('image_size')} -> {d.image_size}")
    had = sorted(float(f) for f in manifest.get("labeled_subsets", {}))
    if had != sorted(float(f) for f in d.labeled_fractions):
        diffs.append(f"data.labeled_fractions {had} -> {sorted(d.labeled_fractions)}")
    if manifest.get("seed") != d.seed:
        diffs.append(f"data.seed {manifest.get('seed')} -> {d.seed}")
    return ", ".join(diffs)


def _changes(saved_path: Path, cfg: Config, keys: tuple[str, ...]) -> str:
    """The dotted keys under `keys` whose value differs between the saved resolved config and `cfg`."""
    try:
        saved = yaml.safe_load(saved_path.read_text()) or {}
        rename_deprecated(saved, str(saved_path), note=False)  # saved by an earlier version: old key names
    except (OSError, yaml.YAMLError, UserError, AttributeError):
        return ""
    now = to_dict(cfg)
    for tree in (saved, now):  # stages record paths made absolute: compare like with like
        for key in ("shards",):
            value = (tree.get("data") or {}).get(key)
            if isinstance(value, str) and "://" not in value and not value.startswith("pipe:"):
                tree["data"][key] = str(Path(value).resolve())
        if isinstance(tree.get("encoder"), str):
            tree["encoder"] = str(Path(tree["encoder"]).resolve())
    diffs: list[str] = []
    for key in keys:
        _diff(_get(saved, key), _get(now, key), key, diffs)
    return ", ".join(diffs[:5]) + (f" (+{len(diffs) - 5} more)" if len(diffs) > 5 else "")


def _get(tree: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def _diff(old: Any, new: Any, key: str, diffs: list[str]) -> None:
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new)):
            _diff(old.get(k), new.get(k), f"{key}.{k}", diffs)
    elif old != new and not (isinstance(old, (int, float)) and isinstance(new, (int, float)) and
                             float(old) == float(new)):
        diffs.append(f"{key} {old!r} -> {new!r}")


def _interrupted_pretrain(cfg: Config) -> bool:
    """A pretraining attempt started here (its config.yaml) and left a checkpoint, but no encoder."""
    from runtime import checkpoint
    from runtime.launch import run_path

    out = Path(cfg.output_dir)
    if (out / "encoder.json").exists() or not (out / "config.yaml").is_file():
        return False
    return checkpoint.find_latest(run_path(cfg, _pretrain_run_name(cfg))) is not None


def _pretrain_run_name(cfg: Config) -> str:
    """The Ray run name pretraining uses: its checkpoints live under <storage_path>/<name>."""
    return cfg.name


def _set_aside(stage: str, cfg: Config) -> None:
    """Before redoing a finished stage, move its outputs to `<output_dir>/superseded/` (nothing is lost), so
    a redo that is interrupted is never mistaken for done, and Ray does not restore the old checkpoints."""
    out = Path(cfg.output_dir)
    if stage == "shard":
        # Renamed in place (the shards dir may be large, and may live outside output_dir).
        shards = Path(cfg.data.shards)
        dest = shards.with_name(f"{shards.name}.superseded-{time.strftime('%Y%m%d-%H%M%S')}")
        shards.rename(dest)
        print(f"[pipeline] shard: previous shards moved to {dest}", flush=True)
        return
    if stage == "pretrain":
        names = ["encoder.json", "encoder.safetensors", "head.safetensors", "metrics.jsonl", "config.yaml"]
        from runtime.launch import run_path

        ckpts = run_path(cfg, _pretrain_run_name(cfg))
    elif stage == "inspect":
        from finetune.datareport import FILE, PNGS

        names = [FILE, "data_report.md", *PNGS.values()]
        ckpts = None
    else:
        names = ["report.json", "report.md", "label_efficiency.png", "classifiers", "finetune.config.yaml"]
        ckpts = None
    dest = _superseded_dir(out, stage)
    for name in names:
        if (out / name).exists():
            shutil.move(str(out / name), str(dest / name))
    if ckpts is not None:
        _move_checkpoints(str(ckpts), dest)
    print(f"[pipeline] {stage}: previous outputs moved to {dest}", flush=True)


def _move_checkpoints(run: str, dest: Path) -> None:
    """Old checkpoints out of the way, or pretraining would (rightly) refuse to start over them."""
    if "://" not in run:
        if Path(run).exists():
            shutil.move(run, str(dest / "checkpoints"))
        return
    import pyarrow.fs as pafs  # storage_path as a URI (s3://, gs://, file://): moved within that storage

    fs, path = pafs.FileSystem.from_uri(run)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.move(path, f"{path}.superseded-{dest.name}")


def _superseded_dir(out: Path, stage: str) -> Path:
    dest = out / "superseded" / f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}"
    n = 1
    while dest.exists():
        dest = dest.with_name(f"{dest.name}-{n}")
        n += 1
    dest.mkdir(parents=True)
    return dest


# ---------------------------------------------------------------- the summary


def summarize(cfg: Config) -> dict[str, Any]:
    out = Path(cfg.output_dir)
    report = json.loads((out / "report.json").read_text())
    summary: dict[str, Any] = {
        "output_dir": str(out),
        "report": str(out / "report.md"),
        "report_json": str(out / "report.json"),
        "plot": str(out / "label_efficiency.png"),
        "encoder": str(Path(cfg.encoder_dir) / "encoder.safetensors"),
        "wandb_group": cfg.wandb.group,
        "headline": headline(report.get("results", [])),
        "skipped_samples": _skipped(cfg),
        "test_samples": report.get("test_samples"),
    }
    if report.get("embedding"):
        summary["embedding"] = str(out / report["embedding"])
    return summary


BASELINES = ("scratch", "pixels")


def headline(results: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The best pretrained-encoder method at the smallest labeled fraction, against scratch and pixels there
    (the product's claim); the best of all methods when only baselines ran."""
    if not results:
        return None
    results = [r for r in results if r.get("selection", "balanced") == "balanced"]  # not selected subsets
    if not results:
        return None
    smallest = min(r["label_fraction"] for r in results)
    at = {r["method"]: r for r in results if r["label_fraction"] == smallest}
    candidates = [r for m, r in at.items() if m not in BASELINES] or list(at.values())
    best = max(candidates, key=lambda r: r["accuracy_mean"])
    return {"fraction": smallest, "labels": best.get("labels"), "best": best,
            "baselines": {m: at[m] for m in BASELINES if m in at}}


def _skipped(cfg: Config) -> dict[str, int]:
    """Corrupt samples the run skipped: at sharding (manifest) and at reading (last metrics.jsonl line)."""
    counts: dict[str, int] = {}
    try:
        from shards.manifest import read_manifest

        skipped = read_manifest(cfg.data.shards).get("skipped", 0)
        counts["sharding"] = int(sum(skipped.values()) if isinstance(skipped, dict) else skipped or 0)
    except (UserError, TypeError, ValueError):
        pass
    metrics = Path(cfg.output_dir) / "metrics.jsonl"
    if metrics.is_file():
        lines = [ln for ln in metrics.read_text().splitlines() if ln.strip()]
        if lines:
            try:
                counts["pretraining"] = int(json.loads(lines[-1]).get("skipped_samples", 0))
            except (ValueError, TypeError):
                pass
    return counts


def _fmt(r: dict[str, Any]) -> str:
    return f"{r['method']} {r['accuracy_mean']:.3f} ± {r['accuracy_std']:.3f}"


def format_summary(s: dict[str, Any]) -> str:
    stages = ", ".join(f"{k} {v}" for k, v in s.get("stages", {}).items())
    lines = [
        f"== pipeline done in {s.get('wall_s', 0):.0f} s ({stages}) ==",
        f"report:  {s['report']}  ({s['report_json']})",
        f"plot:    {s['plot']}",
        *([f"embedding: {s['embedding']}"] if s.get("embedding") else []),
        f"encoder: {s['encoder']}",
        f"W&B group: {s['wandb_group']}",
    ]
    h = s.get("headline")
    if h:
        others = [r for m, r in h["baselines"].items() if m != h["best"]["method"]]
        base = ", ".join(_fmt(r) for r in others)
        line = f"headline at {h['fraction']:g} of the labels ({h['labels']} images): {_fmt(h['best'])}"
        if others:
            b = h["best"]
            wins = all(b["accuracy_mean"] - r["accuracy_mean"] > 2 * max(b["accuracy_std"], r["accuracy_std"])
                       for r in others)
            n_test = s.get("test_samples")
            if min([b.get("seeds", 2)] + [r.get("seeds", 2) for r in others]) < 2:  # no spread from one seed
                verdict = "one seed: no 2-std verdict"
            elif isinstance(n_test, int) and n_test < MIN_TEST_SAMPLES_FOR_VERDICT:
                verdict = f"too few test images ({n_test}) for a 2-std verdict"
            else:
                verdict = "ahead of both by more than 2 std" if wins else "not ahead of both by 2 std"
            line += f" vs {base} ({verdict})"
        lines.append(line)
    if s.get("skipped_samples"):
        lines.append("corrupt samples skipped: " + ", ".join(f"{k} {v}" for k, v in s["skipped_samples"].items()))
    return "\n".join(lines)
