"""The manifest of a shard folder (`manifest.json`): written once by encode, parsed and checked once by every reader.

`Manifest` is the parsed, checked file: a frozen object that answers what readers ask (bucketed?, each bucket's size
and latent shape, the default grid, the codec, the caption encoder, the label space, the shards), around `raw`, the
JSON exactly as read, which is what is written back (byte for byte: nothing is added or reordered). A checkpoint's
excerpt of it (codec, labels, captions, latent, source, stats, latent_norm, buckets) is wrapped by `Manifest.of`
and answers the same questions. The checks refuse a manifest whose numbers could make a reader allocate, read or
train something it did not write (docs/design.md, "Security"); their messages are part of the contract.

    manifest_header / build_manifest     what encode writes (the header, then the merge of the sidecars)
    load_manifest / parse_manifest       what every reader calls: the checked Manifest (a folder, or bytes from a URL)
    check_files                          one stat a shard: the recorded sizes are the files' own
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ditpipe.pipeline import __version__
from ditpipe.pipeline.errors import ShardError

MAX_TOKENS = 4096  # a caption record's tokens (CLIP 77, T5 up to 512 in practice)


@dataclass(frozen=True, eq=False)
class Manifest:
    """A checked manifest (`load_manifest`, `parse_manifest`) or a checkpoint's excerpt of one (`Manifest.of`)."""

    raw: dict  # the JSON as read: `atomic.write_json(path, m.raw)` writes the same bytes

    @classmethod
    def of(cls, manifest: Manifest | dict) -> Manifest:
        """`manifest` as a Manifest: itself, or a dict already checked (a checkpoint's excerpt, encode's header)."""
        return manifest if isinstance(manifest, Manifest) else cls(manifest)

    @property
    def bucketed(self) -> bool:
        """Aspect-ratio buckets: each shard holds one bucket, whose latents have that bucket's shape."""
        return bool(self.raw.get("buckets"))

    @property
    def buckets(self) -> list[dict]:
        """Each bucket's record ({size: [w, h], latent_shape, samples, shards}); [] for square shards."""
        return self.raw.get("buckets") or []

    @property
    def bucket_sizes(self) -> list[tuple[int, int]]:
        """Each bucket's image size (w, h); [] for square shards."""
        return [tuple(b["size"]) for b in self.buckets]

    @property
    def sizes(self) -> list[list[int]]:
        """The image sizes [w, h] the shards hold: the buckets', or the one square size ([] when unknown)."""
        if self.bucketed:
            return [list(s) for s in self.bucket_sizes]
        size = self.source.get("image_size")  # an export folder's excerpt has no source section
        if size is None and self.codec.get("downsample"):
            size = self.latent["shape"][-1] * self.codec["downsample"]
        return [[size, size]] if size else []

    def latent_shape(self, bucket: int | None = None) -> tuple[int, ...]:
        """(k, C, H, W) of a shard's latents: its bucket's, or the one square shape (bucket None)."""
        return latent_shape_of(self.raw, bucket)

    @property
    def most_common_bucket(self) -> int:
        """The bucket with the most samples (the first of equals): validation grids and `sample` default to it."""
        buckets = self.buckets
        return max(range(len(buckets)), key=lambda i: (buckets[i].get("samples", 0), -i)) if buckets else 0

    @property
    def grid(self) -> tuple[int, int, int]:
        """(C, H, W) that validation grids and `sample` draw by default: the most common bucket's, or the square one."""
        if self.bucketed:
            return tuple(self.buckets[self.most_common_bucket]["latent_shape"][1:])
        return tuple(self.latent["shape"][1:])

    def describe_buckets(self) -> str:
        """`8x16: 6, 16x16: 9, ...`: each bucket's size and samples, for `inspect` and the encode summary."""
        return ", ".join(f"{b['size'][0]}x{b['size'][1]}: {b['samples']:,}" for b in self.buckets)

    @property
    def source(self) -> dict:
        return self.raw.get("source") or {}

    @property
    def codec(self) -> dict:
        return self.raw.get("codec") or {}

    @property
    def text_encoder(self) -> dict | None:
        """The caption encoder's identity when the shards carry caption embeddings, else None."""
        return text_encoder_of(self.raw)

    @property
    def targets(self) -> dict | None:
        """The representation targets' section (encoder, model_patch, class_token, slices, dtype), or None."""
        return self.raw.get("targets")

    def target_layout(self, bucket: int | None = None):
        """The stored targets' `targets.Layout` for a shard's bucket (its token grid), or None without targets."""
        from ditpipe.pipeline.targets import layout_of

        return None if self.targets is None else layout_of(self.targets, self.latent_shape(bucket))

    @property
    def captions(self) -> dict | None:
        return self.raw.get("captions")

    @property
    def labels(self) -> dict | None:
        return self.raw.get("labels")

    @property
    def class_names(self) -> list[str] | None:
        return (self.labels or {}).get("names")

    @property
    def num_classes(self) -> int:
        """The label space's size; 0 for unconditional shards."""
        return num_classes(self.raw)

    @property
    def format(self) -> str:
        return self.raw["format"]

    @property
    def entries(self) -> list[dict]:
        """The shards, in order: {name, samples, bytes, sha256, sidecar, sidecar_sha256 (, bucket)}."""
        return self.raw["shards"]

    @property
    def num_samples(self) -> int:
        return self.raw["num_samples"]

    @property
    def num_inputs(self) -> int:
        """The inputs encode was given, skipped ones included (a shard folder's manifest only)."""
        return self.raw["num_inputs"]

    @property
    def num_shards(self) -> int:
        return self.raw["num_shards"]

    @property
    def latent(self) -> dict:
        """The square latent layout: {shape: (k, C, H, W), dtype, slices, std_stored, flip_stored, flip_at_load}."""
        return self.raw["latent"]

    @property
    def stats(self) -> dict | None:
        """Per-channel mean and std of the unscaled latents (None without samples, or online)."""
        return self.raw.get("stats")

    @property
    def samples_per_shard(self) -> int:
        return self.raw["samples_per_shard"]

    @property
    def latent_norm(self) -> dict | None:
        """The normalisation a run recorded (a training run's copy only; encode writes none)."""
        return self.raw.get("latent_norm")

    def with_latent_norm(self, record: dict) -> Manifest:
        """This manifest with the run's normalisation recorded, so every checkpoint says what sampling must invert."""
        return Manifest({**self.raw, "latent_norm": record})

    def excerpt(self, keys: tuple[str, ...]) -> dict:
        """The sections `keys` (None where absent) and the buckets where there are any: what a checkpoint records."""
        return {**{k: self.raw.get(k) for k in keys}, **({"buckets": self.buckets} if self.bucketed else {})}

    # A transition aid while readers move to the questions above: `m["codec"]`, `m.get(...)`, `"shards" in m` and
    # `{**m}` read the raw JSON. New code asks the properties.
    def __getitem__(self, key: str):
        return self.raw[key]

    def get(self, key: str, default=None):
        return self.raw.get(key, default)

    def __contains__(self, key: str) -> bool:
        return key in self.raw

    def keys(self):
        return self.raw.keys()


