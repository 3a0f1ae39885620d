"""The streaming training loader: deterministic order, an exact rank/worker split, and a one-counter position.

Positions. An epoch is `steps_per_epoch · accum` global micro-batches of `batch_size · world_size` samples. Global
micro-batch q of an epoch covers epoch positions [q·B·W, (q+1)·B·W); rank r takes the r-th block of B. Positions past
`steps_per_epoch · global_batch` are that epoch's dropped remainder. Every rank gets the same number of batches.

Order. Position → sample is an index-addressable permutation keyed on (seed, epoch): the shards are permuted, cut
into windows of `window` shards, and the samples inside each window are permuted. With aspect-ratio buckets
(BucketOrder) each bucket is ordered so on its own, and the epoch interleaves the buckets' global batches in a
keyed order: a step's whole global batch is one bucket's, on every rank. Reads stay within a few shards
at a time (locality), yet any position is computable on its own, so resume needs only the samples consumed, and
the order does not depend on the worker count.

Locations. A shard folder is a local path, or a URL of one of REMOTE_PROTOCOLS (`file://`, `s3://` with s3fs
installed, `gs://`, `https://`, `hf://`, ...). URLs are read-only and the slower path: each shard is fetched whole into
memory when the loader first needs it (at most `max_open` at a time per process), never more than the manifest's
size for it, and checked against the manifest's sha256. `pipe:` commands are refused: the loader reads samples by
index, not as a stream. On resume, a URL that only the checkpoint's config names is refused (`unconfirmed_remote`).

The loader is a copy. Per sample it draws one thing, the flip bit, keyed on (seed, epoch, global sample index)
(`sample_key`, a 64-bit hash whose top bit is the flip), picks the stored slices that bit names (mean, std, or their
mirrors) and copies them, fp16 as stored, into the batch. Everything else random is the training step's, drawn on
the device from one stream per optimizer step over the step's global batch positions (pipeline/step.py): the
posterior noise ε in z = mean + std·ε, the timestep, the diffusion noise and the label dropout; the latent
normalisation (shift and scale) is applied there too. So a worker only reads and collates, and no draw depends on
which rank or micro-batch a position lands on. With caption embeddings, which of the image's captions a sample uses
is drawn from its own keyed stream (seed, epoch, _CAPTION, index), so resume stays exact.

`LatentView.__call__` still makes a whole sample on the CPU (keyed ε from a reseeded torch generator, then the
normalisation): the held-out validation set (pipeline/validation.py) is made that way, once.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import mmap
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from pipeline import shards
from pipeline.errors import ShardError
from pipeline.latent_norm import LatentNorm

# Tags that keep the keyed random streams apart.
_SHARD_ORDER, _WINDOW_ORDER, _SAMPLE, _CAPTION, _BUCKET, _BUCKET_ORDER = 0, 1, 2, 3, 4, 5
_U32 = 2**32
_U64 = 2**64 - 1
_LATENT_ITEMSIZE = np.dtype(shards.LATENT_DTYPE).itemsize
_RELEASE_EVERY = 64  # tar reads between ShardStore.release() calls: bounds the mapped pages a process holds


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


def sample_normal(key: int, shape: tuple[int, ...], generator: torch.Generator) -> np.ndarray:
    """ε ~ N(0, I) of `shape`, float32, a pure function of `key` (the generator is reseeded, so any one will do)."""
    generator.manual_seed(key)
    return torch.randn(shape, generator=generator, dtype=torch.float32).numpy()


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


def is_url(location) -> bool:
    """A shard location that is not a local path: `scheme://...` (fsspec) or a `pipe:` command."""
    text = str(location)
    return "://" in text or text.startswith("pipe:")


def _url_join(url: str, name: str) -> str:
    return url.rstrip("/") + "/" + name


def refuse_pipe(location) -> None:
    if str(location).startswith("pipe:"):
        raise ShardError(f"'{location}': pipe: shard locations are not supported (the loader reads samples by index, "
                         "not as a stream, and a pipe: location would run a shell command); copy the shards to a "
                         "local or shared folder, or give an fsspec URL (s3://..., gs://..., file://...)")


# The fsspec protocols a shard location may name: local files, object stores, HTTP(S), the Hugging Face hub, and
# fsspec's in-process `memory` filesystem. Anything else (ssh, ftp, smb, git, chained `a::b` URLs, ...) is refused:
# a location is data, and other protocols reach hosts and credentials nobody meant to hand a shard folder.
REMOTE_PROTOCOLS = ("file", "s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "http", "https", "hf", "memory")
MAX_META_BYTES = shards.MAX_META_BYTES  # a manifest or sidecar, local or read from a URL
REMOTE_KEYS = ("shards.path", "validation.shards")  # config keys that name shard locations


def check_location(location) -> None:
    """Refuse a `pipe:` command and any URL whose protocol is not in REMOTE_PROTOCOLS; local paths pass."""
    refuse_pipe(location)
    text = str(location)
    if not is_url(text):
        return
    protocol = text.split("://", 1)[0].lower()
    if "::" in text or protocol not in REMOTE_PROTOCOLS:
        raise ShardError(f"'{text}': shard locations may use only the protocols {', '.join(REMOTE_PROTOCOLS)} "
                         "(no chained '::' URLs); copy the shards to one of those, or to a local folder")


READ_CHUNK = 1 << 20  # one read of a remote object: the most held beyond the cap while it is read
# Protocols whose fsspec file would fetch each block with one range request and keep the whole reply, whatever its
# length (fsspec's HTTPFile: `await r.read()` on a 206): opened as their streaming file (block_size=0) instead, whose
# read(n) returns at most n bytes, so an endless body is refused at the cap instead of read whole.
_STREAMED = ("http", "https", "hf")


def _read_url(url: str, limit: int) -> bytes:
    """The object at an fsspec URL (read-only; never a `pipe:` command), at most `limit` bytes, read in chunks of at
    most READ_CHUNK: one byte past `limit`, or a read that returns more than it asked for, and it is refused, so an
    object larger than it should be (or an endless HTTP body) is never held in memory whole."""
    check_location(url)
    import fsspec

    streamed = url.split("://", 1)[0].lower() in _STREAMED
    try:
        with fsspec.open(url, "rb", **({"block_size": 0} if streamed else {})) as f:
            parts, held = [], 0
            while held <= limit:
                want = min(READ_CHUNK, limit + 1 - held)
                part = f.read(want)
                if len(part) > want:
                    raise ShardError(f"'{url}': a read of {want:,} bytes returned {len(part):,}, more than asked; the "
                                     "remote location does not answer range reads as asked (refused: it could send "
                                     "without end)")
                if not part:
                    break
                parts.append(part)
                held += len(part)
            data = b"".join(parts)
    except ImportError as e:  # the protocol's package (s3fs, gcsfs, aiohttp for http, ...) is not installed
        raise ShardError(f"cannot read '{url}': {e}") from None
    except (OSError, ValueError) as e:
        raise ShardError(f"cannot read '{url}': {e}") from None
    if len(data) > limit:
        raise ShardError(f"'{url}' is larger than the {limit:,} bytes expected (the manifest's size for a shard); it "
                         "was changed at the remote location or is not ours; re-upload the shard folder")
    return data


def unconfirmed_remote(saved: dict, given: dict) -> list[tuple[str, str]]:
    """(key, message) for every shard location that a checkpoint's saved config (`saved`, the YAML tree) makes a
    URL while the command line (`given`, dotted overrides) does not name it again: on resume a checkpoint found on
    disk must not choose where data is fetched from."""
    problems = []
    for key in REMOTE_KEYS:
        section, name = key.split(".")
        value = (saved.get(section) or {}).get(name)
        if value is not None and is_url(value) and given.get(key) != value:
            problems.append((key, f"the checkpoint's config reads shards from the remote location '{value}'; a "
                                  f"config found on disk does not choose remote locations: name it on the command "
                                  f"line to confirm (--{key} {value})"))
    return problems


class ShardStore:
    """Random access to sample g of a shard folder: tar through mmap + the sidecar's offset index (no per-member tar
    parsing), Parquet through one contiguous `fixed_size_binary` buffer. Opens lazily, per process. A URL folder
    (fsspec) is read shard by shard into memory instead of mmap, each shard checked against the manifest's sha256."""

    def __init__(self, folder: Path | str, manifest: dict, max_open: int = 16):
        self.url = str(folder) if is_url(folder) else None
        self.folder, self.manifest = (folder if self.url else Path(folder)), manifest
        # Each shard's latent shape: the manifest's, or its aspect-ratio bucket's (one bucket a shard).
        self.buckets = [s.get("bucket") for s in manifest["shards"]]
        self.shapes = [shards.latent_shape_of(manifest, b) for b in self.buckets]
        self.counts = [s["samples"] for s in manifest["shards"]]
        self.starts = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        self.max_open = max_open
        self._open: dict[int, tuple] = {}
        self._texts: dict[int, object] = {}  # shard → caption index (tar) or the 'text' column (Parquet)
        self.text = shards.text_encoder_of(manifest)
        self.num_classes = shards.num_classes(manifest)

    def __getstate__(self):  # worker processes open their own maps
        return {**self.__dict__, "_open": {}, "_texts": {}}

    def _shard(self, s: int):
        if s not in self._open:
            if len(self._open) >= self.max_open:
                self._texts.pop(next(iter(self._open)), None)
                self._open.pop(next(iter(self._open)))
            entry = self.manifest["shards"][s]
            shape = self.shapes[s]
            per = math.prod(shape)
            nbytes = per * _LATENT_ITEMSIZE
            remote = self._fetch(entry) if self.url else None
            side = json.loads(remote[1] if remote else self._local_sidecar(entry))
            where = self._where(entry["name"])
            shards.check_sidecar(side, entry, where)  # reads below index by the manifest's count
            labels = np.array(shards.checked_labels(side["labels"], self.num_classes, str(where)), dtype=np.int64)
            if self.manifest["format"] == "wds":
                if remote:
                    mm = remote[0]
                else:
                    with open(self.folder / entry["name"], "rb") as f:
                        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                index = np.asarray(side["index"], dtype=np.int64).reshape(-1, 4)
                header = shards.npy_bytes(np.zeros(shape, shards.LATENT_DTYPE))[: -nbytes]
                # No dtype or shape is ever read on trust: member sizes here, each sample's .npy header when it is
                # read (in `read`). Checking every header here touched every page of the shard in each worker that
                # opens it (each worker opens every shard of a window): 3.6 ms of CPU an open, 14 µs a sample.
                bad = np.flatnonzero((index[:, 1] != len(header) + nbytes) | (index[:, 0] < len(header))
                                     | (index[:, 0] + index[:, 1] > len(mm)))
                if len(bad):
                    raise ShardError(f"{where}: sample '{side['keys'][bad[0]]}' is not a float16 "
                                     f"{shape} array; the shard is damaged (run `ditpipe verify`)")
                if self.text:
                    text_index = np.asarray(side["text"]["index"], dtype=np.int64).reshape(-1, 2)
                    if len(text_index) != len(index) or (text_index.sum(1) > len(mm)).any():
                        raise ShardError(f"{where}: its caption index does not fit the shard; "
                                         "the shard is damaged (run `ditpipe verify`)")
                    self._texts[s] = text_index
                self._open[s] = ("wds", mm, index[:, 0] + len(header), labels, (shape, header, per))
            else:
                import pyarrow.parquet as pq

                import pyarrow as pa

                where = pa.BufferReader(remote[0]) if remote else self.folder / entry["name"]
                # Memory-mapped, and the row groups' chunks kept as they are: the buffered read and combine_chunks
                # copied the shard twice more, in each worker that opens it (29 → 10 ms of CPU an open of 33 MB).
                table = pq.read_table(where, columns=["latent"] + (["text"] if self.text else []),
                                      memory_map=not remote)
                col = table.column(0)
                if table.num_rows != entry["samples"]:
                    raise ShardError(f"{self.url or self.folder}/{entry['name']}: {table.num_rows:,} rows, the manifest says {entry['samples']:,} "
                                     "samples; the shard is damaged or was altered (run `ditpipe verify`)")
                if self.text:
                    self._texts[s] = table.column(1)
                chunks = [np.frombuffer(c.buffers()[1], dtype=shards.LATENT_DTYPE)[c.offset * per :][: len(c) * per]
                          .reshape((len(c), *shape)) for c in col.chunks if len(c)]
                starts = np.cumsum([0] + [len(c) for c in chunks]).tolist()
                self._open[s] = ("parquet", chunks, starts, labels, (shape, None, per))
        return self._open[s]

    def _local_sidecar(self, entry: dict) -> bytes:
        """A local shard's sidecar bytes, once the shard is checked against the manifest it was planned by: its size
        (one stat, `shards.check_files`) and its sidecar's sha256 (which records the shard's own sha256; ~0.1 ms for
        a 1,000-sample sidecar). A shard that an `encode` rewrote since the manifest was read (one that did not
        respect the run's lock, or a copy) is refused, never read with the old manifest's counts."""
        shards.check_files(self.folder, {"shards": [entry]})
        data = shards.read_meta(self.folder / entry["sidecar"])
        want = entry.get("sidecar_sha256")  # absent only in manifests from before it was recorded
        if want is not None and hashlib.sha256(data).hexdigest() != want:
            raise ShardError(f"{self.folder / entry['name']}: its sidecar {entry['sidecar']} does not match the "
                             f"manifest's sha256; the shard was rewritten or altered since the run read "
                             f"{shards.MANIFEST} (run `ditpipe verify`, re-encode it)")
        return data

    def _where(self, name: str):
        """A shard file's location for messages: its URL, or its path."""
        return _url_join(self.url, name) if self.url else self.folder / name

    def _fetch(self, entry: dict) -> tuple[bytes, bytes]:
        """(shard bytes, sidecar bytes) of a remote shard: the shard of exactly the manifest's size (what
        `shards.check_files` holds a local shard to) and sha256, its sidecar of its sha256 where the manifest
        records one (as a local sidecar)."""
        where = _url_join(self.url, entry["name"])
        data = _read_url(where, int(entry["bytes"]))
        if len(data) != entry["bytes"]:
            raise ShardError(f"{where}: {len(data):,} bytes, the manifest ({shards.MANIFEST}) says "
                             f"{entry['bytes']:,}; the shard was truncated or altered at the remote location; "
                             "re-upload the shard folder")
        if not entry.get("sha256"):
            raise ShardError(f"{where}: the manifest records no sha256 for it, and a remote shard is read only once "
                             "checked by it; the manifest is damaged or was altered (re-encode, re-upload)")
        side = _read_url(_url_join(self.url, entry["sidecar"]), MAX_META_BYTES)
        for what, blob, want in ((entry["name"], data, entry["sha256"]), (entry["sidecar"], side,
                                                                          entry.get("sidecar_sha256"))):
            if want is not None and hashlib.sha256(blob).hexdigest() != want:
                raise ShardError(f"{_url_join(self.url, what)} does not match the manifest's sha256 (changed or "
                                 "damaged at the remote location); re-upload the shard folder")
        return data, side

    def read(self, g: int) -> tuple[np.ndarray, int]:
        """(latent (k, C, H, W) float16, label or -1) of global sample g."""
        s = int(np.searchsorted(self.starts, g, side="right") - 1)
        kind, data, offsets, labels, (shape, header, n) = self._shard(s)  # n: elements (not np.prod a sample: 4 µs)
        i = g - self.starts[s]
        if kind == "wds":
            self._reads = self.__dict__.get("_reads", 0) + 1
            if self._reads % _RELEASE_EVERY == 0:
                self.release()
            offset = int(offsets[i])
            if data[offset - len(header) : offset] != header:  # the page the read touches anyway
                raise ShardError(f"{self._where(self.manifest['shards'][s]['name'])}: sample {i} is not a float16 "
                                 f"{shape} array; the shard is damaged (run `ditpipe verify`)")
            return np.frombuffer(data, dtype=shards.LATENT_DTYPE, count=n, offset=offset).reshape(shape), \
                int(labels[i])
        if len(data) == 1:
            return data[0][i], int(labels[i])
        k = bisect.bisect_right(offsets, i) - 1  # the row group's chunk
        return data[k][i - offsets[k]], int(labels[i])

    def read_text(self, g: int) -> np.ndarray:
        """The caption record (K,) of global sample g (pipeline/text.py's layout, checked, never unpickled)."""
        from pipeline.text import read_record

        s = int(np.searchsorted(self.starts, g, side="right") - 1)
        kind, data = self._shard(s)[:2]
        i = g - self.starts[s]
        if kind == "wds":
            offset, size = (int(x) for x in self._texts[s][i])
            blob = data[offset : offset + size]
        else:
            blob = self._texts[s][int(i)].as_py()
        try:
            return read_record(blob, self.text["dim"], self.text["max_tokens"])
        except ValueError as e:
            raise ShardError(f"{self.folder}: sample {g}'s caption embeddings are damaged ({e}); run `ditpipe "
                             "verify`") from None

    def release(self) -> None:
        """Unmap the pages of the open tar maps from this process: they stay in the page cache, and a later read maps
        them again. Without it every page that reads touched (the kernel maps 64 KiB around each) of up to
        `max_open` shards stayed resident, so a worker's RSS grew with shard size and count, not with the batch:
        +30 MiB per worker at 8 px from 1k to 100k samples, up to max_open × 33 MB for 4×4×32×32 latents. Costs
        a few µs of CPU a 32 KB sample (a read faults its pages in again). Views handed out stay valid."""
        if hasattr(mmap, "MADV_DONTNEED"):
            for kind, data, *_ in self._open.values():
                if kind == "wds" and isinstance(data, mmap.mmap):  # not a fetched (URL) shard
                    data.madvise(mmap.MADV_DONTNEED)


