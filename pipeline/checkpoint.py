"""Checkpoints that survive anything: atomic folders, hashed files, a `latest` pointer, fallback, retention; and
the one place that says what a checkpoint holds, how it is read back, and where weights are opened from.

    outputs/<run>/checkpoint-500/         the training guide's layout
        model.pt  ema.pt  optimizer.pt    raw state dicts (model/EMA in the official DiT layout); ema.pt with
                                          training.use_ema
        phema.pt  scaler.pt               the post-hoc EMA shadows (training.posthoc_ema), the fp16 loss scaler
        rng-rank0.pt ...                  each rank's global RNG states and unlogged loss window
        config.yaml  manifest.json        the resolved config; the shard manifest's excerpt (manifest_excerpt)
        training_state.json               step, epoch, samples consumed, config hash, versions, every file's sha256
        shard-00001-model-00001-of-00001.safetensors ...
                                          training.parallel fsdp: each rank's shards of the model, EMAs, projector
                                          and optimizer (torch.distributed.checkpoint's HF storage) in place of the
                                          .pt files; open_weights assembles model/EMA whole (pipeline/fsdp.py)
    outputs/<run>/latest                  the name of the newest complete checkpoint

A checkpoint is written into `.checkpoint-500.tmp/`, fsynced, hashed, then renamed; a crash at any point leaves the
previous checkpoints as they were. Everything loads with `torch.load(weights_only=True)`, safetensors or JSON:
nothing unpickles.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ditpipe.pipeline import atomic, fsdp, safe_yaml
from ditpipe.pipeline.errors import DitpipeError
from ditpipe.pipeline.ranks import Group

# Every file name of a run, a checkpoint and an export: the one place they are spelled.
STATE = "training_state.json"
LATEST = "latest"  # in the run folder: the name of the newest complete checkpoint
MODEL = "model.pt"
EMA = "ema.pt"
OPTIMIZER = "optimizer.pt"
SCALER = "scaler.pt"
PHEMA_FILE = "phema.pt"  # the post-hoc EMA shadows (PowerEMA.state_dict)
PROJECTOR = "projector.pt"  # REPA's projector (training.repa.weight > 0; pipeline/repa.py): training state only
CONFIG = "config.yaml"  # the resolved config; also in the run folder, from its start
MANIFEST = "manifest.json"  # the shard manifest's excerpt (manifest_excerpt)
EXPORT_WEIGHTS = "model.safetensors"  # an export folder's weights (pipeline/exported.py)
EXPORT_CONFIG = "config.json"  # an export folder's metadata


def rng_file(rank: int) -> str:
    """The file of rank `rank`'s RNG states and unlogged loss window."""
    return f"rng-rank{rank}.pt"


_NAME = re.compile(r"^checkpoint-(epoch-)?(\d+)$")


class CheckpointError(DitpipeError):
    pass


class NoEMAError(CheckpointError):
    """open_weights(..., "ema", fallback=False) on a checkpoint without ema.pt (training.use_ema was off)."""


def step_name(step: int) -> str:
    return f"checkpoint-{step}"


def epoch_name(epoch: int) -> str:
    return f"checkpoint-epoch-{epoch}"


def is_checkpoint_name(name: str) -> bool:
    """Whether `name` is a checkpoint folder's (step_name or epoch_name)."""
    return _NAME.match(name) is not None


def _tmp(run_dir: Path, name: str) -> Path:
    return run_dir / f".{name}{atomic.TMP_SUFFIX}"


def save(run_dir: Path, name: str, writers: dict[str, Callable[[Path], None]], state: dict, *,
         group: Group = Group(), needed_bytes: int = 0, pause: float = 0.0) -> Path:
    """Every rank calls this with its own `writers` ({file name: write(path)}); rank 0 also hashes, renames and
    points `latest` at the result. An existing valid checkpoint of the same name is kept (it holds the same state);
    a damaged one is moved aside to `<name>.damaged` and written anew. Any failure to write (a full disk: torch.save
    raises RuntimeError, not OSError) removes the temporary folder on every path, leaves the previous checkpoints as
    they were, and raises one CheckpointError on every rank. `pause`: seconds to sleep after each file (a test hook,
    pipeline/hooks.py)."""
    run_dir, final, tmp = Path(run_dir), Path(run_dir) / name, _tmp(Path(run_dir), name)
    decision = group.broadcast(_prepare(run_dir, name, needed_bytes) if group.rank == 0 else None)
    if decision == "keep":
        return final
    if decision != "write":
        raise CheckpointError(decision)
    failure = None
    try:
        for fname, write in writers.items():
            write(tmp / fname)
            if pause:
                time.sleep(pause)
    except Exception as e:  # noqa: BLE001 (whatever stops a write: OSError, RuntimeError from torch.save, ...)
        failure = _describe(e)
    failures = [f for f in group.gather(failure) if f]
    if group.rank == 0 and not failures:
        try:
            _finish(run_dir, name, tmp, final, state)
        except Exception as e:  # noqa: BLE001
            failures = [_describe(e)]
    failures = group.broadcast(failures if group.rank == 0 else None)
    if failures:
        if group.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(_write_failed(run_dir, name, failures[0]))
    return final


