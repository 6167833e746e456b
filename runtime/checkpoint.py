"""Training-state checkpoints: safe to load, atomic to write, refused when they do not fit the model.

A checkpoint is a directory:
  model.safetensors   the SimCLR model's state dict (backbone + head)
  train_state.pt      optimiser state and RNG states, loaded with `torch.load(weights_only=True)`
  checkpoint.json     scalars (epoch, step, data position, architecture, file sizes); written last,
                      so a directory without it (or with sizes that disagree) is an interrupted write.
Nothing here unpickles arbitrary objects. Directories are named `checkpoint_epoch_NNNNNN` so that
Ray mode (`ray.train.report(checkpoint_dir_name=...)`) and local mode lay out storage the same way.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from runtime.config import umask_mode
from runtime.errors import UserError

MODEL_FILE = "model.safetensors"
STATE_FILE = "train_state.pt"
META_FILE = "checkpoint.json"
PREFIX = "checkpoint_epoch_"


def checkpoint_dir_name(epoch: int) -> str:
    return f"{PREFIX}{epoch:06d}"


def rng_state() -> dict[str, Any]:
    """Every RNG the loop draws from, in a form `torch.load(weights_only=True)` accepts."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    set_cuda_rng_states(state.get("cuda"))


def set_cuda_rng_states(saved: list[torch.Tensor] | None) -> int:
    """Restore the saved per-GPU generator states onto the GPUs this process sees, as many as both have.

    A checkpoint holds one state per GPU visible on rank 0's node when it was written; the resuming process may
    see fewer (`--resume` on one GPU after a 4-GPU run), more, or none. `torch.cuda.set_rng_state_all` raises
    then; this restores the common prefix and leaves the rest as seeded (the loop reseeds every epoch anyway).
    Returns how many states were restored."""
    if not saved or not torch.cuda.is_available():
        return 0
    n = min(len(saved), torch.cuda.device_count())
    for i in range(n):
        torch.cuda.set_rng_state(saved[i], device=i)
    return n


def save_checkpoint(directory: str | os.PathLike, *, model_state: dict[str, torch.Tensor],
                    optimizer_state: dict[str, Any], meta: dict[str, Any],
                    rng: dict[str, Any] | None = None, extra_files: dict[str, str] | None = None) -> Path:
    """Write a checkpoint into `directory` (created; must not hold another checkpoint).

    `meta` holds JSON scalars: epoch, step, data position, `arch` (see `check_arch`). `extra_files`
    ({name: text}, e.g. the run's metrics.jsonl) and any files already placed in `directory` (the exported
    encoder) travel with it: their sizes are recorded too, so a half-copied one marks the checkpoint incomplete.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    for name, text in (extra_files or {}).items():
        (d / name).write_text(text)
    # safetensors refuses shared or non-contiguous storage; a detached contiguous copy is always safe
    save_file({k: v.detach().contiguous().cpu() for k, v in model_state.items()}, str(d / MODEL_FILE))
    os.chmod(d / MODEL_FILE, umask_mode())  # safetensors creates 0600 files: the user's umask instead
    torch.save({"optimizer": optimizer_state, "rng": rng if rng is not None else rng_state()}, d / STATE_FILE)
    sizes = {str(p.relative_to(d)): p.stat().st_size for p in sorted(d.rglob("*"))
             if p.is_file() and p.name != META_FILE and not p.name.startswith(".")}
    text = json.dumps({**meta, "files": sizes}, indent=1, sort_keys=True)
    tmp = d / f".{META_FILE}.tmp"
    tmp.write_text(text)
    os.replace(tmp, d / META_FILE)  # last: its presence marks the directory complete
    return d


def save_checkpoint_atomic(final_dir: str | os.PathLike, **kwargs: Any) -> Path:
    """Write to a temporary sibling directory, then rename into place (local filesystems)."""
    final = Path(final_dir)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    os.chmod(tmp, umask_mode(directory=True))  # it becomes the checkpoint dir: not mkdtemp's 0700
    try:
        save_checkpoint(tmp, **kwargs)
        if final.exists():  # a stale or partial directory of the same epoch: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def read_meta(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The checkpoint's scalars, or None if the directory is not a complete checkpoint."""
    d = Path(directory)
    try:
        meta = json.loads((d / META_FILE).read_text())
        for name, size in meta.get("files", {}).items():
            if (d / name).stat().st_size != size:
                return None
        return meta
    except (OSError, ValueError):
        return None


def load_checkpoint(directory: str | os.PathLike, arch: dict[str, Any] | None = None,
                    map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint: {"meta", "model", "optimizer", "rng"}; refuses another architecture."""
    d = Path(directory)
    meta = read_meta(d)
    if meta is None:
        raise UserError(f"checkpoint at {d} is incomplete or missing: resume from an earlier one or start anew")
    if arch is not None:
        check_arch(meta.get("arch", {}), arch, d)
    model = load_file(str(d / MODEL_FILE), device=str(map_location))
    state = torch.load(d / STATE_FILE, map_location=map_location, weights_only=True)
    return {"meta": meta, "model": model, "optimizer": state["optimizer"], "rng": state["rng"]}


def check_arch(saved: dict[str, Any], wanted: dict[str, Any], where: Path | str) -> None:
    """Refuse a checkpoint whose model or image size differ from the run's config."""
    diffs = [f"{k}={saved.get(k)!r} (config: {wanted[k]!r})" for k in wanted if saved.get(k) != wanted[k]]
    if diffs:
        raise UserError(
            f"checkpoint at {where} does not match this run: {', '.join(diffs)}; "
            "use the config it was trained with or another output_dir"
        )


def find_latest(run_path: str | os.PathLike) -> str | None:
    """The complete checkpoint with the highest epoch under a run's storage dir (local or URI), or None."""
    run_path = str(run_path)
    if "://" in run_path:
        return _find_latest_uri(run_path)
    root = Path(run_path)
    if not root.is_dir():
        return None
    candidates = sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)), reverse=True)
    for p in candidates:
        if read_meta(p) is not None:
            return str(p)
    return None


def _find_latest_uri(uri: str) -> str | None:
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    names = sorted((i.base_name for i in infos if i.type == pafs.FileType.Directory
                    and i.base_name.startswith(PREFIX)), reverse=True)
    for name in names:
        info = fs.get_file_info(f"{path}/{name}/{META_FILE}")
        if info.type == pafs.FileType.File:
            return f"{uri.rstrip('/')}/{name}"
    return None


def epoch_of(path: str | os.PathLike | None) -> int:
    """Epoch encoded in a checkpoint directory's name (-1 for None or a foreign name)."""
    if path is None:
        return -1
    name = str(path).rstrip("/").rsplit("/", 1)[-1]
    try:
        return int(name[len(PREFIX):]) if name.startswith(PREFIX) else -1
    except ValueError:
        return -1
