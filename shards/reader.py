"""Reading shards back: decoded uint8 batches, the same number of batches on every rank.

Why equal batches: DDP's gradient all-reduce and NT-Xent's all-gather are collectives; a rank that runs out
of data one batch early leaves the others waiting forever. webdataset's `split_by_node` over shards of
uneven sizes gives exactly that, so the split across ranks is done here, by sample count:

* The split's shards are laid end to end (in an order shuffled per epoch, the same on every rank) and the
  line of N samples is cut into `world_size` equal ranges (sizes differ by at most one), each rank's range
  into `num_workers` equal ranges again. A range may start or end inside a shard: that worker reads the
  shard and keeps only its sample positions, so one shard and any number of ranks x workers works.
* `len(loader)` = the batches rank 0 (the largest part) needs: sum over its workers of ceil(part / batch).
  Every rank yields exactly that many full batches: a worker that has shown all of its samples once starts
  again on its own samples in a new order (resampling, not an equal cut), so together the ranks cover the
  whole split every epoch and a few samples are seen twice. A corrupt sample is replaced the same way.
* Mixing (training): a loader worker keeps up to `open_shards` of its pieces open and draws each next sample
  from a random one, then shuffles through the buffer, so shards holding long runs of one class (written
  class by class by another tool) still give batches of many classes.
* With `equal_batches=False, shuffle=False` (evaluation) each sample of the rank's part is yielded exactly
  once, in shard order, the last batch of each loader worker partial.

Corrupt or hostile samples never stop an epoch: each is skipped, counted per reason, and warned about
(the first few of each reason per process). Counts made in DataLoader worker processes travel back with
each batch and add up in `loader.skipped` / `loader.skip_reasons`; images that needed a fix (another
colour mode or size) are counted in `loader.fixed`. Nothing is ever extracted to disk.

Over 400 lines on purpose: one job, the equal-batches stream (planning, mixing, reading, decoding) whose parts
only make sense together; whole-split reads for evaluation and fine-tuning are in `shards.splits`.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import random
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.io import ImageReadMode, decode_image
from webdataset.filters import shuffle as wds_shuffle
from webdataset.tariterators import group_by_keys

from runtime.errors import UserError
from shards.manifest import URL_SCHEME, open_url
from shards.tarstream import iter_tar

log = logging.getLogger(__name__)

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "gif")
MIN_SIDE = 8  # shorter side below min(MIN_SIDE, image_size): nothing to crop from, skipped (1x1 images)
_WARN_FIRST = 3  # warnings per reason and process before going quiet (counts keep going)
_PNG_SIG = b"\x89PNG\r\n\x1a\n"
# shard pieces each loader worker reads at once when shuffling, each next sample drawn from a random open
# one, so that shards written class by class by another tool still give batches of many classes. A local
# shard open costs a file handle and an 8 KiB buffer; remote ones (pipe:, s3://, http) a connection each.
OPEN_SHARDS = 128
OPEN_REMOTE_SHARDS = 16


# ------------------------------------------------------------------ public


class ShardLoader:
    """Batches of `(images uint8 [B, C, S, S], labels int64 [B])` from one rank's part of some splits.

    See the module docstring for how ranks and loader workers share the data and why every rank yields
    exactly `len(loader)` batches when `equal_batches` (training). `set_epoch` reseeds the shard order and
    the sample shuffle buffer: the same seed and epoch give the same batches. `keys` restricts the loader
    to those sample keys (the shards are scanned once to count them).
    """

    def __init__(
        self,
        shards_dir: str,
        splits: Sequence[str] | str = ("train", "unlabeled"),
        batch_size: int = 256,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        num_workers: int = 0,
        image_size: int | None = None,
        keys: Iterable[str] | None = None,
        equal_batches: bool = True,
        shuffle_buffer: int = 1000,
        open_shards: int = OPEN_SHARDS,
    ):
        if batch_size <= 0:
            raise UserError(f"batch size per rank must be positive, got {batch_size}: raise pretrain.global_batch_size")
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is outside world size {world_size}")
        if num_workers < 0:
            raise UserError(f"data.loader_workers must be zero or positive, got {num_workers}")
        if open_shards < 1:
            raise UserError(f"open_shards must be at least 1, got {open_shards}")
        self.manifest = read_manifest(shards_dir)
        splits = (splits,) if isinstance(splits, str) else tuple(splits)
        shards = split_shards(shards_dir, self.manifest, splits)
        keyset = frozenset(keys) if keys is not None else None
        if keyset is not None:
            shards = [_Shard(s.url, s.split, _count_keys(s.url, keyset)) for s in shards]
            shards = [s for s in shards if s.count]
        total = sum(s.count for s in shards)
        if total == 0:
            what = f"{len(keyset)} requested keys in " if keyset is not None else ""
            raise UserError(
                f"no samples in {what}split {'+'.join(splits)} of {shards_dir}: "
                f"re-run `selfsup shard` or choose another split"
            )
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.num_workers = num_workers
        self.equal_batches = equal_batches
        self.epoch = 0
        self.skip_reasons: Counter[str] = Counter()
        self.fixed: Counter[str] = Counter()
        self._epoch_value = multiprocessing.get_context().Value("q", 0)  # read by persistent workers
        self._dataset = _ShardStream(
            shards=shards,
            total=total,
            batch_size=batch_size,
            rank=rank,
            world_size=world_size,
            workers=max(1, num_workers),
            seed=seed,
            shuffle=shuffle,
            equal_batches=equal_batches,
            shuffle_buffer=shuffle_buffer,
            channels=int(self.manifest["channels"]),
            image_size=int(image_size or self.manifest["image_size"]),
            nominal_size=int(self.manifest["image_size"]),
            num_classes=len(self.manifest["classes"]),
            keys=keyset,
            epoch_value=self._epoch_value,
            open_shards=open_shards,
        )
        self._loader = None
        if num_workers > 0:
            # batch_size=None: workers batch themselves (one IPC message per batch, not per image)
            self._loader = DataLoader(
                self._dataset, batch_size=None, num_workers=num_workers, persistent_workers=True, prefetch_factor=4,
                pin_memory=torch.cuda.is_available(),  # page-locked batches copy to the GPU asynchronously
            )

    @property
    def image_size(self) -> int:
        return self._dataset.image_size

    @property
    def skipped(self) -> int:
        return sum(self.skip_reasons.values())

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self._epoch_value.value = self.epoch

    def __len__(self) -> int:
        return self._dataset.num_batches()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._epoch_value.value = self.epoch
        source = iter(self._loader) if self._loader is not None else self._dataset.iterate(0)
        try:
            for images, labels, skips, fixes in source:
                self.skip_reasons.update(skips)
                self.fixed.update(fixes)
                if len(images):  # an empty batch only carries a worker's last counts
                    yield images, labels
        except UserError as e:
            # from a loader worker it arrives wrapped with the worker's traceback: keep the one line
            last = str(e).strip().splitlines()[-1]
            raise UserError(last.split("UserError: ", 1)[-1]) from None


def read_manifest(shards_dir: str) -> dict[str, Any]:
    from shards.manifest import read_manifest as read  # the one validating reader; lazy: shards is heavier

    return read(shards_dir)


def resolve_shard(shards_dir: str, entry: str) -> str:
    """A manifest shard entry as a URL webdataset opens: full URLs (`pipe:...`, `s3://...`) as they are,
    relative paths joined to the manifest's dir (refusing paths that leave it)."""
    if URL_SCHEME.match(entry) and not re.match(r"^[a-zA-Z]:[\\/]", entry):  # but not C:\ drive paths
        return entry
    from shards.manifest import shard_url

    return shard_url(shards_dir, entry)


