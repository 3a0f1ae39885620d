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
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from ditpipe.pipeline import atomic, formats
from ditpipe.pipeline.errors import ShardError
from ditpipe.pipeline.manifest import Manifest, label_problem, load_manifest

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PARAMS = "encode-params.json"  # written first, so even a half-finished folder refuses other parameters
LATENT_DTYPE = "float16"
SAMPLE_MEMBERS = ("latent.npy", "json")  # the only tar members a sample may have (+ TEXT_MEMBER with captions)
TEXT_MEMBER = "text.npy"
TARGET_MEMBER = "target.npy"  # representation targets (pipeline/targets.py), with `encode --targets`
MAX_META_BYTES = 64 << 20  # a manifest or sidecar: far above any real one (~100 KB a shard)


REUSE_DIR = ".reuse"  # hard links of the shards an update replaces, until its manifest is written (pipeline/reuse.py)


def shard_name(fmt: str, i: int) -> str:
    return formats.get(fmt).shard_name(i)


def shard_index(name: str) -> int | None:
    """i of a shard file or of its sidecar or stat cache (`shard-0000i.tar`, `part-0000i.meta.json`, ...)."""
    match = formats.OURS_RE.match(name)
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
    """Writes one shard under a temporary name through its format's Writer (pipeline/formats/); `close()` fsyncs,
    renames, then writes the sidecar."""

    def __init__(self, path: Path, fmt: str, latent_shape: tuple[int, ...], text: bool = False, target=None):
        """`target`: the targets' Layout (pipeline/targets.py) when every sample carries representation targets."""
        self.path, self.fmt, self.latent_shape, self.text = Path(path), fmt, tuple(latent_shape), text
        self.target = target
        self._ctx = atomic.atomic_path(self.path)
        self.tmp = self._ctx.__enter__()
        self.keys: list[str] = []
        self.labels: list[int | None] = []
        self.text_stats = {"captions": 0, "max_tokens": 0}  # merged into the manifest's caption section
        self._writer = formats.get(fmt).Writer(self.tmp, self.latent_shape, text, target)

    def add(self, key: str, latent: np.ndarray, meta: dict, text: np.ndarray | None = None,
            target: np.ndarray | None = None) -> None:
        """`text`: the image's caption record (pipeline/text.py), required exactly when the writer has captions;
        `target`: its stored targets (the Layout's array), exactly when it has targets."""
        assert latent.dtype == np.float16 and latent.shape == self.latent_shape, (latent.dtype, latent.shape)
        assert (text is not None) == self.text, "caption records go with every sample of a caption shard, or none"
        assert (target is not None) == (self.target is not None), "targets go with every sample, or none"
        assert target is None or (target.dtype == self.target.np_dtype and target.shape == self.target.shape), (
            target.dtype, target.shape, self.target)
        self.keys.append(key)
        self.labels.append(meta.get("label"))
        text_npy = None
        if text is not None:
            text_npy = npy_bytes(text)
            self.text_stats["captions"] += len(text)
            self.text_stats["max_tokens"] = max(self.text_stats["max_tokens"], int(text["mask"].sum(-1).max(initial=0)))
        self._writer.add(key, latent, json_bytes(meta), text_npy, target)

    def close(self, sidecar: dict) -> dict:
        """Finish the shard atomically, then its sidecar (which marks it complete). Returns the sidecar."""
        self._writer.close()
        self._ctx.__exit__(None, None, None)  # fsync + rename
        sidecar = {"shard": self.path.name, "format": self.fmt, "samples": len(self.keys),
                   "bytes": self.path.stat().st_size, "sha256": atomic.sha256_file(self.path),
                   "keys": self.keys, "labels": self.labels, **sidecar, **self._writer.sidecar()}
        if self.text:
            sidecar["text"] = {**self.text_stats, **self._writer.text_sidecar()}
        if self.target is not None and self._writer.target_sidecar():
            sidecar["target"] = self._writer.target_sidecar()
        atomic.write_json(self.path.parent / sidecar_name(self.path.name), sidecar)
        return sidecar

    def abort(self) -> None:
        self._writer.abort()
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


def _sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------------- reading


def check_sidecar(side, entry: dict, where) -> None:
    """A shard's sidecar, read to open the shard, lists as many samples as the manifest says (keys, labels and, for
    tar, offsets): the loader indexes them by the manifest's count."""
    n = entry["samples"]
    lists = ("keys", "labels") + (("index",) if "index" in side else ()) if isinstance(side, dict) else ()
    if not lists or any(not isinstance(side.get(k), list) or len(side[k]) != n for k in lists):
        counts = {k: len(side[k]) for k in lists if isinstance(side.get(k), list)}
        raise ShardError(f"{where}: its sidecar {entry['sidecar']} lists {counts or 'no samples'}, the manifest says "
                         f"{n:,} samples; the shard folder is damaged or was altered (run `ditpipe verify`)")


