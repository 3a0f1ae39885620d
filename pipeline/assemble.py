"""Shard assembly in a writer thread: encode's VAE forward of batch b+1 overlaps batch b's fp16 conversion, JSON,
tar or Parquet writing, fsync and hashing.

The encode loop (pipeline/encode.py) sends, in order: ("shard", plan, caption records) to start a shard, ("batch", ...)
with each encoded batch's latents still on their way to host memory, and ("end",) to finish it. The thread writes
each shard's inputs in input order, whatever the batches: reused latents (read from their donor shards), new ones
and skips. So the bytes are exactly those of a sequential write, and writes stay atomic (ShardWriter).
"""

from __future__ import annotations

import queue
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ditpipe.pipeline import reuse, shards
from ditpipe.pipeline.manifest import Manifest, latent_shape_of
from ditpipe.pipeline.sources import Loaded

_STOP = object()


@dataclass
class ShardTally:
    """What one shard's encode produced, beyond its samples: the sidecar's extra fields."""

    skipped: list = field(default_factory=list)
    converted: list = field(default_factory=list)
    sums: np.ndarray | None = None
    sumsq: np.ndarray | None = None
    count_px: int = 0

    def add_stats(self, first_slice: np.ndarray) -> None:  # (C, H, W) float16: one sample, as stored
        """Per sample, in shard order, from the stored fp16 values: a reused latent adds exactly what it added when
        it was encoded, so a rewritten shard's statistics do not depend on how its samples were batched."""
        x = first_slice.astype(np.float64)
        s, q = x.sum(axis=(1, 2)), np.square(x).sum(axis=(1, 2))
        self.sums, self.sumsq = (s, q) if self.sums is None else (self.sums + s, self.sumsq + q)
        self.count_px += first_slice.shape[1] * first_slice.shape[2]

    def sidecar(self, start: int, stop: int) -> dict:
        return {"inputs": [start, stop], "skipped": self.skipped, "converted": self.converted,
                "sum": None if self.sums is None else self.sums.tolist(),
                "sumsq": None if self.sumsq is None else self.sumsq.tolist(), "count_px": self.count_px}


@dataclass
class Encoded:
    """One batch's results, as `_encode_batch` hands them over: latents (G, k, C, h, w) float32 in host memory once
    `ready` has fired (an asynchronous device → host copy), for `good`; `failed` with why they are skipped."""

    latents: torch.Tensor | None
    ready: object  # torch.cuda.Event, or None when the latents are already there
    good: list[tuple[int, Loaded]]
    texts: list
    failed: list[tuple[int, str, str | None, int | None, tuple | None]]  # (index, reason, sha256, pixels, stat)
    targets: np.ndarray | None = None  # (G, m, T, D) float32: the target encoder's tokens (pipeline/targets.py)


class DonorCache:
    """The samples of the shards that reused latents come from, a few shards at a time (both threads read it)."""

    def __init__(self, pool: reuse.Pool, keep: int = 3):
        self.pool, self.keep = pool, keep
        self._shards: OrderedDict[str, list[shards.Sample]] = OrderedDict()
        self._lock = threading.Lock()

    def sample(self, held: reuse.Held) -> shards.Sample:
        with self._lock:
            donor = held.donor
            if donor.sidecar_sha not in self._shards:
                path = donor.readable_path(self.pool.out)
                manifest = {**self.pool.header, "format": self.pool.fmt}
                self._shards[donor.sidecar_sha] = list(shards.iter_shard(path.parent, path.name, manifest,
                                                                         donor.sidecar))
                while len(self._shards) > self.keep:
                    self._shards.popitem(last=False)
            self._shards.move_to_end(donor.sidecar_sha)
            return self._shards[donor.sidecar_sha][held.sample]


