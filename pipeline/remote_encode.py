"""`ditpipe encode --out s3://bucket/prefix`: the local encode engine, staged on this node, uploaded as it goes.

The engine (pipeline/encode.py) runs unchanged into a node-local staging folder, `storage.cache_dir`/encode/<digest
of the endpoint and URL>/shards, so everything a local encode does (reuse, updates, resume after kill -9, the lock,
several ranks under torchrun) holds as it is. What this adds:

- Each shard the engine finishes is uploaded at once (its writer thread tells `Observer.shard`; an uploader thread
  here puts it), `encode-params.json` before the first shard and the sidecar after its shard. An S3 PUT makes an
  object visible only whole (objstore.put_file; other protocols write a temporary and rename), and the manifest goes
  up last, once every shard it lists is up: a reader that trusts only what a manifest lists never sees a half-written
  folder.
- Nothing is uploaded twice: a ledger beside the staging folder (`uploaded.<rank>.jsonl`, a line [name, bytes,
  sha256] appended per upload) says what this staging folder put in the bucket; an object counts as there when the
  ledger says so at its bytes and sha256 (the sidecar's, for a shard) and the bucket lists it at that size. So a rerun after kill -9 resumes the engine from the staging folder and uploads
  only what is not up yet.
- The staging folder is trusted only while it belongs to the bucket's current manifest (`base.json` holds the
  manifest sha256s it started from or wrote). Otherwise (another machine, a wiped cache, a bucket changed by
  someone else) it is rebuilt from the bucket: the params, the manifest, and the shards and sidecars it lists, each
  checked against the manifest's sha256. The engine then reuses them as a local folder's, so an update re-encodes
  only what changed and uploads only new or changed objects.
- After the new manifest is up, objects the old manifest or the ledger list (ours, by those records) and the new
  manifest does not are deleted; nothing else ever is. A prefix holding objects without `encode-params.json` is
  not a ditpipe shard folder and is refused, as a local encode refuses a foreign folder.
- Credentials come only from the environment (objstore.configure): a URL carrying them is refused without echoing
  them, and none reaches the manifest, the staging folder or a message (they hold names, sizes and sha256s only).

Several ranks share one node's staging folder; each uploads what its own writer finished, rank 0 the rest and the
manifest. A node-local staging folder cannot span nodes, so a remote encode runs on one node (any number of
processes); training from the bucket runs on many.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import shutil
import threading
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit

from ditpipe.pipeline import atomic, lock, objstore, shards
from ditpipe.pipeline import encode as engine
from ditpipe.pipeline.config import Config
from ditpipe.pipeline.errors import ConfigError, DataError, DitpipeError, ShardError
from ditpipe.pipeline.remote import url_join

STAGING = "shards"  # the engine's folder inside the staging root
BASE = "base.json"  # {"manifests": [sha256, ...]}: the bucket manifests the staging folder belongs to
LEDGER = "uploaded.{}.jsonl"  # per rank, a line per object this staging folder put in the bucket: [name, bytes, sha256]


def checked_url(location: str) -> str:
    """The folder URL without a trailing slash; refuses one with credentials in it (never echoing them) or a
    `pipe:` command."""
    parts = urlsplit(location)
    if "@" in parts.netloc:
        shown = f"{parts.scheme}://<credentials>@{parts.netloc.rsplit('@', 1)[1]}{parts.path}"
        raise ConfigError([("shards.path", f"'{shown}' has credentials in the URL: take them out and give them "
                                           "through the environment (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                                           "or AWS_PROFILE), which is the only place ditpipe reads them from")])
    if location.startswith("pipe:") or not parts.scheme or not (parts.netloc or parts.path.strip("/")):
        raise ConfigError([("shards.path", f"'{location}' is not a folder URL an encode can write (s3://bucket/"
                                           "prefix, or another fsspec protocol's)")])
    return location.rstrip("/")


def staging_root(cfg: Config, url: str) -> Path:
    """This node's staging folder for `url`: one per endpoint and URL, under storage.cache_dir."""
    endpoint = cfg.storage.endpoint_url or os.environ.get("AWS_ENDPOINT_URL", "")
    digest = hashlib.sha256(f"{endpoint}\n{url}".encode()).hexdigest()[:16]
    return Path(cfg.storage.cache_dir).expanduser() / "encode" / digest


