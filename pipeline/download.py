"""Fetch COCO 2017 (images + captions) into a dataset root, safely and resumably.

Layout produced under `root`:
    {split}2017/*.jpg
    annotations/captions_{split}2017.json
    .downloads/<archive>.zip          kept, so a failed extraction never re-downloads
    .downloads/<archive>.complete     sha256 of an archive whose contents are in place

Standard library only: this runs before torch is needed, and must not need it.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import urllib.error
import urllib.request
import zipfile
import zlib
from http.client import HTTPException
from pathlib import Path
from typing import Callable

from ditpipe.pipeline.atomic import sha256_file, write_bytes
from ditpipe.pipeline.errors import DataError

COCO_BASE_URL = "https://images.cocodataset.org"

# Official archives (path under the base URL), what each must contain, and its pin: the exact size and sha256 of the
# official file (as TensorFlow Datasets records them in url_checksums/coco.txt) and a bound on the members' total
# uncompressed size. JPEGs do not compress, so an image archive unpacks to about its own size; the annotations
# archive's JSONs unpack to about 3.3× its size (~0.83 GB). A download larger than the pin is stopped; an archive
# whose members claim more than the bound is refused before anything is extracted.
COCO_ARCHIVES: dict[str, dict] = {
    "zips/train2017.zip": {"images_dir": "train2017", "images": 118_287, "bytes": 19_336_861_798,
                           "sha256": "69a8bb58ea5f8f99d24875f21416de2e9ded3178e903f1f7603e283b9e06d929",
                           "max_unpacked": 24 << 30},
    "zips/val2017.zip": {"images_dir": "val2017", "images": 5_000, "bytes": 815_585_330,
                         "sha256": "4f7e2ccb2866ec5041993c9cf2a952bbed69647b115d0f74da7ce8f4bef82f05",
                         "max_unpacked": 1 << 30},
    "annotations/annotations_trainval2017.zip": {
        "members": ("annotations/captions_train2017.json", "annotations/captions_val2017.json"),
        "bytes": 252_907_541, "sha256": "113a836d90195ee1f884e704da6304dfaaecff1f023f49b6ca93c4aaae470268",
        "max_unpacked": 2 << 30,
    },
}
SPLITS = ("train", "val")
ANNOTATIONS_ARCHIVE = "annotations/annotations_trainval2017.zip"
CAPTION_MEMBERS = COCO_ARCHIVES[ANNOTATIONS_ARCHIVE]["members"]

Progress = Callable[[str, int, "int | None"], None]
_CHUNK = 1 << 20


def download_coco(
    root: Path,
    split: str,
    *,
    base_url: str = COCO_BASE_URL,
    expected_images: int | None = None,
    progress: Progress | None = None,
    archives: dict[str, dict] = COCO_ARCHIVES,
) -> dict[str, str]:
    """Make `<root>/{split}2017/*.jpg` and `<root>/annotations/captions_{split}2017.json` exist.

    Returns {archive file name: sha256} for the archives the data came from; {} when the data
    was placed by hand. A rerun with everything in place does no network or disk work. `archives`: the pins
    (`bytes`, `sha256`, `max_unpacked` per archive) every archive must match; COCO_ARCHIVES unless a test says.
    """
    if split not in SPLITS:
        raise DataError(f"unknown COCO split {split!r}: use one of {', '.join(SPLITS)}")
    root = Path(root)
    images_archive = f"zips/{split}2017.zip"
    if expected_images is None:
        expected_images = archives[images_archive]["images"]
    captions = f"annotations/captions_{split}2017.json"

    # (archive, what must exist afterwards, how to check and extract it)
    parts = [
        (images_archive, root / f"{split}2017",
         lambda zf, name, tmp: _extract_images(zf, name, tmp, root, f"{split}2017", expected_images)),
        (ANNOTATIONS_ARCHIVE, root / captions,
         lambda zf, name, tmp: _extract_captions(zf, name, tmp, root, captions)),
    ]
    hashes: dict[str, str] = {}
    for rel, target, install in parts:
        name = rel.rsplit("/", 1)[-1]
        marker = root / ".downloads" / f"{name}.complete"
        if target.exists():
            if marker.is_file():  # we put it there earlier: report the same archive
                hashes[name] = marker.read_text().strip()
            continue  # otherwise placed by hand: trust it, nothing to record
        archive, sha = _fetch(f"{base_url.rstrip('/')}/{rel}", root, split, progress, archives[rel])
        _install(archive, root, install, archives[rel]["max_unpacked"])
        write_bytes(marker, (sha + "\n").encode())
        hashes[name] = sha
    return hashes


# ---------------------------------------------------------------- download


def _fetch(url: str, root: Path, split: str, progress: Progress | None, pin: dict) -> tuple[Path, str]:
    """Download `url` into <root>/.downloads/, unless a complete copy is already there; either way the file must
    have the pinned size and sha256. A download is stopped as soon as it outgrows the pin."""
    name = url.rsplit("/", 1)[-1]
    downloads = root / ".downloads"
    final = downloads / name
    size, want = pin["bytes"], pin["sha256"]
    if final.is_file():  # renamed into place after a full, fsynced download, or placed there by hand
        sha = sha256_file(final)
        if final.stat().st_size != size or sha != want:
            raise DataError(f"{final} is not the official {name} ({final.stat().st_size:,} bytes, sha256 {sha[:16]}…; "
                            f"the official one has {size:,} bytes, sha256 {want[:16]}…): delete it and retry")
        return final, sha

    made = _missing_folders(downloads)
    downloads.mkdir(parents=True, exist_ok=True)
    part = downloads / f"{name}.part"
    sha = hashlib.sha256()
    done = 0

    def fail(err: object) -> DataError:
        part.unlink(missing_ok=True)
        _remove_if_empty(made)  # offline: no empty .downloads/ (nor data root) left behind
        return DataError(
            f"could not download {url}: {err}. Check the network and retry, or download it "
            f"manually and place the data in {root} as {split}2017/*.jpg and "
            f"annotations/captions_{split}2017.json (or put the archive itself at {final})"
        )

    try:
        resp = urllib.request.urlopen(url, timeout=60)
    except (OSError, HTTPException) as err:  # URLError/HTTPError are OSErrors
        raise fail(err) from err
    with resp, open(part, "wb") as out:
        length = resp.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        if total is not None and total != size:
            raise fail(f"the server offers {total:,} bytes; the official {name} has {size:,}")
        if progress:
            progress(name, 0, size)
        while True:
            try:
                chunk = resp.read(min(_CHUNK, size + 1 - done))  # never more than one byte past the pin
            except (OSError, HTTPException) as err:
                raise fail(err) from err
            if not chunk:
                break
            done += len(chunk)
            if done > size:
                raise fail(f"more than the official {size:,} bytes arrived; stopped")
            out.write(chunk)
            sha.update(chunk)
            if progress:
                progress(name, done, size)
        if done != size:
            raise fail(f"connection closed after {done:,} of {size:,} bytes")
        if sha.hexdigest() != want:
            raise fail(f"sha256 {sha.hexdigest()} is not the official archive's {want}")
        out.flush()
        os.fsync(out.fileno())  # the rename below must never publish a file still in cache only
    os.replace(part, final)
    return final, sha.hexdigest()


def _missing_folders(folder: Path) -> list[Path]:
    """`folder` and those of its parents that do not exist yet, deepest first: what `mkdir(parents=True)` creates."""
    missing = []
    while not folder.exists() and not folder.is_symlink() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def _remove_if_empty(folders: list[Path]) -> None:
    """Remove the folders this download created (deepest first) while they are empty: rmdir removes nothing else,
    so a file anyone put there meanwhile keeps its folder."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


