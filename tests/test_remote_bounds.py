"""Shard folders at a URL (issue 25, H12 and H16): every remote read is bounded while it is read, not after (an HTTP
server that answers a range request with an endless body is refused at the cap), a URL folder's manifest passes
the same checks as a local folder's, and the loader's messages about remote shards name the URL instead of
crashing."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
import tracemalloc
from pathlib import Path

import fsspec
import pytest

from ditpipe.pipeline import remote, shards
from ditpipe.pipeline.errors import ShardError
from ditpipe.pipeline.store import open_shards

from conftest import pixel_shards

N, PER_SHARD = 32, 16


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return pixel_shards(tmp_path_factory.mktemp("bounds") / "shards", N, **{"shards.samples_per_shard": PER_SHARD})


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path, monkeypatch):
    """A URL folder is read through the node's shard cache (pipeline/cache.py): an empty one for each test."""
    from ditpipe.pipeline import cache
    from ditpipe.pipeline.config import StorageConfig

    monkeypatch.setattr(cache, "_configured", StorageConfig(cache_dir=str(tmp_path / "cache")))


@pytest.fixture
def memory(folder):
    """The shard folder copied to fsspec's in-process memory filesystem: (url, put(name, bytes))."""
    mem, root = fsspec.filesystem("memory"), "/remote-bounds"
    for p in folder.iterdir():
        mem.pipe_file(f"{root}/{p.name}", p.read_bytes())
    yield f"memory://{root}", lambda name, data: mem.pipe_file(f"{root}/{name}", data)
    mem.rm(root, recursive=True)


# ------------------------------------------------------------------------ H12: reads bounded as they happen


class _Endless:
    """A file object that, like fsspec's HTTPFile on a 206 reply, hands back far more than was asked, for ever."""

    def __init__(self):
        self.handed = 0

    def read(self, n=-1):
        self.handed += 1 << 20
        return b"\0" * (1 << 20)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_a_read_that_returns_more_than_asked_is_refused_at_once(monkeypatch):
    endless = _Endless()
    from fsspec.implementations.memory import MemoryFileSystem

    monkeypatch.setattr(MemoryFileSystem, "_open", lambda self, path, mode="rb", **kw: endless)
    with pytest.raises(ShardError, match="larger than|more than") as err:
        remote.read_url("memory://x/manifest.json", 64 << 10)
    assert "memory://x/manifest.json" in str(err.value) and "\n" not in str(err.value)
    assert endless.handed <= 1 << 20  # refused at the first read, not read on


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True


def _handler(root: Path, endless: set, sent: list):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # close-delimited bodies: an "endless" one needs no length

        def log_message(self, *a):
            pass

        def _file(self):
            path = root / self.path.lstrip("/").split("/", 1)[-1]
            return path.read_bytes() if path.is_file() else None

        def do_HEAD(self):
            data = self._file()
            self.send_response(200 if data is not None else 404)
            self.send_header("Content-Length", str(len(data or b"")))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()

        def do_GET(self):
            data = self._file()
            if data is None:
                self.send_response(404)
                self.end_headers()
                return
            name = self.path.rsplit("/", 1)[-1]
            ranged = "Range" in self.headers
            self.send_response(206 if ranged else 200)
            if ranged:
                self.send_header("Content-Range", f"bytes 0-{len(data) - 1}/{len(data)}")
            self.end_headers()
            try:
                self.wfile.write(data)
                sent.append(len(data))
                if name in endless:  # 32 MiB past the object's size (a real hostile server: for ever)
                    for _ in range(32):
                        self.wfile.write(b"\0" * (1 << 20))
                        sent.append(1 << 20)
            except (BrokenPipeError, ConnectionResetError):
                pass

    return Handler


@pytest.fixture
def http_folder(folder):
    pytest.importorskip("aiohttp")  # fsspec's HTTP filesystem (fsspec[http]); without it http:// cannot be read
    endless, sent = set(), []
    server = _Server(("127.0.0.1", 0), _handler(folder, endless, sent))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/shards", endless, sent
    server.shutdown()
    server.server_close()


