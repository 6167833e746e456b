"""The frozen encoder's features of a split, computed where the trained methods run: for `knn` and `linear`,
for choosing which images to label (`selfsup select`, `finetune.selection`) and for the data report (`selfsup
inspect`, with `mirror`).

The frozen methods need one forward pass over the whole test split, and over every train image a subset (or
`linear` on all labels) names. At 100k+ images that pass is hours on a driver's CPU while the cluster's GPUs
wait. So when the trained methods go to the cluster (`finetune.parallel` resolved to `tasks` or `train`), the
split's shards are cut into contiguous runs, one Ray task each on `trainer.resources_per_worker` (a GPU with
`trainer.use_gpu`), as many at once as the cluster has room for; each task streams its shards and sends back
only float32 features. Concatenated in part order they are the features one pass in shard order gives, so the
rows line up with `test_index` (`finetune.placement` says where the trained methods run). In the `local` mode
the same function runs in this process, on the GPU with `trainer.use_gpu` when there is one.

Each part runs in the formats fine-tuning trains in on its device (`finetune.precision`,
`finetune.channels_last`, resolved by `pretrain.precision.resolve_for_model`: bf16 autocast + channels_last on
GPUs and native-bf16 CPUs); the features leave the task in float32.
"""

from __future__ import annotations

import copy
import sys
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch

from pretrain.augment import normalize
from pretrain.knn import stream_features
from pretrain.precision import resolve_for_model
from runtime.launch import init_ray, map_tasks, task_slots, task_threads
from shards.manifest import read_manifest
from shards.splits import iter_split, split_shards

BATCH = 256  # images per forward pass


def encode_part(backbone: torch.nn.Module, shards: str, split: str, keys: Sequence[str] | None, image_size: int,
                mean, std, part: tuple[int, int] | None, precision: str, channels_last: bool | None,
                device: str, threads: int = 0, mirror: bool = False,
                ) -> tuple[torch.Tensor, torch.Tensor, list[str], dict[str, Any]]:
    """`(features float32 [N, D] on CPU, labels [N], keys, formats)` of one part of the split (all of it when
    `part` is None), streamed in shard order; `formats` says where and how it ran. With `mirror`, each feature
    is the mean of the image's and its left-right mirror's (a mirrored copy then has the same features)."""
    if threads:
        torch.set_num_threads(threads)
    in_chans = int(read_manifest(shards)["channels"])
    bf16, cl = resolve_for_model(precision, channels_last, backbone, in_chans, image_size, device)
    fmt = torch.channels_last if cl else torch.preserve_format
    model = backbone.to(device, memory_format=fmt)
    if mirror:
        model = Mirrored(model)

    def prepare(u: torch.Tensor) -> torch.Tensor:
        return normalize(u, mean, std).contiguous(memory_format=fmt)

    skips: Counter[str] = Counter()
    batches = iter_split(shards, split, keys=keys, image_size=image_size, batch_size=BATCH, part=part, skips=skips)
    with torch.no_grad(), torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16,
                                         enabled=bf16, cache_enabled=False):
        feats, labels, names = stream_features(model, batches, prepare, device)
    return feats, labels, names, {"device": torch.device(device).type, "precision": "bf16" if bf16 else "fp32",
                                  "channels_last": bool(cl), "skipped": dict(skips)}


class Mirrored(torch.nn.Module):
    """The mean of a network's float32 features of an image and of its left-right mirror image."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.net(x).float() + self.net(torch.flip(x, dims=[3])).float()) / 2


def encode_split(backbone: torch.nn.Module, cfg: Any, split: str, keys: Sequence[str] | None, image_size: int,
                 mean, std, on_cluster: bool, mirror: bool = False,
                 ) -> tuple[torch.Tensor, torch.Tensor, list[str], dict[str, Any]]:
    """The split's (or its `keys`') features in shard order: `(features, labels, keys, formats)`, where
    `formats` also gives `parts` (Ray tasks; 0 when encoded in this process). On the cluster, call it inside
    `runtime.launch.one_cluster()`: it starts or joins the cluster, which the trained methods then use."""
    ft = cfg.finetune
    shards = cfg.data.shards
    wanted = None if keys is None else sorted(keys)
    if not on_cluster:
        device = "cuda" if cfg.trainer.use_gpu and torch.cuda.is_available() else "cpu"
        # a copy: encode_part moves the model to the device and memory format, the trained methods need it as is
        out = encode_part(copy.deepcopy(backbone), shards, split, wanted, image_size, mean, std, None,
                          ft.precision, ft.channels_last, device, mirror=mirror)
        out[3].pop("skipped")  # the reader warned here as it skipped
        return *out[:3], {**out[3], "parts": 0}
    import ray

    init_ray(cfg)
    n = max(1, min(len(split_shards(shards, read_manifest(shards), (split,))), task_slots(cfg)))
    model, names = ray.put(backbone), ray.put(wanted)  # stored once, each task moves its own deserialised copy
    calls = [(model, shards, split, names, image_size, mean, std, (i, n), ft.precision, ft.channels_last,
              "cuda" if cfg.trainer.use_gpu else "cpu", task_threads(cfg.trainer), mirror) for i in range(n)]
    outs = map_tasks(encode_part, calls, cfg, f"{cfg.name}-encode-{split}")
    feats = [o[0] for o in outs if len(o[2])]
    labels = [o[1] for o in outs if len(o[2])]
    names = [k for o in outs for k in o[2]]
    skipped = sum((Counter(o[3].pop("skipped")) for o in outs), Counter())
    if skipped:  # the tasks' own warnings stay in their logs: say it here
        print(f"warning: the {split} split's encode on the cluster skipped {sum(skipped.values())} unreadable "
              f"samples ({', '.join(f'{r}: {c}' for r, c in sorted(skipped.items()))}): re-run `selfsup shard`",
              file=sys.stderr, flush=True)
    formats = {**outs[0][3], "parts": n}
    if not names:
        return torch.empty(0), torch.empty(0, dtype=torch.int64), [], formats
    return torch.cat(feats), torch.cat(labels), names, formats