# ---------------------------------------------------------------- check and extract


def _install(archive: Path, root: Path, install: Callable[[zipfile.ZipFile, str, Path], None],
             max_unpacked: int) -> None:
    """Open, vet and extract `archive` via a temp folder under root; nothing half-done survives."""
    name = archive.name
    redo = f"delete {archive} and retry"
    tmp = root / f".extract-{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # leftover of a crashed run
    try:
        with zipfile.ZipFile(archive) as zf:
            _refuse_unsafe(zf, archive)
            # zipfile never yields more than a member's declared size, so bounding the declared total bounds the
            # disk an archive can fill (and the time testzip spends) before any byte is trusted.
            unpacked = sum(info.file_size for info in zf.infolist())
            if unpacked > max_unpacked:
                raise DataError(f"refusing {name}: its members unpack to {unpacked:,} bytes, more than the "
                                f"{max_unpacked:,} the official archive can; {redo}")
            # testzip reads every member and checks its CRC before anything is used.
            bad = zf.testzip()
            if bad is not None:
                raise DataError(f"{name} is corrupt (bad CRC for {bad!r}): {redo}")
            tmp.mkdir(parents=True)
            install(zf, name, tmp)
    except (zipfile.BadZipFile, zlib.error, EOFError) as err:
        raise DataError(f"{name} is not a valid zip archive ({err}): {redo}") from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _refuse_unsafe(zf: zipfile.ZipFile, archive: Path) -> None:
    """Zip-slip guard: checked for every entry before anything is extracted."""
    for info in zf.infolist():
        entry = info.filename.replace("\\", "/")
        if entry.startswith("/") or re.match(r"[A-Za-z]:", entry):
            why = "is an absolute path"
        elif ".." in entry.split("/"):
            why = "contains a '..' component"
        elif stat.S_ISLNK(info.external_attr >> 16):
            why = "is a symbolic link"
        else:
            continue
        raise DataError(
            f"refusing to extract {archive.name}: entry {info.filename!r} {why}; it is not a "
            f"genuine COCO archive, delete {archive} and retry"
        )


