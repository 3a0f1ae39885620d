"""Parquet shards: columns key (string), latent (fixed_size_binary: the fp16 (k, C, H, W) bytes), json (string)
(+ text: the caption record's .npy bytes; + target: fixed_size_binary, the targets' record without its .npy header),
uncompressed plain pages, one row group per 256 rows; the latent and target shapes and dtypes are in the schema's
metadata."""

from __future__ import annotations

import json
import mmap
import re
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ditpipe.pipeline import shards

NAME, PREFIX, SUFFIX = "parquet", "part", ".parquet"
NAME_RE = re.compile(r"part-[0-9]{5,9}\.parquet")  # a manifest's shard names (fullmatch): 5 digits, more past 99,999
NAME_HINT = "part-NNNNN.parquet"
ROWS_PER_GROUP = 256
_FAULT_AROUND = 64 << 10  # the pages the kernel maps around a faulting read of a file map


def shard_name(i: int) -> str:
    return f"part-{i:05d}.parquet"


class Writer:
    def __init__(self, path: Path, latent_shape: tuple[int, ...], text: bool, target=None):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.text, self.target = text, target
        nbytes = int(np.prod(latent_shape)) * np.dtype(shards.LATENT_DTYPE).itemsize
        meta = {"ditpipe.latent_shape": json.dumps(list(latent_shape)), "ditpipe.latent_dtype": shards.LATENT_DTYPE}
        cols = [("key", pa.string()), ("latent", pa.binary(nbytes)), ("json", pa.string())]
        if text:
            cols.append(("text", pa.binary()))
        if target is not None:
            cols.append(("target", pa.binary(target.data_bytes)))
            meta |= {"ditpipe.target_shape": json.dumps(list(target.shape)), "ditpipe.target_dtype": target.dtype}
        self._schema = pa.schema(cols, metadata=meta)
        # Plain pages: every latent is unique, so a dictionary page only costs a decode pass at read time.
        self._pq = pq.ParquetWriter(path, self._schema, compression="none", use_dictionary=False)
        self._rows: list[tuple] = []

    def add(self, key: str, latent: np.ndarray, meta: bytes, text: bytes | None,
            target: np.ndarray | None = None) -> None:
        row = (key, np.ascontiguousarray(latent).tobytes(), meta.decode())
        row += (text,) if self.text else ()
        row += (np.ascontiguousarray(target).tobytes(),) if self.target is not None else ()
        self._rows.append(row)
        if len(self._rows) >= ROWS_PER_GROUP:
            self._flush_rows()

    def _flush_rows(self) -> None:
        import pyarrow as pa

        if self._rows:
            cols = list(zip(*self._rows))
            self._pq.write_table(pa.Table.from_arrays([pa.array(c, t) for c, t in zip(cols, self._schema.types)],
                                                      schema=self._schema))
            self._rows = []

    def close(self) -> None:
        self._flush_rows()
        self._pq.close()

    def abort(self) -> None:
        self._pq.close()

    def sidecar(self) -> dict:
        return {}  # the reader finds rows through the file's own metadata

    def text_sidecar(self) -> dict:
        return {}

    def target_sidecar(self) -> dict:
        return {}


