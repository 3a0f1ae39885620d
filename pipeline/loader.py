"""The streaming training loader: deterministic order, an exact rank/worker split, and a one-counter position.

Positions. An epoch is `steps_per_epoch · accum` global micro-batches of `batch_size · world_size` samples. Global
micro-batch q of an epoch covers epoch positions [q·B·W, (q+1)·B·W); rank r takes the r-th block of B. Positions past
`steps_per_epoch · global_batch` are that epoch's dropped remainder. Every rank gets the same number of batches.

Order. Position → sample is an index-addressable permutation keyed on (seed, epoch): the shards are permuted, cut
into windows of `window` shards, and the samples inside each window are permuted. Reads stay within a few shards
at a time (locality), yet any position is computable on its own, so resume needs only the samples consumed, and
the order does not depend on the worker count.

Randomness per sample is keyed on (seed, epoch, global sample index): the flip bit and the posterior noise ε in
z = mean + std·ε. Then the manifest's shift and scaling factors are applied: z ← (z − shift)·scale.
"""

from __future__ import annotations

import json
import mmap
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from pipeline import shards
from pipeline.errors import ShardError

# Tags that keep the keyed random streams apart.
_SHARD_ORDER, _WINDOW_ORDER, _SAMPLE = 0, 1, 2


def keyed_rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in key])


@dataclass(frozen=True)
class Plan:
    """The arithmetic of steps, micro-batches, ranks and positions. No I/O."""

    num_samples: int
    batch_size: int  # per rank, per micro-batch
    accum: int
    world_size: int

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.accum * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch

    @property
    def micro_per_epoch(self) -> int:
        return self.steps_per_epoch * self.accum

    def positions(self, q: int, rank: int) -> np.ndarray:
        """Epoch positions of global micro-batch q for `rank`."""
        start = (q * self.world_size + rank) * self.batch_size
        return np.arange(start, start + self.batch_size)

    def micro_index(self, step: int) -> tuple[int, int]:
        """(epoch, q) of the first micro-batch of optimizer step `step` (0-based)."""
        return divmod(step * self.accum, self.micro_per_epoch)


class EpochOrder:
    """position → global sample index for each epoch; shuffled within windows of `window` shards."""

    def __init__(self, counts: list[int], seed: int, window: int):
        self.counts = np.asarray(counts, dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]])
        self.seed, self.window = seed, max(1, window)

    @lru_cache(maxsize=4)
    def _epoch(self, epoch: int) -> tuple[list[np.ndarray], np.ndarray]:
        shard_perm = keyed_rng(self.seed, epoch, _SHARD_ORDER).permutation(len(self.counts))
        windows = [shard_perm[i : i + self.window] for i in range(0, len(shard_perm), self.window)]
        sizes = np.array([self.counts[w].sum() for w in windows])
        return windows, np.concatenate([[0], np.cumsum(sizes)])

    @lru_cache(maxsize=8)
    def _window(self, epoch: int, w: int) -> np.ndarray:
        """Global sample indices of window w, in this epoch's order."""
        shards_in_window = self._epoch(epoch)[0][w]
        members = np.concatenate([np.arange(self.starts[s], self.starts[s] + self.counts[s]) for s in shards_in_window])
        return members[keyed_rng(self.seed, epoch, _WINDOW_ORDER, w).permutation(len(members))]

    def __call__(self, epoch: int, positions: np.ndarray) -> np.ndarray:
        _, bounds = self._epoch(epoch)
        w = np.searchsorted(bounds, positions, side="right") - 1
        return np.array([self._window(epoch, int(wi))[p - bounds[wi]] for wi, p in zip(w, positions)], dtype=np.int64)


