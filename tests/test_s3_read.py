"""Training from s3:// (issue 29, part 1, the read side), against a real S3 API (moto's server, tests/s3server.py):
the shards come through the node's shard cache (pipeline/cache.py), fetched ahead in the order the loader reads
them, downloaded once per node, held to a byte limit, verified against the manifest; a lost connection is retried, a
missing or changed object stops with one line naming it, and credentials reach no file and no message."""

from __future__ import annotations

import collections
import json
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

from ditpipe.pipeline import cache, objstore, remote, shards
from ditpipe.pipeline.config import StorageConfig
from ditpipe.pipeline.errors import ShardError
from ditpipe.pipeline.loader import MicroBatches, PrefetchingLoader, make_loader
from ditpipe.pipeline.order import EpochOrder, Plan
from ditpipe.pipeline.store import open_shards

from conftest import pixel_shards, reset_accelerate
from s3server import ACCESS_KEY, SECRET_KEY
from tiny import TINY_MODEL

N, PER_SHARD = 48, 8  # 6 shards


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return pixel_shards(tmp_path_factory.mktemp("s3read") / "shards", N, **{"shards.samples_per_shard": PER_SHARD})


def upload(folder: Path, url: str) -> str:
    """The shard folder put under `url` object by object, the manifest last (as encode --out s3:// does; one client
    for all: a new one costs ~0.2 s)."""
    fs, root = objstore.filesystem(url)
    for p in sorted(folder.iterdir(), key=lambda p: p.name == shards.MANIFEST):
        if p.is_file():
            fs.put_file(str(p), f"{root}/{p.name}")
    return url


@pytest.fixture
def remote_folder(s3, folder):
    _, bucket = s3
    return upload(folder, f"{bucket}/shapes")


def storage(tmp_path: Path, **over) -> StorageConfig:
    return StorageConfig(cache_dir=str(tmp_path / "cache"), **over)


def batches(where, store_storage, workers: int = 0, steps: int = 6, batch: int = 4) -> list[dict]:
    store, manifest = open_shards(where, store_storage)
    plan = Plan(manifest.num_samples, batch, 1, 1)
    ds = MicroBatches(store, EpochOrder(store.counts, 0, 2), plan, 0, 0)
    return list(make_loader(ds, plan, 0, steps, workers))


def test_training_from_s3_reads_and_trains_exactly_as_from_the_local_folder(remote_folder, folder, tmp_path):
    local = batches(folder, None)
    loader_storage = storage(tmp_path)
    got = batches(remote_folder, loader_storage)
    assert len(got) == len(local) == 6
    for a, b in zip(local, got):
        assert torch.equal(a["indices"], b["indices"]) and torch.equal(a["labels"], b["labels"])
        assert torch.equal(a["mean"], b["mean"])

    # a tiny train: the same losses and weights; its run folder and log carry no credentials
    from ditpipe.pipeline.config import load_config
    from ditpipe.stages.train import train

    common = {"data.dataset_name": "shapes", "data.image_size": 16, "data.num_samples": N, "vae.name": "pixel",
              "data.num_workers": 0, **TINY_MODEL, "training.mixed_precision": "no", "training.batch_size": 8,
              "training.gradient_accumulation_steps": 1, "training.max_steps": 3, "logging.steps": 1,
              "logging.tensorboard": False, "storage.cache_dir": str(tmp_path / "train-cache")}
    runs = []
    for name, where in (("local", str(folder)), ("s3", remote_folder)):
        runs.append(train(load_config(None, {**common, "shards.path": where,
                                             "logging.output_dir": str(tmp_path / "out"), "logging.run_name": name})))
        reset_accelerate()
    losses = [[json.loads(line).get("loss") for line in (r / "metrics.jsonl").read_text().splitlines()] for r in runs]
    assert losses[0] == losses[1] and any(x is not None for x in losses[0])
    from safetensors.torch import load_file

    weights = [load_file(r / "checkpoint-3" / "model.safetensors") if (r / "checkpoint-3" / "model.safetensors")
               .is_file() else torch.load(r / "checkpoint-3" / "model.pt", weights_only=True) for r in runs]
    assert weights[0].keys() == weights[1].keys() and all(torch.equal(weights[0][k], weights[1][k])
                                                          for k in weights[0])
    for p in runs[1].rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            assert ACCESS_KEY.encode() not in data and SECRET_KEY.encode() not in data, p
    assert remote_folder in (runs[1] / "config.yaml").read_text()