class Reader:
    """Random access to the rows of one Parquet shard. Our files (uncompressed PLAIN pages of a fixed-size column)
    store each latent's bytes verbatim, so the reader walks the latent column's page headers once and maps the
    file: each data page's rows are a (rows, k, C, H, W) float16 view of the map, and the pages reads touch are let
    go of on `release`, as a tar's are. Decoding the column instead (pyarrow) copied the whole shard into each worker
    that opened it (every shard of its window: peak memory grew with the data set) and cost 30 ms an open of 33 MB.
    A file laid out otherwise (or a fetched URL shard's bytes that are) is decoded by pyarrow as before."""

    def __init__(self, source: Path | bytes, side: dict, shape: tuple[int, ...], text: bool, where, target=None):
        import pyarrow as pa
        import pyarrow.parquet as pq

        from ditpipe.pipeline.errors import ShardError

        remote = isinstance(source, (bytes, bytearray))
        if remote:
            self.data = source
        else:
            with open(source, "rb") as f:
                self.data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.touched, self.page_at = None, None  # [lo, hi) of the map reads touched; each chunk's file offset
        per = int(np.prod(shape))
        meta = pq.ParquetFile(pa.BufferReader(self.data) if remote else source).metadata
        nbytes = per * np.dtype(shards.LATENT_DTYPE).itemsize
        pages = _latent_pages(np.frombuffer(self.data, dtype=np.uint8), meta, nbytes, "latent")
        if pages is not None:
            num_rows = meta.num_rows
            self.chunks = [np.frombuffer(self.data, dtype=shards.LATENT_DTYPE, count=n * per, offset=at)
                           .reshape((n, *shape)) for at, n in pages if n]
            self.page_at = [at for at, n in pages if n]
        else:  # the row groups' chunks kept as they are: combine_chunks would copy the shard again
            table = pq.read_table(pa.BufferReader(self.data) if remote else source, columns=["latent"],
                                  memory_map=not remote)
            num_rows = table.num_rows
            self.chunks = [np.frombuffer(c.buffers()[1], dtype=shards.LATENT_DTYPE)[c.offset * per :][: len(c) * per]
                           .reshape((len(c), *shape)) for c in table.column(0).chunks if len(c)]
        if num_rows != len(side["keys"]):
            raise ShardError(f"{where}: {num_rows:,} rows, the manifest says {len(side['keys']):,} samples; the "
                             "shard is damaged or was altered (run `ditpipe verify`)")
        self.starts = np.cumsum([0] + [len(c) for c in self.chunks])  # first row of each chunk
        self.texts = None
        if text:
            self.texts = pq.read_table(pa.BufferReader(self.data) if remote else source, columns=["text"],
                                       memory_map=not remote).column(0)
        self.target, self.target_chunks, self.target_starts = target, None, None
        if target is not None:
            self._open_targets(source, meta, num_rows, remote, where)

    def _open_targets(self, source, meta, num_rows: int, remote: bool, where) -> None:
        """The target column as (rows, record bytes) views of the map (our layout), else decoded by pyarrow."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        from ditpipe.pipeline.errors import ShardError

        size = self.target.data_bytes
        names = [meta.schema.column(i).name for i in range(meta.num_columns)]
        schema = meta.schema.to_arrow_schema()
        if "target" not in names or schema.field("target").type != pa.binary(size):
            raise ShardError(f"{where}: no target column of {size:,}-byte records (the manifest's layout "
                             f"{self.target.shape} {self.target.dtype}); the shard is damaged (run `ditpipe verify`)")
        pages = _latent_pages(np.frombuffer(self.data, dtype=np.uint8), meta, size, "target")
        self.target_page_at = None
        if pages is not None:
            self.target_chunks = [np.frombuffer(self.data, dtype=np.uint8, count=n * size, offset=at).reshape(n, size)
                                  for at, n in pages if n]
            self.target_page_at = [at for at, n in pages if n]  # so `release` lets go of the pages targets touch
        else:
            table = pq.read_table(pa.BufferReader(self.data) if remote else source, columns=["target"],
                                  memory_map=not remote)
            self.target_chunks = [np.frombuffer(c.buffers()[1], dtype=np.uint8)[c.offset * size :][: len(c) * size]
                                  .reshape(len(c), size) for c in table.column(0).chunks if len(c)]
        self.target_starts = np.cumsum([0] + [len(c) for c in self.target_chunks])
        if self.target_starts[-1] != num_rows:
            raise ShardError(f"{where}: {int(self.target_starts[-1]):,} target rows for {num_rows:,} samples; the "
                             "shard is damaged (run `ditpipe verify`)")

    def targets(self, rows: np.ndarray, at: np.ndarray, slices: np.ndarray, out: np.ndarray) -> None:
        """out[at[j]] = row rows[j]'s targets, slice slices[at[j]], as float16 (out: (B, T, D))."""
        chunk = np.searchsorted(self.target_starts, rows, side="right") - 1
        size = self.target.data_bytes
        for j, r, k in zip(at.tolist(), rows.tolist(), chunk.tolist()):
            local = r - int(self.target_starts[k])
            stored = self.target.view(self.target_chunks[k][local])
            self.target.decode_into(stored[slices[j]], out[j])
            if self.target_page_at is not None:
                lo = self.target_page_at[k] + local * size
                self.touched = (lo, lo + size) if self.touched is None else (min(lo, self.touched[0]),
                                                                             max(lo + size, self.touched[1]))

    def row(self, i: int) -> np.ndarray:
        """Row i's stored latent (k, C, H, W) float16, a read-only view."""
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        self._touch(k, i - int(self.starts[k]), i - int(self.starts[k]))
        return self.chunks[k][i - int(self.starts[k])]

    def gather(self, rows: np.ndarray, at: np.ndarray, picks: list[tuple[np.ndarray, np.ndarray]]) -> None:
        """For each (slices, out) of `picks`: out[at[j]] = row rows[j]'s slice slices[at[j]] (out: (B, C, H, W)
        float16): one array index a data page."""
        chunk = np.searchsorted(self.starts, rows, side="right") - 1
        for k in np.unique(chunk).tolist():
            mine = chunk == k
            local = rows[mine] - self.starts[k]
            self._touch(k, int(local.min()), int(local.max()))
            for slices, out in picks:
                out[at[mine]] = self.chunks[k][local, slices[at[mine]]]

    def _touch(self, k: int, first: int, last: int) -> None:
        if self.page_at is not None:
            size = self.chunks[k][0].nbytes
            lo, hi = self.page_at[k] + first * size, self.page_at[k] + (last + 1) * size
            self.touched = (lo, hi) if self.touched is None else (min(lo, self.touched[0]), max(hi, self.touched[1]))

    def text(self, i: int) -> bytes:
        return self.texts[int(i)].as_py()

    def release(self) -> None:
        """Let go of the mapped pages reads touched (they stay in the page cache); views handed out stay valid."""
        if self.touched is not None and hasattr(mmap, "MADV_DONTNEED") and isinstance(self.data, mmap.mmap):
            # Only the range reads touched since the last release, widened by the kernel's fault-around, page-aligned.
            lo = max(0, self.touched[0] - _FAULT_AROUND) // mmap.PAGESIZE * mmap.PAGESIZE
            self.data.madvise(mmap.MADV_DONTNEED, lo, min(self.touched[1] + _FAULT_AROUND, len(self.data)) - lo)
        self.touched = None