def split_shards(shards_dir: str, manifest: dict, splits: Sequence[str]) -> list[_Shard]:
    """The shards of `splits` with their sample counts; absent splits (no `unlabeled`) contribute none."""
    shards = []
    for split in splits:
        info = manifest["splits"].get(split)
        if info is None:
            continue
        entries, counts = info.get("shards", []), info.get("shard_counts", [])
        if len(entries) != len(counts):
            raise UserError(
                f"manifest of {shards_dir}: split {split} lists {len(entries)} shards but {len(counts)} "
                f"shard_counts: re-run `selfsup shard`"
            )
        shards += [_Shard(resolve_shard(shards_dir, e), split, int(c)) for e, c in zip(entries, counts) if c]
    return shards


# ------------------------------------------------------------------ planning


@dataclass(frozen=True)
class _Shard:
    url: str
    split: str
    count: int


@dataclass(frozen=True)
class _Piece:
    """Sample positions [start, stop) of one shard (positions count samples, corrupt ones included)."""

    shard: _Shard
    start: int
    stop: int


def part_sizes(total: int, parts: int) -> list[int]:
    """`total` cut into `parts` sizes differing by at most one, the larger first."""
    return [total // parts + (i < total % parts) for i in range(parts)]


def _cut(line: list[_Shard], start: int, stop: int) -> list[_Piece]:
    """The pieces of shards laid end to end (`line`) that cover positions [start, stop)."""
    pieces, offset = [], 0
    for shard in line:
        lo, hi = max(start, offset), min(stop, offset + shard.count)
        if lo < hi:
            pieces.append(_Piece(shard, lo - offset, hi - offset))
        offset += shard.count
    return pieces


def _quotas(sizes: list[int], batch: int, total_batches: int) -> list[int]:
    """Batches per worker: enough to show each of its samples once, plus the extra batches the rank
    needs to reach `total_batches`, spread over the workers that have samples to resample."""
    quotas = [math.ceil(n / batch) for n in sizes]
    able = [w for w, n in enumerate(sizes) if n]
    for i in range(total_batches - sum(quotas)):
        quotas[able[i % len(able)]] += 1
    return quotas


# ------------------------------------------------------------------ the stream


class _ShardStream(IterableDataset):
    """One rank's batches; `iterate(worker)` is one loader worker's share (all of it when no workers)."""

    def __init__(self, *, shards, total, batch_size, rank, world_size, workers, seed, shuffle, equal_batches,
                 shuffle_buffer, channels, image_size, nominal_size, num_classes, keys, epoch_value,
                 open_shards=OPEN_SHARDS):
        self.shards, self.total = shards, total
        self.batch_size, self.rank, self.world_size, self.workers = batch_size, rank, world_size, workers
        self.seed, self.shuffle, self.equal_batches, self.shuffle_buffer = seed, shuffle, equal_batches, shuffle_buffer
        self.channels, self.image_size, self.nominal_size = channels, image_size, nominal_size
        self.num_classes, self.keys, self.epoch_value = num_classes, keys, epoch_value
        self.open_shards = open_shards

    def _worker_sizes(self, rank: int) -> list[int]:
        return part_sizes(part_sizes(self.total, self.world_size)[rank], self.workers)

    def num_batches(self) -> int:
        if self.equal_batches:  # rank 0 holds the largest part
            return sum(math.ceil(n / self.batch_size) for n in self._worker_sizes(0))
        return sum(math.ceil(n / self.batch_size) for n in self._worker_sizes(self.rank))

    def plan(self, epoch: int, worker: int) -> tuple[list[_Piece], int]:
        """This worker's pieces and its quota of batches for `epoch` (quota -1: one pass, no padding)."""
        line = list(self.shards)
        if self.shuffle:  # the same order on every rank: the cut below must agree between ranks
            random.Random(f"{self.seed}-{epoch}-shards").shuffle(line)
        rank = self.rank
        if self.equal_batches and not part_sizes(self.total, self.world_size)[rank]:
            rank = 0  # fewer samples than ranks: resample rank 0's part rather than yield nothing
        starts = [0]
        for n in part_sizes(self.total, self.world_size):
            starts.append(starts[-1] + n)
        sizes = self._worker_sizes(rank)
        lo = starts[rank] + sum(sizes[:worker])
        pieces = _cut(line, lo, lo + sizes[worker])
        quota = _quotas(sizes, self.batch_size, self.num_batches())[worker] if self.equal_batches else -1
        return pieces, quota

    def __iter__(self):
        info = get_worker_info()
        return self.iterate(info.id if info is not None else 0)

    def iterate(self, worker: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict, dict]]:
        epoch = int(self.epoch_value.value)
        pieces, quota = self.plan(epoch, worker)
        everything = [_Piece(shard, 0, shard.count) for shard in self.shards]
        decoder = _Decoder(self.channels, self.image_size, self.nominal_size, self.num_classes)
        reported_skips, reported_fixes = Counter(), Counter()

        def deltas():
            s, f = decoder.skips - reported_skips, decoder.fixes - reported_fixes
            reported_skips.update(s)
            reported_fixes.update(f)
            return dict(s), dict(f)

        images, labels = [], []
        wanted = quota * self.batch_size if quota >= 0 else None
        produced, rounds = 0, 0
        while pieces and (wanted is None or produced < wanted):
            got = 0
            for sample, shard in self._pass(pieces, epoch, worker, rounds, decoder):
                out = decoder(sample, shard)
                if out is None:
                    continue
                images.append(out[0])
                labels.append(out[1])
                got += 1
                produced += 1
                if len(images) == self.batch_size:
                    yield (torch.stack(images), torch.tensor(labels, dtype=torch.int64), *deltas())
                    images, labels = [], []
                if wanted is not None and produced >= wanted:
                    break
            if wanted is None:
                break
            if not got and pieces is not everything:
                # this worker's part is all corrupt: resample from the whole split rather than stop short
                log.warning("rank %d loader worker %d: no readable sample in its part; resampling the split",
                            self.rank, worker)
                pieces = everything
                continue
            if not got:  # a full pass over the split without one readable sample: resampling would loop forever
                raise UserError(
                    f"no readable samples in {len(pieces)} shard pieces of rank {self.rank} "
                    f"({dict(decoder.skips)} skipped), e.g. {pieces[0].shard.url}: re-run `selfsup shard`"
                )
            rounds += 1
        if images:  # evaluation: the last, partial batch
            yield (torch.stack(images), torch.tensor(labels, dtype=torch.int64), *deltas())
        skips, fixes = deltas()
        if skips or fixes:
            empty = torch.empty(0, self.channels, self.image_size, self.image_size, dtype=torch.uint8)
            yield empty, torch.empty(0, dtype=torch.int64), skips, fixes

    def _pass(self, pieces: list[_Piece], epoch: int, worker: int, rounds: int, decoder: _Decoder):
        """One pass over the worker's pieces; with shuffling, a new piece order and buffer order per round,
        up to `open_shards` pieces read at once (interleaved) and then the shuffle buffer. The buffer is
        drained at the end of each pass, so a pass shows every sample before the next starts."""
        order = list(pieces)
        rng = random.Random(f"{self.seed}-{epoch}-{self.rank}-{worker}-{rounds}")
        if self.shuffle and rounds:
            rng.shuffle(order)
        if self.shuffle and self.open_shards > 1:
            remote = any(URL_SCHEME.match(p.shard.url) and not p.shard.url.startswith("file:") for p in order)
            open_max = min(self.open_shards, OPEN_REMOTE_SHARDS) if remote else self.open_shards
            stream = _interleave(order, open_max, rng, decoder.skips, self.keys)
        else:  # evaluation: shard order, one piece after the other
            stream = ((s, p.shard) for p in order for s in _samples(p.shard, decoder.skips, self.keys, p.start, p.stop))
        if self.shuffle and self.shuffle_buffer > 1:
            stream = wds_shuffle(bufsize=self.shuffle_buffer, initial=min(100, self.shuffle_buffer), rng=rng)(stream)
        return stream


