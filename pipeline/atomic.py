"""Atomic writes: temporary name, fsync, rename, fsync the folder. A crash leaves the old file or the new one."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

TMP_SUFFIX = ".tmp"  # every temporary name ends so; encode and checkpoint clean-up know them by it


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: Path):
    """Yields a temporary path beside `path`; on success it is fsynced and renamed over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: Path, obj) -> None:
    write_bytes(path, (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode())


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def new_folder(out: Path, overwrite: bool):
    """Yields an empty temporary folder beside `out`; when the block succeeds it becomes `out`. An existing
    non-empty `out` is refused unless `overwrite`, and replaced only once the new folder is whole; on failure the
    temporary goes and `out` stays as it was."""
    import shutil

    from pipeline.errors import DitpipeError

    out = Path(out)
    if out.is_file():
        raise DitpipeError(f"--out '{out}' is a file; name a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise DitpipeError(f"--out '{out}' already exists and is not empty; choose another folder or pass "
                           "--overwrite to replace it")
    tmp = out.parent / f".{out.name}.export-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)  # --overwrite: only now that the new folder is whole
    os.replace(tmp, out)
