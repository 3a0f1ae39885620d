"""The on-disk format between the stages: latent shards, their sidecars, and the manifest.

    shards/<name>/manifest.json          the contract: source, codec, latent layout, labels, shards + sha256, skips
    shards/<name>/shard-00000.tar        WebDataset tar: <key>.latent.npy (fp16, (k, C, H, W)) + <key>.json
                                         (+ <key>.text.npy with captions: the record of pipeline/text.py)
    shards/<name>/part-00000.parquet     or Parquet: key, latent (fixed_size_binary), json (+ text: .npy bytes)
    shards/<name>/shard-00000.meta.json  sidecar: count, keys, labels, member offsets, skips, per-channel sums

Shard i holds inputs [i·n, (i+1)·n) of the source's input list. With aspect-ratio buckets the input list is ordered
by bucket and cut within each bucket's run, so a shard holds one bucket: its latents have that bucket's shape
(`buckets[b].latent_shape`; the manifest's `latent.shape` stays the square one of `source.image_size`), its sidecar
and manifest entry name it (`bucket`), and the manifest counts each bucket's samples and shards. A shard is complete
when its sidecar exists and records the shard file's size and sha256; the manifest is the merge of the sidecars in
shard order, so a resumed or multi-process encode gives the same manifest as one uninterrupted process. Readers
never unpickle: arrays come from `np.load(allow_pickle=False)` or `np.frombuffer`, metadata from JSON.
"""

from __future__ import annotations

import io
import json
import mmap
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from pipeline import __version__, atomic
from pipeline.errors import ShardError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PARAMS = "encode-params.json"  # written first, so even a half-finished folder refuses other parameters
LATENT_DTYPE = "float16"
SAMPLE_MEMBERS = ("latent.npy", "json")  # the only tar members a sample may have (+ TEXT_MEMBER with captions)
TEXT_MEMBER = "text.npy"
_SHARD_RE = re.compile(r"^(shard-\d{5}\.tar|part-\d{5}\.parquet)$")
# The only names a manifest may give its shards (fullmatch, ASCII digits): a plain file name of ours in the folder,
# never a path: no separator, no `..`, not absolute (`shard_name` writes 5 digits, more past shard 99,999).
_ENTRY_NAME = {"wds": re.compile(r"shard-[0-9]{5,9}\.tar"), "parquet": re.compile(r"part-[0-9]{5,9}\.parquet")}
MAX_META_BYTES = 64 << 20  # a manifest or sidecar: far above any real one (~100 KB a shard)
MAX_TOKENS = 4096  # a caption record's tokens (CLIP 77, T5 up to 512 in practice)


REUSE_DIR = ".reuse"  # hard links of the shards an update replaces, until its manifest is written (pipeline/reuse.py)


def shard_name(fmt: str, i: int) -> str:
    return f"shard-{i:05d}.tar" if fmt == "wds" else f"part-{i:05d}.parquet"


_OURS_RE = re.compile(r"^(?:shard|part)-(\d{5})\.(?:tar|parquet|meta\.json|stat\.json)$")


def shard_index(name: str) -> int | None:
    """i of a shard file or of its sidecar or stat cache (`shard-0000i.tar`, `part-0000i.meta.json`, ...)."""
    match = _OURS_RE.match(name)
    return int(match.group(1)) if match else None


def sidecar_name(shard: str) -> str:
    return shard.rsplit(".", 1)[0] + ".meta.json"


def stat_name(shard: str) -> str:
    """The shard's file-stat cache: {file: [size, mtime_ns, sha256, checked_ns]} of its inputs, when they were hashed.
    Only a cache (a missing or stale one costs hashing), so it is not part of the manifest's checksums."""
    return shard.rsplit(".", 1)[0] + ".stat.json"


def listing_sha256(metas: list[dict]) -> str:
    """Digest of a shard's source-derived sample metadata (keys, indices, files, labels, captions): what a rerun
    compares to tell a shard whose images are unchanged but whose labels or captions moved."""
    return _sha(json_bytes({"metas": metas}))