def link(run_dir: Path, source: str, name: str, *, group: Group = Group()) -> Path:
    """Checkpoint `name` as a second name for checkpoint `source` of the same step (an epoch's end that is also a
    step checkpoint): its files hard-linked, so the two cost the disk once (they were two full copies, 2 GB each
    for DiT-B/2), and either can be pruned or moved without the other. Where the file system has no hard links, the
    files are copied. Written whole under a temporary name like `save`; `latest` is left as it is. Rank 0 does the
    work, and a failure stops every rank with the same message."""
    run_dir = Path(run_dir)

    def make() -> None:
        final, tmp = run_dir / name, _tmp(run_dir, name)
        if final.is_dir():
            try:
                validate(final)
                return  # kept, as `save` keeps a valid checkpoint of its name
            except CheckpointError:
                _move_aside(final)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            for f in sorted((run_dir / source).iterdir()):
                try:
                    os.link(f, tmp / f.name, follow_symlinks=False)
                except OSError:  # no hard links here (some network and FUSE file systems): a copy is still right
                    shutil.copy2(f, tmp / f.name, follow_symlinks=False)
            atomic.fsync_dir(tmp)
            os.replace(tmp, final)
            atomic.fsync_dir(run_dir)
        except Exception as e:  # noqa: BLE001 (as in save: whatever stops a write)
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(_write_failed(run_dir, name, _describe(e))) from None

    group.on_rank0(make, CheckpointError)
    return run_dir / name


def _prepare(run_dir: Path, name: str, needed_bytes: int) -> str:
    """Rank 0's decision for a save: "keep" (a valid checkpoint of this name exists), "write" (a fresh temporary
    folder is ready), or the message of why not."""
    final, tmp = run_dir / name, _tmp(run_dir, name)
    if final.is_dir():
        try:
            validate(final)
            return "keep"
        except CheckpointError:
            pass
    free = shutil.disk_usage(run_dir).free
    if needed_bytes and free < needed_bytes * 1.1:
        return (f"only {free / 2**30:.2f} GiB free in '{run_dir}', and checkpoint {name} needs about "
                f"{needed_bytes / 2**30:.2f} GiB; free some space (or set checkpointing.total_limit) and resume with "
                f"`ditpipe resume {run_dir}`. The previous checkpoints are intact")
    try:
        if final.is_dir():
            _move_aside(final)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    except OSError as e:
        return _write_failed(run_dir, name, _describe(e))
    return "write"


def _finish(run_dir: Path, name: str, tmp: Path, final: Path, state: dict) -> None:
    """Rank 0, once every rank's files are in `tmp`: fsync and hash them, record them, rename, point `latest`."""
    files = {}
    for f in sorted(tmp.iterdir()):
        with open(f, "rb+") as fh:
            os.fsync(fh.fileno())
        files[f.name] = {"bytes": f.stat().st_size, "sha256": atomic.sha256_file(f)}
    atomic.write_json(tmp / STATE, {**state, "files": files})
    atomic.fsync_dir(tmp)
    os.replace(tmp, final)
    atomic.fsync_dir(run_dir)
    atomic.write_bytes(run_dir / LATEST, (name + "\n").encode())


def _describe(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


# How a full disk (or a file-size limit) reads: OS errors, and torch.save's zip writer, which reports a short write
# as "file write failed" or "unexpected pos N vs M" in a RuntimeError.
_DISK_FULL = ("no space left", "file too large", "disk quota", "file write failed", "unexpected pos", "enospc",
              "efbig")


def _write_failed(run_dir: Path, name: str, failure: str) -> str:
    full, what = write_trouble(run_dir, failure)
    return (f"could not write checkpoint {name} in '{run_dir}': {what}. Nothing of it was kept and the previous "
            f"checkpoints are intact; {'free some space' if full else 'fix the cause'} and resume with "
            f"`ditpipe resume {run_dir}`")


def write_trouble(where: Path, failure: str | BaseException) -> tuple[bool, str]:
    """(is it a full disk, "<what happened> (<failure>; <free space in `where`>[, the file-size limit])"): how every
    failed write reads, so each message can name its own path and say whether freeing space will help."""
    failure = failure if isinstance(failure, str) else _describe(failure)
    try:
        free = f"{shutil.disk_usage(where if Path(where).is_dir() else Path(where).parent).free / 2**30:.2f} GiB free"
    except OSError:
        free = "free space unknown"
    import resource

    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY:
        size = f"{limit / 2**20:.0f} MiB" if limit >= 2**20 else f"{limit / 2**10:.0f} KiB"
        free += f", files limited to {size} (ulimit -f)"
    full = any(word in failure.lower() for word in _DISK_FULL)
    what = "the disk (or a file-size limit) is full" if full else "writing failed"
    return full, f"{what} ({failure}; {free})"


def _move_aside(path: Path) -> Path:
    """Rename a damaged checkpoint out of the way (never delete it: it may be all someone has)."""
    aside, n = path.with_name(f"{path.name}.damaged"), 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.name}.damaged-{n}")
    os.replace(path, aside)
    return aside


