"""The torch side of the training loader: map-style datasets over (epoch, q) keys and the DataLoader over a run.

The loader is a copy. Per sample it draws one thing, the flip bit, keyed on (seed, epoch, global sample index)
(`sample_key`, a 64-bit hash whose top bit is the flip), picks the stored slices that bit names (mean, std, or their
mirrors) and copies them, fp16 as stored, into the batch: a micro-batch's samples are read together, one array index
a shard (pipeline/store.py). Everything else random is the training step's, drawn on the device from one stream per
optimizer step over the step's global batch positions (pipeline/step.py): the posterior noise ε in z = mean + std·ε,
the timestep, the diffusion noise and the label dropout; the latent normalisation (shift and scale) is applied there
too. So a worker only reads and collates, and no draw depends on which rank or micro-batch a position lands on. With
caption embeddings, which of the image's captions a sample uses is drawn from its own keyed stream (seed, epoch,
CAPTION, index), so resume stays exact. Which sample a position reads is pipeline/order.py's; the shard reads are
pipeline/store.py's; URLs are pipeline/remote.py's, their shard cache and prefetching pipeline/cache.py's (a URL
folder's loader keeps the next `storage.prefetch_shards` shards of this rank's order downloading ahead: `make_loader`).

`LatentView.__call__` still makes a whole sample on the CPU (keyed ε from a reseeded torch generator, then the
normalisation): the held-out validation set (pipeline/validation.py) is made that way, once.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ditpipe.pipeline.errors import ShardError
from ditpipe.pipeline.latent_norm import LatentNorm
from ditpipe.pipeline.manifest import Manifest
from ditpipe.pipeline.order import CAPTION, EpochOrder, Plan, keyed_rng, sample_flip, sample_key
from ditpipe.pipeline.store import ShardStore


def sample_normal(key: int, shape: tuple[int, ...], generator: torch.Generator) -> np.ndarray:
    """ε ~ N(0, I) of `shape`, float32, a pure function of `key` (the generator is reseeded, so any one will do)."""
    generator.manual_seed(key)
    return torch.randn(shape, generator=generator, dtype=torch.float32).numpy()


class LatentView:
    """Turns a stored latent into a training sample: slice choice, flip, ε, then the latent normalisation (the
    codec's scale and shift from the manifest unless `norm` says otherwise; see pipeline/latent_norm.py)."""

    def __init__(self, manifest: Manifest | dict, norm: LatentNorm | None = None):
        manifest = Manifest.of(manifest)
        lat = manifest.latent
        names = lat["slices"]
        self.mean, self.std = names.index(names[0]), (names.index("std") if "std" in names else None)
        self.mean_flip = names.index("mean_flip") if "mean_flip" in names else None
        self.std_flip = names.index("std_flip") if "std_flip" in names else None
        self.flip_at_load = bool(lat.get("flip_at_load"))
        self.norm = norm or LatentNorm.from_manifest(manifest, "scale")
        self.can_flip = self.flip_at_load or self.mean_flip is not None
        self.generator = torch.Generator()  # reseeded per sample; each worker process has its own copy

    @property
    def has_std(self) -> bool:
        return self.std is not None

    def select(self, stored: np.ndarray, key: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(mean, std or None), each (C, H, W) fp16, of a stored latent for its `sample_key`: the mirrored slices when
        the key's flip bit says so, or the stored image mirrored (pixel codec, a view). No copy, no draw."""
        flip = sample_flip(key) if self.can_flip else False
        if flip and not self.flip_at_load:
            return stored[self.mean_flip], None if self.std_flip is None else stored[self.std_flip]
        mean, std = stored[self.mean], None if self.std is None else stored[self.std]
        if flip:  # flip_at_load: the exact mirror of the stored image
            return mean[:, :, ::-1], None if std is None else std[:, :, ::-1]
        return mean, std

    def pick(self, keys: list[int]) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """`select` for a batch of `sample_key`s, as arrays: (the stored slice of each sample's mean (B,), of its std
        (B,) or None, which samples to mirror afterwards (B,) bool or None: the pixel codec's flip_at_load)."""
        flip = (np.array([sample_flip(k) for k in keys], dtype=bool) if self.can_flip
                else np.zeros(len(keys), dtype=bool))
        if self.flip_at_load:
            std = None if self.std is None else np.full(len(keys), self.std)
            return np.full(len(keys), self.mean), std, flip
        mean = np.where(flip, self.mean_flip if self.mean_flip is not None else self.mean, self.mean)
        std = None if self.std is None else np.where(flip, self.std_flip if self.std_flip is not None else self.std,
                                                     self.std)
        return mean, std, None

    def __call__(self, stored: np.ndarray, key: int) -> np.ndarray:
        """A whole sample on the CPU for a stored latent and its `sample_key`: the selected slices, z = mean + std·ε
        with ε keyed on the key, normalised. (Training draws its ε on the device instead.)"""
        mean, std = self.select(stored, key)
        z = mean.astype(np.float32)  # (C, H, W), a copy
        if std is not None:
            # In place, without temporaries: the same float32 roundings as z + float32(std)·ε (fp16 → fp32 exact).
            eps = sample_normal(key, z.shape, self.generator)  # (C, H, W)
            z += np.multiply(std, eps, out=eps)
        return self.norm.normalize_array(z)  # (C, H, W)


def _batch_tensor(shape: tuple[int, ...], dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """An uninitialised batch to fill. In a DataLoader worker it lives in shared memory from the start, so
    handing it to the main process copies nothing: torch otherwise moves every returned tensor there with a copy
    (np.stack + that move: 7.8 ms of CPU for 256 × 4×32×32, against 2 ms to fill shared memory directly)."""
    if torch.utils.data.get_worker_info() is not None:
        try:
            storage = torch.UntypedStorage._new_shared(math.prod(shape) * torch.empty((), dtype=dtype).element_size())
            return torch.empty(0, dtype=dtype).set_(storage, 0, shape)
        except (AttributeError, RuntimeError):  # no such allocator here: a plain tensor, moved (copied) by torch
            pass
    return torch.empty(shape, dtype=dtype)


class MicroBatches(torch.utils.data.Dataset):
    """Map-style over keys (epoch, q): returns rank `rank`'s part of global micro-batch q of `epoch`: each sample's
    stored mean (and std) as fp16, its flip applied, its label. The step draws ε and normalises on the device.
    With `captions`, also one of each image's captions (tokens padded to the manifest's longest caption).
    The latents are read as a batch (`store.gather`: one array index a shard), in the order's sequence."""

    def __init__(self, store: ShardStore, order: EpochOrder, plan: Plan, rank: int, seed: int, captions: bool = False,
                 targets: bool = False):
        self.store, self.order, self.plan, self.rank, self.seed = store, order, plan, rank, seed
        self.view = LatentView(store.manifest)
        if captions and not store.text:
            raise ShardError(f"{store.folder}: these shards carry no caption embeddings; encode with --captions")
        if targets and not store.manifest.targets:
            raise ShardError(f"{store.folder}: these shards carry no representation targets; encode with --targets")
        self.captions = captions
        # REPA's targets: a flipped sample takes the mirror's (encoded from the flipped image), the second slice
        self.targets = targets
        self.target_mirror = targets and len(store.manifest.targets["slices"]) == 2

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, q = key
        indices = self.order(epoch, self.plan.positions(q, self.rank))
        keys = [sample_key(self.seed, epoch, g) for g in indices.tolist()]
        mean_at, std_at, mirror = self.view.pick(keys)
        shape = (len(indices), *self.store.shape_of(int(indices[0]))[1:])  # (B, C, H, W): its bucket's (one a batch)
        mean = _batch_tensor(shape)
        std = _batch_tensor(shape) if std_at is not None else None
        picks = [(mean_at, mean.numpy())] + ([(std_at, std.numpy())] if std is not None else [])
        labels = self.store.gather(indices, picks)
        if mirror is not None and mirror.any():  # flip_at_load: the exact mirror of the stored image
            for _, out in picks:
                out[mirror] = out[mirror][..., ::-1]
        batch = {"mean": mean,  # (B, C, H, W) float16
                 "labels": torch.from_numpy(labels),  # (B,) int64; -1 without labels
                 "indices": torch.from_numpy(indices), "epoch": epoch, "q": q}
        if std is not None:
            batch["std"] = std  # (B, C, H, W) float16
        if self.captions:
            batch["caption"] = self._captions(epoch, indices)
        if self.targets:
            batch["target"] = self._targets(indices, keys)
        return batch

    def shards_of(self, u: int) -> list[int]:
        """The shards run micro-batch u (epoch · micro_per_epoch + q) of this rank reads, in the order it reaches
        them: what the prefetcher fetches ahead (the same order and positions as `__getitem__`)."""
        epoch, q = divmod(u, self.plan.micro_per_epoch)
        shard_of = np.searchsorted(self.store.starts, self.order(epoch, self.plan.positions(q, self.rank)),
                                   side="right") - 1
        _, first = np.unique(shard_of, return_index=True)
        return shard_of[np.sort(first)].tolist()

    def _targets(self, indices: np.ndarray, keys: list[int]) -> torch.Tensor:
        """(B, T, D) float16: each sample's stored targets, the mirror's where its flip bit says so."""
        flip = self.target_mirror and self.view.can_flip
        slices = np.array([int(flip and sample_flip(k)) for k in keys], dtype=np.int64)  # (B,)
        layout = self.store.layouts[int(np.searchsorted(self.store.starts, indices[0], side="right") - 1)]
        out = _batch_tensor((len(indices), layout.tokens, layout.dim))  # one bucket a batch: one layout
        self.store.gather_targets(indices, slices, out.numpy())
        return out

    def _captions(self, epoch: int, indices: np.ndarray) -> dict:
        """One caption per sample, chosen by its own keyed stream; an image without captions gets an empty mask,
        which the caption model reads as the null caption."""
        enc, width = self.store.text, self.store.manifest.captions["max_tokens_seen"]
        tokens = np.zeros((len(indices), width, enc["dim"]), np.float16)  # (B, L, D)
        mask = np.zeros((len(indices), width), bool)  # (B, L)
        pooled = np.zeros((len(indices), enc["dim"]), np.float16)  # (B, D)
        chosen = np.full(len(indices), -1, np.int64)
        for b, g in enumerate(indices):
            rec = self.store.read_text(int(g))
            if len(rec):
                k = int(keyed_rng(self.seed, epoch, CAPTION, g).integers(len(rec)))
                n = rec.dtype["mask"].shape[0]
                tokens[b, :n], mask[b, :n], pooled[b], chosen[b] = rec["tokens"][k], rec["mask"][k], rec["pooled"][k], k
        return {"tokens": torch.from_numpy(tokens), "mask": torch.from_numpy(mask), "pooled": torch.from_numpy(pooled),
                "chosen": torch.from_numpy(chosen)}  # chosen: the caption's index in the image's list, -1 for none


class ImageBatches(torch.utils.data.Dataset):
    """The online-VAE baseline (`data.source: images`): the same keys, order and flip bits as MicroBatches, but
    yields decoded images; the training step encodes them with the codec every time (and draws ε as for shards)."""

    def __init__(self, source, order: EpochOrder, plan: Plan, rank: int, seed: int, flip: bool):
        self.source, self.order, self.plan, self.rank, self.seed = source, order, plan, rank, seed
        self.flip = flip

    def __getitem__(self, key: tuple[int, int]) -> dict:
        from ditpipe.pipeline.errors import DataError
        from ditpipe.pipeline.sources import BadImage

        epoch, q = key
        indices = self.order(epoch, self.plan.positions(q, self.rank))
        pixels, labels = [], []
        for g in indices:
            key = sample_key(self.seed, epoch, int(g))
            try:
                img = self.source.load(int(g)).pixels  # (H, W, 3) uint8
            except BadImage as e:
                raise DataError(f"{self.source.sample_meta(int(g))['file']}: {e}. The online mode cannot skip inputs; "
                                "encode shards instead (`ditpipe encode`), which skips and records them") from None
            pixels.append(img[:, ::-1] if self.flip and sample_flip(key) else img)
            labels.append(-1 if self.source.items[int(g)].label is None else self.source.items[int(g)].label)
        return {"pixels": torch.from_numpy(np.ascontiguousarray(np.stack(pixels))),  # (B, H, W, 3) uint8
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


_PREFETCH_FACTOR = 4  # micro-batches each loader worker prepares ahead


class PrefetchingLoader(torch.utils.data.DataLoader):
    """The DataLoader of a URL folder's MicroBatches: each iteration runs a `cache.Prefetcher` in this (the rank's
    main) process from the sampler's first micro-batch on, told of every micro-batch taken, stopped when the
    iteration ends or is dropped. Its first error is raised here as it was raised there (one line naming the object),
    also when a worker met the same problem first."""

    def __iter__(self):
        return self._prefetched(super().__iter__())  # the workers' base seed is drawn now, as a plain loader draws it

    def _prefetched(self, batches):
        from ditpipe.pipeline.cache import Prefetcher

        ds, keys = self.dataset, self.sampler
        inflight = (self.num_workers * _PREFETCH_FACTOR if self.num_workers else 0) + 1
        fetcher = Prefetcher(ds.store.cache, ds.store.manifest.entries, ds.shards_of, keys.start, keys.end,
                             ahead=ds.store.cache.prefetch, inflight=inflight).begin()
        try:
            for u, batch in enumerate(batches, keys.start):
                fetcher.check()
                fetcher.advance(u)
                yield batch
            fetcher.check()
        except ShardError as e:
            fetcher.check()  # the prefetcher's own line rather than a worker's wrapped traceback of the same
            raise _unwrapped(e) from None
        finally:
            fetcher.stop()


def _unwrapped(error: ShardError) -> ShardError:
    """A worker's ShardError as its own line: torch re-raises it in this process as "Caught ShardError in DataLoader
    worker process 0. Original Traceback ...", whose last line is the message."""
    text = str(error)
    last = text.rstrip().rsplit("\n", 1)[-1]
    prefix = f"{type(error).__module__}.{type(error).__qualname__}: "
    if text.startswith("Caught ") and last.startswith(prefix):
        return type(error)(last[len(prefix):])
    return error


def make_loader(dataset: torch.utils.data.Dataset, plan: Plan, start_step: int, end_step: int, num_workers: int,
                pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """The whole run's micro-batches of `dataset` (MicroBatches or ImageBatches), starting at `start_step` without
    reading what came before. Over a URL folder (with storage.prefetch_shards > 0) the shards are fetched ahead into
    the node's cache in the order this rank reads them (`PrefetchingLoader`)."""
    cache = getattr(getattr(dataset, "store", None), "cache", None)
    kind = PrefetchingLoader if isinstance(dataset, MicroBatches) and cache is not None and cache.prefetch > 0 \
        else torch.utils.data.DataLoader
    return kind(dataset, sampler=RunKeys(plan, start_step, end_step), batch_size=None,
                num_workers=num_workers, pin_memory=pin_memory, persistent_workers=num_workers > 0,
                prefetch_factor=_PREFETCH_FACTOR if num_workers > 0 else None)