def encode(cfg: Config, overwrite: bool = False, observer: engine.Observer | None = None) -> dict:
    """Encode what `cfg.data` describes into the folder URL `cfg.shards.path` (see the module's docstring). Returns
    the manifest, as pipeline.encode.encode does."""
    url = checked_url(str(cfg.shards.path))
    objstore.configure(cfg.storage)
    _one_node()
    root = staging_root(cfg, url)
    staging = root / STAGING
    rank, world, barrier = engine.distributed()
    with lock.hold(root, "encode"):
        _on_rank0(lambda: _prepare(url, root, staging), rank, world)
        bucket = _Bucket(url, root, rank)
        remote = _Reporting(observer or engine.Observer(), url, staging, _Uploader(bucket))
        try:
            with _naming(url, staging):
                manifest = engine.encode(cfg.model_copy(update={"shards": cfg.shards.model_copy(
                    update={"path": str(staging)})}), overwrite, remote)
        except BaseException as e:
            remote.uploader.close(raising=False)  # what is finished goes up: a rerun need not upload it
            if isinstance(e, DataError):
                remote.show_summary()  # the skips it lists are the reasons the error points to
            raise
        remote.uploader.close()
        entries = manifest["shards"]
        bucket.put_shards(staging, [e for i, e in enumerate(entries) if i % world == rank])
        barrier()
        if rank == 0:
            _publish(bucket, staging, entries)
        barrier()
    remote.show_summary()
    if rank == 0:
        removed = f", {bucket.removed} removed" if bucket.removed else ""
        remote.inner.note(f"{url}: {len(bucket.sent)} object(s) uploaded, {len(bucket.there - bucket.sent)} already "
                          f"there{removed}; the manifest last")
    return manifest


def _one_node() -> None:
    local, world = os.environ.get("LOCAL_WORLD_SIZE"), os.environ.get("WORLD_SIZE", "1")
    if local is not None and local != world:
        raise ConfigError([("shards.path", f"a URL is encoded on one node (its staging folder is node-local): "
                                           f"{world} processes over several nodes here; run the encode with torchrun "
                                           "--nnodes 1 (any --nproc_per_node), then train on any number of nodes")])


@contextlib.contextmanager
def _naming(url: str, staging: Path):
    """The engine's messages name its folder: say the URL instead (the staging folder is ours, not the user's)."""
    try:
        yield
    except DitpipeError as e:
        text = str(e).replace(str(staging), url)
        if text != str(e):
            e.args = (text,)
        raise


def _on_rank0(fn, rank: int, world: int) -> None:
    """fn() on rank 0 while the others wait; a failure stops every rank with rank 0's message."""
    error = None
    if rank == 0:
        try:
            fn()
        except Exception as e:  # every rank must reach the collective below
            error = e
    if world > 1:
        import torch.distributed as dist

        said = [None if error is None else str(error)]
        dist.broadcast_object_list(said, src=0)
        if error is None and said[0] is not None:
            raise ShardError(said[0])
    if error is not None:
        raise error


# ------------------------------------------------------------------------------------------------ the bucket's state


class _Folder:
    """The folder URL through one filesystem for the whole encode (opening one per object starts a new S3 session:
    ~0.15 s each against the local server, 10× the PUT of a 360 KB shard). Every call is objstore.retrying's."""

    def __init__(self, url: str):
        self.url = url
        self.fs, self.path = objstore.filesystem(url)

    def _retrying(self, what: str, name: str, fn):
        return objstore.retrying(f"{what} '{url_join(self.url, name)}'" if name else f"{what} '{self.url}'", fn)

    def entries(self) -> tuple[dict[str, int], list[str]]:
        """({object name: bytes}, [sub-folder names]) directly under the folder, read fresh."""
        def ls():
            try:
                return self.fs.ls(self.path, detail=True, refresh=True)
            except FileNotFoundError:
                return []
        named = {e["name"].rstrip("/").rsplit("/", 1)[-1]: e for e in self._retrying("listing", "", ls)}
        return ({n: int(e.get("size") or 0) for n, e in named.items() if e.get("type") != "directory"},
                [n for n, e in named.items() if e.get("type") == "directory"])

    def read(self, name: str) -> bytes:
        return self._retrying("downloading", name, lambda: self.fs.cat_file(f"{self.path}/{name}"))

    def get(self, name: str, local: Path) -> None:
        self._retrying("downloading", name, lambda: self.fs.get_file(f"{self.path}/{name}", str(local)))

    def put(self, local: Path, name: str) -> None:
        """Whole: an S3 PUT is listed only once complete; other protocols go through objstore.put_file's rename."""
        if not objstore.whole_put(self.fs):  # a file system's folder must exist first (an object store has none)
            self._retrying("making", "", lambda: self.fs.makedirs(self.path, exist_ok=True))
            objstore.put_file(local, url_join(self.url, name))
            return
        self._retrying("uploading", name, lambda: self.fs.put_file(str(local), f"{self.path}/{name}"))

    def remove(self, name: str) -> None:
        self._retrying("deleting", name, lambda: self.fs.rm_file(f"{self.path}/{name}"))


