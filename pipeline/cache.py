"""The node-local cache of remote shards: a URL shard folder (s3://, gs://, https://, ...) is trained from verified
local copies of its shards, read exactly as a local folder is (mmap, the formats' Readers with a path).

    <storage.cache_dir>/shards/<digest of the folder URL>/
        <sha16>-shard-00000.tar         a shard, named by its sha256's first 16 hex digits (the manifest's)
        <sha16>-shard-00000.meta.json   its sidecar, named by the sidecar's sha256 (the shard's when none is recorded)
        .shard-00000.lock               the shard's lock (flock): exclusive while it is downloaded, shared while pinned
        .<name>.<pid>.<hex>.part        a download in progress (its full size reserved up front)
        fetched.log                     one line a completed download (how tests count them; cut at 1 MiB)

- A copy is downloaded to a temporary name, checked against the manifest (size; sha256 of the shard and of its
  sidecar), fsynced and renamed into place: a present file is always a verified one. Names carry the content hash,
  so a shard re-uploaded with other bytes (and a new manifest) is a new name, never a stale copy taken for it.
- Processes on one node (ranks, DataLoader workers) share the folder: the shard's lock makes one of them download it
  while the others wait for it, then find it present.
- `storage.cache_limit_gb` bounds the bytes of every folder under `<cache_dir>/shards/`: before a download reserves its
  size, the least recently used files (their mtime, touched on every open) are evicted, never one whose shard is
  locked (pinned by a rank's prefetch window, or being downloaded). A reader that still maps an evicted file keeps
  valid pages (Linux unlinks only the name); one that finds its file gone fetches it again.
- Only files this module made are deleted: our exact names, in folders we made, never through a link.

`Prefetcher` keeps the next `storage.prefetch_shards` shards a rank will read downloaded and pinned, in the order
the loader will read them (pipeline/loader.py starts and stops it with the loader's iteration).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import secrets
import stat
import threading
import time
from pathlib import Path
from typing import Callable

from ditpipe.pipeline import formats, objstore, remote
from ditpipe.pipeline.errors import ShardError

SHARDS = "shards"  # the cache's sub-folder for shard folders
FETCHED_LOG, _LOG_MAX = "fetched.log", 1 << 20
CHUNK = 8 << 20  # one read of a remote object while it streams to its temporary file
_DIGEST = 16
_GB = 1e9
_POLL_S = 0.02  # how often a process waiting for another's download looks again
PARALLEL = 4  # downloads a prefetcher runs at once
_CONTENT_RE = re.compile(
    r"[0-9a-f]{16}-(?:" + "|".join(re.escape(m.PREFIX) for m in formats.FORMATS.values()) + r")-\d{5,}\.(?:"
    + "|".join(re.escape(m.SUFFIX[1:]) for m in formats.FORMATS.values()) + r"|meta\.json)")
_PART_RE = re.compile(r"\.(" + _CONTENT_RE.pattern + r")\.\d+\.[0-9a-f]{8}\.part")
_FOLDER_RE = re.compile(r"[0-9a-f]{" + str(_DIGEST) + "}")

_configured = None  # the StorageConfig `configure` applied in this process
_LOCK_FLAGS = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC

# Lock descriptors open in this process. A forked child (a loader worker) gets copies of them, and a flock lasts
# while any copy is open: the child closes its copies at once, so a pin or a download's lock dies with the process
# that took it, not with the last of its workers.
_lock_fds: set[int] = set()
_lock_fds_guard = threading.Lock()


def _open_lock(path: Path) -> int:
    with _lock_fds_guard:
        fd = os.open(path, _LOCK_FLAGS, 0o600)
        _lock_fds.add(fd)
    return fd


def release(fd: int) -> None:
    """Close a lock descriptor of this module (a pin's: `ShardCache.pin`), letting go of its lock."""
    with _lock_fds_guard:
        _lock_fds.discard(fd)
        os.close(fd)


def _close_inherited() -> None:
    for fd in _lock_fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    _lock_fds.clear()


os.register_at_fork(before=_lock_fds_guard.acquire, after_in_parent=_lock_fds_guard.release,
                    after_in_child=lambda: (_lock_fds_guard.release(), _close_inherited()))


def configure(storage) -> None:
    """Apply the config's `storage` section in this process: objstore's endpoint and retries (for this process and
    its children) and the shard cache's folder, limit and prefetch depth (`settings`)."""
    global _configured
    objstore.configure(storage)
    _configured = storage


def settings(storage=None):
    """The storage section in force: `storage`, else what `configure` applied, else the defaults."""
    if storage is not None:
        return storage
    if _configured is not None:
        return _configured
    from ditpipe.pipeline.config import StorageConfig

    return StorageConfig()


def folder_digest(url: str) -> str:
    return hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:_DIGEST]