def _latent_pages(buf: np.ndarray, meta, nbytes: int, column: str) -> list[tuple[int, int]] | None:
    """(file offset of the first value, rows) of each data page of a fixed-size column (`latent`, `target`), in row
    order; None unless
    every page is an uncompressed PLAIN v1 data page whose values, `nbytes` each, fill it to its end (no nulls), all
    inside the file: the layout our Writer makes. Every number is checked before it is used as an offset."""
    try:
        names = [meta.schema.column(i).name for i in range(meta.num_columns)]
        col = names.index(column)
        nullable = meta.schema.column(col).max_definition_level > 0
        pages = []
        for g in range(meta.num_row_groups):
            c = meta.row_group(g).column(col)
            if (c.compression != "UNCOMPRESSED" or c.dictionary_page_offset is not None
                    or c.physical_type != "FIXED_LEN_BYTE_ARRAY"):
                return None
            pos, end, rows = c.data_page_offset, c.data_page_offset + c.total_compressed_size, 0
            if not 0 <= pos <= end <= len(buf):
                return None
            while pos < end:
                head = _page_header(buf, pos)
                if head is None:
                    return None
                body, size, n = head
                values = body + (4 + int.from_bytes(buf[body : body + 4].tobytes(), "little") if nullable else 0)
                if n < 0 or values + n * nbytes != body + size or body + size > end:
                    return None
                pages.append((values, n))
                rows, pos = rows + n, body + size
            if rows != meta.row_group(g).num_rows:
                return None
        return pages if sum(n for _, n in pages) == meta.num_rows else None
    except (ValueError, IndexError, KeyError, OverflowError):
        return None


def _page_header(buf: np.ndarray, pos: int) -> tuple[int, int, int] | None:
    """(where the page's body starts, its size, its values) of a PLAIN v1 data page's header at `pos`, else None."""
    t, head = _Thrift(buf, pos), {}

    def page(fid: int, kind: int) -> None:
        if fid in (1, 3) and kind == 5:  # type, compressed_page_size
            head[fid] = t.zigzag()
        elif fid == 5 and kind == 12:  # data_page_header: num_values, encoding (statistics skipped)
            t.struct(lambda f, k: head.__setitem__(("data", f), t.zigzag()) if f in (1, 2) and k == 5 else t.skip(k))
        else:
            t.skip(kind)

    t.struct(page)
    if head.get(1) != 0 or head.get(("data", 2)) != 0 or 3 not in head or ("data", 1) not in head:  # DATA_PAGE, PLAIN
        return None
    return t.pos, head[3], head[("data", 1)]