@dataclass
class Sample:
    key: str
    latent: np.ndarray  # (k, C, H, W) float16, read-only view
    meta: dict
    text: np.ndarray | None = None  # (K,) caption record (pipeline/text.py) when the captions are embedded
    target: np.ndarray | None = None  # the stored targets (pipeline/targets.py Layout) when there are any


def _read_text(data, manifest: Manifest) -> np.ndarray:
    from ditpipe.pipeline.text import read_record

    enc = manifest.text_encoder
    return read_record(data, enc["dim"], enc["max_tokens"])


def iter_shard(folder: Path, shard: str, manifest: Manifest | dict, sidecar: dict | None = None) -> Iterator[Sample]:
    """Fast read of one shard, in order, by its format's iterator (tar: offset index + mmap; Parquet: columns)."""
    folder = Path(folder)
    sidecar = sidecar or json.loads(read_meta(folder / sidecar_name(shard)))
    manifest = Manifest.of(manifest)
    shape = manifest.latent_shape(sidecar.get("bucket"))
    read_text = (lambda data: _read_text(data, manifest)) if manifest.text_encoder else None
    yield from formats.get(manifest.format).iter_shard(folder / shard, sidecar, shape, read_text,
                                                       manifest.target_layout(sidecar.get("bucket")))


def iter_samples(folder: Path) -> Iterator[Sample]:
    manifest = load_manifest(folder)
    for shard in manifest.entries:
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
    enc = manifest.text_encoder
    n_classes = manifest.num_classes
    allowed = set(SAMPLE_MEMBERS) | ({TEXT_MEMBER} if enc else set()) | (
        {TARGET_MEMBER} if manifest.targets else set())
    listed = {s["name"] for s in manifest.entries}
    for p in sorted(folder.iterdir()):
        if formats.SHARD_FILE_RE.match(p.name) and p.name not in listed:
            problems.append(f"{p.name}: shard file not listed in the manifest")
    for entry in manifest.entries:
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
        shape = manifest.latent_shape(entry.get("bucket"))  # each bucket's latents have their own shape
        try:
            n = formats.get(manifest.format).decode(path, shape, allowed, side, problems, enc, n_classes,
                                                    manifest.target_layout(entry.get("bucket")))
        except Exception as e:  # a truncated or garbled file: report it, check the rest
            problems.append(f"{name}: cannot be read ({type(e).__name__}: {e})")
            n = 0
        if n != entry["samples"]:
            problems.append(f"{name}: {n} readable samples, the manifest says {entry['samples']}")
        checked += n
        if progress:
            progress(checked)
    if checked != manifest.num_samples and not any("missing" in p for p in problems):
        problems.append(f"{checked} samples in all, the manifest says {manifest.num_samples}")
    return problems, checked


def check_sample(where: str, key: str, latent_bytes: bytes | None, meta_text: str | None, shape, problems,
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


def check_text(where: str, key: str, data: bytes | None, meta_text: str | None, enc: dict, problems) -> bool:
    """A caption record: present, pickle-free, the manifest's encoder layout, finite, one row per caption."""
    from ditpipe.pipeline.text import read_record

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


def check_target(where: str, key: str, data: bytes | None, layout, problems, from_npy: bool) -> bool:
    """A sample's stored targets: present, pickle-free, exactly the manifest's layout (dtype and shape), finite."""
    if data is None:
        problems.append(f"{where}: sample '{key}' lacks its {TARGET_MEMBER} member (the manifest says targets are "
                        "stored)")
        return False
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False) if from_npy else layout.view(data)
    except (ValueError, OSError) as e:
        problems.append(f"{where}: sample '{key}' targets do not decode ({e})")
        return False
    if arr.dtype != layout.np_dtype or tuple(arr.shape) != layout.shape:
        problems.append(f"{where}: sample '{key}' targets are {arr.dtype}{tuple(arr.shape)}, the manifest says "
                        f"{layout.np_dtype}{layout.shape}")
        return False
    values = arr if layout.dtype == "fp16" else arr["scale"]
    if not np.isfinite(values).all():
        problems.append(f"{where}: sample '{key}' targets have NaN or Inf")
        return False
    return True