# ---------------------------------------------------------------------------------------------------- writing


def manifest_header(source, codec, samples_per_shard: int, slices: list[str], flip_at_load: bool,
                    text_encoder: dict | None = None, targets: dict | None = None) -> dict:
    """Everything the manifest says besides the shards: source, codec, latent layout, labels, captions, targets.
    `text_encoder`: the caption encoder's identity when the captions are embedded (`<key>.text.npy`); `targets`:
    the representation targets' section when they are stored (`<key>.target.npy`, pipeline/targets.py)."""
    from ditpipe.pipeline.shards import LATENT_DTYPE

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
        **({"targets": targets} if targets else {}),  # absent without targets, likewise
    }


TEXT_RECORD = ("<key>.text.npy (Parquet: column 'text'): a (K,) array, K = the image's captions, of the structured "
               "dtype [('tokens', '<f2', (L, dim)), ('mask', '|b1', (L,)), ('pooled', '<f2', (dim,))], L <= "
               "max_tokens; np.load(allow_pickle=False) reads it")


def build_manifest(folder: Path, header: dict, num_shards: int, fmt: str) -> dict:
    """Merge the sidecars, in shard order, under `header` (source, codec, latent, labels, ...)."""
    from ditpipe.pipeline.shards import FORMAT_VERSION, shard_name, sidecar_name

    shards, skipped, converted = [], [], []
    total, sums, sumsq, count = 0, None, None, 0
    text = {"captions": 0, "max_tokens": 0}
    buckets = [{**b, "samples": 0, "shards": 0} for b in header.get("buckets") or []]
    for i in range(num_shards):
        name = shard_name(fmt, i)
        side = json.loads((folder / sidecar_name(name)).read_text())
        side_bytes = (folder / sidecar_name(name)).read_bytes()
        shards.append({"name": name, "samples": side["samples"], "bytes": side["bytes"], "sha256": side["sha256"],
                       "sidecar": sidecar_name(name), "sidecar_sha256": hashlib.sha256(side_bytes).hexdigest()})
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




