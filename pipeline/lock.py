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

Shards are read under a shared lock (`hold(..., shared=True)`, flock LOCK_SH): `train` and `resume` hold one on their
local shard folders (a URL cannot be locked) for the whole run, so any number of runs read one folder while `encode`,
which takes it exclusively, is refused (and a run is refused while encode writes), each naming the other. A reader
writes its record only when the file names no live reader (the one it names is enough to say who holds it; no
exclusive holder can exist while it holds a shared lock); it pads the record to a fixed length, so that two readers
writing at once leave one whole record, never a mix. On release only the last reader removes the file: it leaves
when it cannot convert its lock to an exclusive one (others read); a reader that finds the file exclusively locked by
a reader about to remove it tries again.

Under torchrun / accelerate launch only global rank 0 (RANK) takes an exclusive lock, the others working under it
(every rank takes a shared one). flock works across the machines of an NFSv4 mount (Linux emulates it with POSIX
byte-range locks there); on file systems without any locking it locks nothing. A shard folder this user cannot write
in (read-only shards) is read unlocked; the loader's checks against the manifest still refuse a changed shard.

A run folder's holder also records how it ended (`hold(..., records_end=True)`, which `train` and `resume` pass):
`ended.json` beside the lock, written atomically when the holder leaves: `finished` (the body returned), `stopped`
(it raised an error of exit code 130, 128 + SIGINT: a signal stopped it, after a checkpoint) or `failed` (anything
else; its message's first line, shortened), with the holder's pid and `since`, so that `ditpipe runs` can tell a
record of the process whose lock file is left from an older one. A holder that changed nothing in the folder (a
refusal before the run wrote anything) records nothing: the folder is as the previous one left it. A holder killed
with -9 (or a power loss) records nothing and leaves its lock file, held by nobody: `runs` calls that `killed`.

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

from ditpipe.pipeline import atomic
from ditpipe.pipeline.errors import DitpipeError

NAME = ".lock"
END = "ended.json"  # how the last holder of a run folder's lock ended (`hold(..., records_end=True)`)
STOPPED_EXIT = 130  # 128 + SIGINT: the exit code of an error that means "stopped by a signal" (train's _Stopped)
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
    """True for the lock's own files (the lock file, a run's end record and its temporary), which listings of run,
    checkpoint and shard folders must skip."""
    name = Path(path).name
    return name in (NAME, END) or name.startswith(f".{END}.") and name.endswith(atomic.TMP_SUFFIX)


def takes_lock() -> bool:
    """Only global rank 0 locks (RANK is set by torchrun and accelerate launch; a plain process is rank 0)."""
    return os.environ.get("RANK", "0") == "0"


@contextlib.contextmanager
def hold(folder: Path, verb: str, shared: bool = False, records_end: bool = False):
    """Hold `folder`'s lock (creating the folder when needed) for the body; raise LockHeld when it is taken.
    `shared`: a reader's lock, taken with other readers' (every rank takes one); an absent folder (its reader will
    say so) or one this user cannot create the lock file in (read-only shards) is read unlocked. `records_end` (a
    run folder): write END when the body has changed the folder, saying how it ended."""
    if shared:
        with _hold_shared(Path(folder), verb):
            yield
        return
    if not takes_lock():
        yield
        return
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise DitpipeError(f"'{folder}' exists and is not a folder; choose another")
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    fd = _acquire(folder / NAME, verb)
    before = _listing(folder) if records_end else None
    try:
        yield
    except BaseException as e:
        if before is not None:
            _record_end(folder, fd, before, e)
        raise
    else:
        if before is not None:
            _record_end(folder, fd, before, None)
    finally:
        _release(fd, folder / NAME, folder if created else None)


def holding(where: Callable[..., tuple], shared: bool = False, records_end: bool = False):
    """Decorate a stage's entry point so that it runs under `hold(*where(**its arguments), shared, records_end)`:
    `where` takes the entry point's arguments by name and returns (folder, verb); folder None (a URL, say) locks
    nothing, a list of folders locks each."""

    def wrap(fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def locked(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            folder, verb = where(**bound.arguments)
            with contextlib.ExitStack() as stack:
                for f in folder if isinstance(folder, (list, tuple)) else [folder]:
                    if f is not None:
                        stack.enter_context(hold(f, verb, shared, records_end))
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


# ---------------------------------------------------------------------------------------------------- a run's end

OUTCOMES = ("finished", "stopped", "failed")
MESSAGE_CHARS = 300  # a failure's message in END: its first line, at most this long


def ended(folder: Path) -> dict | None:
    """The END record in `folder`: the holder's lock record (pid, verb, host, since) with "outcome" (one of
    OUTCOMES), "message" and "ended"; None when there is none, or it does not read as one (a link, a folder, a
    damaged or foreign file): never an exception."""
    try:
        fd = os.open(Path(folder) / END, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        rec = json.loads(os.read(fd, 1 << 16).decode()) if stat.S_ISREG(os.fstat(fd).st_mode) else None
    except (OSError, ValueError, RecursionError):
        return None
    finally:
        os.close(fd)
    if isinstance(rec, dict) and rec.get("outcome") in OUTCOMES and isinstance(rec.get("message"), str) \
            and _is_int(rec.get("pid")) and isinstance(rec.get("since"), (int, float)) \
            and not isinstance(rec["since"], bool):
        return rec
    return None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def outcome(error: BaseException | None) -> tuple[str, str]:
    """(outcome, message) of a holder whose body returned (None) or raised `error`: KeyboardInterrupt and an error
    of exit code STOPPED_EXIT are a stop by signal, anything else a failure."""
    if error is None:
        return "finished", ""
    text = str(error).strip()
    line = text.splitlines()[0] if text else type(error).__name__
    if text and not isinstance(error, DitpipeError):  # a bug's message means little without its type
        line = f"{type(error).__name__}: {line}"
    line = line if len(line) <= MESSAGE_CHARS else line[:MESSAGE_CHARS - 1].rstrip() + "…"
    stopped = isinstance(error, KeyboardInterrupt) or getattr(error, "exit_code", None) == STOPPED_EXIT
    return ("stopped" if stopped else "failed"), line


def _listing(folder: Path) -> dict[str, tuple[int, int]]:
    """What `folder` holds at its top level, name → (mtime, size), the lock's own files left out: a run that wrote
    anything (a log line, a checkpoint, `latest`) changes it."""
    out = {}
    for p in folder.iterdir():
        if not is_lock(p):
            with contextlib.suppress(OSError):  # gone meanwhile
                st = p.lstat()
                out[p.name] = (st.st_mtime_ns, st.st_size)
    return out


def _record_end(folder: Path, fd: int, before: dict, error: BaseException | None) -> None:
    """Write END (atomically: a temporary made with O_EXCL | O_NOFOLLOW, renamed) when the body changed `folder`,
    never over anything but an earlier record (a link, a folder or a foreign file there is left alone). Failing to
    write it (a full disk) never hides how the body ended."""
    with contextlib.suppress(OSError):
        if _listing(folder) == before:
            return
        path = folder / END
        if os.path.lexists(path) and ended(folder) is None:
            return
        what, message = outcome(error)
        atomic.write_json(path, {**(record(fd) or {"pid": os.getpid(), "since": 0.0}), "outcome": what,
                                 "message": message, "ended": time.time()})


# ---------------------------------------------------------------------------------------------------- the lock


def _acquire(path: Path, verb: str, shared: bool = False) -> int:
    for _ in range(100):  # each retry means a holder removed the file between our open and our lock
        fd, created = _open(path, shared)
        if fd is None:
            continue
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            rec = record(fd)
            if not _names(path, fd) or (shared and rec is not None and rec.get("shared")):
                os.close(fd)  # removed meanwhile, or the last reader is removing it (it holds it exclusively)
                time.sleep(0.01)
                continue
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
        if not shared:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(rec) + "\n").encode(), 0)
        elif not _live_reader(record(fd)):  # one whole record whoever writes last: fixed length, never truncated
            with contextlib.suppress(OSError):  # a reader's read-only descriptor (`_open`) writes none
                os.pwrite(fd, (json.dumps({**rec, "shared": True}).ljust(_SHARED_BYTES - 1) + "\n").encode(), 0)
        _HELD.add(fd)
        return fd
    raise LockHeld(f"could not lock '{path}': it keeps being replaced")


_SHARED_BYTES = 1024  # a reader's padded record: longer than any record (a host name is at most 255 bytes)


def _live_reader(rec: dict | None) -> bool:
    """Whether a record names a reader that may still hold the lock (any on another host: its pid says nothing)."""
    if rec is None or not rec.get("shared"):
        return False  # no record, or an exclusive holder's: it has died, since we hold a shared lock
    if rec.get("host") != socket.gethostname():
        return True
    if not 0 < rec["pid"] < 1 << 22:  # Linux's pid_max at most
        return False
    try:
        os.kill(rec["pid"], 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        pass
    return True


@contextlib.contextmanager
def _hold_shared(folder: Path, verb: str):
    if not folder.is_dir():
        yield  # nothing to read here: the reader says so in its own words
        return
    # a shard folder this user cannot write (read-only shards): its encode (another user's, or none) cannot be
    # kept out from here; the loader's checks against the manifest still refuse a shard that changed
    fd = None if not os.access(folder, os.W_OK) and not (folder / NAME).exists() else _acquire(
        folder / NAME, verb, shared=True)
    try:
        yield
    finally:
        if fd is not None:
            _release_shared(fd, folder / NAME)


def _release_shared(fd: int, path: Path) -> None:
    """Leave a shared lock; the last reader out (the one that can lock exclusively) removes the file, as `_release`."""
    _HELD.discard(fd)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:  # other readers hold it: leave them the file
        os.close(fd)
        return
    _release(fd, path, None)


def _open(path: Path, shared: bool = False) -> tuple[int | None, bool]:
    """(descriptor, created) of the lock file, never through a link; (None, False) when the caller must retry. A
    reader that may not write the file (another user's reader made it) locks it through a read-only descriptor."""
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        return _regular(path, os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o644)), True  # EXCL: never a link's
    except FileNotFoundError:  # the folder went with its last holder: make it again
        path.parent.mkdir(parents=True, exist_ok=True)
        return None, False
    except FileExistsError:
        pass
    try:
        try:
            return _regular(path, os.open(path, flags)), False
        except PermissionError:
            if not shared:
                raise
            return _regular(path, os.open(path, flags & ~os.O_RDWR | os.O_RDONLY)), False
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
