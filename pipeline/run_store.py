"""A run folder in object storage (`logging.output_dir: s3://bucket/prefix`): staged node-locally, published at
checkpoints, fetched back on resume.

    s3://bucket/prefix/<run>/            the run folder, laid out as a local one (pipeline/checkpoint.py)
        config.yaml  metrics.jsonl       published at every checkpoint (best effort)
        checkpoint-8/<files>             every file its training_state.json lists, then training_state.json
        latest                           the name of the newest complete checkpoint: always written last
        phema/<snapshot>.safetensors     post-hoc EMA snapshots, each uploaded whole once (never deleted)
    <storage.cache_dir>/runs/<digest>/<run>/   the node-local staging folder (digest: of the output_dir URL)

Training writes, checks and retains checkpoints in the staging folder exactly as in a local run folder
(`checkpoint.save`, `link`, `prune`); rank 0 then uploads the new checkpoint (whole objects, its
training_state.json last among its files) and only then `latest`, so a reader who follows `latest` never finds a
partial checkpoint. Retention deletes a pruned checkpoint's objects from the bucket, only those our own
training_state.json (in the bucket) lists, the state first, so what is left of a half-deleted one never validates.

Several nodes: each node stages into its own cache_dir, so a rank cannot write its `rng-rank{r}.pt` where rank 0
hashes. For a staged run, every rank serializes its own files into memory and the process group gathers them to
rank 0 (`gathered_writers`; a few KiB each), which writes the complete checkpoint on its node. On resume, one process
per node (a flock in the cache) downloads the `latest` checkpoint into its node's staging folder, validated
(`checkpoint.validate`: every listed file's size and sha256) before it is renamed into place; the other processes of
the node wait for it and use the same copy.

    is_remote(output_dir)                      whether logging.output_dir is object storage (other URLs refused)
    staging_dir(cache_dir, output_url, name)   the staging folder of the run `output_url/name`
    RemoteRun.of(cfg, run_dir)                 the run's bucket side, or None for a local run
    RemoteRun.from_url(url, cache_dir)         (the run, the checkpoint name the URL names or None) of a URL
    run.latest()                               the name `latest` holds in the bucket, or None
    run.publish(name, also, logs)              upload a checkpoint (and its second name `also`), then `latest`
    run.publish_snapshots()                    upload the post-hoc EMA snapshots the bucket lacks
    run.remove(names)                          delete pruned checkpoints' objects (ours only)
    run.fetch(name)                            the checkpoint, downloaded and validated into the staging folder
    run.set_aside_unpublished()                a staging folder whose checkpoints never reached the bucket, moved
    run.refuse_published()                     a new run refuses a run folder the bucket already holds
    gathered_writers(group, writers, main)     rank 0's writers for every rank's files
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable

from ditpipe.pipeline import atomic, checkpoint, objstore
from ditpipe.pipeline.errors import ConfigError, DitpipeError, ShardError
from ditpipe.pipeline.phema import SNAPSHOT_DIR
from ditpipe.pipeline.ranks import Group
from ditpipe.pipeline.remote import is_url, url_join

METRICS = "metrics.jsonl"  # as pipeline/metrics.py writes it
# Object stores whose PUT makes an object visible only once whole: a run folder may live there (file:// and the
# others would need a rename per object; a local or shared folder is the same thing, without the URL)
WHOLE_PUT_PROTOCOLS = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss")
MAX_STATE_BYTES = 16 << 20  # a training_state.json read from the bucket (hostile input): never more than this


def staging_dir(cache_dir: str | Path, output_url: str, name: str) -> Path:
    """<cache_dir>/runs/<16 hex digits of the output_dir URL>/<name>: one folder per run and node."""
    digest = hashlib.sha256(output_url.rstrip("/").encode()).hexdigest()[:16]
    return Path(cache_dir).expanduser() / "runs" / digest / name


def is_remote(output_dir) -> bool:
    """Whether logging.output_dir names object storage rather than a (local or shared) folder; a URL of another
    protocol is refused, naming the key."""
    if not is_url(output_dir):
        return False
    if str(output_dir).split("://", 1)[0].lower() not in WHOLE_PUT_PROTOCOLS or "::" in str(output_dir):
        raise ConfigError([("logging.output_dir", f"{output_dir!r}: a run folder lives in a local or shared folder, "
                                                  "or in object storage (s3://, gs://, az://)")])
    return True


def split_url(url: str) -> tuple[str, str]:
    """(parent URL, last component) of `s3://bucket/prefix/run`."""
    parent, _, name = url.rstrip("/").rpartition("/")
    if not name or "://" not in parent:
        raise DitpipeError(f"'{url}' names no run folder; give s3://BUCKET/PREFIX/RUN")
    return parent, name


@dataclass(frozen=True)
class RemoteRun:
    url: str  # the run folder in the bucket
    local: Path  # this node's staging folder

    @cached_property
    def _fs(self):
        """One filesystem for the run's many small requests (a fresh one costs a client set-up, ~0.25 s)."""
        return objstore.filesystem(self.url)[0]

    def _path(self, *parts: str) -> str:
        return self._url(*parts).split("://", 1)[1]

    @classmethod
    def of(cls, cfg, run_dir: Path) -> "RemoteRun | None":
        """The bucket side of the run `cfg` staged in `run_dir`; None when logging.output_dir is a folder."""
        out = cfg.logging.output_dir
        if not is_remote(out):
            return None
        if cfg.training.parallel == "fsdp":  # its shards are written by a collective into one folder on every rank
            raise ConfigError([("logging.output_dir", f"{out!r}: training.parallel fsdp writes its checkpoints from "
                                                      "every rank into one folder; use a folder every node sees "
                                                      "(a shared file system) for fsdp runs")])
        return cls(url_join(out, Path(run_dir).name), Path(run_dir))

    @classmethod
    def from_url(cls, url: str, cache_dir: str | Path) -> tuple["RemoteRun", str | None]:
        """(the run, the checkpoint name) of `s3://…/run` (None: its `latest`) or `s3://…/run/checkpoint-N`."""
        parent, name = split_url(url)
        ckpt = None
        if checkpoint.is_checkpoint_name(name):
            (parent, name), ckpt = split_url(parent), name
        return cls(url_join(parent, name), staging_dir(cache_dir, parent, name)), ckpt

    @property
    def output_dir(self) -> str:
        return split_url(self.url)[0]

    def _url(self, *parts: str) -> str:
        return "/".join([self.url.rstrip("/"), *parts])

    def _read(self, *parts: str, limit: int = MAX_STATE_BYTES) -> bytes | None:
        """An object's bytes, or None when it does not exist."""
        url, fs, path = self._url(*parts), self._fs, self._path(*parts)

        def cat():
            try:
                with fs.open(path, "rb") as f:
                    return f.read(limit + 1)
            except FileNotFoundError:
                return None
        data = objstore.retrying(f"reading '{url}'", cat)
        if data is not None and len(data) > limit:
            raise ShardError(f"'{url}' is larger than {limit} bytes; it is not a ditpipe run file")
        return data

    # ------------------------------------------------------------------------------------------------ reading

    def latest(self) -> str | None:
        """The checkpoint name `latest` holds in the bucket; None when the run published none."""
        data = self._read(checkpoint.LATEST, limit=4096)
        if data is None:
            return None
        name = data.decode(errors="replace").strip()
        if not checkpoint.is_checkpoint_name(name):
            raise checkpoint.CheckpointError(f"'{self._url(checkpoint.LATEST)}' holds {name[:60]!r}, not a checkpoint "
                                             "name; it is damaged or not ditpipe's")
        return name

    def fetch(self, name: str | None = None) -> Path:
        """Checkpoint `name` (default: the one `latest` names) in this node's staging folder: a valid copy already
        there of the bucket's own state is used as it is, anything else downloaded whole and validated (sizes and
        sha256) before it is renamed into place. One process per node downloads (a flock), the others wait. The
        run's metrics.jsonl and config.yaml come with it, so the resumed run's logs continue the bucket's. Following
        `latest` while the run still publishes, the checkpoint it named may be pruned under the download: then the
        new `latest` is fetched instead."""
        if name is not None:
            return self._fetch(name)
        for _ in range(3):
            name = self.latest()
            if name is None:
                raise DitpipeError(f"'{self.url}' has no '{checkpoint.LATEST}' pointer: no checkpoint was published "
                                   "there (start the run with `ditpipe train`)")
            try:
                return self._fetch(name)
            except checkpoint.CheckpointError:
                if self.latest() == name:  # not a race with retention: the checkpoint is damaged
                    raise
        raise checkpoint.CheckpointError(f"'{self._url(checkpoint.LATEST)}' kept moving while its checkpoint was "
                                         "fetched; resume once the run that publishes there has stopped")

    def _fetch(self, name: str) -> Path:
        state_bytes = self._read(name, checkpoint.STATE)
        if state_bytes is None:
            raise checkpoint.CheckpointError(f"'{self._url(name)}' has no {checkpoint.STATE}; it is incomplete or "
                                             "not a ditpipe checkpoint")
        self.local.mkdir(parents=True, exist_ok=True)
        with self._node_lock():
            final = self.local / name
            if self._same_valid_copy(final, state_bytes):
                return final
            tmp = self.local / f".{name}.fetch{atomic.TMP_SUFFIX}"  # a `.checkpoint-*.tmp`: clean_temporaries' own
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            try:
                (tmp / checkpoint.STATE).write_bytes(state_bytes)
                state = checkpoint.read_state(tmp)
                for fname in state["files"]:
                    if Path(fname).name != fname or fname in ("", ".", "..", checkpoint.STATE):
                        raise checkpoint.CheckpointError(f"'{self._url(name, checkpoint.STATE)}' lists {fname!r}, "
                                                         "which is not a file name in the checkpoint")
                    self._get(tmp / fname, name, fname)
                checkpoint.validate(tmp)
            except (checkpoint.CheckpointError, ShardError) as e:
                shutil.rmtree(tmp, ignore_errors=True)
                raise checkpoint.CheckpointError(f"cannot resume from '{self._url(name)}': {e}") from None
            if final.exists():  # a stale or damaged copy of ours (the staging folder is a cache of the bucket)
                stale = self.local / f".{name}.stale{atomic.TMP_SUFFIX}"
                shutil.rmtree(stale, ignore_errors=True)
                os.replace(final, stale)
                shutil.rmtree(stale)
            os.replace(tmp, final)
            atomic.fsync_dir(self.local)
            atomic.write_bytes(self.local / checkpoint.LATEST, (name + "\n").encode())
            for extra in (METRICS, checkpoint.CONFIG):  # the bucket's copies: consistent with its `latest`
                data = self._read(extra, limit=1 << 30)
                if data is not None:
                    atomic.write_bytes(self.local / extra, data)
        return final

    def _same_valid_copy(self, folder: Path, state_bytes: bytes) -> bool:
        if not (folder / checkpoint.STATE).is_file() or (folder / checkpoint.STATE).read_bytes() != state_bytes:
            return False
        try:
            checkpoint.validate(folder)
            return True
        except checkpoint.CheckpointError:
            return False

    @contextlib.contextmanager
    def _node_lock(self):
        """One downloader per node: a blocking flock beside the staging folder (not in it: the run folder holds
        only what a run writes)."""
        path = self.local.parent / f".{self.local.name}.fetch.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # ------------------------------------------------------------------------------------------------ writing

    def publish(self, name: str, also: str | None = None, logs: bool = True) -> None:
        """Upload checkpoint `name` from the staging folder (and `also`, its second name), then `latest` last; then
        the post-hoc EMA snapshots the bucket lacks (written before this checkpoint: a node lost later loses none),
        config.yaml and metrics.jsonl (`logs`; best effort: a failure there loses no checkpoint)."""
        for folder in [name] + ([also] if also else []):
            self._upload_checkpoint(folder)
        latest = self.local / checkpoint.LATEST
        if latest.is_file():
            self._put(latest.read_bytes(), checkpoint.LATEST)
        self.publish_snapshots()
        if logs:
            self.publish_logs()

    def publish_snapshots(self) -> list[str]:
        """Upload the staged post-hoc EMA snapshots (phema/, training.posthoc_ema) that the bucket does not hold at
        their size, each whole; temporaries are skipped. Snapshots are never pruned, so none is ever deleted here.
        Returns the names uploaded. `ditpipe ema` reads a local run folder: copy phema/ and a checkpoint down."""
        folder = self.local / SNAPSHOT_DIR
        if folder.is_symlink() or not folder.is_dir():
            return []
        staged = {p.name: p.stat().st_size for p in sorted(folder.glob("*.safetensors"))
                  if p.is_file() and not p.is_symlink() and not p.name.startswith(".")
                  and not p.name.endswith(atomic.TMP_SUFFIX)}
        if not staged:
            return []
        held = objstore.listing(self._url(SNAPSHOT_DIR))
        sent = [n for n, size in staged.items() if held.get(n) != size]
        for n in sent:
            self._put(folder / n, SNAPSHOT_DIR, n)
        return sent

    def publish_logs(self) -> None:
        for extra in (checkpoint.CONFIG, METRICS):
            path = self.local / extra
            if path.is_file():
                with contextlib.suppress(ShardError, OSError):
                    self._put(path, extra)

    def _upload_checkpoint(self, name: str) -> None:
        """Every file checkpoint `name`'s training_state.json lists, whole, then the state itself; skipped when
        the bucket already holds this very state (a restart that kept a checkpoint)."""
        folder = self.local / name
        state_bytes = (folder / checkpoint.STATE).read_bytes()
        if self._read(name, checkpoint.STATE) == state_bytes:
            return
        for fname in sorted(checkpoint.read_state(folder)["files"]):
            self._put(folder / fname, name, fname)
        self._put(state_bytes, name, checkpoint.STATE)

    def remove(self, names: list[str]) -> list[str]:
        """Delete the bucket's objects of the checkpoints `names` (retention pruned their staged copies): only
        checkpoints whose training_state.json in the bucket says ditpipe wrote them, only the files it lists, the
        state first. Never the checkpoint `latest` names. Returns the names removed."""
        keep, removed = self.latest(), []
        for name in names:
            if name == keep or not checkpoint.is_checkpoint_name(name):
                continue
            data = self._read(name, checkpoint.STATE)
            try:
                state = json.loads(data) if data is not None else None
                files = [f for f in state["files"] if Path(f).name == f and f not in ("", ".", "..")]
                ours = str(state["written_by"]).startswith("ditpipe")
            except (ValueError, TypeError, KeyError):
                continue  # not a state of ours: nothing of it is deleted
            if not ours:
                continue
            self._remove(name, checkpoint.STATE)
            for fname in files:
                with contextlib.suppress(ShardError):  # already gone (a delete interrupted before)
                    self._remove(name, fname)
            removed.append(name)
        return removed

    def _put(self, source: Path | bytes, *parts: str) -> None:
        """A whole-object PUT (WHOLE_PUT_PROTOCOLS): readers see the object only once complete."""
        fs, path = self._fs, self._path(*parts)
        put = (lambda: fs.pipe_file(path, source)) if isinstance(source, bytes) else \
            (lambda: fs.put_file(str(source), path))
        objstore.retrying(f"uploading '{self._url(*parts)}'", put)

    def _get(self, local: Path, *parts: str) -> None:
        fs, path = self._fs, self._path(*parts)
        objstore.retrying(f"downloading '{self._url(*parts)}'", lambda: fs.get_file(path, str(local)))

    def _remove(self, *parts: str) -> None:
        fs, path = self._fs, self._path(*parts)
        objstore.retrying(f"deleting '{self._url(*parts)}'", lambda: fs.rm_file(path))

    def unpublished(self) -> bool:
        """Whether this node's staging folder holds checkpoints while the bucket has no `latest`: a run killed
        before it published its first checkpoint."""
        return bool(checkpoint.list_checkpoints(self.local)) and self.latest() is None

    def set_aside_unpublished(self) -> Path | None:
        """Rename a staging folder with unpublished checkpoints to `<run>.unpublished[-N]` (kept, never deleted),
        so the run starts again; returns the new name, or None when there was nothing to move."""
        if not self.unpublished():
            return None
        aside, n = self.local.with_name(f"{self.local.name}.unpublished"), 1
        while aside.exists():
            n += 1
            aside = self.local.with_name(f"{self.local.name}.unpublished-{n}")
        os.replace(self.local, aside)
        return aside

    def refuse_published(self) -> None:
        """A new run must not overwrite a run the bucket already holds."""
        if self.latest() is not None:
            raise DitpipeError(f"run folder '{self.url}' already holds checkpoints. Continue it with "
                               f"`ditpipe resume {self.url}` (or `ditpipe train ... --resume auto`), or start a new "
                               "run with --logging.run_name NAME")


def gathered_writers(group: Group, writers: dict[str, Callable[[Path], None]], main: bool) -> dict:
    """`writers` for `checkpoint.save` when the ranks do not share one folder (nodes staging apart): every other
    rank writes its files into memory and the group gathers them, so rank 0 writes the complete checkpoint and
    the others none. A failure on a rank becomes a writer on rank 0 that raises it, so `save` stops every rank
    with the one message."""
    mine: dict[str, bytes | str] = {}
    if not main:
        with tempfile.TemporaryDirectory(prefix="ditpipe-rank-files-") as d:
            for fname, write in writers.items():
                try:
                    write(Path(d) / fname)
                    mine[fname] = (Path(d) / fname).read_bytes()
                except Exception as e:  # noqa: BLE001 (as checkpoint.save: whatever stops a write)
                    mine[fname] = f"{type(e).__name__}: {str(e)[:300]}"
    everyone = group.gather(mine)
    if not main:
        return {}
    out = dict(writers)
    for files in everyone:
        for fname, data in files.items():
            out[fname] = _writer(fname, data)
    return out


def _writer(fname: str, data: bytes | str) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        if isinstance(data, str):
            raise OSError(f"{fname}: {data}")
        with open(path, "xb") as f:
            f.write(data)
    return write