class ShardStore:
    """Random access to sample g of a shard folder: tar through mmap + the sidecar's offset index (no per-member tar
    parsing), Parquet through one contiguous `fixed_size_binary` buffer. Opens lazily, per process."""

    def __init__(self, folder: Path, manifest: dict, max_open: int = 16):
        self.folder, self.manifest = Path(folder), manifest
        self.shape = tuple(manifest["latent"]["shape"])
        self.nbytes = int(np.prod(self.shape)) * np.dtype(shards.LATENT_DTYPE).itemsize
        self.counts = [s["samples"] for s in manifest["shards"]]
        self.starts = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        self.max_open = max_open
        self._open: dict[int, tuple] = {}

    def __getstate__(self):  # worker processes open their own maps
        return {**self.__dict__, "_open": {}}

    def _shard(self, s: int):
        if s not in self._open:
            if len(self._open) >= self.max_open:
                self._open.pop(next(iter(self._open)))
            entry = self.manifest["shards"][s]
            side = json.loads((self.folder / entry["sidecar"]).read_text())
            labels = np.array([-1 if x is None else x for x in side["labels"]], dtype=np.int64)
            if self.manifest["format"] == "wds":
                with open(self.folder / entry["name"], "rb") as f:
                    mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                index = np.asarray(side["index"], dtype=np.int64).reshape(-1, 4)
                header = shards.npy_bytes(np.zeros(self.shape, shards.LATENT_DTYPE))[: -self.nbytes]
                for key, (lo, ln, _, _) in zip(side["keys"], index):  # no dtype or shape ever read on trust
                    if ln != len(header) + self.nbytes or mm[lo : lo + len(header)] != header:
                        raise ShardError(f"{self.folder / entry['name']}: sample '{key}' is not a float16 "
                                         f"{self.shape} array; the shard is damaged (run `ditpipe verify`)")
                self._open[s] = ("wds", mm, index[:, 0] + len(header), labels)
            else:
                import pyarrow.parquet as pq

                col = pq.read_table(self.folder / entry["name"], columns=["latent"]).column(0).combine_chunks()
                flat = np.frombuffer(col.buffers()[1], dtype=shards.LATENT_DTYPE)
                data = flat[col.offset * int(np.prod(self.shape)) :][: len(col) * int(np.prod(self.shape))]
                self._open[s] = ("parquet", data.reshape((len(col), *self.shape)), None, labels)
        return self._open[s]

    def read(self, g: int) -> tuple[np.ndarray, int]:
        """(latent (k, C, H, W) float16, label or -1) of global sample g."""
        s = int(np.searchsorted(self.starts, g, side="right") - 1)
        kind, data, offsets, labels = self._shard(s)
        i = g - self.starts[s]
        if kind == "wds":
            n = int(np.prod(self.shape))
            return np.frombuffer(data, dtype=shards.LATENT_DTYPE, count=n, offset=int(offsets[i])).reshape(self.shape), \
                int(labels[i])
        return data[i], int(labels[i])