def _sha(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def _prepare(url: str, root: Path, staging: Path) -> None:
    """Refuse a foreign prefix; keep the staging folder when it belongs to the bucket's manifest, else rebuild it
    from the bucket."""
    folder = _Folder(url)
    objects, folders = folder.entries()
    if (objects or folders) and shards.PARAMS not in objects:
        raise ShardError(f"'{url}' holds objects and is not a ditpipe shard folder (no {shards.PARAMS}); choose "
                         "another --out")
    manifest = folder.read(shards.MANIFEST) if shards.MANIFEST in objects else None
    current = None if manifest is None else _sha(manifest)
    if staging.is_dir() and current in _base(root):
        return  # ours, from this bucket state: the engine resumes it and the ledger says what is up
    _wipe(root)
    staging.mkdir(parents=True)
    uploaded = {}
    if shards.PARAMS in objects:  # so the engine refuses other parameters (or --overwrite replaces them) as locally
        uploaded[shards.PARAMS] = _pull(folder, shards.PARAMS, staging, None)
    if manifest is not None:
        uploaded.update(_pull_folder(folder, staging, manifest))
    _write_ledger(root, uploaded)
    atomic.write_json(root / BASE, {"manifests": [current]})


def _base(root: Path) -> list:
    try:
        return json.loads((root / BASE).read_text())["manifests"]
    except (OSError, ValueError, KeyError, TypeError):
        return []  # none yet: the staging folder is rebuilt from the bucket


def _wipe(root: Path) -> None:
    """Forget the staging folder and its records (ours: made under storage.cache_dir by this module)."""
    for p in [root / BASE, *root.glob(LEDGER.format("*"))]:
        p.unlink(missing_ok=True)
    staging = root / STAGING
    if staging.is_symlink():
        raise ShardError(f"'{staging}' is a link, which ditpipe never makes; remove it and encode again")
    shutil.rmtree(staging, ignore_errors=True)


def _pull(folder: _Folder, name: str, staging: Path, sha: str | None) -> list:
    """Download one object into the staging folder, checked against `sha` when given; its ledger record."""
    with atomic.atomic_path(staging / name) as tmp:
        folder.get(name, tmp)
        got = atomic.sha256_file(tmp)
        if sha is not None and got != sha:
            raise ShardError(f"'{url_join(folder.url, name)}' does not match its manifest's sha256 (changed after the "
                             "manifest was written); restore it, or delete the folder's objects and encode again")
    return [(staging / name).stat().st_size, got]


def _pull_folder(folder: _Folder, staging: Path, manifest: bytes) -> dict[str, list]:
    """The manifest and every shard and sidecar it lists, into the staging folder: what the engine reuses."""
    try:
        entries = json.loads(manifest)["shards"]
    except (ValueError, KeyError, TypeError):
        raise ShardError(f"'{url_join(folder.url, shards.MANIFEST)}' is not a readable manifest; delete the folder's "
                         "objects (or choose another --out) and encode again") from None
    done = {}
    for e in entries:
        done[e["sidecar"]] = _pull(folder, e["sidecar"], staging, e["sidecar_sha256"])
        done[e["name"]] = _pull(folder, e["name"], staging, e["sha256"])
    atomic.write_bytes(staging / shards.MANIFEST, manifest)
    done[shards.MANIFEST] = [len(manifest), _sha(manifest)]
    return done


# ------------------------------------------------------------------------------------------------------- uploading


class _Bucket:
    """This rank's uploads, recorded in its ledger; an object already there (by the ledgers and the listing) is
    not uploaded again."""

    def __init__(self, url: str, root: Path, rank: int):
        self.url, self.root, self.rank = url, root, rank
        self.folder = _Folder(url)
        self.sent: set[str] = set()  # uploaded by this run
        self.there: set[str] = set()  # found already there
        self.removed = 0
        self.refresh()

    def refresh(self) -> None:
        self.listing = self.folder.entries()[0]
        self.known = _ledgers(self.root)

    def put(self, local: Path, sha: str) -> None:
        name, size = local.name, local.stat().st_size
        if self.known.get(name) == [size, sha] and self.listing.get(name) == size:
            self.there.add(name)
            return
        self.folder.put(local, name)
        self.known[name] = [size, sha]
        self.listing[name] = size
        with open(self.root / LEDGER.format(self.rank), "a") as f:  # appended: O(1) a shard, whatever the count
            f.write("\n" + json.dumps([name, size, sha]))  # first a newline: a line a kill tore stays apart
        self.sent.add(name)

    def put_shard(self, path: Path) -> None:
        """The params first (a half-uploaded folder already refuses other parameters), the shard, then its
        sidecar, whose sha256 of the shard is what the shard is checked against."""
        params = path.parent / shards.PARAMS
        self.put(params, atomic.sha256_file(params))
        sidecar = path.with_name(shards.sidecar_name(path.name))
        blob = sidecar.read_bytes()
        self.put(path, json.loads(blob)["sha256"])
        self.put(sidecar, _sha(blob))

    def put_shards(self, staging: Path, entries: list[dict]) -> None:
        for e in entries:
            self.put_shard(staging / e["name"])


def _ledgers(root: Path) -> dict[str, list]:
    """What every rank's ledger says this staging folder uploaded."""
    known: dict[str, list] = {}
    for path in sorted(root.glob(LEDGER.format("*"))):
        with contextlib.suppress(OSError):
            for line in path.read_text().splitlines():
                with contextlib.suppress(ValueError, TypeError):  # the torn last line of a kill -9
                    name, size, sha = json.loads(line)
                    known[name] = [size, sha]
    return known


def _write_ledger(root: Path, known: dict[str, list]) -> None:
    """Replace every rank's ledger by one holding `known` (written whole, then the others go)."""
    atomic.write_bytes(root / LEDGER.format(0), "".join(json.dumps([n, *v]) + "\n" for n, v in known.items()).encode())
    for path in root.glob(LEDGER.format("*")):
        if path.name != LEDGER.format(0):
            path.unlink()


def _publish(bucket: _Bucket, staging: Path, entries: list[dict]) -> None:
    """Rank 0, after every rank's uploads: whatever is still missing, the manifest last, then the objects that were
    ours (the old manifest's, or the ledgers') and the new manifest does not list."""
    bucket.refresh()
    bucket.put_shards(staging, entries)
    blob = (staging / shards.MANIFEST).read_bytes()
    old = bucket.folder.read(shards.MANIFEST) if shards.MANIFEST in bucket.listing else None
    ours = set(bucket.known)
    if old is not None:
        with contextlib.suppress(ValueError, KeyError, TypeError):
            ours |= {n for e in json.loads(old)["shards"] for n in (e["name"], e["sidecar"])}
    base = [None if old is None else _sha(old), _sha(blob)]
    atomic.write_json(bucket.root / BASE, {"manifests": base})  # a kill after the manifest's upload still resumes
    if old != blob:
        bucket.put(staging / shards.MANIFEST, _sha(blob))
    else:
        bucket.there.add(shards.MANIFEST)
    keep = {n for e in entries for n in (e["name"], e["sidecar"])} | {shards.PARAMS, shards.MANIFEST}
    for name in sorted((ours - keep) & set(bucket.listing)):
        bucket.folder.remove(name)
        bucket.removed += 1
    _write_ledger(bucket.root, {n: v for n, v in bucket.known.items() if n in keep})
    atomic.write_json(bucket.root / BASE, {"manifests": [_sha(blob)]})


class _Uploader:
    """A thread that uploads each shard the engine's writer finishes, so the encode goes on meanwhile; its error
    surfaces at the next shard or at `close`."""

    def __init__(self, bucket: _Bucket):
        self.bucket = bucket
        self._queue: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="ditpipe-uploader", daemon=True)
        self._thread.start()

    def put(self, path: Path) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(path)

    def close(self, raising: bool = True) -> None:
        """Wait for what was handed over; raise the thread's error, if any (and `raising`)."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        if self._error is not None and raising:
            raise self._error

    def _run(self) -> None:
        while (path := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self.bucket.put_shard(path)
                except BaseException as e:  # raised in the encode's thread (the writer's, at its next shard)
                    self._error = e


class _UrlPath(str):
    """The URL where the summary shows the folder (`folder / name` works on it, as on a Path)."""

    def __truediv__(self, name: str) -> "_UrlPath":
        return _UrlPath(url_join(self, name))


class _Reporting(engine.Observer):
    """The caller's observer, told about the URL rather than the staging folder, with each finished shard handed
    to the uploader; the summary waits until the uploads are done."""

    def __init__(self, inner: engine.Observer, url: str, staging: Path, uploader: _Uploader):
        self.inner, self.url, self.staging, self.uploader = inner, url, str(staging), uploader
        self.run: engine.Run | None = None

    def note(self, text: str) -> None:
        self.inner.note(text.replace(self.staging, self.url))

    def downloading(self):
        return self.inner.downloading()

    def encoding(self, description: str, total: int, shown: bool):
        return self.inner.encoding(description.replace(self.staging, self.url), total, shown)

    def batch(self, n: int) -> None:
        self.inner.batch(n)

    def shard(self, path: Path) -> None:
        self.uploader.put(path)

    def summary(self, run: engine.Run) -> None:
        self.run = replace(run, out=_UrlPath(self.url))

    def show_summary(self) -> None:
        if self.run is not None:
            self.inner.summary(self.run)
            self.run = None
