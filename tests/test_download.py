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

from ditpipe.pipeline import download
from ditpipe.pipeline.download import COCO_ARCHIVES, download_coco
from ditpipe.pipeline.errors import DataError

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

    def pins(self, **changes: dict) -> dict:
        """COCO_ARCHIVES with this site's archives pinned (size and sha256 of the files it serves), `changes`
        applied per archive: what the official pins are to the official archives."""
        out = {}
        for rel, spec in COCO_ARCHIVES.items():
            path = self.folder / rel
            pin = {"bytes": path.stat().st_size, "sha256": self.sha(rel)} if path.is_file() else {}
            out[rel] = {**spec, **pin, **changes.get(rel, {})}
        return out


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
    got = download_coco(root, "val", base_url=site.base_url, expected_images=3, archives=site.pins(),
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

    again = download_coco(root, "val", base_url=site.base_url, expected_images=3, archives=site.pins())
    assert again == got
    assert len(site.requests) == 2  # nothing fetched the second time


def test_complete_archive_is_not_downloaded_again(site, root):
    site.put_standard()
    download_coco(root, "val", base_url=site.base_url, expected_images=3, archives=site.pins())
    # Simulate a crash after download but before extraction finished.
    shutil.rmtree(root / "val2017")
    (root / ".downloads" / "val2017.zip.complete").unlink()
    got = download_coco(root, "val", base_url=site.base_url, expected_images=3, archives=site.pins())
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
        download_coco(root, "val", base_url=site.base_url, archives=site.pins())  # official default: 5000
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
        download_coco(root, "val", base_url=site.base_url, expected_images=3, archives=site.pins())
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
        download_coco(root, "val", base_url=site.base_url, expected_images=3, archives=site.pins())
    assert "val2017.zip" in str(exc.value) and "delete" in str(exc.value)
    assert not (root / "val2017").exists()


def test_not_a_zip_at_all(site, root):
    site.put_standard()
    (site.folder / VAL_ZIP).write_bytes(b"<html>maintenance</html>")
    with pytest.raises(DataError, match="val2017.zip is not a valid zip archive"):
        download_coco(root, "val", base_url=site.base_url, expected_images=3, archives=site.pins())


def test_annotations_without_captions(site, root):
    site.put_standard()
    _write_zip(site.folder / ANN_ZIP, [("annotations/instances_val2017.json", b"{}")])
    with pytest.raises(DataError, match="captions_val2017.json"):
        download_coco(root, "val", base_url=site.base_url, expected_images=3, archives=site.pins())


def test_404_names_url(site, root):
    with pytest.raises(DataError) as exc:
        download_coco(root, "val", base_url=site.base_url, expected_images=3, archives=site.pins())
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


# ---------------------------------------------------------------- pins (issue 15, item 15)


def test_the_official_archives_are_fetched_over_https_with_pinned_sizes_and_hashes():
    from ditpipe.pipeline.config import DataConfig

    assert download.COCO_BASE_URL.startswith("https://") and DataConfig().download_url == download.COCO_BASE_URL
    for rel, spec in COCO_ARCHIVES.items():
        assert spec["bytes"] > 0 and len(spec["sha256"]) == 64 and int(spec["sha256"], 16) >= 0, rel
        assert spec["max_unpacked"] >= spec["bytes"], rel


def test_an_archive_that_is_not_the_pinned_one_is_refused_and_removed(site, root):
    site.put_standard()
    pins = site.pins(**{VAL_ZIP: {"sha256": "0" * 64}})
    with pytest.raises(DataError, match="sha256") as exc:
        download_coco(root, "val", base_url=site.base_url, expected_images=3, archives=pins)
    assert f"{site.base_url}/{VAL_ZIP}" in str(exc.value)
    assert not list((root / ".downloads").glob("*")) and not (root / "val2017").exists()


def test_an_archive_placed_by_hand_must_match_the_pin_too(site, root):
    site.put_standard()
    (root / ".downloads").mkdir()
    shutil.copy(site.folder / ANN_ZIP, root / ".downloads" / "val2017.zip")  # the wrong file under the right name
    with pytest.raises(DataError, match="is not the official val2017.zip"):
        download_coco(root, "val", base_url=site.base_url, expected_images=3, archives=site.pins())
    assert site.requests == []


def test_a_server_offering_more_than_the_pinned_size_is_refused_before_reading(site, root):
    site.put_standard()
    size = (site.folder / VAL_ZIP).stat().st_size
    pins = site.pins(**{VAL_ZIP: {"bytes": size - 100}})
    with pytest.raises(DataError, match=f"the server offers {size:,} bytes"):
        download_coco(root, "val", base_url=site.base_url, expected_images=3, archives=pins)
    assert not list((root / ".downloads").glob("*"))


class EndlessHandler(SimpleHTTPRequestHandler):
    """Streams zeros without a Content-Length until the client hangs up; counts what it sent."""

    sent = 0

    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        block = b"\0" * 65536
        try:
            for _ in range(4096):  # 256 MiB at most, so a client that never stops still ends the test
                self.wfile.write(block)
                EndlessHandler.sent += len(block)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args):
        pass


def test_a_download_that_outgrows_the_pin_is_stopped(root):
    server = ThreadingHTTPServer(("127.0.0.1", 0), EndlessHandler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        pins = {rel: {**spec, "bytes": 1 << 20} for rel, spec in COCO_ARCHIVES.items()}
        with pytest.raises(DataError, match="more than the official 1,048,576 bytes arrived"):
            download_coco(root, "val", base_url=f"http://127.0.0.1:{server.server_address[1]}", expected_images=3,
                          archives=pins)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    assert EndlessHandler.sent < 64 << 20  # stopped near the pin, not at the end of the stream
    assert not list((root / ".downloads").glob("*"))


def test_an_archive_that_unpacks_beyond_the_bound_is_refused_before_extracting(site, root):
    site.put_standard()
    with zipfile.ZipFile(site.folder / VAL_ZIP, "w", zipfile.ZIP_DEFLATED) as zf:  # a small zip bomb
        for rel, data in _val_entries():
            zf.writestr(rel, data)
        zf.writestr("val2017/padding.bin", b"\0" * (32 << 20))  # 32 MiB of zeros: ~32 KiB compressed
    assert (site.folder / VAL_ZIP).stat().st_size < 1 << 20
    pins = site.pins(**{VAL_ZIP: {"max_unpacked": 8 << 20}})
    with pytest.raises(DataError, match="unpack to 33,5.* bytes, more than the 8,388,608") as exc:
        download_coco(root, "val", base_url=site.base_url, expected_images=3, archives=pins)
    assert "val2017.zip" in str(exc.value)
    assert not (root / "val2017").exists() and not list(root.glob(".extract-*"))