def latent_slices(stores_std: bool, store: str, flip: bool, image: bool | None = None) -> list[str]:
    """The named slices of `latent.npy`'s first axis (docs/design.md, Shards). `image`: the pixel codec (by
    default, a codec without a std), whose flip is exact at load time; a deterministic autoencoder (DC-AE, TAESD)
    stores its latent alone, as `mean`."""
    if not stores_std if image is None else image:  # pixel codec: the image alone
        return ["image"]
    names = ["mean", "std"] if store == "mean_std" and stores_std else ["mean"]
    return names + [f"{n}_flip" for n in names] if flip else names


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def json_bytes(meta: dict) -> bytes:
    return json.dumps(meta, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


# ---------------------------------------------------------------------------------------------------- writing


class ShardWriter:
    """Writes one shard under a temporary name; `close()` fsyncs, renames, then writes the sidecar."""

    def __init__(self, path: Path, fmt: str, latent_shape: tuple[int, ...], text: bool = False):
        self.path, self.fmt, self.latent_shape, self.text = Path(path), fmt, tuple(latent_shape), text
        self._ctx = atomic.atomic_path(self.path)
        self.tmp = self._ctx.__enter__()
        self.keys: list[str] = []
        self.labels: list[int | None] = []
        self.index: list[list[int]] = []  # tar only: [latent offset, latent size, json offset, json size]
        self.text_index: list[list[int]] = []  # tar with captions: [text.npy offset, size]
        self.text_stats = {"captions": 0, "max_tokens": 0}  # merged into the manifest's caption section
        self._rows: list[tuple] = []
        if fmt == "wds":
            self._file = open(self.tmp, "wb")
            self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            nbytes = int(np.prod(self.latent_shape)) * np.dtype(LATENT_DTYPE).itemsize
            meta = {"ditpipe.latent_shape": json.dumps(list(self.latent_shape)), "ditpipe.latent_dtype": LATENT_DTYPE}
            cols = [("key", pa.string()), ("latent", pa.binary(nbytes)), ("json", pa.string())]
            self._schema = pa.schema(cols + ([("text", pa.binary())] if text else []), metadata=meta)
            # Plain pages: every latent is unique, so a dictionary page only costs a decode pass at read time.
            self._pq = pq.ParquetWriter(self.tmp, self._schema, compression="none", use_dictionary=False)

    def add(self, key: str, latent: np.ndarray, meta: dict, text: np.ndarray | None = None) -> None:
        """`text`: the image's caption record (pipeline/text.py), required exactly when the writer has captions."""
        assert latent.dtype == np.float16 and latent.shape == self.latent_shape, (latent.dtype, latent.shape)
        assert (text is not None) == self.text, "caption records go with every sample of a caption shard, or none"
        self.keys.append(key)
        self.labels.append(meta.get("label"))
        text_npy = None
        if text is not None:
            text_npy = npy_bytes(text)
            self.text_stats["captions"] += len(text)
            self.text_stats["max_tokens"] = max(self.text_stats["max_tokens"], int(text["mask"].sum(-1).max(initial=0)))
        if self.fmt == "wds":
            self.index.append(self._member(f"{key}.latent.npy", npy_bytes(latent))
                              + self._member(f"{key}.json", json_bytes(meta)))
            if text_npy is not None:
                self.text_index.append(self._member(f"{key}.{TEXT_MEMBER}", text_npy))
        else:
            row = (key, np.ascontiguousarray(latent).tobytes(), json_bytes(meta).decode())
            self._rows.append(row + ((text_npy,) if self.text else ()))
            if len(self._rows) >= 256:
                self._flush_rows()

    def _member(self, name: str, data: bytes) -> list[int]:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o644, "", ""
        offset = self._tar.offset + len(info.tobuf(tarfile.USTAR_FORMAT))  # data follows the 512-byte header
        self._tar.addfile(info, io.BytesIO(data))
        return [offset, len(data)]

    def _flush_rows(self) -> None:
        import pyarrow as pa

        if self._rows:
            cols = list(zip(*self._rows))
            self._pq.write_table(pa.Table.from_arrays([pa.array(c, t) for c, t in zip(cols, self._schema.types)],
                                                      schema=self._schema))
            self._rows = []

    def close(self, sidecar: dict) -> dict:
        """Finish the shard atomically, then its sidecar (which marks it complete). Returns the sidecar."""
        if self.fmt == "wds":
            self._tar.close()
            self._file.close()
        else:
            self._flush_rows()
            self._pq.close()
        self._ctx.__exit__(None, None, None)  # fsync + rename
        sidecar = {"shard": self.path.name, "format": self.fmt, "samples": len(self.keys),
                   "bytes": self.path.stat().st_size, "sha256": atomic.sha256_file(self.path),
                   "keys": self.keys, "labels": self.labels, **sidecar}
        if self.fmt == "wds":
            sidecar["index"] = self.index
        if self.text:
            sidecar["text"] = {**self.text_stats, **({"index": self.text_index} if self.fmt == "wds" else {})}
        atomic.write_json(self.path.parent / sidecar_name(self.path.name), sidecar)
        return sidecar

    def abort(self) -> None:
        for closer in (getattr(self, "_tar", None), getattr(self, "_file", None)):
            if closer is not None:
                closer.close()
        if self.fmt == "parquet":
            self._pq.close()
        self._ctx.__exit__(RuntimeError, None, None)  # removes the temporary file


def read_meta(path: Path) -> bytes:
    """A manifest or sidecar's bytes, at most MAX_META_BYTES: a regular file only, so a name or link that leads to
    a device (`/dev/zero`) or a FIFO is refused instead of read until memory runs out."""
    import os
    import stat

    with open(path, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise ShardError(f"'{path}' is not a regular file; the shard folder is damaged or was altered")
        data = f.read(MAX_META_BYTES + 1)
    if len(data) > MAX_META_BYTES:
        raise ShardError(f"'{path}' is larger than {MAX_META_BYTES:,} bytes, far more than any ditpipe manifest or "
                         "sidecar; the shard folder is damaged or was altered (re-encode it)")
    return data


def load_sidecar(folder: Path, shard: str) -> dict | None:
    """The sidecar of a complete shard, or None when the shard is missing, partial or does not match it."""
    side, path = folder / sidecar_name(shard), folder / shard
    try:
        meta = json.loads(read_meta(side))
        if path.stat().st_size != meta["bytes"] or atomic.sha256_file(path) != meta["sha256"]:
            return None
        return meta
    except (OSError, ValueError, KeyError, TypeError, RecursionError, ShardError):
        return None


def manifest_header(source, codec, samples_per_shard: int, slices: list[str], flip_at_load: bool,
                    text_encoder: dict | None = None) -> dict:
    """Everything the manifest says besides the shards: source, codec, latent layout, labels, captions.
    `text_encoder`: the caption encoder's identity when the captions are embedded (`<key>.text.npy`)."""
    side, f = source.image_size // codec.downsample, codec.downsample
    sizes = getattr(source, "bucket_sizes", None)  # aspect-ratio buckets (w, h), or None: square
    buckets = None if sizes is None else [
        {"size": [w, h], "latent_shape": [len(slices), codec.latent_channels, h // f, w // f]}
        for w, h in sizes]
    return {
        "created_by": f"ditpipe {__version__}",
        "source": source.params,
        "codec": codec.identity(),
        "latent": {"shape": [len(slices), codec.latent_channels, side, side], "dtype": LATENT_DTYPE, "slices": slices,
                   "std_stored": "std" in slices, "flip_stored": "mean_flip" in slices, "flip_at_load": flip_at_load},
        "labels": None if source.class_names is None else {"num_classes": len(source.class_names),
                                                           "names": source.class_names},
        "captions": ({"text": True, "encoder": text_encoder, **({"record": TEXT_RECORD} if text_encoder else {})}
                     if text_encoder or any(it.captions for it in source.items) else None),
        "samples_per_shard": samples_per_shard,
        "num_inputs": len(source),
        **({"buckets": buckets} if buckets else {}),  # absent for square: its manifest is as before, byte for byte
    }


TEXT_RECORD = ("<key>.text.npy (Parquet: column 'text'): a (K,) array, K = the image's captions, of the structured "
               "dtype [('tokens', '<f2', (L, dim)), ('mask', '|b1', (L,)), ('pooled', '<f2', (dim,))], L <= "
               "max_tokens; np.load(allow_pickle=False) reads it")


def build_manifest(folder: Path, header: dict, num_shards: int, fmt: str) -> dict:
    """Merge the sidecars, in shard order, under `header` (source, codec, latent, labels, ...)."""
    shards, skipped, converted = [], [], []
    total, sums, sumsq, count = 0, None, None, 0
    text = {"captions": 0, "max_tokens": 0}
    buckets = [{**b, "samples": 0, "shards": 0} for b in header.get("buckets") or []]
    for i in range(num_shards):
        name = shard_name(fmt, i)
        side = json.loads((folder / sidecar_name(name)).read_text())
        side_bytes = (folder / sidecar_name(name)).read_bytes()
        shards.append({"name": name, "samples": side["samples"], "bytes": side["bytes"], "sha256": side["sha256"],
                       "sidecar": sidecar_name(name), "sidecar_sha256": _sha(side_bytes)})
        if buckets:
            shards[-1]["bucket"] = side["bucket"]
            buckets[side["bucket"]]["samples"] += side["samples"]
            buckets[side["bucket"]]["shards"] += 1
        total += side["samples"]
        if "text" in side:
            text = {"captions": text["captions"] + side["text"]["captions"],
                    "max_tokens": max(text["max_tokens"], side["text"]["max_tokens"])}
        skipped += side["skipped"]
        converted += side["converted"]
        if side["count_px"]:
            s, q = np.array(side["sum"]), np.array(side["sumsq"])
            sums, sumsq = (s, q) if sums is None else (sums + s, sumsq + q)
            count += side["count_px"]
    stats = None
    if count:
        mean = sums / count
        stats = {"channel_mean": mean.tolist(), "channel_std": np.sqrt(np.maximum(sumsq / count - mean**2, 0)).tolist(),
                 "of": "the unscaled posterior mean (or image), over every encoded sample and pixel"}
    if (header.get("captions") or {}).get("encoder"):  # the loader pads every batch to max_tokens seen
        header = {**header, "captions": {**header["captions"], "num_captions": text["captions"],
                                         "max_tokens_seen": max(1, text["max_tokens"])}}
    if buckets:
        header = {**header, "buckets": buckets}
    return {"format_version": FORMAT_VERSION, **header, "format": fmt, "num_samples": total,
            "num_shards": num_shards, "shards": shards, "skipped": skipped, "converted": converted, "stats": stats}


def latent_shape_of(manifest: dict, bucket: int | None) -> tuple[int, ...]:
    """(k, C, H, W) of a shard's latents: its bucket's, or the manifest's one shape (square, bucket None)."""
    if bucket is None:
        return tuple(manifest["latent"]["shape"])
    return tuple(manifest["buckets"][bucket]["latent_shape"])


def _sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------------- reading


def load_manifest(folder: Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ShardError(f"no {MANIFEST} in '{folder}': not a finished ditpipe shard folder; run `ditpipe encode` "
                         "(rerunning the same command finishes an interrupted encode)")
    return parse_manifest(read_meta(path), path)


def parse_manifest(raw: bytes, where, remote: bool = False) -> dict:
    """A manifest's bytes, parsed and checked (version, latent shape, names, counts) before any of it is used: the
    same refusals, in the same words, for a shard folder on disk and at a URL (`remote`: the fix is a re-upload)."""
    redo = "re-encode and re-upload the shard folder" if remote else "re-encode with `ditpipe encode ... --overwrite`"
    try:
        manifest = json.loads(raw)
    except (ValueError, RecursionError, MemoryError) as e:  # RecursionError: JSON nested deeper than Python recurses
        raise ShardError(f"'{where}' is not valid JSON ({type(e).__name__}: {str(e)[:200]}); {redo}") from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != FORMAT_VERSION:
        raise ShardError(f"'{where}' has format_version {version!r}; this ditpipe reads {FORMAT_VERSION}. Re-encode "
                         f"with this version{'' if remote else ' (`--overwrite`)'}")
    check_latent_shape(manifest, where)
    check_entries(manifest, where)  # names become paths or URLs: `../` must not leave the folder
    return manifest


def check_entries(manifest: dict, where) -> None:
    """Refuse a shard entry whose name is not a plain shard file name of ours (with its sidecar's name), whose
    counts are not non-negative integers, or that claims more samples than its recorded bytes can hold, and totals
    that do not add up. Names become paths and counts become allocations (the loader's order holds an index per
    sample), so a forged one could otherwise read outside the folder, or allocate gigabytes before anything fails.
    `check_files` then holds the recorded bytes to the files' own sizes."""
    fmt, entries = manifest.get("format"), manifest.get("shards")
    if fmt not in _ENTRY_NAME or not isinstance(entries, list):
        raise ShardError(f"'{where}': format {fmt!r} or shards is not a ditpipe manifest's (wds or parquet, a list "
                         "of shards); the manifest is damaged or was altered")
    _check_captions(manifest, where)
    seen, total = set(), 0
    for i, entry in enumerate(entries):
        _check_entry(manifest, entry, i, seen, where)
        total += entry["samples"]
    if manifest.get("num_samples") != total or manifest.get("num_shards") != len(entries):
        raise ShardError(f"'{where}': num_samples {manifest.get('num_samples')!r} and num_shards "
                         f"{manifest.get('num_shards')!r} are not the shards' {total:,} samples in {len(entries):,} "
                         "shards; the manifest is damaged or was altered (re-encode it)")


def _check_captions(manifest: dict, where) -> None:
    """The caption encoder's width and token counts, which size every batch's caption arrays."""
    from pipeline.config import MAX_TEXT_DIM

    captions = manifest.get("captions") or {}
    enc = captions.get("encoder") if isinstance(captions, dict) else None
    if enc is None:
        return
    dim, most, seen = (enc.get("dim"), enc.get("max_tokens"), captions.get("max_tokens_seen", 1)
                       ) if isinstance(enc, dict) else (None, None, None)
    if not all(type(x) is int for x in (dim, most, seen)) or not (
            0 < dim <= MAX_TEXT_DIM and 0 < most <= MAX_TOKENS and 0 < seen <= most):
        raise ShardError(f"'{where}': captions.encoder dim {dim!r}, max_tokens {most!r} and max_tokens_seen {seen!r} "
                         f"are not 1..{MAX_TEXT_DIM}, 1..{MAX_TOKENS} and 1..max_tokens; the manifest is damaged or "
                         "was altered (re-encode it)")


def _check_entry(manifest: dict, entry, i: int, seen: set, where) -> None:
    fmt = manifest["format"]
    name = entry.get("name") if isinstance(entry, dict) else None
    if not (isinstance(name, str) and _ENTRY_NAME[fmt].fullmatch(name)) or name in seen:
        raise ShardError(f"'{where}': shards[{i}].name {name!r} is not a shard file name of this folder "
                         f"({'shard-NNNNN.tar' if fmt == 'wds' else 'part-NNNNN.parquet'}, once each, no folder); the "
                         "manifest is damaged or was altered (re-encode it)")
    seen.add(name)
    if entry.get("sidecar") != sidecar_name(name):
        raise ShardError(f"'{where}': shards[{i}].sidecar {entry.get('sidecar')!r} is not {sidecar_name(name)!r}, "
                         "the name of its shard's sidecar; the manifest is damaged or was altered (re-encode it)")
    if "bucket" in entry and "buckets" not in manifest:
        raise ShardError(f"'{where}': shards[{i}] names a bucket, but the manifest has no buckets; the manifest is "
                         "damaged or was altered (re-encode it)")
    samples, nbytes = entry.get("samples"), entry.get("bytes")
    if not (type(samples) is int and type(nbytes) is int and samples >= 0 and nbytes >= 0):
        raise ShardError(f"'{where}': shards[{i}] ({name}) samples {samples!r} and bytes {nbytes!r} are not counts; "
                         "the manifest is damaged or was altered (re-encode it)")
    per = int(np.prod(latent_shape_of(manifest, entry.get("bucket")))) * np.dtype(LATENT_DTYPE).itemsize
    if samples * per > nbytes:  # every sample stores one latent of `per` bytes, uncompressed, in both formats
        raise ShardError(f"'{where}': shards[{i}] ({name}) claims {samples:,} samples, more than its {nbytes:,} bytes "
                         f"hold ({per:,} bytes a latent); the manifest is damaged or was altered (re-encode it)")


def check_files(folder: Path, manifest: dict) -> None:
    """Each shard file is a regular file of the size the manifest records: with `check_entries`, no count the
    loader allocates for exceeds what the files hold. One stat a shard; `verify` checks the contents."""
    import os
    import stat

    for entry in manifest["shards"]:
        path = Path(folder) / entry["name"]
        try:
            st = os.stat(path)
        except OSError as e:
            raise ShardError(f"{path}: {e.strerror}; the shard folder is incomplete (run `ditpipe verify`, rerun "
                             "`ditpipe encode`)") from None
        if not stat.S_ISREG(st.st_mode) or st.st_size != entry["bytes"]:
            raise ShardError(f"{path}: {st.st_size:,} bytes, the manifest ({MANIFEST}) says {entry['bytes']:,}; the "
                             "shard was truncated or altered (run `ditpipe verify`, re-encode it)")


def check_sidecar(side, entry: dict, where) -> None:
    """A shard's sidecar, read to open the shard, lists as many samples as the manifest says (keys, labels and, for
    tar, offsets): the loader indexes them by the manifest's count."""
    n = entry["samples"]
    lists = ("keys", "labels") + (("index",) if "index" in side else ()) if isinstance(side, dict) else ()
    if not lists or any(not isinstance(side.get(k), list) or len(side[k]) != n for k in lists):
        counts = {k: len(side[k]) for k in lists if isinstance(side.get(k), list)}
        raise ShardError(f"{where}: its sidecar {entry['sidecar']} lists {counts or 'no samples'}, the manifest says "
                         f"{n:,} samples; the shard folder is damaged or was altered (run `ditpipe verify`)")


def check_latent_shape(manifest: dict, where) -> None:
    """Refuse a latent shape that the manifest's own source and codec do not give: (k <= 4 slices, C, side, side)
    with side = source.image_size / codec.downsample. Training sizes its model from this shape, so an altered one
    could otherwise make it allocate any amount of memory."""
    from pipeline.config import MAX_IMAGE_SIZE

    latent, source, codec = (manifest.get(k) if isinstance(manifest.get(k), dict) else {}
                             for k in ("latent", "source", "codec"))
    shape, size, down = latent.get("shape"), source.get("image_size"), codec.get("downsample")
    if not (isinstance(shape, list) and len(shape) == 4 and all(type(x) is int and x > 0 for x in shape)
            and shape[0] <= 4 and shape[2] == shape[3] <= MAX_IMAGE_SIZE):
        raise ShardError(f"'{where}': latent.shape {shape!r} is not (k <= 4 slices, C, H, W) with H = W <= "
                         f"{MAX_IMAGE_SIZE}; the manifest is damaged or was altered")
    if type(size) is int and type(down) is int and down > 0 and shape[2] != size // down:
        raise ShardError(f"'{where}': latent.shape {shape} does not match source.image_size {size} / "
                         f"codec.downsample {down} = {size // down}; the manifest is damaged or was altered")
    if "buckets" in manifest:
        _check_buckets(manifest, shape, down, where)


def _check_buckets(manifest: dict, shape: list, down, where) -> None:
    """Each bucket's latent shape is its size / the downsample factor, with the manifest's slices and channels, and
    each shard names one of the buckets: the loader and the model size themselves from these."""
    from pipeline.config import MAX_IMAGE_SIZE

    buckets, entries = manifest.get("buckets"), manifest.get("shards")
    if not (isinstance(buckets, list) and buckets and all(isinstance(b, dict) for b in buckets)):
        raise ShardError(f"'{where}': buckets is not a list of buckets; the manifest is damaged or was altered")
    for i, b in enumerate(buckets):
        size, lat = b.get("size"), b.get("latent_shape")
        ok = (isinstance(size, list) and len(size) == 2 and all(type(x) is int and 0 < x <= MAX_IMAGE_SIZE
                                                                for x in size)
              and type(down) is int and down > 0 and isinstance(lat, list)
              and lat == [shape[0], shape[1], size[1] // down, size[0] // down])
        if not ok:
            raise ShardError(f"'{where}': bucket {i} ({size!r}, latent {lat!r}) does not match its size / "
                             f"codec.downsample {down} with latent.shape's slices and channels; the manifest is "
                             "damaged or was altered")
    for e in entries if isinstance(entries, list) else []:
        if not (isinstance(e, dict) and type(e.get("bucket")) is int and 0 <= e["bucket"] < len(buckets)):
            raise ShardError(f"'{where}': shard {e.get('name') if isinstance(e, dict) else e!r} names no bucket of "
                             "the manifest's; the manifest is damaged or was altered")


@dataclass
class Sample:
    key: str
    latent: np.ndarray  # (k, C, H, W) float16, read-only view
    meta: dict
    text: np.ndarray | None = None  # (K,) caption record (pipeline/text.py) when the captions are embedded


def text_encoder_of(manifest: dict) -> dict | None:
    """The caption encoder's identity when the shards carry caption embeddings, else None."""
    return (manifest.get("captions") or {}).get("encoder")


def _read_text(data, manifest: dict) -> np.ndarray:
    from pipeline.text import read_record

    enc = text_encoder_of(manifest)
    return read_record(data, enc["dim"], enc["max_tokens"])


def iter_shard(folder: Path, shard: str, manifest: dict, sidecar: dict | None = None) -> Iterator[Sample]:
    """Fast read of one shard: tar through its offset index + mmap, Parquet through binary columns."""
    folder = Path(folder)
    sidecar = sidecar or json.loads(read_meta(folder / sidecar_name(shard)))
    shape = latent_shape_of(manifest, sidecar.get("bucket"))
    if manifest["format"] == "wds":
        expected = npy_bytes(np.zeros(shape, LATENT_DTYPE))  # every latent member is exactly this header + data
        with open(folder / shard, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            texts = (sidecar.get("text") or {}).get("index") or [None] * len(sidecar["keys"])
            for key, (lo, ln, jo, jn), where in zip(sidecar["keys"], sidecar["index"], texts):
                header = _npy_header_len(mm, lo)
                if ln != len(expected) or mm[lo : lo + header] != expected[:header]:
                    # another dtype (an object-array pickle, say) or shape: refuse it, never reinterpret its bytes
                    raise ShardError(f"{folder / shard}: sample '{key}' latent is not a {LATENT_DTYPE}{shape} .npy; "
                                     "the shard is damaged or tampered (run `ditpipe verify`)")
                # copy at once: a view still alive when the mmap closes raises BufferError ("exported pointers")
                latent = np.frombuffer(mm, dtype=LATENT_DTYPE, count=int(np.prod(shape)), offset=lo + header).copy()
                text = None if where is None else _read_text(mm[where[0] : where[0] + where[1]], manifest)
                yield Sample(key, latent.reshape(shape), json.loads(bytes(mm[jo : jo + jn])), text)
    else:
        import pyarrow.parquet as pq

        cols = ["key", "latent", "json"] + (["text"] if text_encoder_of(manifest) else [])
        for batch in pq.ParquetFile(folder / shard).iter_batches(batch_size=256, columns=cols):
            keys, jsons = batch.column(0).to_pylist(), batch.column(2).to_pylist()
            texts = batch.column(3).to_pylist() if len(cols) == 4 else [None] * len(keys)
            flat = np.frombuffer(batch.column(1).buffers()[1], dtype=LATENT_DTYPE)
            nper = int(np.prod(shape))
            start = batch.column(1).offset * nper
            for i, key in enumerate(keys):
                yield Sample(key, flat[start + i * nper : start + (i + 1) * nper].reshape(shape).copy(),
                             json.loads(jsons[i]), None if texts[i] is None else _read_text(texts[i], manifest))


def _npy_header_len(buf, offset: int) -> int:
    """Length of the .npy header at `offset` (magic, version, header length field, header)."""
    major = buf[offset + 6]
    if major == 1:
        return 10 + int.from_bytes(buf[offset + 8 : offset + 10], "little")
    return 12 + int.from_bytes(buf[offset + 8 : offset + 12], "little")


def num_classes(manifest: dict) -> int:
    """The label space's size; 0 for unconditional shards (every label must then be null)."""
    return int((manifest.get("labels") or {}).get("num_classes") or 0)


def label_problem(label, n_classes: int) -> str | None:
    """Why a stored label is unusable, or None. A label is an int in [0, n_classes), or null / -1 for none: anything
    else (n_classes itself, the null class the model reserves for CFG) would train silently as something else."""
    if label is None or (type(label) is int and -1 <= label < n_classes):
        return None
    return (f"label {label!r} is outside the manifest's {n_classes} classes (0..{n_classes - 1}, or null / -1 for "
            "none)")


def checked_labels(labels: list, n_classes: int, where: str) -> list[int]:
    """Sidecar labels as ints (-1 for none), each range-checked; a bad one is a ShardError naming `where`."""
    for i, label in enumerate(labels):
        problem = label_problem(label, n_classes)
        if problem:
            raise ShardError(f"{where}: sample {i}'s {problem}; the shard is damaged or was made for another label "
                             "set (run `ditpipe verify`, re-encode it)")
    return [-1 if x is None else x for x in labels]


def iter_samples(folder: Path) -> Iterator[Sample]:
    manifest = load_manifest(folder)
    for shard in manifest["shards"]:
        yield from iter_shard(folder, shard["name"], manifest)


# ---------------------------------------------------------------------------------------------------- verify


def verify(folder: Path, progress=None) -> tuple[list[str], int]:
    """Check every shard's size and sha256, then decode every sample independently of the fast path (plain tar
    parsing, np.load without pickle) and check its members, shape, dtype, finiteness and JSON. Returns
    (problems, samples checked). `progress(n)` is called with the samples checked so far."""
    folder = Path(folder)
    manifest = load_manifest(folder)
    problems: list[str] = []
    checked = 0
    enc = text_encoder_of(manifest)
    n_classes = num_classes(manifest)
    allowed = set(SAMPLE_MEMBERS) | ({TEXT_MEMBER} if enc else set())
    listed = {s["name"] for s in manifest["shards"]}
    for p in sorted(folder.iterdir()):
        if _SHARD_RE.match(p.name) and p.name not in listed:
            problems.append(f"{p.name}: shard file not listed in the manifest")
    for entry in manifest["shards"]:
        name, path = entry["name"], folder / entry["name"]
        if not path.is_file():
            problems.append(f"{name}: missing")
            continue
        size = path.stat().st_size
        if size != entry["bytes"]:
            problems.append(f"{name}: {size} bytes, the manifest says {entry['bytes']} (truncated or altered)")
        if atomic.sha256_file(path) != entry["sha256"]:
            problems.append(f"{name}: sha256 does not match the manifest (corrupted or tampered)")
        side_path = folder / entry["sidecar"]
        side_bytes = read_meta(side_path) if side_path.is_file() else None
        if side_bytes is None or _sha(side_bytes) != entry["sidecar_sha256"]:
            problems.append(f"{entry['sidecar']}: missing or does not match the manifest's sha256")
            side = None
        else:
            side = json.loads(side_bytes)
            bad = [(i, p) for i, x in enumerate(side.get("labels") or []) if (p := label_problem(x, n_classes))]
            problems += [f"{entry['sidecar']}: sample {i}'s {p}" for i, p in bad[:3]]
            if side.get("bucket") != entry.get("bucket"):
                problems.append(f"{entry['sidecar']}: bucket {side.get('bucket')!r}, the manifest says "
                                f"{entry.get('bucket')!r}")
        shape = latent_shape_of(manifest, entry.get("bucket"))  # each bucket's latents have their own shape
        try:
            reader = _decode_tar if manifest["format"] == "wds" else _decode_parquet
            n = reader(path, shape, allowed, side, problems, enc, n_classes)
        except Exception as e:  # a truncated or garbled file: report it, check the rest
            problems.append(f"{name}: cannot be read ({type(e).__name__}: {e})")
            n = 0
        if n != entry["samples"]:
            problems.append(f"{name}: {n} readable samples, the manifest says {entry['samples']}")
        checked += n
        if progress:
            progress(checked)
    if checked != manifest["num_samples"] and not any("missing" in p for p in problems):
        problems.append(f"{checked} samples in all, the manifest says {manifest['num_samples']}")
    return problems, checked


def _check_sample(where: str, key: str, latent_bytes: bytes | None, meta_text: str | None, shape, problems,
                  from_npy: bool, n_classes: int) -> bool:
    ok = True
    if latent_bytes is None or meta_text is None:
        problems.append(f"{where}: sample '{key}' lacks its {'latent' if latent_bytes is None else 'json'} member")
        return False
    try:
        arr = (np.load(io.BytesIO(latent_bytes), allow_pickle=False) if from_npy
               else np.frombuffer(latent_bytes, dtype=LATENT_DTYPE).reshape(shape))
        if arr.dtype != np.dtype(LATENT_DTYPE) or tuple(arr.shape) != shape:
            problems.append(f"{where}: sample '{key}' latent is {arr.dtype}{tuple(arr.shape)}, expected "
                            f"{LATENT_DTYPE}{shape}")
            ok = False
        elif not np.isfinite(arr).all():
            problems.append(f"{where}: sample '{key}' latent has NaN or Inf")
            ok = False
    except (ValueError, OSError) as e:
        problems.append(f"{where}: sample '{key}' latent does not decode ({e})")
        ok = False
    try:
        meta = json.loads(meta_text)
        if meta.get("key") != key:
            problems.append(f"{where}: sample '{key}' json names key {meta.get('key')!r}")
            ok = False
        if label_problem(meta.get("label"), n_classes):
            problems.append(f"{where}: sample '{key}' {label_problem(meta.get('label'), n_classes)}")
            ok = False
    except ValueError as e:
        problems.append(f"{where}: sample '{key}' json does not parse ({e})")
        ok = False
    return ok


def _check_text(where: str, key: str, data: bytes | None, meta_text: str | None, enc: dict, problems) -> bool:
    """A caption record: present, pickle-free, the manifest's encoder layout, finite, one row per caption."""
    from pipeline.text import read_record

    if data is None:
        problems.append(f"{where}: sample '{key}' lacks its {TEXT_MEMBER} member (the manifest says captions are "
                        "embedded)")
        return False
    try:
        rec = read_record(data, enc["dim"], enc["max_tokens"])
    except ValueError as e:
        problems.append(f"{where}: sample '{key}' {TEXT_MEMBER} is not a caption record ({e})")
        return False
    captions = (json.loads(meta_text or "{}") or {}).get("captions", [])
    if len(rec) != len(captions):
        problems.append(f"{where}: sample '{key}' has {len(rec)} caption embeddings for {len(captions)} captions")
        return False
    if not (np.isfinite(rec["tokens"]).all() and np.isfinite(rec["pooled"]).all()):
        problems.append(f"{where}: sample '{key}' caption embeddings have NaN or Inf")
        return False
    if len(rec) and not rec["mask"].any(axis=1).all():
        problems.append(f"{where}: sample '{key}' has a caption embedding without any token")
        return False
    return True


def _decode_tar(path: Path, shape, allowed: set[str], side: dict | None, problems: list[str],
                enc: dict | None, n_classes: int) -> int:
    samples: dict[str, dict[str, tuple[int, bytes]]] = {}
    order: list[str] = []
    with tarfile.open(path, mode="r:") as tar:  # plain parsing, deliberately not our offset index
        for info in tar:
            key, _, ext = info.name.partition(".")
            if not info.isfile() or ext not in allowed or "/" in info.name:
                problems.append(f"{path.name}: unexpected member '{info.name}' (only <key>.latent.npy, <key>.json"
                                f"{' and <key>.' + TEXT_MEMBER if enc else ''} belong in a shard; it was not read)")
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
        ok = _check_sample(path.name, key, latent and latent[1], meta_text, shape, problems, True, n_classes)
        if enc is not None:
            text = members.get(TEXT_MEMBER)
            ok = _check_text(path.name, key, text and text[1], meta_text, enc, problems) and ok
        good += ok
    if side is not None:
        if side.get("keys") != order:
            problems.append(f"{path.name}: member keys differ from its sidecar's")
        else:
            for key, (lo, ln, jo, jn) in zip(order, side["index"]):
                if samples[key].get("latent.npy", (None,))[0] != lo or samples[key].get("json", (None,))[0] != jo:
                    problems.append(f"{path.name}: sidecar offset index is wrong for '{key}'")
                    break
            if enc is not None:  # the loader reads captions through this index, so it must be exact
                actual = [[samples[k][TEXT_MEMBER][0], len(samples[k][TEXT_MEMBER][1])] if TEXT_MEMBER in samples[k]
                          else None for k in order]
                if (side.get("text") or {}).get("index") != actual:
                    problems.append(f"{path.name}: sidecar caption index is missing or wrong")
    return good


def _decode_parquet(path: Path, shape, allowed, side: dict | None, problems: list[str],
                    enc: dict | None, n_classes: int) -> int:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    columns = ["key", "latent", "json"] + (["text"] if enc else [])
    if table.column_names != columns:
        problems.append(f"{path.name}: columns {table.column_names}, expected {columns}")
        return 0
    meta = table.schema.metadata or {}
    if json.loads(meta.get(b"ditpipe.latent_shape", b"null")) != list(shape):
        problems.append(f"{path.name}: schema latent shape does not match the manifest's {list(shape)}")
    good = 0
    keys = table.column("key").to_pylist()
    texts = table.column("text").to_pylist() if enc else [None] * len(keys)
    for key, latent, meta, text in zip(keys, table.column("latent").to_pylist(), table.column("json").to_pylist(),
                                       texts):
        ok = _check_sample(path.name, key, latent, meta, shape, problems, False, n_classes)
        good += (_check_text(path.name, key, text, meta, enc, problems) and ok) if enc else ok
    if side is not None and side.get("keys") != keys:
        problems.append(f"{path.name}: keys differ from its sidecar's")
    return good
