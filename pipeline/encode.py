"""The encode engine: every input through the codec once, into verified latent shards and a manifest.

Shard i holds inputs [i·n, (i+1)·n). With `data.captions`, every caption of every kept input also goes through the
text encoder once, into `<key>.text.npy` beside its latent. A rerun reuses what the folder holds (pipeline/reuse.py):
a shard whose inputs are unchanged is kept, any other is rewritten from reused latents plus the inputs that changed
or were added, so rerunning after a crash or kill -9 finishes the job with the same bytes, and rerunning after the
images changed updates the shards. Decoding and resizing run in the workers of one DataLoader; the codec runs in this
process; a writer thread assembles the shards (pipeline/assemble.py); an encode batch never crosses a shard.

`encode` says nothing itself: what it reports (notes, the download, each batch, the summary) goes to an `Observer`,
which the verb (stages/encode.py) draws on the console and bench uses to stamp each batch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from rich.markup import escape

from ditpipe.pipeline import atomic, lock, reuse, shards
from ditpipe.pipeline.assemble import Assembler, DonorCache, Encoded
from ditpipe.pipeline.buckets import resolve
from ditpipe.pipeline.codec import encode_with_backoff, load_codec, tune_for_device, with_class
from ditpipe.pipeline.config import Config
from ditpipe.pipeline.errors import ConfigError, DataError, ShardError
from ditpipe.pipeline.manifest import Manifest, build_manifest, load_manifest, manifest_header, text_encoder_of
from ditpipe.pipeline.remote import is_url
from ditpipe.pipeline.sources import BadImage, Loaded, Source, assign_buckets, make_source, missing_captions_note
from ditpipe.pipeline.spread import TIMEOUT
from ditpipe.pipeline.workers import capped_workers


@dataclass(frozen=True)
class Run:
    """What one encode did, for its summary: the merged manifest, its folder, the seconds it took, the counts summed
    over ranks (shards' inputs kept, latents reused, inputs decoded, files hashed, shards rewritten) and this rank's
    codec batch (`batch`, and `halvings` when an out-of-memory error halved it)."""

    manifest: Manifest
    out: Path
    seconds: float
    kept: int
    reused: int
    encoded: int
    hashed: int
    rewritten: int
    state: dict


class Observer:
    """What the encode engine tells whoever runs it; each is a no-op here. Notes and the summary come from rank 0
    only; `batch` comes on every rank, `encoding` says whether this rank is the one to show."""

    def note(self, text: str) -> None:
        """A note worth a line, as rich markup (what it quotes from outside is escaped where it may hold [)."""

    def downloading(self):
        """A context around COCO's download that gives a `report(name, bytes done, total)` callable, or None."""
        return contextlib.nullcontext(None)

    def encoding(self, description: str, total: int, shown: bool):
        """A context around the batches: `total` inputs to decode and encode this run."""
        return contextlib.nullcontext()

    def batch(self, n: int) -> None:
        """After each batch is encoded and handed to the writer thread: `n` more inputs done."""

    def shard(self, path: Path) -> None:
        """In the writer thread, once a shard this run rewrote and its sidecar are complete in the folder: its path
        (on every rank; a remote encode uploads it then, pipeline/remote_encode.py). Keep it short: the next shard
        waits."""

    def summary(self, run: Run) -> None:
        """Once the manifest is merged, before a result without a single usable image is refused."""


@dataclass
class Decoded:
    """One batch, decoded and collated in a DataLoader worker: the good inputs' pixels stacked as uint8 (pinned and
    copied to the device as bytes, a quarter of float32's), the others with why they are skipped."""

    indices: list[int]
    pixels: torch.Tensor | None  # (G, H, W, 3) uint8
    good: list[tuple[int, Loaded]]  # in batch order, each without its pixels (they are in `pixels`)
    failed: list[tuple[int, str, str | None, int | None, tuple | None]]  # (index, reason, sha256, pixels, stat)

    def __len__(self) -> int:
        return len(self.indices)

    def pin_memory(self) -> "Decoded":  # DataLoader(pin_memory=True) calls this in its pinning thread
        return replace(self, pixels=None if self.pixels is None else self.pixels.pin_memory())


class _Decode(torch.utils.data.Dataset):
    """Runs in DataLoader workers: decode + preprocess one input, or say why it is skipped."""

    def __init__(self, source: Source):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        try:
            return i, self.source.load(i), None
        except BadImage as e:
            return i, None, (i, str(e), e.sha256, e.pixels, e.stat)


def _collate(items) -> Decoded:
    good = [(i, loaded) for i, loaded, _ in items if loaded is not None]
    pixels = torch.from_numpy(np.stack([loaded.pixels for _, loaded in good])) if good else None
    return Decoded([i for i, _, _ in items], pixels, [(i, replace(loaded, pixels=None)) for i, loaded in good],
                   [fail for _, _, fail in items if fail is not None])


@lock.holding(lambda cfg, **_: (None if is_url(cfg.shards.path or "") else cfg.shards_path, "encode"))
def encode(cfg: Config, overwrite: bool = False, observer: Observer | None = None) -> dict:
    """Encode what `cfg.data` describes into `cfg.shards_path`, reusing what the folder already holds. Returns the
    manifest.

    Under torchrun / accelerate launch, rank r encodes shards r, r + world, ...; rank 0 merges the manifest after
    a barrier. Each shard is the same bytes whichever rank writes it, so the result equals a one-process encode."""
    observer = observer or Observer()
    t0 = time.time()
    if "://" in str(cfg.shards.path or "") or str(cfg.shards.path or "").startswith("pipe:"):
        raise ConfigError([("shards.path", f"{cfg.shards.path!r} is a URL; this engine writes a local (or shared) "
                                           "folder: encode to a URL through pipeline.remote_encode (as `ditpipe "
                                           "encode --out s3://...` does), which stages the folder and uploads it")])
    rank, world, barrier = distributed()
    fewer_workers = capped_workers(cfg.data.num_workers)[1]
    if fewer_workers and rank == 0:
        observer.note(fewer_workers)
    source = _source_once_per_node(cfg, observer, world)
    if (missing := missing_captions_note(source)) and rank == 0:
        observer.note(escape(missing))
    if not cfg.shards.path and cfg.data.num_samples and len(source) < cfg.data.num_samples and rank == 0:
        observer.note(f"data.num_samples {cfg.data.num_samples:,} asks for more than the {len(source):,} inputs "
                      f"there: all are encoded, into {cfg.shards_path}, named by the number asked for so that "
                      "`train` with the same config finds it (--num-samples null names it -all)")
    codec = encode_codec(cfg)
    if cfg.data.image_size % codec.downsample:
        raise ConfigError([("data.image_size", f"{cfg.data.image_size} is not a multiple of the codec's downsample "
                                               f"factor {codec.downsample} ({cfg.vae.name})")])
    if sizes := _bucket_sizes(cfg, codec):
        source = assign_buckets(source, sizes, capped_workers(cfg.data.num_workers)[0] or 1)
    out = cfg.shards_path
    n_per, fmt = cfg.shards.samples_per_shard, cfg.shards.format
    text_encoder = _text_encoder(cfg, source)
    target_encoder = _target_encoder(cfg, codec)
    slices = codec.slices(cfg.shards.store, cfg.shards.flip)
    header = manifest_header(source, codec, n_per, slices, flip_at_load=codec.kind == "pixel" and cfg.shards.flip,
                             text_encoder=text_encoder.identity() if text_encoder else None,
                             targets=_targets_section(cfg, codec, target_encoder))
    if target_encoder is not None and rank == 0:
        observer.note(escape(_targets_note(header)))
    _prepare_folder(out, header, fmt, overwrite, write=False)  # every rank refuses the same folder the same way
    barrier()
    if rank == 0:
        _prepare_folder(out, header, fmt, overwrite, write=True)
    barrier()
    spans = source.spans(n_per)  # (start, stop, bucket) of each shard
    num_shards = len(spans)
    pool = reuse.Pool(out, header, fmt)
    baseline = _baseline(out, pool) if rank == 0 else None
    mine = range(rank, num_shards, world)
    fps = pool.fingerprints(source, [g for i in mine for g in range(*spans[i][:2])],
                            capped_workers(cfg.data.num_workers)[0])
    plans = [reuse.plan_shard(pool, source, i, spans[i], fmt, fps) for i in mine]
    for plan in plans:
        here = pool.at.get(plan.index)
        if not plan.kept and here is not None and here.valid():
            reuse.keep_for_reuse(out, here)  # before anything is replaced: every rank may draw on it
        elif plan.kept and reuse.stat_cache_stale(out, plan):
            reuse.write_stat_cache(out, plan.name, plan.entries)  # touched, not changed: the shard stays
    if rank == 0:
        for position, donor in pool.at.items():
            if position >= num_shards and donor.valid():  # the source shrank: its old last shards may hold samples
                reuse.keep_for_reuse(out, donor)
    barrier()
    state = {"batch": cfg.vae.batch_size, "reused": 0, "encoded": 0}
    kept = sum(p.stop - p.start for p in plans if p.kept)
    with observer.encoding(f"encode → {out}" + (f" (rank 0 of {world})" if world > 1 else ""),
                           sum(len(p.to_encode()) for p in plans if not p.kept), rank == 0):
        _write_shards([p for p in plans if not p.kept], source, codec, text_encoder, cfg, pool, header, state,
                      observer.batch, target_encoder, observer.shard)
    counts = _sum_over_ranks([kept, state["reused"], state["encoded"], pool.hashed,
                              sum(not p.kept for p in plans)], world)
    barrier()
    if rank == 0:
        _finish(out, header, num_shards, fmt, baseline)
    barrier()
    parsed = load_manifest(out)
    manifest = parsed.raw  # the JSON written, as encode returns it
    if rank == 0:
        observer.summary(Run(parsed, out, time.time() - t0, *counts, state))
    if parsed.num_samples == 0:
        raise DataError(f"no usable image: all {parsed.num_inputs:,} input(s) were skipped (the reasons are above"
                        f" and in {out / shards.MANIFEST}); fix or replace them, delete '{out}' and encode again")
    return manifest


def _write_shards(plans: list, source: Source, codec, text_encoder, cfg: Config, pool: reuse.Pool, header: dict,
                  state: dict, advance, target_encoder=None, written=None) -> None:
    """Rewrite the shards `plans` name: one DataLoader decodes every input to encode, batches never cross a shard,
    and a writer thread assembles each shard (reused latents, new ones, skips) while the next batch is encoded;
    `written(path)` is told of each shard once it is complete."""
    size = cfg.vae.batch_size
    chunks = {p.index: [p.to_encode()[k : k + size] for k in range(0, len(p.to_encode()), size)] for p in plans}
    order = [c for p in plans for c in chunks[p.index]]
    batches = iter(torch.utils.data.DataLoader(
        _Decode(source), batch_sampler=order, collate_fn=_collate, pin_memory=codec.device.type == "cuda",
        num_workers=min(capped_workers(cfg.data.num_workers)[0], len(order)))) if order else iter(())
    donors = DonorCache(pool)
    with Assembler(pool.out, cfg.shards.format, header, text_encoder is not None, donors, written) as writer:
        for plan in plans:
            text_cache: dict = {}  # per shard, so a shard's bytes depend only on its own inputs (resume gives the same)
            writer.put("shard", plan, _changed_caption_texts(plan, donors, text_encoder, cfg, text_cache))
            state["reused"] += sum(e.action == "reuse" for e in plan.entries)
            for _ in chunks[plan.index]:
                batch = next(batches)
                _encode_batch(batch, source, codec, text_encoder, cfg, writer, state, text_cache, target_encoder)
                advance(len(batch))
            writer.put("end")


def _changed_caption_texts(plan, donors: DonorCache, text_encoder, cfg: Config, text_cache: dict) -> dict:
    """Caption records for reused latents whose captions changed (the image did not); the rest reuse theirs."""
    if text_encoder is None:
        return {}
    stale = [e for e in plan.entries if e.action == "reuse"
             and donors.sample(e.held).meta.get("captions", []) != plan.metas[e.index - plan.start].get("captions", [])]
    if not stale:
        return {}
    records = text_encoder.encode_records([list(plan.metas[e.index - plan.start].get("captions", [])) for e in stale],
                                          cfg.text.batch_size, text_cache)
    return {e.index: r for e, r in zip(stale, records)}


def _bucket_sizes(cfg: Config, codec) -> list[tuple[int, int]] | None:
    """data.buckets resolved for this codec and the config's patch size; None for square."""
    try:
        return resolve(cfg.data.buckets, cfg.data.image_size, codec.downsample * cfg.model.patch)
    except ValueError as e:
        raise ConfigError([("data.buckets", f"{e} (codec {cfg.vae.name}: {codec.downsample}× down; model.name "
                                            f"{cfg.model.name}: patch {cfg.model.patch})")]) from None


def distributed():
    """(rank, world size, barrier) from torchrun's / accelerate's environment; one process needs no group. On CUDA
    each rank selects its own GPU before the process group exists, so NCCL's collectives (the barriers) run on it
    rather than on whichever device a rank happens to have current."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, lambda: None
    import torch.distributed as dist

    device = _local_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # sample/evaluate's long timeout: the other ranks wait in a collective while one per node downloads COCO
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    return dist.get_rank(), world, dist.barrier


_distributed = distributed  # its older name (tests/test_ranks.py)


def _sum_over_ranks(values: list[int], world: int) -> list[int]:
    if world == 1:
        return values
    import torch.distributed as dist

    total = torch.tensor(values, dtype=torch.int64, device=_local_device())
    dist.all_reduce(total)
    return total.tolist()


def _text_encoder(cfg: Config, source: Source):
    """The caption encoder when `data.captions` asks for one; refuses a source without a single caption."""
    if not cfg.data.captions:
        return None
    if not any(item.captions for item in source.items):
        where = {"coco": f"annotations/captions_{cfg.data.split}2017.json under the COCO root",
                 "custom": "metadata.jsonl at the folder's root, or a <stem>.txt beside each image"}
        raise DataError(f"--captions, but no input has a caption; {source.name} captions come from "
                        f"{where.get(source.name, 'the source')}")
    from ditpipe.pipeline.text import load_text_encoder

    return load_text_encoder(cfg.text.encoder, _local_device(), cfg.text.max_tokens)


def _local_device() -> torch.device:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise ConfigError([("LOCAL_RANK", f"{local}, but this process sees {torch.cuda.device_count()} CUDA "
                                              "device(s); start at most that many processes per node")])
        return torch.device("cuda", local)
    return torch.device("cpu")


def encode_codec(cfg: Config):
    """The codec encode runs: on this rank's device, tuned for it as the bench's bare VAE and the online baseline are
    (pipeline.codec.tune_for_device)."""
    codec = load_codec(cfg.vae.name, cfg.vae.dtype, device=_local_device(), use_slicing=cfg.vae.use_slicing)
    tune_for_device(codec, cfg.vae.cudnn_benchmark)
    return codec


def _source_once_per_node(cfg: Config, observer: Observer, world: int) -> Source:
    """The inputs, downloading COCO first where asked. Under torchrun every rank would download and extract into the
    same `.part` file and temporary folder, so one rank per node (LOCAL_RANK 0) does, into this node's data root,
    while the others wait in a collective; then they find the data in place. A failed download stops every rank
    with the downloading rank's message. (Several nodes sharing one data root would still race: download there
    once first, with one process.)"""
    if world == 1 or not (cfg.data.dataset_name == "coco" and cfg.data.download):
        return _source_with_download(cfg, observer)
    import torch.distributed as dist

    source, error = None, None
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        try:
            source = _source_with_download(cfg, observer)
        except Exception as e:  # every rank must reach the collective below, whatever went wrong
            error = e
    errors: list[str | None] = [None] * world
    said = None if error is None else str(error) if isinstance(error, DataError) else f"{type(error).__name__}: {error}"
    dist.all_gather_object(errors, said)
    if error is not None:
        raise error
    if failed := next((e for e in errors if e), None):
        raise DataError(failed)  # the downloading rank's words: what to fix is the same for every rank
    return source or make_source(cfg.data)


def _source_with_download(cfg: Config, observer: Observer) -> Source:
    if not (cfg.data.dataset_name == "coco" and cfg.data.download):
        return make_source(cfg.data)
    with observer.downloading() as report:
        return make_source(cfg.data, download_progress=report)


# What the listing happens to hold, not how it is encoded: an update may change these (pipeline/reuse.py).
_CONTENT_KEYS = ("num_inputs_available", "archives_sha256")


def _params(header: dict, fmt: str) -> dict:
    params = {k: header[k] for k in ("source", "codec", "latent", "samples_per_shard")}
    params["source"] = {k: v for k, v in params["source"].items() if k not in _CONTENT_KEYS}
    if text_encoder_of(header):  # other caption embeddings are other shards
        params["text_encoder"] = text_encoder_of(header)
    if header.get("targets"):  # other representation targets are other shards: stale ones are never mixed in
        params["targets"] = header["targets"]
    params["format_version"] = shards.FORMAT_VERSION
    params["format"] = fmt  # a wds folder re-encoded as parquet would keep stale tars that verify then rejects
    return params


def _prepare_folder(out: Path, header: dict, fmt: str, overwrite: bool, write: bool) -> None:
    """Refuse an existing folder made with other parameters (unless --overwrite); with `write`, clean it up and
    record ours. Images added, removed or changed are not other parameters: the encode updates the shards."""
    params = _params(header, fmt)
    params_file = out / shards.PARAMS
    if out.exists() and not out.is_dir():
        raise ShardError(f"'{out}' exists and is not a folder; choose another --out")
    if out.exists() and any(not lock.is_lock(p) for p in out.iterdir()):
        if not params_file.is_file():
            raise ShardError(f"'{out}' exists and is not a ditpipe shard folder; choose another --out")
        old = json.loads(params_file.read_text())
        old["source"] = {k: v for k, v in (old.get("source") or {}).items() if k not in _CONTENT_KEYS}
        old["codec"] = with_class(old.get("codec") or {})  # a record from before the class was recorded
        if old != params and not overwrite:
            diff = _diff(old, params)
            raise ShardError(f"'{out}' holds shards made with other parameters ({diff}); pass --overwrite to replace "
                             "them, or choose another --out")
        if old != params and write:
            _remove_ours(out)
    if not write:
        return
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(f".*{atomic.TMP_SUFFIX}"):  # temporaries of a killed run
        stale.unlink()
    if not params_file.is_file() or json.loads(params_file.read_text()) != params:  # new, or of an older ditpipe
        atomic.write_json(params_file, params)


def _diff(old: dict, new: dict, prefix: str = "") -> str:
    """Every differing key (not just the first: `latent.shape` alone would hide the `source.image_size` behind it)."""
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            if a != b:
                diffs.append(_diff(a, b, f"{prefix}{key}."))
        elif a != b:
            diffs.append(f"{prefix}{key}: {a!r} there, {b!r} now")
    return "; ".join(diffs) or "no difference"


def _remove_ours(out: Path) -> None:
    """--overwrite deletes only files ditpipe writes in a shard folder, by their exact names (`shard-00003.tar`,
    `part-00003.meta.json`, ...), nothing else: a user's `notes.meta.json` merely ends like a sidecar."""
    for p in out.iterdir():
        if (shards.shard_index(p.name) is not None or p.name in (shards.MANIFEST, shards.PARAMS)) and (
                p.is_file() and not p.is_symlink()):  # we write regular files: a folder or a link is not ours
            p.unlink()
    shutil.rmtree(out / shards.REUSE_DIR, ignore_errors=True)


def _baseline(out: Path, pool: reuse.Pool) -> tuple[dict, str, dict] | None:
    """(manifest, its sha256, file → sha256 of its inputs) of the folder's last complete encode, read before
    anything is replaced: what an update reports its changes against."""
    try:
        blob = (out / shards.MANIFEST).read_bytes()
        parsed = load_manifest(out)
    except (OSError, ShardError):
        return None
    manifest = parsed.raw  # compared with, and reported against, the new one as JSON
    by_sha = {h.donor.sidecar_sha: h.donor for copies in pool.held.values() for h in copies}
    records = [r for s in parsed.entries if s["sidecar_sha256"] in by_sha
               for r in by_sha[s["sidecar_sha256"]].records]
    return manifest, hashlib.sha256(blob).hexdigest(), reuse.records_by_file(records)


def _finish(out: Path, header: dict, num_shards: int, fmt: str, baseline) -> None:
    """Rank 0, after every shard is written: merge the manifest (rewritten only if it changes, with what the update
    changed), then remove what is left of the old state: shards past the new end and .reuse/."""
    manifest = build_manifest(out, header, num_shards, fmt)
    if baseline is not None:
        old, old_sha, old_files = baseline
        if {k: v for k, v in old.items() if k != "update"} == manifest:
            manifest = None  # nothing changed: the folder's bytes stay as they are
        else:
            records = [r for i in range(num_shards) for r in json.loads(
                (out / shards.sidecar_name(shards.shard_name(fmt, i))).read_text())["sources"]]
            manifest["update"] = reuse.update_section(old, old_sha, old_files, manifest, reuse.records_by_file(records))
    if manifest is not None:
        atomic.write_json(out / shards.MANIFEST, manifest)
    for p in out.iterdir():
        if (i := shards.shard_index(p.name)) is not None and i >= num_shards:
            p.unlink()
    shutil.rmtree(out / shards.REUSE_DIR, ignore_errors=True)


def _encode_batch(batch: Decoded, source: Source, codec, text_encoder, cfg: Config, writer: Assembler, state: dict,
                  text_cache: dict, target_encoder=None) -> None:
    """Encode one decoded batch and hand the latents to the writer thread. The uint8 pixels go to the device as they
    are (from pinned memory, asynchronously) and become floats there; the latents come back through an asynchronous
    copy the writer thread waits for, so the next batch's forward is queued while this one is written."""
    state["encoded"] += len(batch)
    if batch.pixels is None:
        writer.put("batch", Encoded(None, None, [], [], batch.failed))
        return
    n = len(batch.good)
    neural = codec.kind != "pixel"  # the pixel codec's flip is exact at load time: it encodes nothing
    images = batch.pixels.to(codec.device, non_blocking=True) if neural else batch.pixels  # (N, H, W, 3)
    with_flip = neural and cfg.shards.flip
    if with_flip:
        images = torch.cat([images, images.flip(2)])  # (2N, H, W, 3): mirror along W
    mean, std = encode_with_backoff(codec, images, state)  # (2N | N, C, h, w) float32
    parts = [mean] if std is None or cfg.shards.store == "mean" else [mean, std]
    if with_flip:
        parts = [p[:n] for p in parts] + [p[n:] for p in parts]
    latents, ready = _to_host(torch.stack(parts, dim=1))  # (N, k, C, h, w) float32
    texts = [None] * n
    if text_encoder is not None:  # every caption of the batch in one go: the encoder runs once per caption, ever
        texts = text_encoder.encode_records([list(source.items[i].captions) for i, _ in batch.good],
                                            cfg.text.batch_size, text_cache)
    targets = None
    if target_encoder is not None:  # the frozen image encoder runs once per image (and mirror), ever
        targets = _targets(target_encoder, batch.pixels, codec.downsample * cfg.model.patch, cfg)
    writer.put("batch", Encoded(latents, ready, batch.good, texts, batch.failed, targets))


def _targets(encoder, pixels: torch.Tensor, step: int, cfg: Config) -> np.ndarray:
    """(N, m, T, D) float32 on the host: the target encoder's tokens of each image (and of its mirror, second, when
    training flips), on the DiT's token grid: (H, W) / (codec downsample × model patch)."""
    pixels = pixels.to(encoder.device, non_blocking=True)  # (N, H, W, 3) uint8
    grid = (pixels.shape[1] // step, pixels.shape[2] // step)
    views = [pixels, pixels.flip(2)] if cfg.shards.flip else [pixels]  # the mirror along W, as the latents'
    size = cfg.targets.batch_size
    out = [torch.cat([encoder(v[i : i + size], grid, cfg.targets.class_token) for i in range(0, len(v), size)])
           for v in views]  # m × (N, T, D)
    return torch.stack(out, dim=1).cpu().numpy()  # (N, m, T, D)


def _target_encoder(cfg: Config, codec):
    """The target encoder when `targets.encoder` asks for one, on this rank's device."""
    if not cfg.targets.encoder:
        return None
    from ditpipe.pipeline.targets import load_target_encoder

    step = codec.downsample * cfg.model.patch
    if cfg.data.image_size % step:
        raise ConfigError([("targets.encoder", f"targets are one a DiT token: data.image_size {cfg.data.image_size} "
                                               f"must be a multiple of the codec's downsample {codec.downsample} × "
                                               f"model patch {cfg.model.patch}")])
    return load_target_encoder(cfg.targets.encoder, _local_device())


def _targets_section(cfg: Config, codec, encoder) -> dict | None:
    """The manifest's `targets` (pipeline/targets.py): the encoder, the grid it was cut for, the record's layout."""
    if encoder is None:
        return None
    from ditpipe.pipeline.targets import RECORD, Layout

    side = cfg.data.image_size // codec.downsample // cfg.model.patch
    slices = ["target", "target_flip"] if cfg.shards.flip else ["target"]
    tokens = side * side + int(cfg.targets.class_token)
    layout = Layout(len(slices), tokens, encoder.dim, cfg.targets.dtype)
    return {"encoder": encoder.identity(), "model_patch": cfg.model.patch, "class_token": cfg.targets.class_token,
            "slices": slices, "dtype": cfg.targets.dtype, "grid": [side, side],
            "resolution": encoder.resolution((side, side)), "bytes_per_sample": layout.data_bytes, "record": RECORD}


def _targets_note(header: dict) -> str:
    """The preflight line: what the targets are and what they cost a sample, beside the latent."""
    t, latent = header["targets"], header["latent"]
    latent_bytes = int(np.prod(latent["shape"])) * 2
    side = t["grid"]
    return (f"targets: {t['encoder']['name']} ({t['encoder']['layer']}), {side[0]}x{side[1]} tokens"
            f"{' + class token' if t['class_token'] else ''} x {t['encoder']['dim']}, {t['dtype']}"
            f"{', with the mirror' if len(t['slices']) == 2 else ''}: {t['bytes_per_sample'] / 1024:,.0f} KiB a sample "
            f"(the latent: {latent_bytes / 1024:,.0f} KiB)" + (f"; the encoder sees {t['resolution'][0]} px"
                                                                if t.get("resolution") else ""))


def _to_host(latents: torch.Tensor) -> tuple[torch.Tensor, object]:
    """A CUDA tensor copied into pinned host memory without waiting, and the event that marks the copy done."""
    if latents.device.type != "cuda":
        return latents, None
    host = torch.empty(latents.shape, dtype=latents.dtype, pin_memory=True)
    host.copy_(latents, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    return host, ready