# What every checkpoint must hold, whatever its training_state.json lists: a state file that omits one would
# otherwise validate, and fail (or silently resume without it) later. ema.pt also, when the saved config keeps an EMA.
REQUIRED_FILES = (MODEL, OPTIMIZER, rng_file(0), CONFIG)
REQUIRED_KEYS = ("written_by", "step", "epoch", "samples_consumed", "total_steps", "world_size", "files")
UNREADABLE = (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError, MemoryError)  # hostile JSON


def validate(ckpt: Path) -> dict:
    """The checkpoint's training state, after checking that it lists every required file and key, and that every
    listed file is present, whole and unaltered."""
    ckpt = Path(ckpt)
    if ckpt.is_symlink() and not ckpt.exists():
        raise CheckpointError(f"'{ckpt}' is a link to '{os.readlink(ckpt)}', which does not exist (storage not "
                              "mounted?)")
    state = read_state(ckpt)
    files = state["files"]
    for fname, size, sha in ((name, rec["bytes"], rec["sha256"]) for name, rec in files.items()):
        path = ckpt / fname
        if Path(fname).name != fname or fname in ("", ".", ".."):
            raise CheckpointError(f"'{ckpt}/{STATE}' lists {fname!r}, which is not a file name in the checkpoint")
        if not path.is_file():
            raise CheckpointError(f"'{ckpt}' is missing {fname}")
        if path.stat().st_size != size or atomic.sha256_file(path) != sha:
            raise CheckpointError(f"'{ckpt}/{fname}' does not match its recorded size and sha256 (damaged)")
    required = _required_by_config(ckpt / CONFIG, state["world_size"]) if CONFIG in files else REQUIRED_FILES
    unlisted = [f for f in required if f not in files]
    if unlisted:
        raise CheckpointError(f"'{ckpt}/{STATE}' does not list {', '.join(unlisted)}, which every checkpoint holds; "
                              "it is incomplete or was altered")
    return state


def read_state(ckpt: Path) -> dict:
    """A checkpoint's training_state.json, every field checked (check_state), without hashing its files: what
    listing, `runs` and retention read. Any problem is one CheckpointError naming the file (and the key)."""
    path = Path(ckpt) / STATE
    try:
        state = json.loads(path.read_text())
    except UNREADABLE as e:
        raise CheckpointError(f"'{ckpt}' has no readable {STATE} ({type(e).__name__}: {str(e)[:200]}); it is "
                              "incomplete or not a ditpipe checkpoint") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"'{path}' does not hold a JSON object; it is damaged or not a ditpipe checkpoint")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"'{path}' lacks {', '.join(missing)}; it is incomplete or not a ditpipe checkpoint")
    return check_state(state, path)


# Counts a training state holds, and their least value. Every reader does arithmetic on them (int(), ranges,
# comparisons), so a bool, a float (Infinity, NaN, 2.0) or a string ("2") read from an altered file would raise far
# from here; they are refused in one place instead. 2**62 keeps every product of them inside int64 for torch.
_COUNTS = {"step": 0, "epoch": 0, "samples_consumed": 0, "total_steps": 0, "world_size": 1, "steps_per_epoch": 1,
           "global_batch": 1, "batch_size": 1, "gradient_accumulation_steps": 1, "nonfinite_total": 0,
           "data_offset": 0, "recoveries": 0}
_MAX_COUNT = 2**62