class LatentView:
    """Turns a stored latent into a training sample: slice choice, flip, ε, then the latent normalisation (the
    codec's scale and shift from the manifest unless `norm` says otherwise; see pipeline/latent_norm.py)."""

    def __init__(self, manifest: dict, norm: LatentNorm | None = None):
        lat = manifest["latent"]
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
    With `captions`, also one of each image's captions (tokens padded to the manifest's longest caption)."""

    def __init__(self, store: ShardStore, order: EpochOrder, plan: Plan, rank: int, seed: int, captions: bool = False):
        self.store, self.order, self.plan, self.rank, self.seed = store, order, plan, rank, seed
        self.view = LatentView(store.manifest)
        if captions and not store.text:
            raise ShardError(f"{store.folder}: these shards carry no caption embeddings; encode with --captions")
        self.captions = captions

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, q = key
        indices = self.order(epoch, self.plan.positions(q, self.rank))
        first = self.store.read(int(indices[0]))
        shape = (len(indices), *first[0].shape[1:])  # (B, C, H, W): the first sample's, its bucket's (one a batch)
        mean = _batch_tensor(shape)
        std = _batch_tensor(shape) if self.view.has_std else None
        means, stds, labels = mean.numpy(), None if std is None else std.numpy(), []
        for k, g in enumerate(indices):
            stored, label = first if k == 0 else self.store.read(int(g))
            m, s = self.view.select(stored, sample_key(self.seed, epoch, g))  # (C, H, W) fp16 views
            means[k] = m
            if s is not None:
                stds[k] = s
            labels.append(label)
        batch = {"mean": mean,  # (B, C, H, W) float16
                 "labels": torch.tensor(labels, dtype=torch.long),  # (B,); -1 without labels
                 "indices": torch.from_numpy(indices), "epoch": epoch, "q": q}
        if std is not None:
            batch["std"] = std  # (B, C, H, W) float16
        if self.captions:
            batch["caption"] = self._captions(epoch, indices)
        return batch

    def _captions(self, epoch: int, indices: np.ndarray) -> dict:
        """One caption per sample, chosen by its own keyed stream; an image without captions gets an empty mask,
        which the caption model reads as the null caption."""
        enc, width = self.store.text, self.store.manifest["captions"]["max_tokens_seen"]
        tokens = np.zeros((len(indices), width, enc["dim"]), np.float16)  # (B, L, D)
        mask = np.zeros((len(indices), width), bool)  # (B, L)
        pooled = np.zeros((len(indices), enc["dim"]), np.float16)  # (B, D)
        chosen = np.full(len(indices), -1, np.int64)
        for b, g in enumerate(indices):
            rec = self.store.read_text(int(g))
            if len(rec):
                k = int(keyed_rng(self.seed, epoch, _CAPTION, g).integers(len(rec)))
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
        from pipeline.errors import DataError
        from pipeline.sources import BadImage

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


def open_shards(folder: Path | str) -> tuple[ShardStore, dict]:
    check_location(folder)
    manifest = _load_url_manifest(str(folder)) if is_url(folder) else shards.load_manifest(folder)
    if not is_url(folder):
        shards.check_files(folder, manifest)  # the order allocates by the counts: they must fit the files
    if manifest["num_samples"] == 0:
        raise ShardError(f"'{folder}' holds no samples (every input was skipped); see its manifest's 'skipped'")
    return ShardStore(folder, manifest), manifest


def _load_url_manifest(url: str) -> dict:
    """`shards.load_manifest` for an fsspec URL folder."""
    where = _url_join(url, shards.MANIFEST)
    try:
        raw = _read_url(where, MAX_META_BYTES)
    except ShardError as e:
        raise ShardError(f"no readable {shards.MANIFEST} at '{url}' ({e}); the URL must name a finished ditpipe "
                         "shard folder, uploaded whole") from None
    return shards.parse_manifest(raw, where, remote=True)  # refused as from a path, in the same words


def make_loader(dataset: torch.utils.data.Dataset, plan: Plan, start_step: int, end_step: int, num_workers: int,
                pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """The whole run's micro-batches of `dataset` (MicroBatches or ImageBatches), starting at `start_step` without
    reading what came before."""
    return torch.utils.data.DataLoader(
        dataset, sampler=RunKeys(plan, start_step, end_step), batch_size=None,
        num_workers=num_workers, pin_memory=pin_memory, persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None)
