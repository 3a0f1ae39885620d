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
    """Yields a temporary path beside `path`, an empty regular file made here; on success it is fsynced and renamed
    over `path`. Made with O_EXCL | O_NOFOLLOW: a file or link planted at the temporary name (a predictable one) is
    never written through, and on failure only the file made here is removed, never one someone else put there."""
    path = Path(path)
    tmp, made = _fresh_temporary(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            if (os.lstat(tmp).st_dev, os.lstat(tmp).st_ino) == made:
                tmp.unlink()


def _fresh_temporary(path: Path) -> tuple[Path, tuple[int, int]]:
    """`.NAME.PID.tmp` beside `path` (or `.NAME.PID-K.tmp` where that name is taken), created empty, and its
    (device, inode)."""
    for k in range(100):
        tmp = path.with_name(f".{path.name}.{os.getpid()}{f'-{k}' if k else ''}{TMP_SUFFIX}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
        except FileExistsError:
            continue
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
        return tmp, (st.st_dev, st.st_ino)
    raise FileExistsError(f"no free temporary name beside '{path}' (100 taken): remove the '.{path.name}.*.tmp' "
                          "files there")


def new_file_mode() -> int:
    """The mode a file made here gets (0o666 less the umask), read without setting the umask (Linux shows it in
    /proc; elsewhere it is set and put back at once). For files a library makes its own way: safetensors writes a
    temporary it renames into place, 0600 whatever the umask."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/self/status") as f:
            return 0o666 & ~int(next(line for line in f if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


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
