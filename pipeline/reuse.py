"""What a shard folder already holds, reused: the encode that updates itself when the images change.

Every sidecar records, for each input of its range, `[file, sha256 of its bytes, pixel count]` (`sources`) and a digest
of the source-derived sample metadata (`listing_sha256`: keys, files, labels, captions). Beside it, `<shard>.stat.json`
caches each file's size, mtime, ctime, inode and device from when it was hashed, as git's index does (only a
cache: never part of the manifest's checksums; `sources.stat_key`).

A rerun of `ditpipe encode`:
  1. stats every input and hashes only the files whose size, mtime, ctime, inode or device moved since they were
     hashed, or whose mtime was then too recent to trust (mtime ticks are coarse: the "racy" window git knows
     too). A file rewritten to its old size with its mtime put back (`cp -p`, an archive, a fixed-size
     format) still moved its ctime, which only root can set; an entry of an older cache, without ctime, inode and
     device, matches nothing (hashed once again, never trusted);
  2. looks each input's (file, sha256) up among the complete shards of the folder and of `.reuse/`;
  3. keeps a shard whose inputs, outcomes and metadata are all unchanged, and rewrites any other from the latents it
     can reuse, from whichever shard holds them (an added image shifts every later one by a slot), plus the inputs
     it must encode: changed or added files, and skips that a raised budget may now admit.
Generated inputs (`shapes`) are named by (seed, index) and never change.

Before a shard that other shards may draw on is replaced, it is hard-linked into `.reuse/` (named by its sidecar's
sha256), and `.reuse/` is removed only after the manifest is written. So every rank of a multi-rank encode, and a
rerun after a kill, plans from the same donors: the result does not depend on how the work was split or interrupted.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ditpipe.pipeline import atomic, formats, shards
from ditpipe.pipeline.manifest import Manifest
from ditpipe.pipeline.sources import FILE_CAP_REASON, PIXEL_BUDGET_REASON, Source, over_budget

RACY_NS = 2_000_000_000  # a file hashed less than this after its mtime could change again within the same tick
BUDGET_REASONS = (PIXEL_BUDGET_REASON, FILE_CAP_REASON)  # skips a changed data.max_pixels / max_file_bytes can lift


@dataclass(eq=False)
class Donor:
    """A complete shard (sidecar present) whose samples may be reused."""

    path: Path  # the shard file: in the folder, or in .reuse/
    sidecar: dict
    sidecar_sha: str
    position: int | None  # the shard index it sits at in the folder; None when it is only in .reuse/
    records: list = field(default_factory=list)  # [file, sha256, pixels] per input (from its JSON before `sources`)
    _valid: bool | None = None

    def valid(self) -> bool:
        """Its size and sha256 are what its sidecar records (hashed once, when first asked)."""
        if self._valid is None:
            try:
                self._valid = (self.path.stat().st_size == self.sidecar["bytes"]
                               and atomic.sha256_file(self.path) == self.sidecar["sha256"])
            except (OSError, KeyError, TypeError):
                self._valid = False
        return self._valid

    def reuse_path(self, out: Path) -> Path:
        """Where its bytes live under .reuse/ (linked there before the shard is replaced)."""
        return out / shards.REUSE_DIR / f"{self.sidecar_sha}{self.path.suffix}"

    def readable_path(self, out: Path) -> Path:
        """The .reuse/ link when there is one (the folder's file may since have been replaced), else the file."""
        linked = self.reuse_path(out)
        return linked if linked.is_file() else self.path


@dataclass(frozen=True)
class Held:
    """One input as a donor holds it: its record, and where its sample is (or why it was skipped)."""

    donor: Donor
    offset: int  # within the donor's input range
    sample: int | None  # position among the donor's samples; None when it was skipped
    reason: str | None
    record: list  # [file, sha256, pixels]


@dataclass
class Entry:
    """What a shard does with one of its inputs."""

    index: int
    action: str  # "reuse" | "encode" | "skip"
    record: list | None  # [file, sha256, pixels] as the sidecar records it; None until an encode says
    held: Held | None = None
    reason: str | None = None
    stat: tuple[int, ...] | None = None  # sources.stat_key: (size, mtime_ns, checked_ns, ctime_ns, ino, dev)


@dataclass
class ShardPlan:
    index: int
    name: str
    start: int
    stop: int
    metas: list[dict]  # source.sample_meta of each input
    entries: list[Entry]
    listing: str
    kept: bool  # the shard in the folder is already exactly this
    bucket: int | None = None  # its aspect-ratio bucket (pipeline/buckets.py); None: square

    def to_encode(self) -> list[int]:
        return [e.index for e in self.entries if e.action == "encode"]


def _sha(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


class Pool:
    """The complete shards of a folder and of its .reuse/, indexed by the inputs they hold, and its stat cache."""

    def __init__(self, out: Path, header: dict, fmt: str):
        self.out, self.header, self.fmt = Path(out), header, fmt
        self.at: dict[int, Donor] = {}
        self.held: dict[tuple[str, str | None], list[Held]] = {}  # (file, sha256) → copies; (file, None) → any sha
        self.stats: dict[str, list[list]] = {}
        self.hashed = 0  # files hashed by `fingerprints`
        in_folder: dict[str, Donor] = {}
        ext = formats.get(fmt).SUFFIX
        for folder in (self.out, self.out / shards.REUSE_DIR):
            for side_path in sorted(folder.glob("*.meta.json")) if folder.is_dir() else ():
                try:
                    blob = side_path.read_bytes()
                    side = json.loads(blob)
                    name = side["shard"] if folder == self.out else side_path.name.replace(".meta.json", ext)
                    if side.get("format") != fmt or (folder == self.out and shards.sidecar_name(name) != side_path.name):
                        continue
                    start, stop = side["inputs"]
                except (OSError, ValueError, KeyError, TypeError):
                    continue  # not a sidecar of ours, or a damaged one: nothing to reuse
                sha = _sha(blob)
                same = in_folder.get(sha)
                if same is not None and _same_file(same.path, folder / name):
                    continue  # the .reuse/ link of a shard still in place: one donor
                donor = Donor(folder / name, side, sha, shards.shard_index(name) if folder == self.out else None)
                if donor.position is not None:
                    self.at[donor.position] = in_folder[sha] = donor
                self._index(donor, start, stop)
        for stat_path in self.out.glob("*.stat.json"):
            try:
                for file, entry in json.loads(stat_path.read_text()).items():
                    self.stats.setdefault(file, []).append(entry)
            except (OSError, ValueError, AttributeError):
                continue

    def _index(self, donor: Donor, start: int, stop: int) -> None:
        records = donor.records = donor.sidecar.get("sources") or self._legacy_records(donor, start, stop)
        skipped = {s["index"] - start: s["reason"] for s in donor.sidecar.get("skipped", [])}
        sample = 0
        for offset, record in enumerate(records[: stop - start]):
            reason = skipped.get(offset)
            held = Held(donor, offset, None if reason else sample, reason, list(record))
            sample += reason is None
            if record[0] is not None:
                self.held.setdefault((record[0], None), []).append(held)
                if record[1] is not None:
                    self.held.setdefault((record[0], record[1]), []).append(held)

    def _legacy_records(self, donor: Donor, start: int, stop: int) -> list[list]:
        """A sidecar from before `sources`: the records its samples' JSON carries (skips are not reusable)."""
        records = [[None, None, None] for _ in range(stop - start)]
        try:
            for s in shards.iter_shard(donor.path.parent, donor.path.name, {**self.header, "format": self.fmt},
                                       donor.sidecar):
                records[s.meta["index"] - start] = [s.meta["file"], s.meta.get("sha256"), None]
        except Exception:  # a damaged old shard: nothing to reuse from it
            return []
        return records

    def lookup(self, file: str, sha: str | None, position: int) -> Held | None:
        """A valid donor's copy of (file, sha256) (any sha for None): the shard at `position` first, then by place."""
        copies = sorted(self.held.get((file, sha), ()), key=lambda h: (h.donor.position != position,
                                                                      h.donor.position is None,
                                                                      h.donor.position or 0, h.donor.sidecar_sha))
        return next((h for h in copies if h.donor.valid()), None)

    def cached_sha(self, file: str, stat: tuple) -> str | None:
        """The cached sha256 of `file` when an entry has its size, mtime, ctime, inode and device (`stat`, a
        `sources.stat_key`), and was hashed past the racy window of its mtime (as git: a file changed again since
        moved its ctime too, unless within the same tick of the kernel's clock, a few ms)."""
        key = _stat_key(stat)
        shas = {e[2] for e in self.stats.get(file, ()) if key is not None and _cache_key(e) == key
                and e[1] + RACY_NS < e[3]}
        return shas.pop() if len(shas) == 1 else None

    def fingerprints(self, source: Source, indices: list[int], threads: int) -> dict[int, tuple]:
        """index → (stat, sha256) for inputs with a file: the sha from the stat cache where the stat key matches,
        hashed where they moved (only for files some donor holds: a new file is hashed when it is encoded)."""
        out, todo = {}, []
        for g in indices:
            stat = source.stat(g)
            if stat is None:
                continue
            file = source.items[g].file
            sha = self.cached_sha(file, stat)
            out[g] = (stat, sha)
            if sha is None and (file, None) in self.held and stat[0] <= source.max_file_bytes:
                todo.append(g)
        with ThreadPoolExecutor(max(1, threads)) as pool:  # hashlib releases the GIL
            for g, sha in zip(todo, pool.map(source.file_sha256, todo)):
                out[g] = (out[g][0], sha)
        self.hashed += len(todo)
        return out


def plan_shard(pool: Pool, source: Source, i: int, span: tuple[int, int, int | None], fmt: str,
               fps: dict[int, tuple]) -> ShardPlan:
    """Shard i's plan for its `span` (start, stop, bucket) of the input list (Source.spans)."""
    start, stop, bucket = span
    metas = [source.sample_meta(g) for g in range(start, stop)]
    entries = [_plan_input(pool, source, g, i, metas[g - start]["file"], fps.get(g)) for g in range(start, stop)]
    plan = ShardPlan(i, shards.shard_name(fmt, i), start, stop, metas, entries, shards.listing_sha256(metas), False,
                     bucket)
    here = pool.at.get(i)
    plan.kept = here is not None and here.valid() and _unchanged(here, plan)
    return plan


def _plan_input(pool: Pool, source: Source, g: int, position: int, file: str, fp: tuple | None) -> Entry:
    item = source.items[g]
    if item.problem:  # known from the listing alone
        return Entry(g, "skip", [file, None, None], reason=item.problem)
    if item.file is None:  # generated: its name says what it is
        held = pool.lookup(file, None, position)
        return Entry(g, "reuse", held.record, held) if held and held.sample is not None else Entry(g, "encode", None)
    if fp is None:  # unreadable now: the decode will say why
        return Entry(g, "encode", None)
    stat, sha = fp
    if reason := over_budget(stat[0], None, source.max_pixels, source.max_file_bytes):
        return Entry(g, "skip", [file, None, None], reason=reason, stat=stat)
    held = pool.lookup(file, sha, position) if sha else None
    if held is None:
        return Entry(g, "encode", None, stat=stat)
    if reason := over_budget(None, held.record[2], source.max_pixels, source.max_file_bytes):
        return Entry(g, "skip", [file, sha, held.record[2]], reason=reason, stat=stat)
    if held.sample is None and held.reason.startswith(BUDGET_REASONS):  # the budget that refused it was raised
        return Entry(g, "encode", None, stat=stat)
    if held.sample is None:  # the same bytes fail the same way: skipped again without decoding
        return Entry(g, "skip", held.record, held, held.reason, stat)
    return Entry(g, "reuse", held.record, held, stat=stat)


def _unchanged(here: Donor, plan: ShardPlan) -> bool:
    """The shard at the plan's place already holds exactly what the plan would write."""
    side = here.sidecar
    if side.get("inputs") != [plan.start, plan.stop] or side.get("listing_sha256") != plan.listing:
        return False
    if side.get("bucket") != plan.bucket:
        return False
    if side.get("sources") != [e.record for e in plan.entries]:
        return False
    reasons = {s["index"]: s["reason"] for s in side.get("skipped", [])}
    for e in plan.entries:
        if e.action == "encode" or reasons.get(e.index) != e.reason:
            return False
        if e.action == "reuse" and (e.held.donor is not here or e.held.offset != e.index - plan.start):
            return False
    return True


def stat_cache(entries: list[Entry]) -> dict[str, list]:
    """The stat-cache file of a shard: {file: [size, mtime_ns, sha256, checked_ns, ctime_ns, ino, dev]} of its
    hashed inputs."""
    return {e.record[0]: [*e.stat[:2], e.record[1], *e.stat[2:6]] for e in entries
            if e.stat is not None and len(e.stat) == 6 and e.record is not None and e.record[1] is not None}


def _stat_key(stat: tuple) -> tuple | None:
    """(size, mtime_ns, ctime_ns, ino, dev) of a `sources.stat_key`."""
    return (stat[0], stat[1], *stat[3:6]) if len(stat) == 6 else None


def _cache_key(entry) -> tuple | None:
    """(size, mtime_ns, ctime_ns, ino, dev) of a stat-cache entry; None for an entry of an older cache (size and
    mtime only) or a damaged one: it matches nothing, so its file is hashed again."""
    if not (isinstance(entry, list) and len(entry) == 7 and all(type(v) is int for v in entry[:2] + entry[3:])):
        return None
    return (entry[0], entry[1], *entry[4:7])


def write_stat_cache(out: Path, name: str, entries: list[Entry]) -> None:
    cache = stat_cache(entries)
    path = out / shards.stat_name(name)
    if cache:
        atomic.write_bytes(path, (json.dumps(cache, sort_keys=True) + "\n").encode())
    else:
        path.unlink(missing_ok=True)


def stat_cache_stale(out: Path, plan: ShardPlan) -> bool:
    """The shard's stat cache records other stat keys or hashes than its files have now (a touched file), or is
    of an older format (without ctime, inode and device)."""
    want = {f: v[:3] + v[4:] for f, v in stat_cache(plan.entries).items()}
    try:
        return {f: v[:3] + v[4:] for f, v in json.loads((out / shards.stat_name(plan.name)).read_text()).items()
                } != want
    except (OSError, ValueError, TypeError, AttributeError):
        return bool(want)


def keep_for_reuse(out: Path, donor: Donor) -> None:
    """Hard-link a shard, then its sidecar, into .reuse/ before it is replaced (a copy where links are not
    supported): other ranks reading it, and a rerun after a kill, still find its samples."""
    target = donor.reuse_path(out)
    side = target.with_name(f"{donor.sidecar_sha}.meta.json")
    if side.is_file():
        return
    target.parent.mkdir(exist_ok=True)
    for src, dst in ((donor.path, target), (donor.path.with_name(shards.sidecar_name(donor.path.name)), side)):
        if dst.exists():
            continue
        try:
            os.link(src, dst)
        except OSError:
            with atomic.atomic_path(dst) as tmp:
                shutil.copyfile(src, tmp)
    atomic.fsync_dir(target.parent)


def records_by_file(records: list[list]) -> dict[str, str | None]:
    """file → sha256 over some shards' input records (the inputs a manifest's shards cover)."""
    return {r[0]: r[1] for r in records if r[0] is not None}


def update_section(old_manifest: Manifest | dict, old_sha: str, old_files: dict, new_manifest: Manifest | dict,
                   new_files: dict) -> dict:
    """What an update changed against the manifest it started from: inputs changed, added, removed; shards."""
    old, new = Manifest.of(old_manifest).entries, Manifest.of(new_manifest).entries
    before = {(s["name"], s["sha256"]) for s in old}
    new_names = {s["name"] for s in new}
    return {"changed": sum(1 for f, sha in new_files.items() if f in old_files and old_files[f] != sha),
            "added": len(new_files.keys() - old_files.keys()), "removed": len(old_files.keys() - new_files.keys()),
            "shards_rewritten": sum((s["name"], s["sha256"]) not in before for s in new),
            "shards_removed": sum(s["name"] not in new_names for s in old),
            "from_manifest_sha256": old_sha}
