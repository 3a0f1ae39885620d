"""`ditpipe encode`: every input through the codec once, into verified latent shards and a manifest.

Shard i holds inputs [i·n, (i+1)·n). With `data.captions`, every caption of every kept input also goes through the
text encoder once, into `<key>.text.npy` beside its latent. Shards already complete (sidecar present, size and sha256 matching) are kept,
so rerunning the same command after a crash or kill -9 finishes the job and gives the same bytes. Decoding and
resizing run in DataLoader workers; the codec runs in this process; an encode batch never crosses a shard.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                           TimeRemainingColumn, TransferSpeedColumn)
from rich.table import Table
from rich.text import Text

from pipeline import atomic, lock, shards
from pipeline.codec import encode_with_backoff, load_codec
from pipeline.config import Config
from pipeline.errors import ConfigError, DataError, ShardError
from pipeline.loader import is_url
from pipeline.sources import BadImage, Source, make_source
from pipeline.workers import capped_workers


class RateColumn(ProgressColumn):
    """The one rate of encode (and verify): items done this run / seconds since the bar started; items found done
    already (the `reused` field) do not count. The encode summary prints the same number."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        return Text(f"{mean_rate(task):,.0f} {self.unit}/s", style="cyan")


def mean_rate(task) -> float:
    seconds = task.finished_time or task.elapsed
    return (task.completed - task.fields.get("reused", 0)) / seconds if seconds else 0.0


def progress_bar(console: Console, unit: str = "img", disable: bool = False) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(unit),
                    TimeRemainingColumn(), console=console, transient=False, disable=disable)


@dataclass
class ShardTally:
    """What one shard's encode produced, beyond its samples: the sidecar's extra fields."""

    skipped: list = field(default_factory=list)
    converted: list = field(default_factory=list)
    sums: np.ndarray | None = None
    sumsq: np.ndarray | None = None
    count_px: int = 0

    def add_stats(self, first_slice: np.ndarray) -> None:  # (N, C, H, W) float32
        s = first_slice.astype(np.float64).sum(axis=(0, 2, 3))
        q = np.square(first_slice.astype(np.float64)).sum(axis=(0, 2, 3))
        self.sums, self.sumsq = (s, q) if self.sums is None else (self.sums + s, self.sumsq + q)
        self.count_px += first_slice.shape[0] * first_slice.shape[2] * first_slice.shape[3]

    def sidecar(self, start: int, stop: int) -> dict:
        return {"inputs": [start, stop], "skipped": self.skipped, "converted": self.converted,
                "sum": None if self.sums is None else self.sums.tolist(),
                "sumsq": None if self.sumsq is None else self.sumsq.tolist(), "count_px": self.count_px}


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
            return i, None, str(e)


def _first(batch):
    return batch