def test_the_cache_keeps_its_byte_limit_evicting_the_least_recently_used(remote_folder, folder, tmp_path):
    manifest = json.loads((folder / shards.MANIFEST).read_text())
    entries = manifest["shards"]
    one = max(e["bytes"] for e in entries) + max(e["sidecar_sha256"] and len((folder / e["sidecar"]).read_bytes())
                                                 for e in entries)
    c = cache.ShardCache(remote_folder, storage(tmp_path, cache_limit_gb=2.5 * one / 1e9))
    a, b, d = entries[:3]
    c.local(a)
    time.sleep(0.02)
    c.local(b)
    time.sleep(0.02)
    c.local(a)  # used again: b is now the least recently used
    time.sleep(0.02)
    c.local(d)
    assert c.present(a) and c.present(d) and not c.present(b)
    assert c.used() <= c.limit
    pin = c.pin(d)  # held by a prefetch window: never evicted, however old
    try:
        time.sleep(0.02)
        c.local(a)
        c.local(entries[3])
        assert c.present(d) and c.present(entries[3]) and not c.present(a) and c.used() <= c.limit
    finally:
        cache.release(pin)
    # a shard larger than the whole limit: one line naming the key to raise
    small = cache.ShardCache(remote_folder, storage(tmp_path, cache_limit_gb=one / 4 / 1e9))
    with pytest.raises(ShardError, match="storage.cache_limit_gb") as err:
        small.local(a)
    assert "\n" not in str(err.value) and f"{remote_folder}/{a['name']}" in str(err.value)


def test_loader_workers_and_the_prefetcher_download_each_shard_once(remote_folder, folder, tmp_path):
    s = storage(tmp_path, prefetch_shards=2)
    store, manifest = open_shards(remote_folder, s)
    plan = Plan(manifest.num_samples, 4, 1, 1)
    ds = MicroBatches(store, EpochOrder(store.counts, 0, 2), plan, 0, 0)
    loader = make_loader(ds, plan, 0, plan.steps_per_epoch, 2)
    assert isinstance(loader, PrefetchingLoader)
    seen = [int(g) for b in loader for g in b["indices"]]
    assert sorted(seen) == list(range(N))  # an epoch, every sample once
    fetched = collections.Counter(store.cache.fetched())
    names = {n for e in manifest.entries for n in store.cache.names(e)}
    assert set(fetched) == names and set(fetched.values()) == {1}, fetched
    # a second reader (another process's store: a fresh copy) finds every file present: nothing fetched again
    again = batches(remote_folder, s, workers=0, steps=plan.steps_per_epoch)
    assert len(again) == plan.steps_per_epoch and collections.Counter(store.cache.fetched()) == fetched


def test_a_changed_or_missing_object_stops_with_one_line_naming_it(remote_folder, folder, tmp_path):
    name = "shard-00001.tar"
    data = bytearray((folder / name).read_bytes())
    data[-1] ^= 0xFF  # the same size, other bytes
    objstore.put_bytes(bytes(data), f"{remote_folder}/{name}")
    for workers in (0, 2):
        with pytest.raises(ShardError) as err:
            batches(remote_folder, storage(tmp_path / str(workers)), workers=workers, steps=12)
        text = str(err.value)
        assert f"{remote_folder}/{name}" in text and "sha256" in text and "\n" not in text, text
        assert not list((tmp_path / str(workers) / "cache").rglob(f"*-{name}"))  # no unverified copy in place

    objstore.remove(f"{remote_folder}/{name}")
    with pytest.raises(ShardError, match="is missing at the remote location") as err:
        batches(remote_folder, storage(tmp_path / "missing"), steps=12)
    assert f"{remote_folder}/{name}" in str(err.value) and "\n" not in str(err.value)


