"""Checkpoints that survive anything: atomic folders, hashed files, a `latest` pointer, fallback, retention.

    outputs/<run>/checkpoint-500/         the training guide's layout
        model.pt  ema.pt  optimizer.pt    raw state dicts (model/EMA in the official DiT layout)
        scaler.pt  rng-rank0.pt           whatever else the state needs
        config.yaml  manifest.json        the resolved config; the shard manifest's codec/labels/captions
        training_state.json               step, epoch, samples consumed, config hash, versions, every file's sha256
    outputs/<run>/latest                  the name of the newest complete checkpoint

A checkpoint is written into `.checkpoint-500.tmp/`, fsynced, hashed, then renamed; a crash at any point leaves the
previous checkpoints as they were. Everything loads with `torch.load(weights_only=True)` or JSON: nothing unpickles.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from pipeline import atomic
from pipeline.errors import DitpipeError

STATE = "training_state.json"
LATEST = "latest"
_NAME = re.compile(r"^checkpoint-(epoch-)?(\d+)$")
# Test hook: seconds to sleep after writing each file of a checkpoint, so a test can kill -9 a run while a
# `.checkpoint-*.tmp` folder is half written. Unset (or 0) in normal use.
PAUSE_ENV = "DITPIPE_CHECKPOINT_PAUSE_S"


class CheckpointError(DitpipeError):
    pass


def step_name(step: int) -> str:
    return f"checkpoint-{step}"


def epoch_name(epoch: int) -> str:
    return f"checkpoint-epoch-{epoch}"


def _tmp(run_dir: Path, name: str) -> Path:
    return run_dir / f".{name}{atomic.TMP_SUFFIX}"


@dataclass(frozen=True)
class Group:
    """The collectives a save across processes needs; the defaults are one process's. Every decision that changes
    what the ranks do next (keep, write, fail) is rank 0's, broadcast: ranks that looked for themselves could
    disagree (NFS attribute caching) and then run different numbers of barriers, which hangs NCCL."""

    rank: int = 0
    broadcast: Callable[[object], object] = lambda value: value  # rank 0's value, returned on every rank
    gather: Callable[[object], list] = lambda value: [value]  # every rank's value, on every rank


def save(run_dir: Path, name: str, writers: dict[str, Callable[[Path], None]], state: dict, *,
         group: Group = Group(), needed_bytes: int = 0) -> Path:
    """Every rank calls this with its own `writers` ({file name: write(path)}); rank 0 also hashes, renames and
    points `latest` at the result. An existing valid checkpoint of the same name is kept (it holds the same state);
    a damaged one is moved aside to `<name>.damaged` and written anew. Any failure to write (a full disk: torch.save
    raises RuntimeError, not OSError) removes the temporary folder on every path, leaves the previous checkpoints as
    they were, and raises one CheckpointError on every rank."""
    run_dir, final, tmp = Path(run_dir), Path(run_dir) / name, _tmp(Path(run_dir), name)
    decision = group.broadcast(_prepare(run_dir, name, needed_bytes) if group.rank == 0 else None)
    if decision == "keep":
        return final
    if decision != "write":
        raise CheckpointError(decision)
    pause = float(os.environ.get(PAUSE_ENV) or 0)
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
    try:
        free = f"{shutil.disk_usage(run_dir).free / 2**30:.2f} GiB free"
    except OSError:
        free = "free space unknown"
    import resource

    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY:
        free += f", files limited to {limit / 2**20:.0f} MiB (ulimit -f)"
    full = any(word in failure.lower() for word in _DISK_FULL)
    what = "the disk (or a file-size limit) is full" if full else "writing failed"
    return (f"could not write checkpoint {name} in '{run_dir}': {what} ({failure}; {free}). Nothing of it was kept and "
            f"the previous checkpoints are intact; {'free some space' if full else 'fix the cause'} and resume with "
            f"`ditpipe resume {run_dir}`")


def _move_aside(path: Path) -> Path:
    """Rename a damaged checkpoint out of the way (never delete it: it may be all someone has)."""
    aside, n = path.with_name(f"{path.name}.damaged"), 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.name}.damaged-{n}")
    os.replace(path, aside)
    return aside


def validate(ckpt: Path) -> dict:
    """The checkpoint's training state, after checking that every recorded file is present, whole and unaltered."""
    ckpt = Path(ckpt)
    try:
        state = json.loads((ckpt / STATE).read_text())
        files = state["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"'{ckpt}' has no readable {STATE} ({e}); it is incomplete or not a ditpipe "
                              "checkpoint") from None
    for fname, rec in files.items():
        path = ckpt / fname
        if not path.is_file():
            raise CheckpointError(f"'{ckpt}' is missing {fname}")
        if path.stat().st_size != rec["bytes"] or atomic.sha256_file(path) != rec["sha256"]:
            raise CheckpointError(f"'{ckpt}/{fname}' does not match its recorded size and sha256 (damaged)")
    return state


def list_checkpoints(run_dir: Path) -> list[tuple[int, bool, Path]]:
    """(step, is_epoch, path) of every checkpoint folder, newest step first (step checkpoints before epoch ones)."""
    found = []
    for p in Path(run_dir).iterdir() if Path(run_dir).is_dir() else []:
        m = _NAME.match(p.name)
        if m and p.is_dir():
            try:
                step = int(json.loads((p / STATE).read_text())["step"])
            except (OSError, ValueError, KeyError, TypeError):
                step = -1 if m.group(1) else int(m.group(2))  # damaged: still listed, so fallback can name it
            found.append((step, bool(m.group(1)), p))
    return sorted(found, key=lambda x: (-x[0], x[1]))


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


def clean_temporaries(run_dir: Path) -> None:
    """Remove half-written checkpoint folders of a killed run (only our own hidden `.checkpoint-*.tmp`)."""
    for p in Path(run_dir).glob(f".checkpoint-*{atomic.TMP_SUFFIX}"):
        shutil.rmtree(p, ignore_errors=True)


def prune(run_dir: Path, keep_steps: int | None, keep_epochs: int | None) -> list[Path]:
    """Keep the newest `keep_steps` step checkpoints and `keep_epochs` epoch checkpoints (None keeps all). Only
    folders whose training_state.json says ditpipe wrote them are deleted, and never the one `latest` names."""
    latest = (Path(run_dir) / LATEST).read_text().strip() if (Path(run_dir) / LATEST).is_file() else None
    removed = []
    for is_epoch, keep in ((False, keep_steps), (True, keep_epochs)):
        if keep is None:
            continue
        ours = [p for step, e, p in list_checkpoints(run_dir) if e == is_epoch and step >= 0 and _is_ours(p)]
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
    except (OSError, ValueError, AttributeError):
        return False


def load_tensors(path: Path, mmap: bool = False) -> dict:
    """A saved state dict, never unpickled beyond tensors and plain values. `mmap`: tensors stay backed by the file
    (the page cache), so ranks that load the same checkpoint share one copy in host memory."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


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
