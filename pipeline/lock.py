"""One process per folder: an exclusive `fcntl.flock` on `<folder>/.lock`, held while a verb runs.

`ditpipe train` and `resume` lock the run folder, `encode` the shard folder, `export` the output folder. A second
process on the same folder exits at once (LockHeld, exit code 75), naming the holder's pid, which the holder writes
into the file after locking. The kernel drops a flock when its process dies, so a lock file left by a killed
process (kill -9, a crash, a lost node) blocks nothing: the next process simply locks it again. (Forked DataLoader
workers share the lock's open file; after a kill -9 of their parent they exit within seconds, and with them the lock.)

Under torchrun / accelerate launch only global rank 0 (RANK) takes the lock; the others work under it. flock works
across the machines of an NFSv4 mount (Linux emulates it with POSIX byte-range locks there); on file systems without
any locking it locks nothing.

The file is removed on release, and a folder the lock itself created is removed again when it holds nothing else.
A reader that opened the file just before it was removed would lock a dead inode, so `acquire` checks, after
locking, that the path still names the inode it locked, and retries otherwise.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import inspect
import json
import os
import socket
import time
from pathlib import Path
from typing import Callable

from pipeline.errors import DitpipeError

NAME = ".lock"


class LockHeld(DitpipeError):
    """Another process holds the folder's lock. 75 is sysexits' EX_TEMPFAIL: try again later."""

    exit_code = 75


def is_lock(path: Path) -> bool:
    """True for a folder's lock file, which listings of run, checkpoint and shard folders must skip."""
    return Path(path).name == NAME


def takes_lock() -> bool:
    """Only global rank 0 locks (RANK is set by torchrun and accelerate launch; a plain process is rank 0)."""
    return os.environ.get("RANK", "0") == "0"


@contextlib.contextmanager
def hold(folder: Path, verb: str):
    """Hold `folder`'s lock (creating the folder when needed) for the body; raise LockHeld when it is taken."""
    if not takes_lock():
        yield
        return
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise DitpipeError(f"'{folder}' exists and is not a folder; choose another")
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    fd = _acquire(folder / NAME, verb)
    try:
        yield
    finally:
        _release(fd, folder / NAME, folder if created else None)


def holding(where: Callable[..., tuple[Path | None, str]]):
    """Decorate a stage's entry point so that it runs under `hold(*where(**its arguments))`: `where` takes the
    entry point's arguments by name and returns (folder, verb); folder None (a URL, say) locks nothing."""

    def wrap(fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def locked(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            folder, verb = where(**bound.arguments)
            with hold(folder, verb) if folder is not None else contextlib.nullcontext():
                return fn(*args, **kwargs)

        return locked

    return wrap


def _acquire(path: Path, verb: str) -> int:
    for _ in range(100):  # each retry means a holder removed the file between our open and our lock
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # the folder went with its last holder: make it again
            path.parent.mkdir(parents=True, exist_ok=True)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise LockHeld(f"'{path.parent}' is in use by {holder}; wait for it to finish (or stop it), or choose "
                           "another folder. A lock left by a process that has died blocks nothing") from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            record = {"pid": os.getpid(), "verb": verb, "host": socket.gethostname(), "since": time.time()}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
            return fd
        os.close(fd)
    raise LockHeld(f"could not lock '{path}': it keeps being replaced")


def _holder(fd: int) -> str:
    """The lock holder, as its file describes it."""
    try:
        rec = json.loads(os.pread(fd, 4096, 0).decode())
        return f"ditpipe {rec['verb']} (pid {int(rec['pid'])} on {rec['host']})"
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return "another process (its pid is not written yet)"  # it has locked and not yet written, or not ditpipe


def _release(fd: int, path: Path, created: Path | None) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)  # still locked: a process that opened it meanwhile fails, or retries on the new inode
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)
    if created is not None:
        with contextlib.suppress(OSError):
            created.rmdir()  # only when empty: a run that wrote nothing leaves no folder behind