class _LateProxy:
    """A TCP port that refuses connections until `after` seconds have passed, then forwards them to `target`: a
    lost connection that comes back."""

    def __init__(self, target: tuple[str, int], after: float):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.target, self.opened = target, None
        self.timer = threading.Timer(after, self._listen)
        self.timer.daemon = True
        self.timer.start()

    def _listen(self) -> None:
        self.server = socket.create_server(("127.0.0.1", self.port))
        self.opened = time.monotonic()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a, b) -> None:
        try:
            while data := a.recv(1 << 16):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.timer.cancel()
        if self.opened is not None:
            self.server.close()


def test_a_lost_connection_is_retried_with_back_off(s3, remote_folder, monkeypatch):
    server, _ = s3
    url = f"{remote_folder}/{shards.MANIFEST}"
    # no retries: a refused connection is one line naming the object (botocore's and s3fs's own retries are off)
    closed = _LateProxy(("127.0.0.1", server.port), after=3600)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed.port}")
    monkeypatch.setenv(objstore.RETRIES_ENV, "0")
    with pytest.raises(ShardError, match="still failing after 1 tries") as err:
        remote.read_url(url, remote.MAX_META_BYTES)
    assert url in str(err.value) and "\n" not in str(err.value)
    # with retries: the endpoint comes back after a second, and the read goes on with back-off
    proxy = _LateProxy(("127.0.0.1", server.port), after=1.0)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
    monkeypatch.setenv(objstore.RETRIES_ENV, "5")
    began = time.monotonic()
    try:
        assert json.loads(remote.read_url(url, remote.MAX_META_BYTES))["num_samples"] == N
        assert proxy.opened is not None and began < proxy.opened  # the first try met a closed port
    finally:
        proxy.close()


def test_transient_sorts_real_errors():
    from botocore.exceptions import ClientError, EndpointConnectionError

    def client_error(code: str, status: int) -> ClientError:
        return ClientError({"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
                           "GetObject")

    assert objstore.transient(EndpointConnectionError(endpoint_url="http://127.0.0.1:1"))
    assert objstore.transient(ConnectionResetError())
    assert objstore.transient(client_error("ServiceUnavailable", 503))
    assert not objstore.transient(FileNotFoundError("s3://b/k"))
    assert not objstore.transient(client_error("AccessDenied", 403))


def test_credentials_in_a_url_are_refused_without_repeating_them(s3, tmp_path):
    _, bucket = s3
    keyed = f"s3://{ACCESS_KEY}:{SECRET_KEY}@{bucket.removeprefix('s3://')}/shapes"
    with pytest.raises(ShardError, match="has credentials in the URL") as err:
        open_shards(keyed, storage(tmp_path))
    text = str(err.value)
    assert ACCESS_KEY not in text and SECRET_KEY not in text and "AWS_ACCESS_KEY_ID" in text and "\n" not in text
    assert not (tmp_path / "cache").exists()


def test_bench_loader_reports_local_cold_and_warm_for_a_url(remote_folder, tmp_path, capsys):
    from ditpipe.stages.bench import BenchOptions, run

    result = run(["loader"], BenchOptions(shards=remote_folder, loader_batch=8, num_workers=0, repeats=1,
                                          workdir=str(tmp_path / "bench")))
    r = result["loader"]["remote"]
    assert result["loader"]["samples"] == N // 8 * 8 and result["loader"]["num_shards"] == N // PER_SHARD
    for key in ("local_samples_per_s", "cold_samples_per_s", "warm_samples_per_s"):
        assert r[key] > 0, r
    assert r["cold_ratio"] == pytest.approx(r["cold_samples_per_s"] / r["local_samples_per_s"], abs=2e-3)
    assert {t["name"] for t in result["targets"]} >= {"loader from the URL, warm cache / local disk",
                                                      "loader from the URL, cold cache / local disk"}
    assert "--shards " + remote_folder in result["command"]
