"""Shards at a URL (issue 15, item 16): only a documented list of fsspec protocols, every remote read capped at the
size it should have, and on `ditpipe resume` no remote location that only the checkpoint's own config names."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import fsspec
import pytest

from ditpipe.pipeline import remote, shards
from ditpipe.pipeline.config import load_config
from ditpipe.pipeline.errors import ShardError
from ditpipe.pipeline.store import open_shards

from conftest import pixel_shards, reset_accelerate
from tiny import TINY_MODEL

N, PER_SHARD = 32, 16


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return pixel_shards(tmp_path_factory.mktemp("remote") / "shards", N, **{"shards.samples_per_shard": PER_SHARD})


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path, monkeypatch):
    """A URL folder is read through the node's shard cache (pipeline/cache.py): each test starts with an empty one,
    so a copy verified by an earlier test does not stand in for the object a test changes."""
    from ditpipe.pipeline import cache
    from ditpipe.pipeline.config import StorageConfig

    monkeypatch.setattr(cache, "_configured", StorageConfig(cache_dir=str(tmp_path / "cache")))


@pytest.fixture
def memory_copy(folder):
    """The shard folder uploaded to fsspec's in-process memory filesystem; `grow` appends bytes to one file there."""
    mem, root = fsspec.filesystem("memory"), "/remote-test"
    for p in folder.iterdir():
        mem.pipe_file(f"{root}/{p.name}", p.read_bytes())

    def grow(name: str, extra: int) -> None:
        mem.pipe_file(f"{root}/{name}", (folder / name).read_bytes() + b"\0" * extra)

    yield f"memory://{root}", grow
    mem.rm(root, recursive=True)


@pytest.mark.parametrize("url", ["ftp://example.org/shards", "ssh://host/shards", "sftp://host/x",
                                 "simplecache::file:///tmp/shards", "github://org:repo@main/shards"])
def test_only_the_documented_protocols_are_accepted(url):
    with pytest.raises(ShardError, match="may use only the protocols") as err:
        open_shards(url)
    for protocol in ("file", "s3", "gs", "az", "https", "hf"):
        assert protocol in str(err.value)


def test_a_file_url_and_the_memory_filesystem_are_read(folder, memory_copy):
    url, _ = memory_copy
    for where in (folder.resolve().as_uri(), url):
        store, manifest = open_shards(where)
        assert manifest["num_samples"] == N and store.read(N - 1)[0].shape == (1, 3, 16, 16)


def test_a_shard_larger_than_the_manifest_says_is_refused_without_reading_it_whole(memory_copy):
    url, grow = memory_copy
    grow("shard-00001.tar", 16 << 20)  # 16 MiB more than the manifest's size for it
    store, manifest = open_shards(url)
    store.read(0)
    tracemalloc.start()
    try:
        with pytest.raises(ShardError, match="larger than the .* bytes expected"):
            store.read(PER_SHARD)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * manifest["shards"][1]["bytes"] + (1 << 20), peak  # the cap, not the 16 MiB object


def test_an_oversized_remote_manifest_or_sidecar_is_refused(memory_copy, monkeypatch):
    url, grow = memory_copy
    monkeypatch.setattr(remote, "MAX_META_BYTES", 64 << 10)
    grow(shards.sidecar_name("shard-00000.tar"), 128 << 10)
    store, _ = open_shards(url)
    with pytest.raises(ShardError, match="larger than"):
        store.read(0)
    grow(shards.MANIFEST, 128 << 10)
    with pytest.raises(ShardError, match="larger than"):
        open_shards(url)


def test_resume_refuses_a_remote_location_only_the_checkpoint_names(folder, tmp_path, cli):
    from ditpipe.stages.train import train

    url = folder.resolve().as_uri()
    over = {"data.dataset_name": "shapes", "data.image_size": 16, "data.num_samples": N, "vae.name": "pixel",
            "shards.path": url, **TINY_MODEL,
            "data.num_workers": 0, "training.mixed_precision": "no",
            "training.batch_size": 8, "training.gradient_accumulation_steps": 1, "training.max_steps": 2,
            "checkpointing.steps": 2, "logging.output_dir": str(tmp_path / "out"), "logging.run_name": "r",
            "logging.tensorboard": False}
    run = train(load_config(None, over))
    reset_accelerate()

    code, _, err = cli("resume", run, "--training.max_steps", 3)
    text = " ".join(err.split())
    assert code == 2 and "shards.path" in text and url in text and f"--shards.path {url}" in text, text
    assert not (run / "checkpoint-3").exists()

    code, _, err = cli("resume", run, "--training.max_steps", 3, "--shards.path", url)
    reset_accelerate()
    assert code == 0, err
    assert (run / "checkpoint-3").is_dir()