class LatentView:
    """Turns a stored latent into a training sample, from the manifest alone: slice choice, flip, ε, scale, shift."""

    def __init__(self, manifest: dict):
        lat, codec = manifest["latent"], manifest["codec"]
        names = lat["slices"]
        self.mean, self.std = names.index(names[0]), (names.index("std") if "std" in names else None)
        self.mean_flip = names.index("mean_flip") if "mean_flip" in names else None
        self.std_flip = names.index("std_flip") if "std_flip" in names else None
        self.flip_at_load = bool(lat.get("flip_at_load"))
        self.scale, self.shift = float(codec["scaling_factor"]), float(codec["shift_factor"])
        self.can_flip = self.flip_at_load or self.mean_flip is not None

    def __call__(self, stored: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        flip = bool(rng.integers(2)) if self.can_flip else False
        if flip and not self.flip_at_load:
            mean, std = stored[self.mean_flip], None if self.std_flip is None else stored[self.std_flip]
        else:
            mean, std = stored[self.mean], None if self.std is None else stored[self.std]
        z = mean.astype(np.float32)  # (C, H, W)
        if std is not None:
            z = z + std.astype(np.float32) * rng.standard_normal(z.shape, dtype=np.float32)
        if flip and self.flip_at_load:
            z = z[:, :, ::-1]  # exact mirror of the stored image
        return (z - self.shift) * self.scale


class MicroBatches(torch.utils.data.Dataset):
    """Map-style over keys (epoch, q): returns rank `rank`'s part of global micro-batch q of `epoch`, ready to train."""

    def __init__(self, store: ShardStore, order: EpochOrder, plan: Plan, rank: int, seed: int):
        self.store, self.order, self.plan, self.rank, self.seed = store, order, plan, rank, seed
        self.view = LatentView(store.manifest)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, q = key
        indices = self.order(epoch, self.plan.positions(q, self.rank))
        latents, labels = [], []
        for g in indices:
            stored, label = self.store.read(int(g))
            latents.append(self.view(stored, keyed_rng(self.seed, epoch, _SAMPLE, g)))
            labels.append(label)
        return {"latents": torch.from_numpy(np.ascontiguousarray(np.stack(latents))),  # (B, C, H, W) float32
                "labels": torch.tensor(labels, dtype=torch.long),  # (B,); -1 without labels
                "indices": torch.from_numpy(indices), "epoch": epoch, "q": q}


class ImageBatches(torch.utils.data.Dataset):
    """The online-VAE baseline (`data.source: images`): the same keys, order and per-sample draws (flip bit, then ε)
    as MicroBatches, but yields decoded images; the training step encodes them with the codec every time."""

    def __init__(self, source, order: EpochOrder, plan: Plan, rank: int, seed: int, latent_shape: tuple[int, ...],
                 flip: bool, stores_std: bool):
        self.source, self.order, self.plan, self.rank, self.seed = source, order, plan, rank, seed
        self.latent_shape, self.flip, self.stores_std = tuple(latent_shape), flip, stores_std

    def __getitem__(self, key: tuple[int, int]) -> dict:
        from pipeline.errors import DataError
        from pipeline.sources import BadImage

        epoch, q = key
        indices = self.order(epoch, self.plan.positions(q, self.rank))
        pixels, eps, labels = [], [], []
        for g in indices:
            rng = keyed_rng(self.seed, epoch, _SAMPLE, g)
            try:
                img = self.source.load(int(g)).pixels  # (H, W, 3) uint8
            except BadImage as e:
                raise DataError(f"{self.source.sample_meta(int(g))['file']}: {e}. The online mode cannot skip inputs; "
                                "encode shards instead (`ditpipe encode`), which skips and records them") from None
            pixels.append(img[:, ::-1] if self.flip and rng.integers(2) else img)
            eps.append(rng.standard_normal(self.latent_shape, dtype=np.float32) if self.stores_std
                       else np.zeros(self.latent_shape, np.float32))
            labels.append(-1 if self.source.items[int(g)].label is None else self.source.items[int(g)].label)
        return {"pixels": torch.from_numpy(np.ascontiguousarray(np.stack(pixels))),  # (B, H, W, 3) uint8
                "eps": torch.from_numpy(np.stack(eps)),  # (B, C, h, w) float32
                "labels": torch.tensor(labels, dtype=torch.long), "indices": torch.from_numpy(indices),
                "epoch": epoch, "q": q}


class RunKeys(torch.utils.data.Sampler):
    """(epoch, q) for every micro-batch from optimizer step `start_step` to `end_step`: one counter, many epochs."""

    def __init__(self, plan: Plan, start_step: int, end_step: int):
        self.plan, self.start, self.end = plan, start_step * plan.accum, end_step * plan.accum

    def __iter__(self):
        for u in range(self.start, self.end):
            yield divmod(u, self.plan.micro_per_epoch)

    def __len__(self) -> int:
        return self.end - self.start


def open_shards(folder: Path) -> tuple[ShardStore, dict]:
    manifest = shards.load_manifest(folder)
    if manifest["num_samples"] == 0:
        raise ShardError(f"'{folder}' holds no samples (every input was skipped); see its manifest's 'skipped'")
    return ShardStore(folder, manifest), manifest


def make_loader(dataset: torch.utils.data.Dataset, plan: Plan, start_step: int, end_step: int, num_workers: int,
                pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """The whole run's micro-batches of `dataset` (MicroBatches or ImageBatches), starting at `start_step` without
    reading what came before."""
    return torch.utils.data.DataLoader(
        dataset, sampler=RunKeys(plan, start_step, end_step), batch_size=None,
        num_workers=num_workers, pin_memory=pin_memory, persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None)