def _interleave(pieces: list[_Piece], open_max: int, rng: random.Random, skips: Counter,
                keys: frozenset | None) -> Iterator[tuple[dict, _Shard]]:
    """Samples of `pieces`, `open_max` pieces open at a time (webdataset's random mixing of sources, seeded):
    each next sample comes from an open piece drawn uniformly at random; a finished piece is replaced by the
    next one in order. Every sample exactly once; the same pieces and `rng` state give the same order."""
    pending = iter(pieces)
    open_: list[tuple[Iterator, _Shard]] = []

    def refill() -> None:
        while len(open_) < open_max and (p := next(pending, None)) is not None:
            # _samples is a generator: the shard is opened at its first sample, closed at its end
            open_.append((_samples(p.shard, skips, keys, p.start, p.stop), p.shard))

    refill()
    try:
        while open_:
            i = rng.randrange(len(open_))
            sample = next(open_[i][0], None)
            if sample is None:  # done (or a truncated shard ended early: counted by _samples)
                open_[i] = open_[-1]
                open_.pop()
                refill()
                continue
            yield sample, open_[i][1]
    finally:
        for it, _ in open_:
            it.close()


# ------------------------------------------------------------------ reading and decoding


def _samples(shard: _Shard, skips: Counter, keys: frozenset | None = None, start: int = 0, stop: int | None = None):
    """Raw samples `{__key__, ext: bytes, ...}` at positions [start, stop) of one shard, via a fast tar
    parser and webdataset's grouping (streamed: nothing is extracted). A shard that cannot be opened or ends early is counted
    once and the samples before the break are kept: cut mid-member (`truncated_shard`), or a well-formed tar
    holding fewer samples than the manifest's count for it (`short_shard`: e.g. zeroed blocks, which a tar
    reader takes for its end)."""
    errors: list[Exception] = []

    def handler(exn: Exception) -> bool:
        errors.append(exn)
        return True

    position = 0
    try:
        stream = open_url(shard.url)
    except Exception as e:  # noqa: BLE001 -- any way a shard fails to open is one counted skip
        _skip(skips, "unreadable_shard", f"{shard.url}: {e}")
        return

    def files():
        # the tar's own errors end the file stream here, so the last complete sample is still grouped
        try:
            for f in iter_tar(stream):  # not tarfile: it cost more than the PNG decode (shards/tarstream.py)
                yield {**f, "__url__": shard.url}
        except Exception as e:  # noqa: BLE001 -- tarfile.ReadError, EOFError, zlib errors: the rest is lost
            errors.append(e)

    seen, stopped = 0, False  # seen: every sample of the tar, whatever `keys` passes
    try:
        for sample in group_by_keys(files(), handler=handler):
            seen += 1
            if keys is not None and sample["__key__"] not in keys:
                continue
            if stop is not None and position >= stop:
                stopped = True
                break
            if position >= start:
                yield sample
            position += 1
    finally:
        stream.close()
    if errors:
        _skip(skips, "truncated_shard", f"{shard.url}: {errors[0]!r}")
    elif not stopped and seen < shard.count:
        _skip(skips, "short_shard", f"{shard.url}: the tar ends after {seen} of the manifest's {shard.count} samples: "
                                    "re-run `selfsup shard`", count=shard.count - seen)