@lock.holding(lambda cfg, **_: (None if is_url(cfg.shards.path or "") else cfg.shards_path, "encode"))
def encode(cfg: Config, overwrite: bool = False, console: Console | None = None) -> dict:
    """Encode what `cfg.data` describes into `cfg.shards_path`. Returns the manifest.

    Under torchrun / accelerate launch, rank r encodes shards r, r + world, ...; rank 0 merges the manifest after
    a barrier. Each shard is the same bytes whichever rank writes it, so the result equals a one-process encode."""
    console = console or Console(stderr=True)
    t0 = time.time()
    if "://" in str(cfg.shards.path or "") or str(cfg.shards.path or "").startswith("pipe:"):
        raise ConfigError([("shards.path", f"{cfg.shards.path!r} is a URL; encode writes a local (or shared) folder "
                                           "only. Encode there, then copy the folder to the object store (training "
                                           "reads fsspec URLs read-only)")])
    rank, world, barrier = _distributed()
    fewer_workers = capped_workers(cfg.data.num_workers)[1]
    if fewer_workers and rank == 0:
        console.print(f"[yellow]note:[/] {fewer_workers}", highlight=False, soft_wrap=True)
    source = _source_with_download_bar(cfg, console)
    if not cfg.shards.path and cfg.data.num_samples and len(source) < cfg.data.num_samples and rank == 0:
        console.print(f"[yellow]note:[/] data.num_samples {cfg.data.num_samples:,} asks for more than the "
                      f"{len(source):,} inputs there: all are encoded, into {cfg.shards_path}, named by the number "
                      "asked for so that `train` with the same config finds it (--num-samples null names it -all)",
                      highlight=False, soft_wrap=True)
    codec = load_codec(cfg.vae.name, cfg.vae.dtype, device=_local_device(), use_slicing=cfg.vae.use_slicing)
    if cfg.data.image_size % codec.downsample:
        raise ConfigError([("data.image_size", f"{cfg.data.image_size} is not a multiple of the codec's downsample "
                                               f"factor {codec.downsample} ({cfg.vae.name})")])
    out = cfg.shards_path
    n_per, fmt = cfg.shards.samples_per_shard, cfg.shards.format
    text_encoder = _text_encoder(cfg, source)
    slices = shards.latent_slices(codec.stores_std, cfg.shards.store, cfg.shards.flip)
    header = shards.manifest_header(source, codec, n_per, slices, flip_at_load=not codec.stores_std and cfg.shards.flip,
                                    text_encoder=text_encoder.identity() if text_encoder else None)
    latent_shape = tuple(header["latent"]["shape"])
    _prepare_folder(out, header, fmt, overwrite, write=False)  # every rank refuses the same folder the same way
    barrier()
    if rank == 0:
        _prepare_folder(out, header, fmt, overwrite, write=True)
    barrier()
    num_shards = max(1, math.ceil(len(source) / n_per))
    mine = range(rank, num_shards, world)
    loader_state = {"batch": cfg.vae.batch_size}
    done_before = 0
    with progress_bar(console, disable=rank != 0) as bar:
        task = bar.add_task(f"encode → {out}" + (f" (rank 0 of {world})" if world > 1 else ""),
                            total=sum(min(n_per, len(source) - i * n_per) for i in mine), reused=0)
        for i in mine:
            start, stop = i * n_per, min((i + 1) * n_per, len(source))
            name = shards.shard_name(fmt, i)
            if shards.load_sidecar(out, name) is not None:  # complete and verified: keep it
                done_before += stop - start
                bar.update(task, advance=stop - start, reused=done_before)
                continue
            _encode_shard(source, codec, text_encoder, cfg, out / name, latent_shape, start, stop, loader_state,
                          lambda n: bar.update(task, advance=n))
    barrier()
    if rank == 0:
        atomic.write_json(out / shards.MANIFEST, shards.build_manifest(out, header, num_shards, fmt))
    barrier()
    manifest = shards.load_manifest(out)
    if rank == 0:
        _summary(console, manifest, out, time.time() - t0, done_before if world == 1 else 0, loader_state,
                 mean_rate(bar.tasks[0]))
    if manifest["num_samples"] == 0:
        raise DataError(f"no usable image: all {manifest['num_inputs']:,} input(s) were skipped (the reasons are above"
                        f" and in {out / shards.MANIFEST}); fix or replace them, delete '{out}' and encode again")
    return manifest