def _base(name: str) -> str:
    """The shard a file name belongs to (`shard-00000` for the shard and its sidecar): the unit of locking."""
    return name.split(".", 1)[0]


def _own_dir(path: Path) -> None:
    """Make a folder of ours (or find it), refusing one that is a link or not a folder: we never write through a link
    we did not make."""
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise ShardError(f"'{path}' is a link or not a folder; the shard cache writes only into folders it made "
                         "(move it away, or set storage.cache_dir)")


class ShardCache:
    """Verified local copies of one URL shard folder's files (`local(entry)`), shared by the node's processes."""

    def __init__(self, url: str, storage=None):
        s = settings(storage)
        self.url = url.rstrip("/")
        self.root = Path(s.cache_dir).expanduser()
        self.limit = int(s.cache_limit_gb * _GB)
        self.prefetch = int(s.prefetch_shards)
        self.folder = self.root / SHARDS / folder_digest(url)
        self._made = False

    def __getstate__(self):  # a worker process makes (checks) the folders again
        return {**self.__dict__, "_made": False}

    def _ensure_folders(self) -> None:
        if not self._made:
            self.root.mkdir(parents=True, exist_ok=True)  # the user's choice of place (it may be a link)
            _own_dir(self.root / SHARDS)
            _own_dir(self.folder)
            self._made = True

    # ------------------------------------------------------------------------------------------------ names

    def names(self, entry: dict) -> tuple[str, str]:
        """(the shard's cached name, its sidecar's): each prefixed by its content's sha256."""
        sha = entry.get("sha256")
        if not sha or not re.fullmatch(r"[0-9a-f]{64}", str(sha)):
            raise ShardError(f"{remote.url_join(self.url, entry['name'])}: the manifest records no sha256 for it, and "
                             "a remote shard is read only once checked by it; the manifest is damaged or was altered "
                             "(re-encode, re-upload)")
        side_sha = entry.get("sidecar_sha256") or sha
        return f"{sha[:_DIGEST]}-{entry['name']}", f"{str(side_sha)[:_DIGEST]}-{entry['sidecar']}"

    def paths(self, entry: dict) -> tuple[Path, Path]:
        shard, side = self.names(entry)
        return self.folder / shard, self.folder / side

    def present(self, entry: dict) -> bool:
        return all(p.is_file() and not p.is_symlink() for p in self.paths(entry))

    # ------------------------------------------------------------------------------------------------ locks

    def _lock_fd(self, name: str) -> int:
        self._ensure_folders()
        return _open_lock(self.folder / f".{_base(name)}.lock")

    def pin(self, entry: dict) -> int:
        """Download the shard if needed and hold a shared lock on it (the returned descriptor; `release` unpins):
        eviction passes over it while it is held."""
        for _ in range(8):
            self.local(entry)
            fd = self._lock_fd(entry["name"])
            fcntl.flock(fd, fcntl.LOCK_SH)
            if self.present(entry):  # not evicted between the download and the lock
                return fd
            release(fd)
        raise ShardError(f"{remote.url_join(self.url, entry['name'])}: evicted from the cache '{self.folder}' as fast "
                         "as it is fetched; raise storage.cache_limit_gb")

    # ------------------------------------------------------------------------------------------------ reading

    def local(self, entry: dict) -> tuple[Path, Path]:
        """(shard path, sidecar path): verified local copies, downloaded once per node (the first process to need one
        fetches it; the others wait on its lock and find it present), touched as used."""
        paths = self.paths(entry)
        while not all(p.is_file() for p in paths):
            # Never blocked on the lock: a process holding it shared (a prefetcher's pin, which may be this
            # process's) holds a present shard, so the wait ends when the files are there or the lock is free.
            fd = self._lock_fd(entry["name"])
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    time.sleep(_POLL_S)  # being downloaded by another process or thread
                    continue
                for path, name, want, size, cap in (
                        (paths[0], entry["name"], entry["sha256"], int(entry["bytes"]), int(entry["bytes"])),
                        (paths[1], entry["sidecar"], entry.get("sidecar_sha256"), None, remote.MAX_META_BYTES)):
                    if not path.is_file():
                        self._download(remote.url_join(self.url, name), path, want, size, cap)
            finally:
                release(fd)
        for p, size in zip(paths, (int(entry["bytes"]), None)):
            st = os.lstat(p)  # gone already (evicted): FileNotFoundError, and the reader fetches it again
            if not stat.S_ISREG(st.st_mode) or (size is not None and st.st_size != size):
                raise ShardError(f"'{p}' in the shard cache is not the verified copy of "
                                 f"{remote.url_join(self.url, entry['name'])} (a link, or another size): the cache was "
                                 f"altered; remove the folder '{self.folder}' and run again")
            os.utime(p, follow_symlinks=False)  # used now: the last to be evicted
        return paths

    def _download(self, url: str, final: Path, want: str | None, size: int | None, cap: int) -> None:
        """`url` into `final` through a temporary of ours (its size reserved first), checked against the manifest's
        size and sha256, fsynced, renamed. Only the caller (holding the shard's lock) writes this name."""
        if size is not None and size > self.limit:
            raise ShardError(f"{url}: {size:,} bytes, more than the whole shard cache may hold "
                             f"(storage.cache_limit_gb = {self.limit / _GB:g}); raise storage.cache_limit_gb")
        self._clear_parts(final.name)  # a killed download's leftovers (we hold the lock: none is in progress)
        temporary = final.parent / f".{final.name}.{os.getpid()}.{secrets.token_hex(4)}.part"
        fd = self._reserve(temporary, size or 0, url)
        try:
            objstore.retrying(f"downloading '{url}'", lambda: _stream(url, fd, size, cap, want))
            os.fsync(fd)
            os.close(fd)
            fd = -1
            os.rename(temporary, final)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
            raise
        self._log(final.name)

    def _clear_parts(self, name: str) -> None:
        for p in self.folder.iterdir():
            m = _PART_RE.fullmatch(p.name)
            if m and m.group(1) == name and not p.is_symlink():
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()

    def _log(self, name: str) -> None:
        path = self.folder / FETCHED_LOG
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            if os.fstat(fd).st_size > _LOG_MAX:
                os.ftruncate(fd, 0)
            os.write(fd, f"{name} {os.getpid()} {time.time():.3f}\n".encode())
        finally:
            os.close(fd)

    def fetched(self) -> list[str]:
        """The names downloaded into this folder, one per download (fetched.log)."""
        try:
            return [line.split()[0] for line in (self.folder / FETCHED_LOG).read_text().splitlines() if line]
        except FileNotFoundError:
            return []

    # ------------------------------------------------------------------------------------------------ the limit

    def _reserve(self, temporary: Path, size: int, url: str) -> int:
        """Under the cache-wide lock: evict least recently used files until `size` more bytes fit the limit, then
        create the temporary (O_EXCL | O_NOFOLLOW) with its size allocated, so concurrent downloads count it."""
        self._ensure_folders()
        lock = _open_lock(self.root / SHARDS / ".evict.lock")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._make_room(size, url)
            fd = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            if size:
                try:
                    os.posix_fallocate(fd, 0, size)
                except OSError as e:
                    os.close(fd)
                    os.unlink(temporary)
                    if e.errno in (errno.ENOSPC, errno.EDQUOT):
                        raise ShardError(f"{url}: no space left for it in the shard cache '{self.folder}' "
                                         f"({size:,} bytes); free the disk or lower storage.cache_limit_gb") from None
                    raise
            return fd
        finally:
            release(lock)

    def files(self) -> list[tuple[Path, os.stat_result]]:
        """Every file of ours under `<cache_dir>/shards/` (content and temporaries), with its lstat."""
        found = []
        top = self.root / SHARDS
        try:
            folders = [d for d in top.iterdir() if _FOLDER_RE.fullmatch(d.name)]
        except FileNotFoundError:
            return []
        for d in folders:
            if not stat.S_ISDIR(os.lstat(d).st_mode):
                continue  # a link named like ours is not ours
            for p in d.iterdir():
                if _CONTENT_RE.fullmatch(p.name) or _PART_RE.fullmatch(p.name):
                    with contextlib.suppress(FileNotFoundError):
                        st = os.lstat(p)
                        if stat.S_ISREG(st.st_mode):
                            found.append((p, st))
        return found

    def used(self) -> int:
        return sum(st.st_size for _, st in self.files())

    def _make_room(self, size: int, url: str) -> None:
        files = self.files()
        used = sum(st.st_size for _, st in files)
        if used + size <= self.limit:
            return
        held = 0
        # a killed download's temporary first (its shard's lock is free: a download holds it throughout), then the
        # least recently used files
        for p, st in sorted(files, key=lambda f: (not _PART_RE.fullmatch(f[0].name), f[1].st_mtime)):
            if used + size <= self.limit:
                return
            if self._evict(p):
                used -= st.st_size
            else:
                held += st.st_size
        if used + size > self.limit:
            raise ShardError(f"{url}: the shard cache '{self.root / SHARDS}' cannot hold its {size:,} bytes besides "
                             f"the {held:,} bytes of shards in use (pinned by a prefetch window or being fetched): "
                             f"storage.cache_limit_gb = {self.limit / _GB:g} is too small for them; raise it, or "
                             "lower storage.prefetch_shards")

    def _evict(self, path: Path) -> bool:
        """Delete one file of ours unless its shard is locked (pinned or being downloaded); whether it went."""
        part = _PART_RE.fullmatch(path.name)
        name = (part.group(1) if part else path.name).split("-", 1)[1]
        try:
            fd = _open_lock(path.parent / f".{_base(name)}.lock")
        except OSError:
            return False
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            return True
        finally:
            release(fd)