def _count_keys(url: str, keys: frozenset) -> int:
    return sum(1 for _ in _samples(_Shard(url, "", 0), Counter(), keys))


class _Decoder:
    """One raw sample -> `(uint8 [C, S, S], label)`, or None (skipped and counted by reason)."""

    def __init__(self, channels: int, image_size: int, nominal_size: int, num_classes: int):
        self.channels, self.size, self.nominal_size, self.num_classes = channels, image_size, nominal_size, num_classes
        self.min_side = min(MIN_SIDE, image_size)
        self.skips: Counter[str] = Counter()
        self.fixes: Counter[str] = Counter()

    def __call__(self, sample: dict, shard: _Shard) -> tuple[torch.Tensor, int] | None:
        key = sample["__key__"]
        where = f"{key} in {shard.url}"
        if not _safe_key(key):
            return _skip(self.skips, "bad_key", where)
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if ext is None:
            return _skip(self.skips, "no_image", where)
        data = sample[ext]
        if not data:
            return _skip(self.skips, "empty", where)
        label = self._label(sample.get("cls"), shard.split)
        if label is None:
            return _skip(self.skips, "bad_label", f"{where}: cls={sample.get('cls')!r}")
        try:
            image = self._decode(data)
        except Exception as e:  # noqa: BLE001 -- garbage bytes raise RuntimeError/ValueError/...; all skipped
            return _skip(self.skips, "decode", f"{where}: {e}")
        h, w = image.shape[-2:]
        if min(h, w) < self.min_side:
            return _skip(self.skips, "too_small", f"{where}: {w}x{h} px")
        if min(h, w) != self.nominal_size:
            self.fixes["size"] += 1
        if (h, w) != (self.size, self.size):
            image = _resize_center_crop(image, self.size)
        return image, label

    def _label(self, raw: Any, split: str) -> int | None:
        if raw is None:
            return -1 if split == "unlabeled" else None
        try:
            label = int(raw.decode() if isinstance(raw, bytes) else raw)
        except (ValueError, UnicodeDecodeError):
            return None
        if label == -1 and split == "unlabeled" or 0 <= label < self.num_classes:
            return label
        return None

    def _decode(self, data: bytes) -> torch.Tensor:
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        palette = data[:8] == _PNG_SIG and len(data) > 25 and data[25] == 3  # UNCHANGED gives palette indices
        image = None if palette else decode_image(buf, mode=ImageReadMode.UNCHANGED)
        if image is not None and image.ndim == 4:  # an animated GIF: [frames, C, H, W]
            image = image[0]
        if image is None or image.dtype != torch.uint8 or image.shape[0] != self.channels:
            # another colour mode (RGBA, LA, palette, CMYK, 16-bit): let the decoder convert it
            self.fixes["mode"] += 1
            image = decode_image(buf, mode=ImageReadMode.RGB if self.channels == 3 else ImageReadMode.GRAY)
            if image.dtype == torch.uint16:
                image = (image.to(torch.int32) >> 8).to(torch.uint8)
            if image.shape[0] == 3 and self.channels == 1:  # WebP ignores GRAY: ITU-R 601 luma, as PIL's "L"
                weights = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
                image = (image.float() * weights).sum(0, keepdim=True).round().clamp(0, 255).to(torch.uint8)
            elif image.shape[0] == 1 and self.channels == 3:
                image = image.expand(3, -1, -1).contiguous()
        return image[0] if image.ndim == 4 else image  # an animated GIF: its first frame


