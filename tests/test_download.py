"""download_coco against a real local HTTP server laid out like images.cocodataset.org."""

from __future__ import annotations

import functools
import hashlib
import io
import json
import shutil
import socket
import stat
import threading
import zipfile
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from pipeline.download import download_coco
from pipeline.errors import DataError

VAL_ZIP = "zips/val2017.zip"
ANN_ZIP = "annotations/annotations_trainval2017.zip"


def _jpeg(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, "JPEG")
    return buf.getvalue()


IMAGES = {f"{i:012d}.jpg": _jpeg((40 * i, 100, 200 - 40 * i)) for i in (1, 2, 3)}


def _captions_json() -> bytes:
    images = [{"id": int(n[:-4]), "file_name": n} for n in IMAGES]
    anns = [{"id": k, "image_id": img["id"], "caption": f"a test picture {k}"} for k, img in enumerate(images)]
    return json.dumps({"images": images, "annotations": anns}).encode()


def _write_zip(path: Path, entries: list[tuple[zipfile.ZipInfo | str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:  # stored: bytes stay findable
        for info, data in entries:
            zf.writestr(info, data)
    return path


def _val_entries() -> list[tuple[str, bytes]]:
    return [("val2017/", b"")] + [(f"val2017/{n}", data) for n, data in IMAGES.items()]


class Site:
    """A temp folder served over HTTP on 127.0.0.1; records every requested path."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.requests: list[str] = []
        site = self

        class Handler(SimpleHTTPRequestHandler):
            def do_GET(self):
                site.requests.append(self.path)
                super().do_GET()

            def log_message(self, *args):  # keep pytest output clean
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def put_standard(self) -> None:
        _write_zip(self.folder / VAL_ZIP, _val_entries())
        _write_zip(self.folder / ANN_ZIP, [
            ("annotations/captions_train2017.json", _captions_json()),
            ("annotations/captions_val2017.json", _captions_json()),
            ("annotations/instances_val2017.json", b"{}"),
        ])

    def sha(self, rel: str) -> str:
        return hashlib.sha256((self.folder / rel).read_bytes()).hexdigest()


@pytest.fixture
def site(tmp_path):
    s = Site(tmp_path / "site")
    (tmp_path / "site").mkdir()
    s.thread.start()
    yield s
    s.server.shutdown()
    s.server.server_close()
    s.thread.join(timeout=5)


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "coco"
    r.mkdir()
    return r


def test_success_layout_hashes_and_no_second_download(site, root):
    site.put_standard()
    calls = []
    got = download_coco(root, "val", base_url=site.base_url, expected_images=3,
                        progress=lambda name, done, total: calls.append((name, done, total)))

    assert got == {"val2017.zip": site.sha(VAL_ZIP), "annotations_trainval2017.zip": site.sha(ANN_ZIP)}
    assert sorted(p.name for p in (root / "val2017").iterdir()) == sorted(IMAGES)
    assert (root / "val2017" / "000000000002.jpg").read_bytes() == IMAGES["000000000002.jpg"]
    caps = json.loads((root / "annotations" / "captions_val2017.json").read_text())
    assert {"images", "annotations"} <= caps.keys()
    assert not (root / "annotations" / "instances_val2017.json").exists()  # only captions are taken
    # progress ends at the full size of each archive
    size = (site.folder / VAL_ZIP).stat().st_size
    assert ("val2017.zip", size, size) in calls
    # no temp folders or .part files left behind
    assert not list(root.glob(".extract-*")) and not list(root.glob(".downloads/*.part"))
    assert len(site.requests) == 2

    again = download_coco(root, "val", base_url=site.base_url, expected_images=3)
    assert again == got
    assert len(site.requests) == 2  # nothing fetched the second time


def test_complete_archive_is_not_downloaded_again(site, root):
    site.put_standard()
    download_coco(root, "val", base_url=site.base_url, expected_images=3)
    # Simulate a crash after download but before extraction finished.
    shutil.rmtree(root / "val2017")
    (root / ".downloads" / "val2017.zip.complete").unlink()
    got = download_coco(root, "val", base_url=site.base_url, expected_images=3)
    assert got["val2017.zip"] == site.sha(VAL_ZIP)
    assert len(site.requests) == 2 and (root / "val2017" / "000000000001.jpg").is_file()


def test_data_placed_by_hand_is_left_alone(site, root):
    (root / "val2017").mkdir()
    (root / "annotations").mkdir()
    (root / "annotations" / "captions_val2017.json").write_text("{}")
    assert download_coco(root, "val", base_url=site.base_url) == {}
    assert site.requests == []


def test_count_mismatch_names_archive_and_counts(site, root):
    site.put_standard()
    with pytest.raises(DataError) as exc:
        download_coco(root, "val", base_url=site.base_url)  # official default: 5000
    msg = str(exc.value)
    assert "val2017.zip" in msg and "5000" in msg and "found 3" in msg
    assert not (root / "val2017").exists()
    assert not list(root.glob(".extract-*"))


def _symlink_info() -> zipfile.ZipInfo:
    info = zipfile.ZipInfo("val2017/link.jpg")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_zip_slip_is_refused(site, root, tmp_path, kind):
    evil_abs = tmp_path / "outside" / "evil.txt"
    bad = {
        "dotdot": ("../evil.txt", b"pwned"),
        "absolute": (str(evil_abs), b"pwned"),
        "symlink": (_symlink_info(), str(tmp_path / "outside").encode()),
    }[kind]
    site.put_standard()
    _write_zip(site.folder / VAL_ZIP, _val_entries() + [bad])

    with pytest.raises(DataError) as exc:
        download_coco(root, "val", base_url=site.base_url, expected_images=3)
    name = bad[0].filename if isinstance(bad[0], zipfile.ZipInfo) else bad[0]
    assert "val2017.zip" in str(exc.value) and name in str(exc.value)
    for p in (tmp_path / "evil.txt", root / "evil.txt", evil_abs, root.parent / "evil.txt"):
        assert not p.exists()
    assert not (root / "val2017").exists() and not list(root.glob(".extract-*"))


def test_corrupted_member_fails_crc(site, root):
    site.put_standard()
    path = site.folder / VAL_ZIP
    data = bytearray(path.read_bytes())
    victim = IMAGES["000000000002.jpg"]
    at = data.find(victim) + len(victim) // 2
    data[at:at + 4] = bytes(b ^ 0xFF for b in data[at:at + 4])
    path.write_bytes(bytes(data))

    with pytest.raises(DataError) as exc:
        download_coco(root, "val", base_url=site.base_url, expected_images=3)
    assert "val2017.zip" in str(exc.value) and "delete" in str(exc.value)
    assert not (root / "val2017").exists()


def test_not_a_zip_at_all(site, root):
    site.put_standard()
    (site.folder / VAL_ZIP).write_bytes(b"<html>maintenance</html>")
    with pytest.raises(DataError, match="val2017.zip is not a valid zip archive"):
        download_coco(root, "val", base_url=site.base_url, expected_images=3)


def test_annotations_without_captions(site, root):
    site.put_standard()
    _write_zip(site.folder / ANN_ZIP, [("annotations/instances_val2017.json", b"{}")])
    with pytest.raises(DataError, match="captions_val2017.json"):
        download_coco(root, "val", base_url=site.base_url, expected_images=3)


def test_404_names_url(site, root):
    with pytest.raises(DataError) as exc:
        download_coco(root, "val", base_url=site.base_url, expected_images=3)
    assert f"{site.base_url}/{VAL_ZIP}" in str(exc.value)
    assert not list((root / ".downloads").glob("*.zip"))


def test_unreachable_host_names_url(root):
    with socket.socket() as s:  # a port that was free a moment ago: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    with pytest.raises(DataError) as exc:
        download_coco(root, "val", base_url=base, expected_images=3)
    assert f"{base}/{VAL_ZIP}" in str(exc.value) and "manually" in str(exc.value)


def test_unknown_split(root):
    with pytest.raises(DataError, match="unknown COCO split"):
        download_coco(root, "test", base_url="http://127.0.0.1:9")