def _stream(url: str, fd: int, size: int | None, cap: int, want: str | None) -> None:
    """One try: the object at `url` written to `fd` from offset 0, at most `cap` bytes, then held to the manifest's
    `size` and sha256 `want`. A missing, larger, shorter or changed object is a ShardError (not retried)."""
    fs, path = objstore.filesystem(url)  # one per process and endpoint: a new S3 client costs ~0.2 s
    digest, held = hashlib.sha256(), 0
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        f = fs.open(path, "rb", **({"block_size": 0} if remote.streamed(url) else {"block_size": CHUNK}))
    except FileNotFoundError:
        raise ShardError(f"{url} is missing at the remote location (the manifest lists it); re-upload the shard folder "
                         "whole, manifest last") from None
    with f:
        while True:
            part = f.read(min(CHUNK, cap + 1 - held))
            if not part:
                break
            held += len(part)
            if held > cap:
                raise ShardError(f"'{url}' is larger than the {cap:,} bytes expected (the manifest's size for it); it "
                                 "was changed at the remote location or is not ours; re-upload the shard folder")
            digest.update(part)
            view = memoryview(part)
            while view:
                view = view[os.write(fd, view):]
    if size is not None and held != size:
        raise ShardError(f"{url}: {held:,} bytes, the manifest says {size:,}; it was truncated or changed at the "
                         "remote location; re-upload the shard folder")
    os.ftruncate(fd, held)
    if want is not None and digest.hexdigest() != want:
        raise ShardError(f"{url} does not match the manifest's sha256 (changed or damaged at the remote location); "
                         "re-upload the shard folder")