class _Thrift:
    """Just enough of Thrift's compact protocol to walk a Parquet page header (skipping what it does not need)."""

    def __init__(self, buf, pos: int):
        self.buf, self.pos = buf, pos

    def varint(self) -> int:
        out = shift = 0
        for _ in range(10):
            b = int(self.buf[self.pos])
            self.pos += 1
            out |= (b & 0x7F) << shift
            if not b & 0x80:
                return out
            shift += 7
        raise ValueError("varint too long")

    def zigzag(self) -> int:
        n = self.varint()
        return (n >> 1) ^ -(n & 1)

    def skip(self, kind: int, depth: int = 0) -> None:
        if depth > 8:
            raise ValueError("nested too deep")
        if kind in (1, 2):
            return
        if kind == 3:
            self.pos += 1
        elif kind in (4, 5, 6):
            self.varint()
        elif kind == 7:
            self.pos += 8
        elif kind == 8:
            size = self.varint()  # read first: `self.pos += self.varint()` would add to the position before it
            self.pos += size
        elif kind in (9, 10):
            head = int(self.buf[self.pos])
            self.pos += 1
            size = head >> 4 if head >> 4 != 15 else self.varint()
            for _ in range(size):
                self.skip(head & 0x0F, depth + 1)
        elif kind == 12:
            self.struct(lambda fid, k: self.skip(k, depth + 1))
        else:
            raise ValueError(f"thrift type {kind}")

    def struct(self, field) -> None:
        last = 0
        while True:
            head = int(self.buf[self.pos])
            self.pos += 1
            if head == 0:
                return
            delta, kind = head >> 4, head & 0x0F
            fid = last + delta if delta else self.zigzag()
            last = fid
            field(fid, kind)


def iter_shard(path: Path, sidecar: dict, shape: tuple[int, ...],
               read_text: Callable[[bytes], np.ndarray] | None, target=None) -> Iterator[shards.Sample]:
    """Every sample of a Parquet shard in order, through its binary columns (`target`: the targets' Layout)."""
    import pyarrow.parquet as pq

    cols = ["key", "latent", "json"] + (["text"] if read_text else []) + (["target"] if target is not None else [])
    nper = int(np.prod(shape))
    for batch in pq.ParquetFile(path).iter_batches(batch_size=ROWS_PER_GROUP, columns=cols):
        keys, jsons = batch.column(0).to_pylist(), batch.column(2).to_pylist()
        texts = batch.column("text").to_pylist() if read_text else [None] * len(keys)
        targets = batch.column("target").to_pylist() if target is not None else [None] * len(keys)
        flat = np.frombuffer(batch.column(1).buffers()[1], dtype=shards.LATENT_DTYPE)
        start = batch.column(1).offset * nper
        for i, key in enumerate(keys):
            yield shards.Sample(key, flat[start + i * nper : start + (i + 1) * nper].reshape(shape).copy(),
                                json.loads(jsons[i]), None if texts[i] is None else read_text(texts[i]),
                                None if targets[i] is None else target.view(targets[i]).copy())


def decode(path: Path, shape, allowed, side: dict | None, problems: list[str], enc: dict | None,
           n_classes: int, target=None) -> int:
    """`ditpipe verify`'s read: the whole table, each value decoded on its own; returns the good samples."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    columns = ["key", "latent", "json"] + (["text"] if enc else []) + (["target"] if target is not None else [])
    if table.column_names != columns:
        problems.append(f"{path.name}: columns {table.column_names}, expected {columns}")
        return 0
    meta = table.schema.metadata or {}
    if json.loads(meta.get(b"ditpipe.latent_shape", b"null")) != list(shape):
        problems.append(f"{path.name}: schema latent shape does not match the manifest's {list(shape)}")
    good = 0
    keys = table.column("key").to_pylist()
    texts = table.column("text").to_pylist() if enc else [None] * len(keys)
    targets = table.column("target").to_pylist() if target is not None else [None] * len(keys)
    for key, latent, meta, text, tgt in zip(keys, table.column("latent").to_pylist(),
                                            table.column("json").to_pylist(), texts, targets):
        ok = shards.check_sample(path.name, key, latent, meta, shape, problems, False, n_classes)
        ok = (shards.check_text(path.name, key, text, meta, enc, problems) and ok) if enc else ok
        good += (shards.check_target(path.name, key, tgt, target, problems, False) and ok) if target else ok
    if side is not None and side.get("keys") != keys:
        problems.append(f"{path.name}: keys differ from its sidecar's")
    return good
