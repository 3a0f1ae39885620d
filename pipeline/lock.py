"""One process per folder: an exclusive `fcntl.flock` on `<folder>/.lock`, held while a verb runs.

`ditpipe train` and `resume` lock the run folder, `encode` the shard folder, `export` the output folder. A second
process on the same folder exits at once (LockHeld, exit code 75), naming the holder's pid, which the holder writes
into the file after locking (a JSON record: pid, verb, host, since; `record` reads it, for `ditpipe runs` too).

The lock dies with the process that took it. The kernel drops a flock when the last descriptor of its open file
closes, and a fork copies descriptors: DataLoader workers would keep the lock of a main process killed with -9 until
they notice, seconds or minutes later, and a rerun would be refused. So every forked child closes the lock's
descriptor at once (`os.register_at_fork`), and an exec'd child never gets it (Python's descriptors are
close-on-exec). flock rather than POSIX record locks (`lockf`), which forks do not inherit either: a record lock is
dropped when the process closes *any* descriptor of the file (a `runs` probe, a hash of the folder) and never
conflicts with another lock of the same process.

Under torchrun / accelerate launch only global rank 0 (RANK) takes the lock; the others work under it. flock works
across the machines of an NFSv4 mount (Linux emulates it with POSIX byte-range locks there); on file systems without
any locking it locks nothing.

Never through a link, never someone else's file: `.lock` is opened with O_NOFOLLOW, must be a regular file with one
link, and is written only when we created it or it holds a ditpipe lock record (or nothing: a ditpipe killed between
creating and writing it); anything else is refused, naming it. It is the one file written in place (the lock lives
on its inode, so a renamed copy would be unlocked). On release the path is removed only while it still names the
inode we locked, and a folder the lock itself created is removed again when it holds nothing else. A reader that
opened the file just before it was removed would lock a dead inode, so `acquire` checks, after locking, that the path
still names the inode it locked, and retries otherwise.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import inspect
import json
import os
import socket
import stat
import time
from pathlib import Path
from typing import Callable

from pipeline.errors import DitpipeError

NAME = ".lock"
_HELD: set[int] = set()  # the descriptors of the locks this process holds


def _close_in_child() -> None:
    """In a forked child: close (never unlock: that would free the parent's lock too) every lock descriptor."""
    for fd in _HELD:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_close_in_child)


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


def record(fd: int) -> dict | None:
    """The holder's record in an open lock file: {"pid", "verb", "host", "since"}, or None when it holds none."""
    try:
        rec = json.loads(os.pread(fd, 4096, 0).decode())
        if isinstance(rec, dict) and isinstance(rec.get("pid"), int) and isinstance(rec.get("verb"), str):
            return rec
    except (OSError, ValueError, RecursionError):
        pass
    return None


def _acquire(path: Path, verb: str) -> int:
    for _ in range(100):  # each retry means a holder removed the file between our open and our lock
        fd, created = _open(path)
        if fd is None:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise LockHeld(f"'{path.parent}' is in use by {holder}; wait for it to finish (or stop it), or choose "
                           "another folder. A lock left by a process that has died blocks nothing") from None
        if not _names(path, fd):
            os.close(fd)
            continue
        if not created:
            _refuse_foreign(path, fd)
        rec = {"pid": os.getpid(), "verb": verb, "host": socket.gethostname(), "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(rec) + "\n").encode(), 0)
        _HELD.add(fd)
        return fd
    raise LockHeld(f"could not lock '{path}': it keeps being replaced")


def _open(path: Path) -> tuple[int | None, bool]:
    """(descriptor, created) of the lock file, never through a link; (None, False) when the caller must retry."""
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        return _regular(path, os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o644)), True  # EXCL: never a link's
    except FileNotFoundError:  # the folder went with its last holder: make it again
        path.parent.mkdir(parents=True, exist_ok=True)
        return None, False
    except FileExistsError:
        pass
    try:
        return _regular(path, os.open(path, flags)), False
    except FileNotFoundError:  # removed by its holder since: create it again
        return None, False
    except OSError as e:
        what = "a symbolic link" if e.errno == errno.ELOOP else "not a regular file" if e.errno in (
            errno.EISDIR, errno.ENXIO) else f"unreadable ({e.strerror})"
        raise DitpipeError(f"'{path}' is {what}; ditpipe keeps its lock in that file and never writes through a "
                           "link or into what it did not make: remove or rename it, or choose another folder") from None


def _regular(path: Path, fd: int) -> int:
    """`fd`, when it is a regular file with no other name (a hard link would be written into elsewhere)."""
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
        return fd
    os.close(fd)
    what = "not a regular file" if not stat.S_ISREG(st.st_mode) else f"a file with {st.st_nlink} names (hard links)"
    raise DitpipeError(f"'{path}' is {what}; ditpipe keeps its lock in that file and never writes into what it did "
                       "not make: remove or rename it, or choose another folder")


def _refuse_foreign(path: Path, fd: int) -> None:
    """An existing lock file is ours to reuse when it holds a ditpipe record (its writer died) or nothing."""
    if os.fstat(fd).st_size == 0 or record(fd) is not None:
        return
    os.close(fd)
    raise DitpipeError(f"'{path}' was not written by ditpipe (it holds no ditpipe lock record); ditpipe keeps its "
                       "lock in that file and will not overwrite or delete it: move it away, or choose another folder")


def _names(path: Path, fd: int) -> bool:
    """Whether `path` (not followed) still names the inode open as `fd`."""
    try:
        st, mine = os.stat(path, follow_symlinks=False), os.fstat(fd)
    except FileNotFoundError:
        return False
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def _holder(fd: int) -> str:
    """The lock holder, as its file describes it."""
    rec = record(fd)
    if rec is None:
        return "another process (its pid is not written yet)"  # it has locked and not yet written, or not ditpipe
    return f"ditpipe {rec['verb']} (pid {rec['pid']} on {rec.get('host', '?')})"


def _release(fd: int, path: Path, created: Path | None) -> None:
    _HELD.discard(fd)
    if _names(path, fd):  # only the inode we locked: whatever was put at the name since is not ours to delete
        with contextlib.suppress(OSError):
            os.unlink(path)  # still locked: a process that opened it meanwhile fails, or retries on the new inode
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)
    if created is not None:
        with contextlib.suppress(OSError):
            created.rmdir()  # only when empty: a run that wrote nothing leaves no folder behind