def _extract_members(zf: zipfile.ZipFile, members: list[zipfile.ZipInfo], tmp: Path) -> None:
    base = tmp.resolve()
    for info in members:
        # Belt and braces after _refuse_unsafe: the real target must stay inside the temp folder.
        if not (base / info.filename).resolve().is_relative_to(base):
            raise DataError(f"refusing to extract entry {info.filename!r}: it points outside {base}")
        zf.extract(info, tmp)  # zipfile checks each member's CRC as it reads


def _extract_images(zf, name: str, tmp: Path, root: Path, folder: str, expected: int) -> None:
    members = [i for i in zf.infolist() if i.filename.startswith(f"{folder}/") and not i.is_dir()]
    found = sum(i.filename.lower().endswith(".jpg") for i in members)
    if found != expected:
        raise DataError(
            f"expected {expected} images in {name} (under {folder}/), found {found}: "
            f"the download is incomplete or not the official archive; delete "
            f"{root / '.downloads' / name} and retry"
        )
    _extract_members(zf, members, tmp)
    # One rename publishes the whole folder, so a present {split}2017/ is always complete.
    os.replace(tmp / folder, root / folder)


def _extract_captions(zf, name: str, tmp: Path, root: Path, captions: str) -> None:
    names = set(zf.namelist())
    if captions not in names:
        raise DataError(
            f"{name} does not contain {captions}: it is not the official COCO annotations "
            f"archive; delete {root / '.downloads' / name} and retry"
        )
    # Only the captions are needed; the instance/keypoint JSONs would add ~800 MB.
    wanted = [zf.getinfo(m) for m in CAPTION_MEMBERS if m in names]
    _extract_members(zf, wanted, tmp)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for info in wanted:
        dest = root / info.filename
        if not dest.exists():  # never clobber a captions file someone placed by hand
            os.replace(tmp / info.filename, dest)


def recorded_archives(root: Path, split: str) -> dict[str, str]:
    """{archive: sha256} of the archives an earlier download installed for `split` ({} for data placed by hand)."""
    names = [f"{split}2017.zip", ANNOTATIONS_ARCHIVE.rsplit("/", 1)[-1]]
    markers = {n: Path(root) / ".downloads" / f"{n}.complete" for n in names}
    return {n: m.read_text().strip() for n, m in markers.items() if m.is_file()}
