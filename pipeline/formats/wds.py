"""WebDataset tar shards: `<key>.latent.npy` (fp16 (k, C, H, W)) + `<key>.json` (+ `<key>.text.npy` with captions,
+ `<key>.target.npy` with representation targets), one sample's members consecutive. The sidecar's offset index
(`index`: [latent offset, size, json offset, size] a sample, `text.index` and `target.index`: [offset, size]) lets
the reader map the file and copy a latent or targets without parsing the tar."""

from __future__ import annotations

import io
import json
import mmap
import re
import tarfile
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ditpipe.pipeline import shards
from ditpipe.pipeline.errors import ShardError

NAME, PREFIX, SUFFIX = "wds", "shard", ".tar"
NAME_RE = re.compile(r"shard-[0-9]{5,9}\.tar")  # a manifest's shard names (fullmatch): 5 digits, more past 99,999
NAME_HINT = "shard-NNNNN.tar"
_FAULT_AROUND = 64 << 10  # the pages the kernel maps around a faulting read of a file map


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.tar"


class Writer:
    """Appends samples to an open tar and records where each member's data starts."""

    def __init__(self, path: Path, latent_shape: tuple[int, ...], text: bool, target=None):
        self._file = open(path, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        self.index: list[list[int]] = []  # [latent offset, latent size, json offset, json size]
        self.text_index: list[list[int]] = []  # with captions: [text.npy offset, size]
        self.target_index: list[list[int]] = []  # with targets: [target.npy offset, size]

    def add(self, key: str, latent: np.ndarray, meta: bytes, text: bytes | None,
            target: np.ndarray | None = None) -> None:
        self.index.append(self._member(f"{key}.latent.npy", shards.npy_bytes(latent))
                          + self._member(f"{key}.json", meta))
        if text is not None:
            self.text_index.append(self._member(f"{key}.{shards.TEXT_MEMBER}", text))
        if target is not None:
            self.target_index.append(self._member(f"{key}.{shards.TARGET_MEMBER}", shards.npy_bytes(target)))

    def _member(self, name: str, data: bytes) -> list[int]:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o644, "", ""
        offset = self._tar.offset + len(info.tobuf(tarfile.USTAR_FORMAT))  # data follows the 512-byte header
        self._tar.addfile(info, io.BytesIO(data))
        return [offset, len(data)]

    def close(self) -> None:
        self._tar.close()
        self._file.close()

    def abort(self) -> None:
        self.close()

    def sidecar(self) -> dict:
        """What the reader needs in the sidecar besides keys and labels."""
        return {"index": self.index}

    def text_sidecar(self) -> dict:
        return {"index": self.text_index}

    def target_sidecar(self) -> dict:
        return {"index": self.target_index}


class Reader:
    """Random access to the rows of one tar: mmap (or a fetched URL shard's bytes) + the sidecar's offset index. No
    dtype or shape is read on trust: member sizes are checked here, each sample's .npy header when it is read
    (checking every header here touched every page of the shard in each worker that opens it: 3.6 ms of CPU an
    open, 14 µs a sample)."""

    def __init__(self, source: Path | bytes, side: dict, shape: tuple[int, ...], text: bool, where, target=None):
        if isinstance(source, (bytes, bytearray)):
            self.data = source
        else:
            with open(source, "rb") as f:
                self.data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.shape, self.where = shape, where
        self.buf = np.frombuffer(self.data, dtype=np.uint8)
        per = int(np.prod(shape)) * np.dtype(shards.LATENT_DTYPE).itemsize
        header = shards.npy_bytes(np.zeros(shape, shards.LATENT_DTYPE))[:-per]
        self.header = np.frombuffer(header, dtype=np.uint8)
        index = np.asarray(side["index"], dtype=np.int64).reshape(-1, 4)
        bad = np.flatnonzero((index[:, 1] != len(header) + per) | (index[:, 0] < len(header))
                             | (index[:, 0] + index[:, 1] > len(self.data)))
        if len(bad):
            raise ShardError(f"{where}: sample '{side['keys'][bad[0]]}' is not a float16 {shape} array; the shard is "
                             "damaged (run `ditpipe verify`)")
        self.offsets = index[:, 0] + len(header)  # where each latent's data starts
        self.slice_bytes = per // shape[0]
        # Our writer puts the samples at one stride when their JSON members pad to the same 512-byte blocks: then
        # the rows are one strided (n, k, slice bytes) view of the file, and a batch is one fancy index.
        steps = np.diff(self.offsets)
        self.rows_view = self.headers_view = None
        if len(steps) and (steps == steps[0]).all() and steps[0] >= len(header) + per:
            stride, first = int(steps[0]), int(self.offsets[0])
            self.rows_view = np.lib.stride_tricks.as_strided(  # (n, k, slice bytes)
                self.buf[first:], shape=(len(self.offsets), shape[0], self.slice_bytes),
                strides=(stride, self.slice_bytes, 1), writeable=False)
            self.headers_view = np.lib.stride_tricks.as_strided(  # (n, header bytes)
                self.buf[first - len(header):], shape=(len(self.offsets), len(header)), strides=(stride, 1),
                writeable=False)
        self.touched = None  # [lo, hi): the bytes reads touched since the last release
        self.texts = None
        if text:
            self.texts = np.asarray(side["text"]["index"], dtype=np.int64).reshape(-1, 2)
            if len(self.texts) != len(index) or (self.texts.sum(1) > len(self.data)).any():
                raise ShardError(f"{where}: its caption index does not fit the shard; the shard is damaged (run "
                                 "`ditpipe verify`)")
        self.target, self.target_at = target, None  # targets.Layout; where each record's data starts
        if target is not None:
            at = np.asarray((side.get("target") or {}).get("index") or [], dtype=np.int64).reshape(-1, 2)
            head = len(target.header)
            if len(at) != len(index) or (at[:, 1] != head + target.data_bytes).any() or (at[:, 0] < 0).any() or (
                    at.sum(1) > len(self.data)).any():
                raise ShardError(f"{where}: its target index does not fit the shard or the manifest's target layout "
                                 f"{target.shape} {target.dtype}; the shard is damaged (run `ditpipe verify`)")
            self.target_at = at[:, 0]
            self.target_header = np.frombuffer(target.header, dtype=np.uint8)

    def _check(self, rows: np.ndarray) -> None:
        """Each row's .npy header is exactly the float16 `shape` one (the page the read touches anyway)."""
        starts = self.offsets[rows]
        lo, hi = int(starts.min()) - len(self.header), int(starts.max()) + self.slice_bytes * self.shape[0]
        self.touched = (lo, hi) if self.touched is None else (min(lo, self.touched[0]), max(hi, self.touched[1]))
        if self.headers_view is not None:
            headers = self.headers_view[rows]  # (B, header bytes)
        else:
            headers = self.buf[starts[:, None] - len(self.header) + np.arange(len(self.header))]
        bad = np.flatnonzero((headers != self.header).any(axis=1))
        if len(bad):
            raise ShardError(f"{self.where}: sample {int(rows[bad[0]])} is not a float16 {self.shape} array; the "
                             "shard is damaged (run `ditpipe verify`)")

    def row(self, i: int) -> np.ndarray:
        """Row i's stored latent (k, C, H, W) float16, a read-only view."""
        self._check(np.array([i]))
        return np.frombuffer(self.data, dtype=shards.LATENT_DTYPE, count=int(np.prod(self.shape)),
                             offset=int(self.offsets[i])).reshape(self.shape)

    def gather(self, rows: np.ndarray, at: np.ndarray, picks: list[tuple[np.ndarray, np.ndarray]]) -> None:
        """For each (slices, out) of `picks`: out[at[j]] = row rows[j]'s slice slices[at[j]], a byte copy (out:
        (B, C, H, W) float16, contiguous)."""
        self._check(rows)
        for slices, out in picks:
            flat = out.reshape(len(out), -1).view(np.uint8)  # (B, slice bytes)
            if self.rows_view is not None:
                flat[at] = self.rows_view[rows, slices[at]]
                continue
            starts = self.offsets[rows] + slices[at] * self.slice_bytes
            for j, start in zip(at.tolist(), starts.tolist()):
                flat[j] = self.buf[start : start + self.slice_bytes]

    def text(self, i: int) -> bytes:
        offset, size = (int(x) for x in self.texts[i])
        return self.data[offset : offset + size]

    def targets(self, rows: np.ndarray, at: np.ndarray, slices: np.ndarray, out: np.ndarray) -> None:
        """out[at[j]] = row rows[j]'s targets, slice slices[at[j]], as float16 (out: (B, T, D)); each record's .npy
        header checked against the manifest's layout first."""
        lay, head = self.target, len(self.target_header)
        for j, r in zip(at.tolist(), rows.tolist()):
            start = int(self.target_at[r])
            if not np.array_equal(self.buf[start : start + head], self.target_header):
                raise ShardError(f"{self.where}: sample {r}'s targets are not a {lay.dtype} {lay.shape} record; the "
                                 "shard is damaged (run `ditpipe verify`)")
            stored = lay.view(self.buf[start + head : start + head + lay.data_bytes])
            lay.decode_into(stored[slices[j]], out[j])
        if len(rows):
            lo, hi = int(self.target_at[rows].min()), int(self.target_at[rows].max()) + head + lay.data_bytes
            self.touched = (lo, hi) if self.touched is None else (min(lo, self.touched[0]), max(hi, self.touched[1]))

    def release(self) -> None:
        """Unmap the pages reads touched (they stay in the page cache, and a later read maps them again): without it
        every page touched (the kernel maps 64 KiB around each) of up to `max_open` shards stayed resident, so a
        worker's RSS grew with shard size and count, not with the batch. Views handed out stay valid."""
        if self.touched is not None and hasattr(mmap, "MADV_DONTNEED") and isinstance(self.data, mmap.mmap):
            # Only the range reads touched since the last release, widened by the kernel's fault-around, page-aligned.
            lo = max(0, self.touched[0] - _FAULT_AROUND) // mmap.PAGESIZE * mmap.PAGESIZE
            self.data.madvise(mmap.MADV_DONTNEED, lo, min(self.touched[1] + _FAULT_AROUND, len(self.data)) - lo)
        self.touched = None


def _npy_header_len(buf, offset: int) -> int:
    """Length of the .npy header at `offset` (magic, version, header length field, header)."""
    major = buf[offset + 6]
    if major == 1:
        return 10 + int.from_bytes(buf[offset + 8 : offset + 10], "little")
    return 12 + int.from_bytes(buf[offset + 8 : offset + 12], "little")


def iter_shard(path: Path, sidecar: dict, shape: tuple[int, ...],
               read_text: Callable[[bytes], np.ndarray] | None, target=None) -> Iterator[shards.Sample]:
    """Every sample of a tar in order, through its offset index + mmap (`target`: the targets' Layout)."""
    expected = shards.npy_bytes(np.zeros(shape, shards.LATENT_DTYPE))  # every latent member is this header + data
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        texts = (sidecar.get("text") or {}).get("index") or [None] * len(sidecar["keys"])
        targets = (sidecar.get("target") or {}).get("index") if target is not None else None
        for i, (key, (lo, ln, jo, jn), where) in enumerate(zip(sidecar["keys"], sidecar["index"], texts)):
            header = _npy_header_len(mm, lo)
            if ln != len(expected) or mm[lo : lo + header] != expected[:header]:
                # another dtype (an object-array pickle, say) or shape: refuse it, never reinterpret its bytes
                raise ShardError(f"{path}: sample '{key}' latent is not a {shards.LATENT_DTYPE}{shape} .npy; "
                                 "the shard is damaged or tampered (run `ditpipe verify`)")
            # copy at once: a view still alive when the mmap closes raises BufferError ("exported pointers")
            latent = np.frombuffer(mm, dtype=shards.LATENT_DTYPE, count=int(np.prod(shape)), offset=lo + header).copy()
            text = None if where is None else read_text(mm[where[0] : where[0] + where[1]])
            tgt = None
            if target is not None:
                to, tn = targets[i]
                if tn != len(target.header) + target.data_bytes or mm[to : to + len(target.header)] != target.header:
                    raise ShardError(f"{path}: sample '{key}' targets are not a {target.dtype} {target.shape} record;"
                                     " the shard is damaged or tampered (run `ditpipe verify`)")
                tgt = target.view(mm[to + len(target.header) : to + tn]).copy()
            yield shards.Sample(key, latent.reshape(shape), json.loads(bytes(mm[jo : jo + jn])), text, tgt)


def decode(path: Path, shape, allowed: set[str], side: dict | None, problems: list[str],
           enc: dict | None, n_classes: int, target=None) -> int:
    """`ditpipe verify`'s read: plain tar parsing, deliberately not our offset index; returns the good samples."""
    samples: dict[str, dict[str, tuple[int, bytes]]] = {}
    order: list[str] = []
    with tarfile.open(path, mode="r:") as tar:
        for info in tar:
            key, _, ext = info.name.partition(".")
            if not info.isfile() or ext not in allowed or "/" in info.name:
                extra = [m for m, on in ((shards.TEXT_MEMBER, enc), (shards.TARGET_MEMBER, target)) if on]
                problems.append(f"{path.name}: unexpected member '{info.name}' (only <key>.latent.npy, <key>.json"
                                f"{''.join(' and <key>.' + m for m in extra)} belong in a shard; it was not read)")
                continue
            if key not in samples:
                samples[key] = {}
                order.append(key)
            elif key != order[-1]:  # webdataset groups members by consecutive key: this sample would split
                problems.append(f"{path.name}: the members of sample '{key}' are not consecutive ('{info.name}')")
            if ext in samples[key]:
                problems.append(f"{path.name}: duplicate member '{info.name}'")
            samples[key][ext] = (info.offset_data, tar.extractfile(info).read())
    good = 0
    for key in order:
        members = samples[key]
        latent, meta = members.get("latent.npy"), members.get("json")
        meta_text = meta and meta[1].decode("utf-8", "replace")
        ok = shards.check_sample(path.name, key, latent and latent[1], meta_text, shape, problems, True, n_classes)
        if enc is not None:
            text = members.get(shards.TEXT_MEMBER)
            ok = shards.check_text(path.name, key, text and text[1], meta_text, enc, problems) and ok
        if target is not None:
            tgt = members.get(shards.TARGET_MEMBER)
            ok = shards.check_target(path.name, key, tgt and tgt[1], target, problems, True) and ok
        good += ok
    if side is not None:
        if side.get("keys") != order:
            problems.append(f"{path.name}: member keys differ from its sidecar's")
        else:
            for key, (lo, ln, jo, jn) in zip(order, side["index"]):
                if samples[key].get("latent.npy", (None,))[0] != lo or samples[key].get("json", (None,))[0] != jo:
                    problems.append(f"{path.name}: sidecar offset index is wrong for '{key}'")
                    break
            # the loader reads captions and targets through these indices, so they must be exact
            for on, member, field, what in ((enc, shards.TEXT_MEMBER, "text", "caption"),
                                            (target, shards.TARGET_MEMBER, "target", "target")):
                actual = [[samples[k][member][0], len(samples[k][member][1])] if member in samples[k] else None
                          for k in order]
                if on is not None and (side.get(field) or {}).get("index") != actual:
                    problems.append(f"{path.name}: sidecar {what} index is missing or wrong")
    return good