def check_state(state: dict, path: Path) -> dict:
    """`state` when every field a reader uses has its type and range (`path`, the file, names it in the message);
    optional fields are checked when present."""

    def refuse(key: str, what: str):
        raise CheckpointError(f"'{path}' {key} is {_show(state[key])}, not {what}; the checkpoint is damaged or was "
                              "altered (ditpipe skips it and uses the newest valid one)")

    for key, least in _COUNTS.items():
        if key in state and not _is_count(state[key], least):
            refuse(key, "a non-negative whole number" if least == 0 else f"a whole number ≥ {least}")
    if not isinstance(state["written_by"], str):
        refuse("written_by", "a string")
    scale = state.get("lr_scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < float("inf"):
        refuse("lr_scale", "a positive finite number")
    at = state.get("restretched_at", [])
    if not isinstance(at, list) or not all(_is_count(s, 0) for s in at):
        refuse("restretched_at", "a list of steps")
    if state.get("precision", "no") not in ("fp16", "bf16", "no"):  # what ran (train's resolved precision)
        refuse("precision", "fp16, bf16 or no")
    files = state["files"]
    if not isinstance(files, dict) or not all(
            isinstance(rec, dict) and _is_count(rec.get("bytes"), 0) and isinstance(rec.get("sha256"), str)
            for rec in files.values()):
        refuse("files", "a table of {file name: {bytes, sha256}}")
    return state


def _is_count(value, least: int) -> bool:
    return type(value) is int and least <= value <= _MAX_COUNT  # type(): a bool is an int to isinstance


def _show(value) -> str:
    return repr(value)[:60] if not isinstance(value, float) else json.dumps(value)  # inf as the file spells it


def read_json(path: Path) -> dict:
    """A JSON object from a checkpoint or an export, which anyone may have altered: any failure (bad JSON, nesting
    deeper than Python recurses, not an object) is one CheckpointError naming the file."""
    try:
        value = json.loads(Path(path).read_text())
    except UNREADABLE as e:
        raise CheckpointError(f"'{path}' is not readable JSON ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"'{path}' does not hold a JSON object")
    return value


def read_manifest(ckpt: Path) -> dict:
    """A checkpoint's manifest.json (the shard manifest's codec, labels, latent... sections), its latent shape
    checked as a shard manifest's is: sample and export size their model from it."""
    from ditpipe.pipeline.manifest import check_latent_shape

    manifest = read_json(Path(ckpt) / MANIFEST)
    check_latent_shape(manifest, Path(ckpt) / MANIFEST)
    return manifest


# The shard manifest's sections that sampling needs; a checkpoint also records where the latents came from, their
# statistics and the normalisation the run trained with (SHARD_KEYS, below, is what checks the shards themselves).
EXCERPT_KEYS = ("codec", "labels", "captions", "latent")
CHECKPOINT_EXCERPT_KEYS = EXCERPT_KEYS + ("source", "stats", "latent_norm")


def manifest_excerpt(manifest: dict, keys: tuple[str, ...] = EXCERPT_KEYS) -> dict:
    """The manifest excerpt a checkpoint (`keys` CHECKPOINT_EXCERPT_KEYS) or an export (EXCERPT_KEYS) records, in
    `keys`' order; a bucketed run's buckets last, so `sample` knows the run's sizes from it alone."""
    from ditpipe.pipeline.manifest import Manifest

    return Manifest.of(manifest).excerpt(keys)


def read_config(ckpt: Path):
    """A checkpoint's config.yaml as a Config; problems name the file."""
    from ditpipe.pipeline.config import load_saved_config

    return load_saved_config(Path(ckpt) / CONFIG)


def _required_by_config(config: Path, world_size: int) -> tuple[str, ...]:
    """The files a checkpoint's config.yaml (already checked against its sha256) makes required: REQUIRED_FILES,
    ema.pt when training.use_ema, projector.pt when training.repa.weight > 0; under training.parallel fsdp, each of
    the `world_size` ranks' shard files instead of the .pt files (the EMAs and projector are in them)."""
    import yaml

    from ditpipe.pipeline.config import TrainingConfig

    try:
        tree = safe_yaml.safe_load(config.read_text())
        training = tree.get("training") or {}
        ema = training.get("use_ema", TrainingConfig.model_fields["use_ema"].default)
        repa = float((training.get("repa") or {}).get("weight", 0.0)) > 0
        sharded = training.get("parallel", TrainingConfig.model_fields["parallel"].default) == "fsdp"
    except (yaml.YAMLError, *UNREADABLE) as e:
        why = str(e).splitlines()[0][:200] if isinstance(e, safe_yaml.AliasRefused) else type(e).__name__
        raise CheckpointError(f"'{config}' is not a readable config ({why}); the checkpoint is damaged or not "
                              "ditpipe's") from None
    if sharded:
        return (rng_file(0), CONFIG) + tuple(fsdp.shard_file(r) for r in range(world_size))
    return REQUIRED_FILES + ((EMA,) if ema else ()) + ((PROJECTOR,) if repa else ())


def list_checkpoints(run_dir: Path) -> list[tuple[int, bool, Path]]:
    """(step, is_epoch, path) of every checkpoint folder, newest step first (step checkpoints before epoch ones).
    Symbolic links to checkpoint folders are listed (resume follows them); prune never touches them."""
    found = []
    for p in Path(run_dir).iterdir() if Path(run_dir).is_dir() else []:
        m = _NAME.match(p.name)
        if m and (p.is_dir() or p.is_symlink()):  # a link (moved to other storage) counts; a dangling one as damaged
            step = _recorded_step(p)
            if step is None:
                step = -1 if m.group(1) else int(m.group(2))  # damaged: still listed, so fallback can name it
            found.append((step, bool(m.group(1)), p))
    return sorted(found, key=lambda x: (-x[0], x[1]))


def _recorded_step(ckpt: Path) -> int | None:
    """The step a checkpoint's state records, or None when it is unreadable or not a step (Infinity, "2", true):
    only the step, so listing stays cheap and lists what validate() will then refuse by name."""
    try:
        step = json.loads((Path(ckpt) / STATE).read_text())["step"]
    except UNREADABLE:
        return None
    return step if _is_count(step, 0) else None


def find_resumable(run_dir: Path, warn: Callable[[str], None]) -> tuple[Path, dict]:
    """The newest valid checkpoint of a run. Damaged newer ones are named in a warning and skipped."""
    run_dir = Path(run_dir)
    candidates = [p for _, _, p in list_checkpoints(run_dir)]
    for path in candidates:
        try:
            return path, validate(path)
        except CheckpointError as e:
            warn(f"skipping damaged checkpoint: {e}")
    raise CheckpointError(f"no valid checkpoint in '{run_dir}'" + ("" if candidates else " (none was written yet)"))


# The shard manifest's sections that say what a run trains on. `created_by` (the ditpipe version that wrote it),
# `latent_norm` (derived from the config) and anything an encode adds to describe itself are left out, so that
# re-encoding the same data, or checking it again, is not "other shards".
SHARD_KEYS = ("format_version", "source", "codec", "latent", "labels", "captions", "format", "samples_per_shard",
              "num_inputs", "num_samples", "num_shards", "shards", "skipped", "converted", "stats", "targets")


def _digest(value) -> str:
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def shards_record(manifest: dict) -> dict:
    """What every checkpoint records of the shards it was trained on (training_state.json's `shards`): the sha256
    of the manifest's canonical JSON (its SHARD_KEYS sections, keys sorted, no whitespace: json.dumps(...,
    sort_keys=True, separators=(",", ":"), ensure_ascii=False)), a digest of each section, and the counts, so a
    refusal can say what changed."""
    from ditpipe.pipeline.manifest import Manifest

    raw = Manifest.of(manifest).raw  # the JSON as written: the digest is of its sections, byte for byte
    body = {k: raw[k] for k in SHARD_KEYS if k in raw}
    return {"manifest_sha256": _digest(body), "sections": {k: _digest(v)[:16] for k, v in body.items()},
            "num_samples": raw.get("num_samples"), "num_shards": raw.get("num_shards")}


def check_same_shards(saved: dict, manifest: dict, ckpt: Path, folder) -> str | None:
    """Refuse to resume `ckpt` on shards other than its own, naming what changed. A checkpoint written before the
    shards were recorded resumes; the returned notice says that they could not be checked."""
    then = saved.get("shards")
    if not isinstance(then, dict) or "manifest_sha256" not in then:
        return (f"'{ckpt}' was written before checkpoints recorded their shards, so ditpipe cannot check that "
                f"'{folder}' holds the shards it was trained on")
    now = shards_record(manifest)
    if now["manifest_sha256"] == then["manifest_sha256"]:
        return None
    changes = [f"{k} {then.get(k)} in the checkpoint, {now[k]} now" for k in ("num_samples", "num_shards")
               if then.get(k) != now[k]]
    old = then.get("sections") or {}
    sections = [k for k in SHARD_KEYS if old.get(k) != now["sections"].get(k) and k not in ("num_samples",
                                                                                            "num_shards")]
    if "shards" in sections:
        sections[sections.index("shards")] = "shards (the shard files' sha256)"
    changes += [f"changed: {', '.join(sections)}"] if sections else []
    raise CheckpointError(f"'{ckpt}' was trained on other shards than '{folder}' holds now ({'; '.join(changes)}); "
                          "resume on the shards it was trained on (data at shards.path as they were), or start a new "
                          f"run from its weights: ditpipe train --init-from {ckpt}")


def newest_valid(run_dir: Path, before: int) -> tuple[str, dict] | None:
    """(path, training state) of the newest valid step checkpoint at or before step `before`, or None."""
    for step, is_epoch, path in list_checkpoints(run_dir):
        if 0 <= step <= before and not is_epoch:
            try:
                return str(path), validate(path)
            except CheckpointError:
                continue
    return None


def abandon_after(run_dir: Path, step: int, keep: str) -> list[Path]:
    """Move every checkpoint of ours after `step` aside as `<name>.abandoned` (training.recover went back to
    `keep`: they hold the failure's state), and the post-hoc EMA snapshots after `step` with them, and point
    `latest` at `keep`. Nothing is deleted."""
    from ditpipe.pipeline import phema  # imported here, as pipeline.config is above: checkpoint loads without pydantic

    moved = phema.abandon_after(Path(run_dir) / phema.SNAPSHOT_DIR, step)
    for s, _, path in list_checkpoints(run_dir):
        if s > step and not path.is_symlink() and _is_ours(path):
            aside, n = path.with_name(f"{path.name}.abandoned"), 1
            while aside.exists():
                n += 1
                aside = path.with_name(f"{path.name}.abandoned-{n}")
            os.replace(path, aside)
            moved.append(aside)
    atomic.write_bytes(Path(run_dir) / LATEST, (keep + "\n").encode())
    return moved


def clean_temporaries(run_dir: Path) -> None:
    """Remove half-written checkpoint folders of a killed run (only our own hidden `.checkpoint-*.tmp`)."""
    for p in Path(run_dir).glob(f".checkpoint-*{atomic.TMP_SUFFIX}"):
        shutil.rmtree(p, ignore_errors=True)


def prune(run_dir: Path, keep_steps: int | None, keep_epochs: int | None) -> list[Path]:
    """Keep the newest `keep_steps` step checkpoints and `keep_epochs` epoch checkpoints (None keeps all). Only
    folders whose training_state.json says ditpipe wrote them are deleted, and never the one `latest` names. A
    symbolic link (a checkpoint moved to other storage and linked back) is neither followed, deleted nor counted."""
    latest = (Path(run_dir) / LATEST).read_text().strip() if (Path(run_dir) / LATEST).is_file() else None
    removed = []
    for is_epoch, keep in ((False, keep_steps), (True, keep_epochs)):
        if keep is None:
            continue
        ours = [p for step, e, p in list_checkpoints(run_dir)
                if e == is_epoch and step >= 0 and not p.is_symlink() and _is_ours(p)]
        for p in ours[keep:]:
            if p.name != latest:
                # rename first, so a kill mid-delete leaves a temporary that clean_temporaries removes, not a
                # half-deleted checkpoint that no longer says it is ours
                doomed = _tmp(Path(run_dir), f"{p.name}.deleting")
                shutil.rmtree(doomed, ignore_errors=True)
                os.replace(p, doomed)
                shutil.rmtree(doomed)
                removed.append(p)
    return removed


def _is_ours(path: Path) -> bool:
    try:
        return json.loads((path / STATE).read_text()).get("written_by", "").startswith("ditpipe")
    except UNREADABLE:
        return False


def load_tensors(path: Path, mmap: bool = False) -> dict:
    """A `.pt` file's tensors, never unpickling anything else; any failure (a pickle that weights_only refuses, a
    truncated zip, a tensor larger than its storage, ...) is one CheckpointError naming the file. `mmap`: tensors
    stay backed by the file (the page cache), so ranks that load the same checkpoint share one copy in host memory."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - whatever a hostile or damaged file raises, the message is the same
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise CheckpointError(f"cannot load '{path}' with torch.load(weights_only=True) ({type(e).__name__}: "
                              f"{first}); it is damaged, or holds more than tensors and is refused (ditpipe never "
                              "unpickles objects)") from None


# The optimizer's own execution flags: fixed by this build, never by a checkpoint (one written on a CPU without
# fused kernels must not switch a GPU run to the unfused AdamW, which cannot skip a step on the device).
OPTIMIZER_FLAGS = ("fused", "foreach", "capturable", "differentiable")


def load_state(ckpt: Path, model: torch.nn.Module, ema, opt: torch.optim.Optimizer, scaler,  # ema: pipeline.ema.EMA
               phema=None, projector: torch.nn.Module | None = None) -> None:  # phema: pipeline.phema.PowerEMA
    """A checkpoint's model, EMA, optimizer, loss-scaler and post-hoc EMA state, into objects already on their
    device. The files are memory-mapped: every rank reads them through the page cache instead of holding its own
    host copy. A sharded model (training.parallel fsdp) loads the checkpoint's shards instead, resharded for this
    run's number of processes (pipeline/fsdp.py; every rank calls it)."""
    if fsdp.is_sharded(model):
        fsdp.load(ckpt, SimpleNamespace(raw=model, projector=projector, ema=ema, phema=phema, opt=opt))
        return
    model.load_state_dict(load_tensors(ckpt / MODEL, mmap=True), strict=True)
    if projector is not None:  # required: the config cannot switch REPA on at a resume
        projector.load_state_dict(load_tensors(ckpt / PROJECTOR, mmap=True), strict=True)
    flags = {k: opt.defaults[k] for k in OPTIMIZER_FLAGS if k in opt.defaults}
    opt.load_state_dict(load_tensors(ckpt / OPTIMIZER, mmap=True))
    for group in opt.param_groups:
        group.update(flags)
    for p, state in opt.state.items():  # a step count saved by an unfused optimizer lives on the CPU
        if flags.get("fused") and "step" in state:
            state["step"] = state["step"].to(p.device, torch.float32)
    if ema is not None and (ckpt / EMA).is_file():
        ema.load_state_dict(load_tensors(ckpt / EMA, mmap=True))
    if phema is not None:  # required: the config cannot switch posthoc_ema on at a resume
        phema.load_state_dict(load_tensors(ckpt / PHEMA_FILE, mmap=True))
    if scaler is not None and (ckpt / SCALER).is_file():
        scaler.load_state_dict(load_tensors(ckpt / SCALER))


# ---------------------------------------------------------------------------------------------------- what is written


def state_record(cfg, step: int, plan, total_steps: int, nonfinite_total: int, manifest: dict,
                 restretched: list[int], precision: str) -> dict:
    """training_state.json's content (less `files`, which `save` adds, and the recovery record, which the run adds)
    for the state after `step` optimizer steps of the run `cfg` (a Config), `plan` (a pipeline.order.Plan)."""
    from importlib.metadata import version

    from ditpipe.pipeline import __version__

    return {"written_by": f"ditpipe {__version__}", "step": step, "epoch": step // plan.steps_per_epoch,
            "samples_consumed": step * plan.global_batch, "steps_per_epoch": plan.steps_per_epoch,
            "total_steps": total_steps, "world_size": plan.world_size, "global_batch": plan.global_batch,
            "batch_size": plan.batch_size, "gradient_accumulation_steps": plan.accum, "config_hash": cfg.hash(),
            "nonfinite_total": nonfinite_total, "shards": shards_record(manifest),
            "restretched_at": restretched,
            "precision": precision,  # what ran: the config's fp16 runs as bf16 on a CPU
            "versions": {name: version(name) for name in ("torch", "accelerate", "numpy", "ditpipe")}}


def writers(acc, cfg, manifest: dict, step) -> dict:
    """{file: write(path)} for this rank, of the run `cfg` at `step` (a pipeline.step.Step). Every rank saves its
    RNG states and its unlogged loss window (so the first log line after a resume averages the same steps as an
    uninterrupted run's); rank 0 the model, optimizer, config, manifest excerpt, EMAs and loss scaler."""
    rank, stats = acc.process_index, step.stats
    window = [stats.loss_sum, stats.finite_steps] + ([stats.align_sum] if step.projector is not None else [])
    log_window = torch.stack([x.double().cpu() for x in window])  # a checkpoint syncs
    device = acc.device
    files = {rng_file(rank): lambda p: torch.save({**rng_state(device), "log_window": log_window}, p)}
    sharded = getattr(step, "sharded", False)
    if sharded:  # every rank writes its shard file (a collective: at the same place in every rank's writers)
        files[fsdp.shard_file(rank)] = lambda p: fsdp.save(step, p.parent)
    if not acc.is_main_process:
        return files
    excerpt = manifest_excerpt(manifest, CHECKPOINT_EXCERPT_KEYS)
    described = {CONFIG: lambda p: p.write_text(cfg.to_yaml()),
                 MANIFEST: lambda p: p.write_text(json.dumps(excerpt, indent=1))}
    if sharded:  # the model, EMAs, projector and optimizer are in the shards; fp16's scaler is refused
        return {**files, **described}
    files.update({
        MODEL: lambda p: torch.save(step.raw.state_dict(), p),
        OPTIMIZER: lambda p: torch.save(step.opt.state_dict(), p),
        **described,
    })
    if step.ema is not None:
        files[EMA] = lambda p: torch.save(step.ema.state_dict(), p)
    if step.phema is not None:
        files[PHEMA_FILE] = lambda p: torch.save(step.phema.state_dict(), p)
    if step.projector is not None:
        files[PROJECTOR] = lambda p: torch.save(step.projector.state_dict(), p)
    if acc.scaler is not None:
        files[SCALER] = lambda p: torch.save(acc.scaler.state_dict(), p)
    return files


def needed_bytes(raw, step=None) -> int:
    """A checkpoint's size, about: the model, the EMA, Adam's 2 moments and the post-hoc EMAs, in fp32."""
    params = sum(p.numel() * 4 for p in raw.parameters())
    return params * (4 + len(step.phema.emas if step is not None and step.phema else []))


# ---------------------------------------------------------------------------------------------------- loading


def restore_rank_state(ckpt: Path, saved: dict, rank: int, stats, device: torch.device) -> None:
    """The saved state that still applies on any world size: this rank's global RNG states when the checkpoint has
    its file (the step draws from keyed generators alone, so a rank the run did not have needs none), and the
    unlogged loss window, the same in every rank's file, so the first log line after a resume averages the same
    steps as an uninterrupted run's (into `stats`, a pipeline.step.StepStats)."""
    own = ckpt / rng_file(rank)
    if own.is_file():
        set_rng_state(load_tensors(own), device)
    window = load_tensors(own if own.is_file() else ckpt / rng_file(0))["log_window"]
    stats.loss_sum += window[0].to(device)
    stats.finite_steps += window[1].to(device)
    if len(window) > 2:  # REPA's alignment loss window
        stats.align_sum += window[2].to(device)
    stats.nonfinite_total.fill_(int(saved.get("nonfinite_total", 0)))


# ---------------------------------------------------------------------------------------------------- RNG state


def rng_state(device: torch.device | None = None) -> dict:
    """Global RNG states of python, numpy and torch's CPU generator, and of this rank's own CUDA device (never the
    others': a rank that sees fewer GPUs on resume, under a per-task CUDA_VISIBLE_DEVICES, must still load it), as
    tensors and plain values (weights_only-safe)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, py_gauss = random.getstate()
    state = {"python": [version, torch.tensor(internal, dtype=torch.int64), py_gauss],
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
             "torch": torch.get_rng_state()}
    if device is not None and device.type == "cuda":
        state["cuda_device"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device | None = None) -> None:
    version, internal, py_gauss = state["python"]
    random.setstate((version, tuple(int(x) for x in internal.tolist()), py_gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if device is None or device.type != "cuda":
        return  # a GPU checkpoint resumed on a CPU: the CUDA state has no generator to go to
    if "cuda_device" in state:
        torch.cuda.set_rng_state(state["cuda_device"], device)
    elif isinstance(state.get("cuda"), list) and (device.index or 0) < len(state["cuda"]):
        torch.cuda.set_rng_state(state["cuda"][device.index or 0], device)  # written before: every device's state


# ---------------------------------------------------------------------------------------------------- weights


@dataclass(frozen=True)
class Weights:
    """One set of weights, opened by `open_weights`, and what is known of where they came from."""

    state: dict  # {parameter name: tensor} on the CPU, in the official DiT layout
    kind: str  # "checkpoint" (ours), "export" (an export folder) or "file" (a bare .pt or .safetensors)
    source: Path  # the checkpoint folder, the export folder, or the file that was read
    which: str  # the weights read: "ema" or "model" (a checkpoint); an export's own "weights"; for a file, what of
    # it: "state dict", "its 'ema' entry", "its 'model' entry", or a .safetensors' recorded "weights" ("unknown")
    cfg: object | None = None  # the run's Config (checkpoint, export); None for a file
    manifest: dict = field(default_factory=dict)  # the manifest excerpt (checked latent shape for a checkpoint);
    # {} when unknown. An export's carries its recorded latent_norm
    step: int | None = None  # the step the weights were taken at, when recorded
    meta: dict = field(default_factory=dict)  # an export's (or a .safetensors' sibling) config.json; else {}


def open_weights(path: Path, which: str = "ema", *, fallback: bool = True, warn: Callable[[str], None] =
                 lambda message: None) -> Weights:
    """The weights at `path`, whatever holds them, as a `Weights`:

    - an export folder, or its model.safetensors (`ditpipe export`, `ditpipe ema --out`): kind "export", its one
      set of weights (`which` is not consulted: callers that asked for other weights refuse), cfg and manifest from
      its config.json (pipeline/exported.py `read`);
    - one of our checkpoint folders, or a run folder (its newest valid checkpoint; damaged newer ones are named
      through `warn` and skipped): validated (every file's sha256), kind "checkpoint", cfg from config.yaml,
      manifest from manifest.json (its latent shape checked), step from the state; `which` "ema" reads ema.pt and
      "model" model.pt; without ema.pt, `fallback` reads model.pt instead (`which` then says "model"), else
      NoEMAError;
    - any other `.safetensors` file: kind "file", its tensors, and the config.json beside it when there is one
      (`meta`, and its "manifest" as `manifest`);
    - any other file: a bare torch state dict (an official DiT .pt): kind "file"; a training checkpoint's {"ema",
      "model", ...} gives its "ema" entry for `which` "ema", else its "model" entry.

    Nothing is unpickled (torch.load(weights_only=True), safetensors). A path that does not exist raises
    CheckpointError; callers that word that themselves check first."""
    from ditpipe.pipeline import exported

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"'{path}' does not exist")
    folder = exported.folder_of(path)
    if folder is not None:
        ex = exported.read(folder)
        return Weights(ex.state, "export", folder, ex.meta["weights"], ex.cfg, ex.manifest, ex.meta.get("step"),
                       ex.meta)
    if path.is_dir():
        if not (path / STATE).is_file():
            path = find_resumable(path, warn)[0]  # a run folder: raises when it has none
        state = validate(path)
        if shards := fsdp.shard_files(state["files"]):  # training.parallel fsdp: consolidated from the shards
            return _sharded_weights(path, state, shards, which, fallback)
        name = f"{which}.pt"
        if name == EMA and not (path / EMA).is_file():
            if not fallback:
                raise NoEMAError(f"'{path}' has no {EMA}")
            name = MODEL
        return Weights(load_tensors(path / name), "checkpoint", path, name.removesuffix(".pt"), read_config(path),
                       read_manifest(path), state["step"])
    if path.suffix == ".safetensors":
        return _safetensors_file(path)
    return _torch_file(path, which)


def has_ema(ckpt: Path, state: dict) -> bool:
    """Whether checkpoint `ckpt` (its training_state.json: `state`) keeps an EMA: its ema.pt, or under training.parallel
    fsdp its config's training.use_ema (the shadows are in the shards)."""
    if (Path(ckpt) / EMA).is_file():
        return True
    if not fsdp.shard_files(state.get("files") or {}):
        return False
    try:
        return bool(read_config(ckpt).training.use_ema)
    except (DitpipeError, OSError, ValueError):
        return False


def _sharded_weights(path: Path, state: dict, shards: list[str], which: str, fallback: bool) -> Weights:
    """An fsdp checkpoint's (validated) weights as one state dict in the official layout, as ema.pt / model.pt would
    hold them: the EMA shadows (or, without them and with `fallback`, the model) assembled from every rank's
    shards."""
    try:
        tensors = fsdp.consolidate(path, shards, fsdp.EMA if which == "ema" else fsdp.MODEL)
        if not tensors and which == "ema":
            if not fallback:
                raise NoEMAError(f"'{path}' has no EMA (training.use_ema was off)")
            which, tensors = "model", fsdp.consolidate(path, shards, fsdp.MODEL)
    except NoEMAError:
        raise
    except Exception as e:  # noqa: BLE001 (a foreign or altered shard: one line naming the checkpoint)
        raise CheckpointError(f"cannot read the fsdp shards of '{path}' ({_describe(e)}); it is damaged or not "
                              "ditpipe's") from None
    if not tensors:
        raise CheckpointError(f"'{path}' holds no {which} weights in its shards; it is damaged or not ditpipe's")
    return Weights(tensors, "checkpoint", path, which, read_config(path), read_manifest(path), state["step"])


def _safetensors_file(path: Path) -> Weights:
    from safetensors.torch import load_file

    try:
        tensors = load_file(path)
    except Exception as e:  # noqa: BLE001 (a truncated or foreign file)
        raise CheckpointError(f"cannot read '{path}' as safetensors ({e}); export it again with `ditpipe export`") \
            from None
    config = path.parent / EXPORT_CONFIG
    meta = read_json(config) if config.is_file() else {}
    return Weights(tensors, "file", path, meta.get("weights", "unknown"), None, meta.get("manifest") or {},
                   meta.get("step"), meta)


def _torch_file(path: Path, which: str) -> Weights:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (weights_only refuses pickled objects; or not a torch file at all)
        raise CheckpointError(f"cannot load '{path}' with torch.load(weights_only=True): {str(e).splitlines()[0]}. "
                              "ditpipe loads plain state dicts only (the official DiT-XL-2-256x256.pt is one); it "
                              "never unpickles arbitrary objects") from None
    what = "state dict"
    if isinstance(obj, dict) and isinstance(obj.get("ema"), dict) and which == "ema":
        obj, what = obj["ema"], "its 'ema' entry"  # the official training script saves {"model", "ema", "opt", ...}
    elif isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj, what = obj["model"], "its 'model' entry"
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"'{path}' is not a DiT state dict (a mapping of parameter names to tensors)")
    return Weights(obj, "file", path, what)
