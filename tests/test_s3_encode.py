"""`ditpipe encode --out s3://bucket/prefix` against a real S3 API (moto's server, tests/s3server.py): the objects
are those a local encode writes, the manifest goes up last, a kill -9 resumes to the same objects, an update
uploads only what changed (from this node's staging folder or, on another machine, from the bucket alone), a
foreign prefix and credentials in the URL are refused, and the credentials reach no object, staging file or message.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import jpeg_bytes, photo
from ditpipe.pipeline import lock, shards
from s3server import ACCESS_KEY, SECRET_KEY


def shapes(out, cache: Path, n=300, per_shard=100) -> list[str]:
    return ["encode", "--dataset", "shapes", "--vae", "pixel", "--image-size", "16", "--num-samples", str(n),
            "--samples-per-shard", str(per_shard), "--num-workers", "0", "--out", str(out),
            "--storage.cache_dir", str(cache)]


def custom(folder: Path, out, cache: Path) -> list[str]:
    return ["encode", "--dataset", "custom", "--data-path", str(folder), "--vae", "pixel", "--image-size", "16",
            "--samples-per-shard", "4", "--num-workers", "0", "--out", str(out), "--storage.cache_dir", str(cache)]


def run(cli, args: list[str]) -> str:
    code, _, err = cli(*args)
    assert code == 0, err
    return " ".join(err.split())


def fs():
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)


def objects(url: str) -> dict[str, bytes]:
    """name → bytes of every object under the prefix (sub-folders included, by their relative names)."""
    prefix, s3 = url.removeprefix("s3://").rstrip("/"), fs()
    return {path[len(prefix) + 1:]: s3.cat_file(path) for path in s3.find(prefix)}


def stamps(url: str) -> dict[str, object]:
    prefix, s3 = url.removeprefix("s3://").rstrip("/"), fs()
    return {p.rsplit("/", 1)[-1]: s3.info(p)["LastModified"] for p in s3.find(prefix)}


def local_objects(folder: Path) -> dict[str, bytes]:
    """What a local encode leaves that belongs in the bucket: not the lock, the stat caches (node-local), .reuse/."""
    return {p.name: p.read_bytes() for p in folder.iterdir()
            if p.is_file() and not lock.is_lock(p) and not p.name.endswith(".stat.json")}


def no_credentials(*texts_or_folders) -> None:
    for item in texts_or_folders:
        blobs = ([p.read_bytes() for p in Path(item).rglob("*") if p.is_file()] if isinstance(item, Path)
                 else list(item.values()) if isinstance(item, dict) else [item.encode()])
        for blob in blobs:
            assert ACCESS_KEY.encode() not in blob and SECRET_KEY.encode() not in blob


def write_image(folder: Path, rel: str, seed: int) -> None:
    path = folder / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(jpeg_bytes(photo(40, 32, seed)))
    past = time.time_ns() - 3600 * 10**9  # old enough for the stat cache to trust
    os.utime(path, ns=(past, past))


def test_an_s3_encode_writes_the_objects_a_local_encode_writes_and_no_credentials(s3, tmp_path, cli):
    _, bucket = s3
    url, cache = f"{bucket}/shapes", tmp_path / "cache"
    err = run(cli, shapes(url, cache))
    assert f"encoded into {url}" in err and "8 object(s) uploaded, 0 already there" in err
    run(cli, shapes(tmp_path / "local", tmp_path / "unused"))
    got = objects(url)
    assert sorted(got) == sorted(local_objects(tmp_path / "local"))
    assert got == local_objects(tmp_path / "local")
    no_credentials(got, cache, err)
    assert "0 object(s) uploaded, 8 already there" in run(cli, shapes(url, cache))  # up to date: nothing goes up
    assert objects(url) == got


def encode_process(server, args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "from ditpipe.stages.cli import entry; entry()", *args],
                            stdout=subprocess.DEVNULL, stderr=open(log, "wb"), start_new_session=True,
                            env={**os.environ, **server.env, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})


def test_killed_midway_the_bucket_has_shards_but_no_manifest_and_a_rerun_finishes_it(s3, tmp_path, cli):
    server, bucket = s3
    url, cache = f"{bucket}/shapes", tmp_path / "cache"
    args = shapes(url, cache, n=3000, per_shard=100)  # 30 shards
    proc = encode_process(server, args, tmp_path / "killed.log")
    prefix, poll = url.removeprefix("s3://"), fs()  # one filesystem: a new one costs a new session
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        seen = {p.rsplit("/", 1)[-1] for p in poll.find(prefix)}
        if shards.sidecar_name(shards.shard_name("wds", 0)) in seen:  # the first shard is up, with its sidecar
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    assert proc.wait(60) == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-2000:]
    left = set(objects(url))
    assert shards.MANIFEST not in left and shards.PARAMS in left and "shard-00000.tar" in left  # manifest last
    assert len([n for n in left if n.endswith(".tar")]) < 30

    err = run(cli, args)
    assert "already there" in err and " 0 already there" not in err  # what was up is not uploaded again
    run(cli, shapes(tmp_path / "local", tmp_path / "unused", n=3000, per_shard=100))
    assert objects(url) == local_objects(tmp_path / "local")


def test_an_update_uploads_only_what_changed_from_the_staging_folder_or_from_the_bucket_alone(s3, tmp_path, cli):
    _, bucket = s3
    images, url = tmp_path / "images", f"{bucket}/photos"
    for i in range(10):
        write_image(images, f"{'cat' if i % 2 else 'dog'}/{i:03d}.jpg", seed=i)
    local = tmp_path / "local"
    run(cli, custom(images, url, tmp_path / "cache"))
    run(cli, custom(images, local, tmp_path / "unused"))
    before = stamps(url)
    time.sleep(1.1)  # S3's Last-Modified has whole seconds

    write_image(images, "dog/010.jpg", seed=10)  # sorts last: the last shard (of 4) changes, the others stay
    err = run(cli, custom(images, url, tmp_path / "cache"))
    assert "1 inputs decoded" in err and "3 object(s) uploaded" in err  # shard 2, its sidecar, the manifest
    run(cli, custom(images, local, tmp_path / "unused"))
    assert objects(url) == local_objects(local)  # the update, byte for byte as a local folder's
    after = stamps(url)
    changed = {n for n in after if after[n] != before.get(n)}
    assert changed == {"shard-00002.tar", "shard-00002.meta.json", shards.MANIFEST}

    # another machine: no staging folder, only the bucket. Its shards are reused, not encoded again
    write_image(images, "cat/001.jpg", seed=101)  # repainted: shard 0 changes
    for i in range(11, 14):
        write_image(images, f"{'cat' if i % 2 else 'dog'}/{i:03d}.jpg", seed=i)  # and one more shard
    err = run(cli, custom(images, url, tmp_path / "other-machine"))
    assert "4 inputs decoded" in err, err
    run(cli, custom(images, local, tmp_path / "unused"))
    assert objects(url) == local_objects(local)
    assert json.loads(objects(url)[shards.MANIFEST])["num_shards"] == 4

    # back on the first machine: its staging folder belongs to a manifest the bucket no longer holds, so it is
    # rebuilt from the bucket (its ledger would otherwise vouch for objects since replaced)
    err = run(cli, custom(images, url, tmp_path / "cache"))
    assert "0 inputs decoded" in err and "0 object(s) uploaded" in err
    assert objects(url) == local_objects(local)


def test_overwrite_with_fewer_shards_removes_only_our_objects(s3, tmp_path, cli):
    _, bucket = s3
    url, cache = f"{bucket}/shapes", tmp_path / "cache"
    run(cli, shapes(url, cache, n=300))
    fs().pipe_file(f"{url.removeprefix('s3://')}/extra/notes.txt", b"a user's own object")  # in a sub-folder
    code, _, err = cli(*shapes(url, tmp_path / "fresh-cache", n=300, per_shard=150))
    assert code != 0 and f"'{url}' holds shards made with other parameters" in " ".join(err.split())  # the URL's
    assert "fresh-cache" not in err  # not the staging folder's name
    err = run(cli, [*shapes(url, tmp_path / "fresh-cache", n=300, per_shard=150), "--overwrite"])  # 3 shards → 2
    run(cli, shapes(tmp_path / "local", tmp_path / "unused", n=300, per_shard=150))
    got = objects(url)
    assert got.pop("extra/notes.txt") == b"a user's own object"
    assert got == local_objects(tmp_path / "local") and "removed" in err


def test_a_foreign_prefix_and_credentials_in_the_url_are_refused(s3, tmp_path, cli):
    _, bucket = s3
    url = f"{bucket}/data"
    fs().pipe_file(f"{url.removeprefix('s3://')}/photo.jpg", b"not ours")
    code, _, err = cli(*shapes(url, tmp_path / "cache"))
    assert code != 0 and f"'{url}' holds objects and is not a ditpipe shard folder" in " ".join(err.split())
    assert "Traceback" not in err and objects(url) == {"photo.jpg": b"not ours"}

    keyed = f"s3://{ACCESS_KEY}:{SECRET_KEY}@{bucket.removeprefix('s3://')}/shapes"
    code, _, err = cli(*shapes(keyed, tmp_path / "cache"))
    assert code == 2 and "has credentials in the URL" in " ".join(err.split())
    no_credentials(err)
    assert objects(f"{bucket}/shapes") == {}


@pytest.mark.slow
def test_a_two_process_encode_uploads_what_one_local_process_writes(s3, tmp_path, cli):
    """torchrun, 2 processes on one node: each uploads the shards its writer finished, rank 0 the manifest last."""
    server, bucket = s3
    url, bin_dir = f"{bucket}/two", Path(sys.executable).parent
    proc = subprocess.run([str(bin_dir / "torchrun"), "--standalone", "--nproc_per_node", "2", str(bin_dir / "ditpipe"),
                           *shapes(url, tmp_path / "cache", n=500)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **server.env, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    run(cli, shapes(tmp_path / "local", tmp_path / "unused", n=500))
    assert objects(url) == local_objects(tmp_path / "local")
    no_credentials(proc.stderr, tmp_path / "cache")