def _safe_key(key: str) -> bool:
    """Keys name samples, never files: refuse absolute paths and `..` (a hostile `../../x` member)."""
    if "/" not in key and "\\" not in key and ":" not in key:  # the usual `train-00000042`: no path at all
        return bool(key) and key != ".."
    path = PurePosixPath(key.replace("\\", "/"))
    return not path.is_absolute() and ".." not in path.parts and ":" not in key


def _resize_center_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    """Shorter side to `size` (antialiased bilinear), then the centre square."""
    h, w = image.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    if (nh, nw) != (h, w):
        x = F.interpolate(image[None].float(), size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
        image = x[0].round().clamp(0, 255).to(torch.uint8)
    top, left = (nh - size) // 2, (nw - size) // 2
    return image[:, top : top + size, left : left + size].contiguous()


def _skip(skips: Counter, reason: str, detail: str, count: int = 1) -> None:
    """Count `count` skipped samples under `reason`, warning about the first few and then at round numbers."""
    before = skips[reason]
    skips[reason] += count
    n = skips[reason]
    if before < _WARN_FIRST or any(before < m <= n for m in (10, 100, 1000, 10000)):
        more = " (further ones counted, not shown)" if before < _WARN_FIRST <= n else ""
        log.warning("skipped sample (%s, %d so far): %s%s", reason, n, detail, more)
    return None