# ---------------------------------------------------------------------------------------------------- prefetch


class Prefetcher:
    """A daemon thread in a rank's main process that keeps the shards of the next reads downloaded and pinned:
    those of the micro-batches the loader has in flight (`inflight` ahead of the consumer), then `ahead` more
    distinct shards in the order they will first be read. `shards_of(u)`: the shard ids micro-batch u reads, in the
    order it reaches them; `entries[s]`: shard s's manifest entry. The consumer reports each micro-batch it takes
    (`advance(u)`); the first error is kept for it (`check`)."""

    def __init__(self, cache: ShardCache, entries: list[dict], shards_of: Callable[[int], list[int]], start: int,
                 end: int, ahead: int, inflight: int):
        self.cache, self.entries, self.shards_of = cache, entries, shards_of
        self.start, self.end, self.ahead, self.inflight = start, end, max(1, ahead), max(1, inflight)
        self.consumed = start  # the next micro-batch the consumer takes
        self.error: BaseException | None = None
        self._memo: dict[int, list[int]] = {}
        self._pins: dict[int, int] = {}  # shard → the descriptor of its shared lock
        self._wake = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="ditpipe-prefetch", daemon=True)

    def begin(self) -> "Prefetcher":
        self._thread.start()
        return self

    def advance(self, u: int) -> None:
        with self._wake:
            self.consumed = max(self.consumed, u + 1)
            self._wake.notify()

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def stop(self, wait: float = 5.0) -> None:
        """Stop fetching ahead; the thread lets go of its pins as it ends (after the downloads it has started)."""
        with self._wake:
            self._stopped = True
            self._wake.notify()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=wait)

    def wanted(self) -> list[int]:
        """The shards to hold now, in the order they are first read: every shard of the micro-batches in flight,
        then the next `ahead` new ones."""
        order: dict[int, None] = {}
        consumed, new = self.consumed, 0
        for u in range(consumed, self.end):
            if u >= consumed + self.inflight and new >= self.ahead:
                break
            for s in self._shards(u):
                if s not in order:
                    order[s] = None
                    new += u >= consumed + self.inflight
        for old in [k for k in self._memo if k < consumed]:
            del self._memo[old]
        return list(order)

    def _shards(self, u: int) -> list[int]:
        if u not in self._memo:
            self._memo[u] = self.shards_of(u)
        return self._memo[u]

    def _run(self) -> None:
        try:
            while True:
                with self._wake:
                    if self._stopped:
                        return
                    seen = self.consumed
                want = self.wanted()
                for s in [s for s in self._pins if s not in want]:
                    release(self._pins.pop(s))
                budget = self.cache.limit - max((int(e["bytes"]) for e in self.entries), default=0)
                held, batch = sum(int(self.entries[s]["bytes"]) for s in self._pins), []
                for s in want:
                    if s in self._pins:
                        continue
                    size = int(self.entries[s]["bytes"])
                    if (self._pins or batch) and held + size > budget:  # leave a reader room for one more shard
                        break
                    batch.append(s)
                    held += size
                    if len(batch) == PARALLEL:
                        break
                if batch and not self._stopped:
                    self._pin_all(batch)
                    continue  # then look again: the consumer may have moved on meanwhile
                with self._wake:
                    if not self._stopped and self.consumed == seen:
                        self._wake.wait(timeout=1.0)
        except BaseException as e:  # noqa: BLE001 - kept for the consumer, who raises it as its own
            self.error = e
        finally:
            for fd in self._pins.values():
                release(fd)
            self._pins.clear()

    def _pin_all(self, batch: list[int]) -> None:
        """Pin the shards of `batch` at once, a download each in its own (daemon) thread: one stream from an object
        store is slower than several. The first failure is raised after every thread ends (what did pin is
        kept in the pins, which the prefetcher's thread lets go of as it ends)."""
        results: dict[int, int | BaseException] = {}

        def pin(s: int) -> None:
            try:
                results[s] = self.cache.pin(self.entries[s])
            except BaseException as e:  # noqa: BLE001 - raised below, in the prefetcher's thread
                results[s] = e
        threads = [threading.Thread(target=pin, args=(s,), daemon=True, name="ditpipe-fetch") for s in batch]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        errors = [r for r in results.values() if isinstance(r, BaseException)]
        self._pins.update((s, r) for s, r in results.items() if not isinstance(r, BaseException))
        if errors:
            raise errors[0]