# ---------------------------------------------------------------------------------------------------- reading


def load_manifest(folder: Path) -> Manifest:
    from ditpipe.pipeline.shards import MANIFEST, read_meta

    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ShardError(f"no {MANIFEST} in '{folder}': not a finished ditpipe shard folder; run `ditpipe encode` "
                         "(rerunning the same command finishes an interrupted encode)")
    return parse_manifest(read_meta(path), path)


def parse_manifest(raw: bytes, where, remote: bool = False) -> Manifest:
    """A manifest's bytes, parsed and checked (version, latent shape, names, counts) before any of it is used: the
    same refusals, in the same words, for a shard folder on disk and at a URL (`remote`: the fix is a re-upload)."""
    from ditpipe.pipeline.shards import FORMAT_VERSION

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
    check_targets(manifest, where)  # sizes every batch's target arrays
    check_entries(manifest, where)  # names become paths or URLs: `../` must not leave the folder
    return Manifest(manifest)


def check_entries(manifest: dict, where) -> None:
    """Refuse a shard entry whose name is not a plain shard file name of ours (with its sidecar's name), whose
    counts are not non-negative integers, or that claims more samples than its recorded bytes can hold, and totals
    that do not add up. Names become paths and counts become allocations (the loader's order holds an index per
    sample), so a forged one could otherwise read outside the folder, or allocate gigabytes before anything fails.
    `check_files` then holds the recorded bytes to the files' own sizes."""
    from ditpipe.pipeline import formats

    fmt, entries = manifest.get("format"), manifest.get("shards")
    if fmt not in formats.FORMATS or not isinstance(entries, list):
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
    from ditpipe.pipeline.config import MAX_TEXT_DIM

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
    from ditpipe.pipeline import formats
    from ditpipe.pipeline.shards import LATENT_DTYPE, sidecar_name

    fm = formats.FORMATS[manifest["format"]]  # the only names a manifest may give its shards: NAME_RE, fullmatch
    name = entry.get("name") if isinstance(entry, dict) else None
    if not (isinstance(name, str) and fm.NAME_RE.fullmatch(name)) or name in seen:
        raise ShardError(f"'{where}': shards[{i}].name {name!r} is not a shard file name of this folder "
                         f"({fm.NAME_HINT}, once each, no folder); the "
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

    from ditpipe.pipeline.shards import MANIFEST

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



def check_targets(manifest: dict, where) -> None:
    from ditpipe.pipeline.targets import check_section

    check_section(manifest, where)


def check_latent_shape(manifest: dict, where) -> None:
    """Refuse a latent shape that the manifest's own source and codec do not give: (k <= 4 slices, C, side, side)
    with side = source.image_size / codec.downsample. Training sizes its model from this shape, so an altered one
    could otherwise make it allocate any amount of memory."""
    from ditpipe.pipeline.config import MAX_IMAGE_SIZE

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
    from ditpipe.pipeline.config import MAX_IMAGE_SIZE

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



def text_encoder_of(manifest: dict) -> dict | None:
    """The caption encoder's identity when the shards carry caption embeddings, else None."""
    return (manifest.get("captions") or {}).get("encoder")



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