def test_an_http_folder_is_read(http_folder):
    url, _, _ = http_folder
    store, manifest = open_shards(url)
    assert manifest["num_samples"] == N and store.read(N - 1)[0].shape == (1, 3, 16, 16)


@pytest.mark.parametrize("name", [shards.MANIFEST, "shard-00001.tar"])
def test_an_endless_http_body_is_refused_at_the_cap(http_folder, monkeypatch, name):
    url, endless, sent = http_folder
    monkeypatch.setattr(remote, "MAX_META_BYTES", 64 << 10)
    endless.add(name)
    tracemalloc.start()
    try:
        with pytest.raises(ShardError, match="larger than") as err:
            store, _ = open_shards(url)
            store.read(PER_SHARD)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert f"{url}/{name}" in str(err.value)
    assert peak < 8 << 20, peak  # the cap and a chunk, not the 32 MiB body


# ------------------------------------------------------------ H16: the same manifest checks from a URL


def _manifest(folder: Path) -> dict:
    return json.loads((folder / shards.MANIFEST).read_text())


def _bad_manifests(folder: Path):
    """(what, manifest bytes, what the refusal says, from a path and from a URL alike)."""
    m = _manifest(folder)
    yield "a list", b"[]", "format_version None"
    yield "nested deeper than Python recurses", b"[" * 100_000 + b"]" * 100_000, "not valid JSON"
    yield "not JSON", b"{", "not valid JSON"
    yield "another format_version", json.dumps({**m, "format_version": 0}).encode(), "format_version 0"
    yield "a latent shape of 10^10", json.dumps({**m, "latent": {**m["latent"], "shape": [1, 3, 10**5, 10**5]}}
                                                ).encode(), "latent.shape"
    bad = json.loads(json.dumps(m))
    bad["shards"][0]["name"] = "../elsewhere/shard-00000.tar"
    yield "a name outside the folder", json.dumps(bad).encode(), "is not a shard file name"
    bad = json.loads(json.dumps(m))
    bad["num_samples"] += 1
    yield "totals that do not add up", json.dumps(bad).encode(), "are not the shards'"


def test_a_manifest_refused_from_a_path_is_refused_from_a_url_with_the_same_reason(folder, tmp_path, memory):
    url, put = memory
    local = tmp_path / "local"
    local.mkdir()
    for p in folder.iterdir():
        (local / p.name).write_bytes(p.read_bytes())
    for what, raw, says in _bad_manifests(folder):
        (local / shards.MANIFEST).write_bytes(raw)
        put(shards.MANIFEST, raw)
        for where in (local, local.resolve().as_uri(), url):
            with pytest.raises(ShardError, match=says) as err:
                open_shards(where)
            assert "\n" not in str(err.value), (what, where, str(err.value))


def test_a_remote_shard_of_another_size_or_without_a_hash_is_refused(folder, memory):
    url, put = memory
    m = _manifest(folder)
    data = (folder / "shard-00000.tar").read_bytes()
    put("shard-00000.tar", data[:-512])  # truncated; its manifest hash dropped, so only the size can tell
    m["shards"][0]["sha256"] = ""
    put(shards.MANIFEST, json.dumps(m).encode())
    store, _ = open_shards(url)
    with pytest.raises(ShardError, match="sha256|bytes") as err:
        store.read(0)
    assert f"{url}/shard-00000.tar" in str(err.value)


def test_messages_about_a_damaged_remote_shard_name_the_url(folder, memory):
    url, put = memory
    m = _manifest(folder)
    side = json.loads((folder / m["shards"][0]["sidecar"]).read_text())
    data = bytearray((folder / "shard-00000.tar").read_bytes())
    start = side["index"][0][0] + 10  # inside sample 0's .npy header: its bytes no longer say float16 (1, 3, 16, 16)
    data[start : start + 4] = b"XXXX"
    put("shard-00000.tar", bytes(data))
    m["shards"][0]["sha256"] = hashlib.sha256(data).hexdigest()  # re-uploaded consistently, but damaged
    put(shards.MANIFEST, json.dumps(m).encode())
    store, _ = open_shards(url)
    with pytest.raises(ShardError, match="damaged") as err:
        store.read(0)
    assert f"{url}/shard-00000.tar" in str(err.value)
