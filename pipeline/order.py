"""The training order: which sample each position of an epoch reads, and the keys of its random draws.

Positions. An epoch is `steps_per_epoch · accum` global micro-batches of `batch_size · world_size` samples. Global
micro-batch q of an epoch covers epoch positions [q·B·W, (q+1)·B·W); rank r takes the r-th block of B. Positions past
`steps_per_epoch · global_batch` are that epoch's dropped remainder. Every rank gets the same number of batches.

Order. Position → sample is an index-addressable permutation keyed on (seed, epoch): the shards are permuted, cut
into windows of `window` shards, and the samples inside each window are permuted. With aspect-ratio buckets
(BucketOrder) each bucket is ordered so on its own, and the epoch interleaves the buckets' global batches in a
keyed order: a step's whole global batch is one bucket's, on every rank. Reads stay within a few shards
at a time (locality), yet any position is computable on its own, so resume needs only the samples consumed, and
the order does not depend on the worker count.

Keys. A sample's draws (its flip bit, and on the CPU path its ε) derive from `sample_key(seed, epoch, index)`; its
caption choice from its own stream keyed (seed, epoch, CAPTION, index). No I/O and no torch here.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

# Tags that keep the keyed random streams apart (pipeline/validation.py's start past these).
_SHARD_ORDER, _WINDOW_ORDER, _SAMPLE, CAPTION, _BUCKET, _BUCKET_ORDER = 0, 1, 2, 3, 4, 5
_U32 = 2**32
_U64 = 2**64 - 1


def keyed_rng(*key: int) -> np.random.Generator:
    key = [int(k) for k in key]
    if all(0 <= k < _U32 for k in key):
        # The same generator as np.random.default_rng(key) (a uint32 array is the same SeedSequence entropy as a list
        # of ints below 2**32), in half the time: SeedSequence coerces a list int by int in Python (7 µs a sample).
        return np.random.Generator(np.random.PCG64(np.array(key, dtype=np.uint32)))
    return np.random.default_rng(key)


def sample_key(seed: int, epoch: int, index: int) -> int:
    """The 64-bit hash of a sample's key (seed, epoch, global index): all of its random draws derive from it."""
    packed = struct.pack("<4Q", *(int(k) & _U64 for k in (seed, epoch, _SAMPLE, index)))
    return int.from_bytes(hashlib.blake2b(packed, digest_size=8).digest(), "little")


def sample_flip(key: int) -> bool:
    return bool(key >> 63)




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
    """position → global sample index for each epoch; shuffled within windows of `window` shards. `exclude` (global
    indices, e.g. the held-out validation samples) are never ordered: every epoch covers only the others. `only`:
    the shards this order covers (default all), e.g. one bucket's; `salt` keys its streams apart from others'."""

    def __init__(self, counts: list[int], seed: int, window: int, exclude: np.ndarray | None = None,
                 only: list[int] | None = None, salt: tuple[int, ...] = ()):
        starts = np.concatenate([[0], np.cumsum(np.asarray(counts, dtype=np.int64))[:-1]])
        self.members = [np.arange(a, a + n) for a, n in zip(starts, counts)]  # global indices of each shard
        if only is not None:
            self.members = [self.members[s] for s in only]
        if exclude is not None and len(exclude):
            self.members = [np.setdiff1d(m, exclude, assume_unique=True) for m in self.members]
        self.counts = np.array([len(m) for m in self.members], dtype=np.int64)
        self.seed, self.window, self.salt = seed, max(1, window), tuple(salt)

    @property
    def num_samples(self) -> int:
        return int(self.counts.sum())

    @lru_cache(maxsize=4)
    def _epoch(self, epoch: int) -> tuple[list[np.ndarray], np.ndarray]:
        shard_perm = keyed_rng(self.seed, epoch, _SHARD_ORDER, *self.salt).permutation(len(self.counts))
        windows = [shard_perm[i : i + self.window] for i in range(0, len(shard_perm), self.window)]
        sizes = np.array([self.counts[w].sum() for w in windows])
        return windows, np.concatenate([[0], np.cumsum(sizes)])

    @lru_cache(maxsize=8)
    def _window(self, epoch: int, w: int) -> np.ndarray:
        """Global sample indices of window w, in this epoch's order."""
        shards_in_window = self._epoch(epoch)[0][w]
        members = np.concatenate([self.members[s] for s in shards_in_window])
        return members[keyed_rng(self.seed, epoch, _WINDOW_ORDER, w, *self.salt).permutation(len(members))]

    def __call__(self, epoch: int, positions: np.ndarray) -> np.ndarray:
        _, bounds = self._epoch(epoch)
        w = np.searchsorted(bounds, positions, side="right") - 1
        return np.array([self._window(epoch, int(wi))[p - bounds[wi]] for wi, p in zip(w, positions)], dtype=np.int64)


class BucketOrder:
    """position → global sample index over aspect-ratio buckets, a pure function of (seed, epoch, position) as
    EpochOrder is: each bucket has its own keyed EpochOrder (over its shards, shuffled within windows); an epoch
    is a keyed interleaving of the buckets' global batches, floor(n_b / G) of bucket b (its remainder dropped for
    this epoch, as Plan drops the whole set's), so global batch s of an epoch, positions [s·G, (s+1)·G), comes
    from one bucket, whichever rank or micro-batch reads it: every rank takes the same bucket at a step, every
    usable sample of a bucket is read once an epoch, and every rank reads the same number of batches."""

    def __init__(self, counts: list[int], shard_buckets: list[int], num_buckets: int, seed: int, window: int,
                 global_batch: int, exclude: np.ndarray | None = None):
        self.orders = [EpochOrder(counts, seed, window, exclude, only=[s for s, b in enumerate(shard_buckets)
                                                                         if b == k], salt=(_BUCKET, k))
                       for k in range(num_buckets)]
        self.batches = np.array([o.num_samples // global_batch for o in self.orders], dtype=np.int64)  # per epoch
        self.seed, self.global_batch = seed, global_batch

    @property
    def num_samples(self) -> int:
        return int(sum(o.num_samples for o in self.orders))

    @property
    def usable(self) -> int:
        """Samples an epoch trains on: every bucket's whole global batches (Plan's num_samples)."""
        return int(self.batches.sum()) * self.global_batch

    @lru_cache(maxsize=4)
    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(bucket of each global batch of the epoch, its index among that bucket's batches)."""
        seq = keyed_rng(self.seed, epoch, _BUCKET_ORDER).permutation(np.repeat(np.arange(len(self.orders)),
                                                                                self.batches))
        nth = np.zeros(len(seq), dtype=np.int64)
        for k in range(len(self.orders)):
            nth[seq == k] = np.arange(int(self.batches[k]))
        return seq, nth

    def __call__(self, epoch: int, positions: np.ndarray) -> np.ndarray:
        seq, nth = self._epoch(epoch)
        step, offset = np.divmod(np.asarray(positions, dtype=np.int64), self.global_batch)
        out = np.empty(len(step), dtype=np.int64)
        for k in np.unique(seq[step]):  # one bucket for a micro-batch's positions: they are one global batch's
            mine = seq[step] == k
            out[mine] = self.orders[int(k)](epoch, nth[step[mine]] * self.global_batch + offset[mine])
        return out
