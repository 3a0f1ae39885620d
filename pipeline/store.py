"""Random access to the samples of a shard folder, by global index: each shard opened lazily (per process) through
its format's Reader (pipeline/formats/), at most `max_open` at a time, and checked against the manifest before a
byte of it is read. A URL folder (fsspec, pipeline/remote.py) is read from the node's shard cache (pipeline/cache.py):
each shard's verified local copy (size and sha256 held to the manifest when it was downloaded), mapped exactly as a
local shard is.

`gather` reads a whole micro-batch: its indices grouped by shard (in the order the batch first reaches each), each
shard's rows copied with one array index, so the bytes land in the batch's order as one read a sample would put
them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from ditpipe.pipeline import formats, remote, shards
from ditpipe.pipeline.cache import ShardCache
from ditpipe.pipeline.errors import ShardError
from ditpipe.pipeline.manifest import Manifest, check_files, checked_labels, load_manifest

_RELEASE_EVERY = 64  # reads between ShardStore.release() calls: bounds the mapped pages a process holds


class ShardStore:
    """Sample g of a shard folder: `read` one, `gather` a batch, `read_text` one's caption record."""

    def __init__(self, folder: Path | str, manifest: Manifest | dict, max_open: int = 16, storage=None):
        self.url = str(folder) if remote.is_url(folder) else None
        self.cache = ShardCache(self.url, storage) if self.url else None  # storage: a StorageConfig, else configured
        manifest = Manifest.of(manifest)
        self.folder, self.manifest = (folder if self.url else Path(folder)), manifest
        formats.get(manifest.format)  # an unknown format is refused before any worker starts
        # Each shard's latent shape: the manifest's, or its aspect-ratio bucket's (one bucket a shard).
        self.buckets = [s.get("bucket") for s in manifest.entries]
        self.shapes = [manifest.latent_shape(b) for b in self.buckets]
        self.layouts = [manifest.target_layout(b) for b in self.buckets]  # the targets' (None without)
        self.counts = [s["samples"] for s in manifest.entries]
        self.starts = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        self.max_open = max_open
        self._open: dict[int, tuple] = {}  # shard → (its format's Reader, its labels)
        self._reads = 0
        self.text = manifest.text_encoder
        self.num_classes = manifest.num_classes

    def __getstate__(self):  # worker processes open their own maps
        return {**self.__dict__, "_open": {}, "_reads": 0}

    def _shard(self, s: int) -> tuple:
        if s not in self._open:
            if len(self._open) >= self.max_open:
                self._open.pop(next(iter(self._open)))
            entry = self.manifest.entries[s]
            for attempt in range(3):  # a cached copy evicted between its download and its open is fetched again
                try:
                    self._open[s] = self._open_shard(s, entry)
                    break
                except FileNotFoundError:
                    if self.cache is None or attempt == 2:
                        raise
        return self._open[s]

    def _open_shard(self, s: int, entry: dict) -> tuple:
        if self.cache is not None:  # the cached copies, verified against the manifest when they were downloaded;
            source, side_path = self.cache.local(entry)  # held to its size and its sidecar's sha256 as local ones
            side = json.loads(self._checked_sidecar(shards.read_meta(side_path), entry))
        else:
            check_files(self.folder, {"shards": [entry]})
            source = self.folder / entry["name"]
            side = json.loads(self._checked_sidecar(shards.read_meta(self.folder / entry["sidecar"]), entry))
        where = self._where(entry["name"])
        shards.check_sidecar(side, entry, where)  # reads below index by the manifest's count
        labels = np.array(checked_labels(side["labels"], self.num_classes, str(where)), dtype=np.int64)
        reader = formats.get(self.manifest.format).Reader
        return reader(source, side, self.shapes[s], bool(self.text), where, self.layouts[s]), labels

    def _checked_sidecar(self, data: bytes, entry: dict) -> bytes:
        """A shard's sidecar bytes, once checked against the manifest it was planned by: the shard's size is checked
        by the caller (one stat: `manifest.check_files`, or the cache's), the sidecar's sha256 here (it records the
        shard's own sha256; ~0.1 ms for a 1,000-sample sidecar). A shard that an `encode` rewrote since the manifest
        was read (one that did not respect the run's lock, or a copy) is refused, never read with the old manifest's
        counts."""
        want = entry.get("sidecar_sha256")  # absent only in manifests from before it was recorded
        if want is not None and hashlib.sha256(data).hexdigest() != want:
            raise ShardError(f"{self._where(entry['name'])}: its sidecar {entry['sidecar']} does not match the "
                             f"manifest's sha256; the shard was rewritten or altered since the run read "
                             f"{shards.MANIFEST} (run `ditpipe verify`, re-encode it)")
        return data

    def _where(self, name: str):
        """A shard file's location for messages: its URL, or its path."""
        return remote.url_join(self.url, name) if self.url else self.folder / name

    def _counted(self, n: int) -> None:
        self._reads += n
        if self._reads >= _RELEASE_EVERY:
            self.release()
            self._reads = 0

    def shape_of(self, g: int) -> tuple[int, ...]:
        """(k, C, H, W) of global sample g's stored latent: its shard's (its bucket's)."""
        return self.shapes[int(np.searchsorted(self.starts, g, side="right") - 1)]

    def read(self, g: int) -> tuple[np.ndarray, int]:
        """(latent (k, C, H, W) float16, label or -1) of global sample g."""
        s = int(np.searchsorted(self.starts, g, side="right") - 1)
        reader, labels = self._shard(s)
        i = g - int(self.starts[s])
        self._counted(1)
        return reader.row(i), int(labels[i])

    def gather(self, indices: np.ndarray, picks: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
        """Labels (B,) of global samples `indices`, and for each (slices (B,), out (B, C, H, W) float16) of `picks`:
        out[j] = slice slices[j] of sample indices[j]'s stored latent. One array index a shard, not a call a sample."""
        indices = np.asarray(indices, dtype=np.int64)
        shard_of = np.searchsorted(self.starts, indices, side="right") - 1
        labels = np.empty(len(indices), dtype=np.int64)
        _, first = np.unique(shard_of, return_index=True)
        for s in shard_of[np.sort(first)].tolist():  # the shards in the order the batch reaches them
            at = np.flatnonzero(shard_of == s)
            reader, shard_labels = self._shard(s)
            rows = indices[at] - self.starts[s]
            reader.gather(rows, at, picks)
            labels[at] = shard_labels[rows]
            self._counted(len(at))
        return labels

    def gather_targets(self, indices: np.ndarray, slices: np.ndarray, out: np.ndarray) -> None:
        """out[j] = slice slices[j] of sample indices[j]'s stored targets, as float16 (out: (B, T, D)); a shard at a
        time, as `gather`."""
        indices = np.asarray(indices, dtype=np.int64)
        shard_of = np.searchsorted(self.starts, indices, side="right") - 1
        for s in np.unique(shard_of).tolist():
            at = np.flatnonzero(shard_of == s)
            self._shard(s)[0].targets(indices[at] - self.starts[s], at, slices, out)

    def read_text(self, g: int) -> np.ndarray:
        """The caption record (K,) of global sample g (pipeline/text.py's layout, checked, never unpickled)."""
        from ditpipe.pipeline.text import read_record

        s = int(np.searchsorted(self.starts, g, side="right") - 1)
        blob = self._shard(s)[0].text(g - int(self.starts[s]))
        try:
            return read_record(blob, self.text["dim"], self.text["max_tokens"])
        except ValueError as e:
            raise ShardError(f"{self.folder}: sample {g}'s caption embeddings are damaged ({e}); run `ditpipe "
                             "verify`") from None

    def release(self) -> None:
        """Let go of the pages reads touched in every open shard (tar: unmapped, so a worker's RSS follows the batch,
        not shard size and count; they stay in the page cache). Views handed out stay valid."""
        for reader, _ in self._open.values():
            reader.release()


def open_shards(folder: Path | str, storage=None) -> tuple[ShardStore, dict]:
    """(store, manifest) of a local or URL shard folder; `storage` (StorageConfig) places a URL folder's cache, else
    what `cache.configure` applied, else the defaults."""
    remote.check_location(folder)
    manifest = remote.load_url_manifest(str(folder)) if remote.is_url(folder) else load_manifest(folder)
    if not remote.is_url(folder):
        check_files(folder, manifest)  # the order allocates by the counts: they must fit the files
    if manifest.num_samples == 0:
        raise ShardError(f"'{folder}' holds no samples (every input was skipped); see its manifest's 'skipped'")
    return ShardStore(folder, manifest, storage=storage), manifest