class Assembler:
    """The writer thread. `put` blocks while a few messages wait (the decode and VAE cannot run far ahead), and
    raises the thread's error, if it failed, in the encode loop."""

    def __init__(self, out: Path, fmt: str, header: dict, text: bool, donors: DonorCache, written=None):
        """`header`: the manifest header, whose latent shape (or a shard's bucket's) each shard is written in;
        `written(path)`, if given, is called (in this thread) once each shard and its sidecar are complete."""
        self.out, self.fmt, self.header, self.text, self.donors = Path(out), fmt, header, text, donors
        self.written = written
        self._queue: queue.Queue = queue.Queue(maxsize=4)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="ditpipe-shard-writer", daemon=True)
        self._writer = None

    def __enter__(self) -> "Assembler":
        self._thread.start()
        return self

    def __exit__(self, kind, value, tb) -> None:
        self._queue.put((_STOP, kind is not None))
        self._thread.join()
        if self._error is not None and kind is None:
            raise self._error

    def put(self, *message) -> None:
        while True:
            if self._error is not None:
                raise self._error
            try:
                self._queue.put(message, timeout=0.2)
                return
            except queue.Full:
                continue

    def _run(self) -> None:
        while True:
            message = self._queue.get()
            if message[0] is _STOP:
                if self._writer is not None:
                    self._writer.abort()  # a shard begun but never ended: its temporary goes, nothing else
                return
            if self._error is not None:
                continue  # drain until told to stop
            try:
                getattr(self, f"_on_{message[0]}")(*message[1:])
            except BaseException as e:  # handed to the encode loop at its next `put`
                self._error = e
                if self._writer is not None:
                    self._writer.abort()
                    self._writer = None

    def _on_shard(self, plan: reuse.ShardPlan, texts: dict) -> None:
        self._plan, self._texts, self._next, self._done = plan, texts, 0, {}
        self._tally = ShardTally()
        shape = latent_shape_of(self.header, plan.bucket)  # the manifest's, or the shard's bucket's
        self._layout = Manifest.of(self.header).target_layout(plan.bucket)  # None without targets
        self._writer = shards.ShardWriter(self.out / plan.name, self.fmt, shape, text=self.text, target=self._layout)

    def _on_batch(self, batch: Encoded) -> None:
        for index, reason, sha, pixels, stat in batch.failed:
            self._done[index] = ("skip", reason, sha, pixels, stat)
        if batch.good:
            if batch.ready is not None:
                batch.ready.synchronize()  # the device → host copy has landed
            half = batch.latents.numpy().astype(np.float16)  # (G, k, C, h, w)
            finite = np.isfinite(half).reshape(len(half), -1).all(axis=1)
            targets = [None] * len(half) if batch.targets is None else [self._layout.pack(x) for x in batch.targets]
            for (index, loaded), latent, ok, text, target in zip(batch.good, half, finite, batch.texts, targets):
                self._done[index] = ("latent", latent, ok, loaded, text, target)
        self._flush()

    def _on_end(self) -> None:
        self._flush()
        plan = self._plan
        assert self._next == len(plan.entries), f"{plan.name}: {len(plan.entries) - self._next} inputs never arrived"
        sidecar = {**self._tally.sidecar(plan.start, plan.stop), "sources": [e.record for e in plan.entries],
                   "listing_sha256": plan.listing, **({} if plan.bucket is None else {"bucket": plan.bucket})}
        self._writer.close(sidecar)
        self._writer = None
        reuse.write_stat_cache(self.out, plan.name, plan.entries)
        if self.written is not None:
            self.written(self.out / plan.name)

    def _flush(self) -> None:
        """Write every input whose turn has come and whose data is here, in input order."""
        plan = self._plan
        while self._next < len(plan.entries):
            entry = plan.entries[self._next]
            meta = plan.metas[self._next]
            if entry.action == "encode" and entry.index not in self._done:
                return
            if entry.action == "skip":
                self._skip(entry, meta, entry.reason)
            elif entry.action == "reuse":
                donor_sample = self.donors.sample(entry.held)
                text = self._texts.get(entry.index, donor_sample.text)
                self._add(entry, meta, donor_sample.latent, donor_sample.meta["sha256"],
                          donor_sample.meta.get("notes"), text, donor_sample.target)
            else:
                self._encoded(entry, meta, self._done.pop(entry.index))
            self._next += 1

    def _encoded(self, entry: reuse.Entry, meta: dict, done: tuple) -> None:
        if done[0] == "skip":
            _, reason, sha, pixels, stat = done
            entry.record, entry.stat = [meta["file"], sha, pixels], stat
            self._skip(entry, meta, reason)
            return
        _, latent, ok, loaded, text, target = done
        entry.record, entry.stat = [meta["file"], loaded.sha256, loaded.source_pixels], loaded.stat
        if not ok:
            self._skip(entry, meta, "non-finite latent (codec overflow)")
            return
        self._add(entry, meta, latent, loaded.sha256, loaded.notes, text, target)

    def _skip(self, entry: reuse.Entry, meta: dict, reason: str) -> None:
        entry.reason = reason
        self._tally.skipped.append({"index": entry.index, "file": meta["file"], "reason": reason})

    def _add(self, entry: reuse.Entry, meta: dict, latent: np.ndarray, sha: str, notes, text, target=None) -> None:
        meta = {**meta, "sha256": sha}
        if notes:
            meta["notes"] = notes
            self._tally.converted.append({"index": entry.index, "file": meta["file"], "notes": notes})
        self._tally.add_stats(latent[0])
        self._writer.add(meta["key"], latent, meta, text if self.text else None, target)
