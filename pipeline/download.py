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

from pipeline.atomic import sha256_file, write_bytes
from pipeline.errors import DataError

COCO_BASE_URL = "http://images.cocodataset.org"

# Official archives (path under the base URL) and what each must contain.
COCO_ARCHIVES: dict[str, dict] = {
    "zips/train2017.zip": {"images_dir": "train2017", "images": 118_287},
    "zips/val2017.zip": {"images_dir": "val2017", "images": 5_000},
    "annotations/annotations_trainval2017.zip": {
        "members": ("annotations/captions_train2017.json", "annotations/captions_val2017.json"),
    },
}
SPLITS = ("train", "val")
ANNOTATIONS_ARCHIVE = "annotations/annotations_trainval2017.zip"

Progress = Callable[[str, int, "int | None"], None]
_CHUNK = 1 << 20


def download_coco(
    root: Path,
    split: str,
    *,
    base_url: str = COCO_BASE_URL,
    expected_images: int | None = None,
    progress: Progress | None = None,
) -> dict[str, str]:
    """Make `<root>/{split}2017/*.jpg` and `<root>/annotations/captions_{split}2017.json` exist.

    Returns {archive file name: sha256} for the archives the data came from; {} when the data
    was placed by hand. A rerun with everything in place does no network or disk work.
    """
    if split not in SPLITS:
        raise DataError(f"unknown COCO split {split!r}: use one of {', '.join(SPLITS)}")
    root = Path(root)
    images_archive = f"zips/{split}2017.zip"
    if expected_images is None:
        expected_images = COCO_ARCHIVES[images_archive]["images"]
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
        archive, sha = _fetch(f"{base_url.rstrip('/')}/{rel}", root, split, progress)
        _install(archive, root, install)
        write_bytes(marker, (sha + "\n").encode())
        hashes[name] = sha
    return hashes


# ---------------------------------------------------------------- download


def _fetch(url: str, root: Path, split: str, progress: Progress | None) -> tuple[Path, str]:
    """Download `url` into <root>/.downloads/, unless a complete copy is already there."""
    name = url.rsplit("/", 1)[-1]
    downloads = root / ".downloads"
    final = downloads / name
    if final.is_file():  # only ever renamed into place after a full, fsynced download
        return final, sha256_file(final)

    downloads.mkdir(parents=True, exist_ok=True)
    part = downloads / f"{name}.part"
    sha = hashlib.sha256()
    done = 0

    def fail(err: object) -> DataError:
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
        if progress:
            progress(name, 0, total)
        while True:
            try:
                chunk = resp.read(_CHUNK)
            except (OSError, HTTPException) as err:
                raise fail(err) from err
            if not chunk:
                break
            out.write(chunk)
            sha.update(chunk)
            done += len(chunk)
            if progress:
                progress(name, done, total)
        if total is not None and done != total:
            raise fail(f"connection closed after {done} of {total} bytes")
        out.flush()
        os.fsync(out.fileno())  # the rename below must never publish a file still in cache only
    os.replace(part, final)
    return final, sha.hexdigest()


# ---------------------------------------------------------------- check and extract


def _install(archive: Path, root: Path, install: Callable[[zipfile.ZipFile, str, Path], None]) -> None:
    """Open, vet and extract `archive` via a temp folder under root; nothing half-done survives."""
    name = archive.name
    redo = f"delete {archive} and retry"
    tmp = root / f".extract-{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # leftover of a crashed run
    try:
        with zipfile.ZipFile(archive) as zf:
            _refuse_unsafe(zf, archive)
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
    wanted = [zf.getinfo(m) for m in COCO_ARCHIVES[ANNOTATIONS_ARCHIVE]["members"] if m in names]
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
