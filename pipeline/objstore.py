"""Object storage (s3:// and the other fsspec protocols of pipeline/remote.py): the one place that opens an fsspec
filesystem, retries what is transient and writes objects so a reader never sees half of one.

- `configure(storage)` applies the config's `storage` section for this process and its children: the endpoint
  (`storage.endpoint_url` becomes AWS_ENDPOINT_URL, which botocore reads) and the retry count. Credentials are never
  taken from the config: the environment (AWS_ACCESS_KEY_ID, AWS_PROFILE, an instance role) supplies them, so they
  reach no config.yaml, manifest, checkpoint or log.
- `retrying(what, fn)`: a lost connection, a timeout or a 5xx is retried with exponential back-off (0.5 s, 1 s, 2 s,
  … at most 30 s); a missing object, a refusal (403) or our own ShardError is not, and the last failure is one
  line naming `what`.
- `put_file` / `put_bytes`: an S3 PUT makes an object visible only once complete, so an object is never listed half
  written; on other protocols (file://) the bytes go to a temporary name first and are renamed.
- `listing(url)`: {name: size} of the objects directly under a folder URL, read fresh (no listing cache).
"""

from __future__ import annotations

import os
import time
import uuid
from typing import Callable, TypeVar

from ditpipe.pipeline.errors import ShardError

T = TypeVar("T")
RETRIES_ENV = "DITPIPE_STORAGE_RETRIES"  # storage.retries, for this process's children (loader workers, torchrun)
DEFAULT_RETRIES = 5
_BACKOFF_S, _BACKOFF_MAX_S = 0.5, 30.0


def configure(storage) -> None:
    """Apply the config's `storage` section (StorageConfig) to this process and the processes it starts."""
    if storage.endpoint_url:
        os.environ["AWS_ENDPOINT_URL"] = storage.endpoint_url
    os.environ[RETRIES_ENV] = str(storage.retries)


def retries() -> int:
    try:
        return max(0, int(os.environ.get(RETRIES_ENV, DEFAULT_RETRIES)))
    except ValueError:
        return DEFAULT_RETRIES


def filesystem(url: str):
    """(fsspec filesystem, path inside it) for a URL; listings are never cached (an encode or a run adds objects
    while others read), and S3's own retries are left to `retrying`. One filesystem per process and endpoint is kept
    (fsspec's instance cache, which a forked worker clears): a new S3 session costs ~0.15 s, a PUT ~0.02 s."""
    import fsspec

    protocol = url.split("://", 1)[0].lower()
    options = {}
    if protocol in ("s3", "s3a"):
        options.update(use_listings_cache=False, config_kwargs={"retries": {"max_attempts": 1}})  # ours decide (retrying)
        if os.environ.get("AWS_ENDPOINT_URL"):  # part of the cache key: another endpoint is another filesystem
            options["client_kwargs"] = {"endpoint_url": os.environ["AWS_ENDPOINT_URL"]}
    try:
        fs, path = fsspec.core.url_to_fs(url, **options)
    except ImportError as e:  # s3fs, gcsfs, adlfs, aiohttp: the protocol's package is not installed
        raise ShardError(f"cannot open '{url}': {e} (pip install s3fs for s3://)") from None
    if protocol in ("s3", "s3a"):
        fs.retries = 1  # s3fs's own loop (5 tries of a refused connection, ~2 s) too: `retrying` decides
    return fs, path


def transient(error: BaseException) -> bool:
    """Whether `error` is worth another try: a lost or refused connection, a timeout, a throttle or a 5xx. A missing
    object, a permission refusal and our own refusals are not."""
    if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ShardError,
                          ValueError, TypeError, KeyError)):
        return False
    text = f"{type(error).__name__} {error}".lower()
    if any(w in text for w in ("accessdenied", "access denied", "forbidden", "invalidaccesskey", "signaturedoesnotmatch",
                               "nosuchbucket", "nosuchkey", "403", "404")):
        return False
    return isinstance(error, (OSError, ConnectionError, TimeoutError)) or any(
        w in text for w in ("connect", "timeout", "timed out", "reset", "broken pipe", "throttl", "slowdown",
                            "internalerror", "serviceunavailable", "500", "502", "503", "504"))


def retrying(what: str, fn: Callable[[], T], attempts: int | None = None) -> T:
    """fn(), retried while it fails transiently (`transient`): `attempts` more tries (storage.retries) with back-off
    0.5 s, 1 s, 2 s, … (at most 30 s). The last failure becomes one ShardError line naming `what`."""
    extra = retries() if attempts is None else attempts
    for attempt in range(extra + 1):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - sorted by `transient`; ours pass through unchanged
            if isinstance(e, ShardError):
                raise
            if not transient(e):
                raise ShardError(f"{what}: {type(e).__name__}: {e}") from None
            if attempt == extra:
                raise ShardError(f"{what}: still failing after {extra + 1} tries ({type(e).__name__}: {e}); check the "
                                 "endpoint and the network, then run the command again") from None
            time.sleep(min(_BACKOFF_MAX_S, _BACKOFF_S * 2 ** attempt))
    raise AssertionError("unreachable")


def put_file(local, url: str) -> None:
    """Upload a local file to `url`, whole: visible to readers only once complete (an S3 PUT; elsewhere a temporary
    name renamed)."""
    fs, path = filesystem(url)
    if _atomic_put(fs):
        retrying(f"uploading '{url}'", lambda: fs.put_file(str(local), path))
        return
    temporary = f"{path}.{uuid.uuid4().hex}.tmp"
    retrying(f"uploading '{url}'", lambda: fs.put_file(str(local), temporary))
    retrying(f"uploading '{url}'", lambda: fs.mv(temporary, path))


def put_bytes(data: bytes, url: str) -> None:
    """`put_file` for bytes in memory (a manifest, a `latest` pointer)."""
    fs, path = filesystem(url)
    if _atomic_put(fs):
        retrying(f"uploading '{url}'", lambda: fs.pipe_file(path, data))
        return
    temporary = f"{path}.{uuid.uuid4().hex}.tmp"
    retrying(f"uploading '{url}'", lambda: fs.pipe_file(temporary, data))
    retrying(f"uploading '{url}'", lambda: fs.mv(temporary, path))


def whole_put(fs) -> bool:
    """Whether a put on `fs` is whole by itself (an object store's PUT), so no temporary name and rename are needed
    (pipeline/remote_encode.py puts through one filesystem of its own)."""
    return _atomic_put(fs)


def _atomic_put(fs) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return any(p in ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss") for p in protocols)


def listing(url: str) -> dict[str, int]:
    """{name: size in bytes} of the objects directly under the folder `url` (read fresh; {} when there is none)."""
    fs, path = filesystem(url)

    def ls():
        try:
            return fs.ls(path, detail=True, refresh=True)
        except FileNotFoundError:
            return []
    return {e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e.get("size") or 0)
            for e in retrying(f"listing '{url}'", ls) if e.get("type") != "directory"}


def get_file(url: str, local) -> None:
    """Download `url` to the local path `local` (the caller writes it under a temporary name and renames)."""
    fs, path = filesystem(url)
    retrying(f"downloading '{url}'", lambda: fs.get_file(path, str(local)))


def remove(url: str) -> None:
    """Delete one object (callers delete only objects a manifest or run of ours lists)."""
    fs, path = filesystem(url)
    retrying(f"deleting '{url}'", lambda: fs.rm_file(path))