def _distributed():
    """(rank, world size, barrier) from torchrun's / accelerate's environment; one process needs no group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, lambda: None
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world, dist.barrier


def _text_encoder(cfg: Config, source: Source):
    """The caption encoder when `data.captions` asks for one; refuses a source without a single caption."""
    if not cfg.data.captions:
        return None
    if not any(item.captions for item in source.items):
        where = {"coco": f"annotations/captions_{cfg.data.split}2017.json under the COCO root",
                 "custom": "metadata.jsonl at the folder's root, or a <stem>.txt beside each image"}
        raise DataError(f"--captions, but no input has a caption; {source.name} captions come from "
                        f"{where.get(source.name, 'the source')}")
    from pipeline.text import load_text_encoder

    return load_text_encoder(cfg.text.encoder, _local_device(), cfg.text.max_tokens)


def _local_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _source_with_download_bar(cfg: Config, console: Console) -> Source:
    if not (cfg.data.dataset_name == "coco" and cfg.data.download):
        return make_source(cfg.data)
    with Progress(TextColumn("download {task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  console=console) as bar:
        tasks: dict[str, int] = {}

        def report(name: str, done: int, total: int | None) -> None:
            if name not in tasks:
                tasks[name] = bar.add_task(name, total=total)
            bar.update(tasks[name], completed=done)

        return make_source(cfg.data, download_progress=report)


def _prepare_folder(out: Path, header: dict, fmt: str, overwrite: bool, write: bool) -> None:
    """Refuse an existing folder made with other parameters (unless --overwrite); with `write`, clean it up and
    record ours."""
    params = {k: header[k] for k in ("source", "codec", "latent", "samples_per_shard")}
    if shards.text_encoder_of(header):  # other caption embeddings are other shards
        params["text_encoder"] = shards.text_encoder_of(header)
    params["format_version"] = shards.FORMAT_VERSION
    params["format"] = fmt  # a wds folder re-encoded as parquet would keep stale tars that verify then rejects
    params_file = out / shards.PARAMS
    if out.exists() and not out.is_dir():
        raise ShardError(f"'{out}' exists and is not a folder; choose another --out")
    if out.exists() and any(not lock.is_lock(p) for p in out.iterdir()):
        if not params_file.is_file():
            raise ShardError(f"'{out}' exists and is not a ditpipe shard folder; choose another --out")
        old = json.loads(params_file.read_text())
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
    if not params_file.is_file():
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
    """--overwrite deletes only files ditpipe writes in a shard folder, nothing else."""
    for p in out.iterdir():
        if shards._SHARD_RE.match(p.name) or p.name.endswith(".meta.json") or p.name in (shards.MANIFEST,
                                                                                          shards.PARAMS):
            p.unlink()


def _encode_shard(source, codec, text_encoder, cfg: Config, path: Path, latent_shape, start: int, stop: int,
                  state: dict, advance) -> None:
    writer = shards.ShardWriter(path, cfg.shards.format, latent_shape, text=text_encoder is not None)
    tally = ShardTally()
    text_cache: dict = {}  # per shard, so a shard's bytes depend only on its own inputs (resume gives the same)
    batches = [list(range(b, min(b + cfg.vae.batch_size, stop))) for b in range(start, stop, cfg.vae.batch_size)]
    loader = torch.utils.data.DataLoader(_Decode(source), batch_sampler=batches, collate_fn=_first,
                                         num_workers=capped_workers(cfg.data.num_workers)[0])
    try:
        for batch in loader:
            _encode_batch(batch, source, codec, text_encoder, cfg, writer, tally, state, text_cache)
            advance(len(batch))
        writer.close(tally.sidecar(start, stop))
    except BaseException:
        writer.abort()
        raise


def _encode_batch(batch, source, codec, text_encoder, cfg: Config, writer, tally: ShardTally, state: dict,
                  text_cache: dict | None = None) -> None:
    good = [(i, loaded) for i, loaded, _ in batch if loaded is not None]
    for i, _, reason in batch:
        if reason is not None:
            tally.skipped.append({"index": i, "file": source.sample_meta(i)["file"], "reason": reason})
    if not good:
        return
    images = torch.from_numpy(np.stack([loaded.pixels for _, loaded in good]))  # (N, H, W, 3) uint8
    with_flip = codec.stores_std and cfg.shards.flip
    if with_flip:
        images = torch.cat([images, images.flip(2)])  # (2N, H, W, 3): mirror along W
    mean, std = encode_with_backoff(codec, images, state)  # (2N | N, C, h, w) float32
    parts = [mean] if std is None or cfg.shards.store == "mean" else [mean, std]
    if with_flip:
        parts = [p[: len(good)] for p in parts] + [p[len(good):] for p in parts]
    latents = torch.stack(parts, dim=1).cpu().numpy()  # (N, k, C, h, w) float32
    half = latents.astype(np.float16)
    finite = np.isfinite(half).reshape(len(good), -1).all(axis=1)
    tally.add_stats(latents[finite, 0])
    texts = [None] * len(good)
    if text_encoder is not None:  # every caption of the batch in one go: the encoder runs once per caption, ever
        texts = text_encoder.encode_records([list(source.items[i].captions) for i, _ in good], cfg.text.batch_size,
                                            text_cache)
    for (i, loaded), lat, ok, text in zip(good, half, finite, texts):
        meta = source.sample_meta(i)
        if not ok:
            tally.skipped.append({"index": i, "file": meta["file"], "reason": "non-finite latent (codec overflow)"})
            continue
        meta["sha256"] = loaded.sha256
        if loaded.notes:
            meta["notes"] = loaded.notes
            tally.converted.append({"index": i, "file": meta["file"], "notes": loaded.notes})
        writer.add(meta["key"], lat, meta, text)


def _summary(console: Console, manifest: dict, out: Path, seconds: float, reused: int, state: dict,
             rate: float) -> None:
    encoded = manifest["num_samples"]
    table = Table(title=f"encoded into {out}", show_header=False)
    table.add_row("encoded", f"{encoded:,}")
    table.add_row("skipped", f"{len(manifest['skipped']):,}")
    table.add_row("converted", f"{len(manifest['converted']):,}")
    table.add_row("shards", f"{manifest['num_shards']} ({manifest['format']})")
    table.add_row("bytes", f"{sum(s['bytes'] for s in manifest['shards']):,}")
    table.add_row("time", f"{seconds:.1f} s" + (f" ({reused:,} inputs reused from complete shards)" if reused else ""))
    table.add_row("rate", f"{rate:,.0f} img/s (this run's inputs / its encoding seconds)")
    if state.get("halvings"):
        table.add_row("batch", f"halved {state['halvings']}× on out-of-memory, now {state['batch']}")
    console.print(table)
    if manifest["skipped"]:
        reasons: dict[str, int] = {}
        for s in manifest["skipped"]:
            reasons[s["reason"].split(":")[0]] = reasons.get(s["reason"].split(":")[0], 0) + 1
        console.print("[yellow]skipped:[/] " + ", ".join(f"{n} × {r}" for r, n in sorted(reasons.items())))
        for s in manifest["skipped"][:10]:
            console.print(f"  {s['file']}: {s['reason']}")
        if len(manifest["skipped"]) > 10:
            console.print(f"  … and {len(manifest['skipped']) - 10} more in {out / shards.MANIFEST}")
