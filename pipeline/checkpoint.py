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

import errno
import json
import os
import random
import re
import shutil
import time
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


def save(run_dir: Path, name: str, writers: dict[str, Callable[[Path], None]], state: dict, *, rank: int = 0,
         barrier: Callable[[], None] = lambda: None, needed_bytes: int = 0) -> Path:
    """Every rank calls this with its own `writers` ({file name: write(path)}); rank 0 also hashes, renames and
    points `latest` at the result. An existing valid checkpoint of the same name is kept (it holds the same state);
    a damaged one is moved aside to `<name>.damaged` and written anew."""
    run_dir, final, tmp = Path(run_dir), Path(run_dir) / name, _tmp(Path(run_dir), name)
    if final.is_dir():
        try:
            validate(final)
            return final
        except CheckpointError:
            pass
    pause = float(os.environ.get(PAUSE_ENV) or 0)
    if rank == 0:
        free = shutil.disk_usage(run_dir).free
        if needed_bytes and free < needed_bytes * 1.1:
            raise CheckpointError(f"only {free / 2**30:.2f} GiB free in '{run_dir}', and checkpoint {name} needs about "
                                  f"{needed_bytes / 2**30:.2f} GiB; free some space (or set checkpointing.total_limit)"
                                  f" and resume with `ditpipe resume {run_dir}`. The previous checkpoints are intact")
        if final.is_dir():
            _move_aside(final)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    try:
        for fname, write in writers.items():
            write(tmp / fname)
            if pause:
                time.sleep(pause)
        barrier()
        if rank == 0:
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
    except OSError as e:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if e.errno == errno.ENOSPC:
            raise CheckpointError(f"no space left on the device while writing checkpoint {name} in '{run_dir}'. The "
                                  "previous checkpoints are intact; free some space and resume with "
                                  f"`ditpipe resume {run_dir}`") from None
        raise
    barrier()
    return final


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


def load_tensors(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------------------------------------- RNG state


def rng_state() -> dict:
    """Global RNG states of python, numpy and torch (CPU + CUDA), as tensors and plain values (weights_only-safe)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, py_gauss = random.getstate()
    state = {"python": [version, torch.tensor(internal, dtype=torch.int64), py_gauss],
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, py_gauss = state["python"]
    random.setstate((version, tuple(int(x) for x in internal.tolist()), py_gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
