"""Never train on data that changed (issue 25, H5 and H6).

- H5: a run holds a shared lock on the shard folders it reads (pipeline/lock.py, `hold(..., shared=True)`): runs
  share it, `encode` (exclusive) is refused while one reads and a run while encode writes, each naming the other;
  readers never overwrite a live reader's record, and only the last one out removes `.lock`. And a shard is checked
  against the manifest the run read when it is opened (its size, its sidecar's sha256): one rewritten meanwhile is a
  ShardError naming it, never read with the old manifest's counts.
- H6: the encode's stat cache keys a file as git's index does (size, mtime, ctime, inode, device): a file rewritten
  to the same size with its mtime put back is hashed again and its shard re-encoded; an older cache (size and mtime
  only) is treated as stale, never as an error.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ditpipe.pipeline import lock, shards
from ditpipe.pipeline.config import load_config
from ditpipe.pipeline.errors import ShardError
from ditpipe.pipeline.store import open_shards
from ditpipe.stages.encode import encode
from test_lock import DATA, TRAIN, args, kill_9, refused_here, start

READER = [sys.executable, "-c", "import sys, time; from ditpipe.pipeline import lock\n"
          "with lock.hold(sys.argv[1], sys.argv[2], shared=sys.argv[3] == 'shared'):\n"
          "    print('locked', flush=True); time.sleep(600)"]


def hold_in_subprocess(folder: Path, verb: str, logs: Path, shared: bool) -> subprocess.Popen:
    proc, err = start([*READER, str(folder), verb, "shared" if shared else "exclusive"], logs)
    assert proc.stdout.readline().strip() == b"locked", err.read_text()[-3000:]
    return proc


def record(folder: Path) -> dict:
    return json.loads((folder / lock.NAME).read_text())


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()
    return proc.pid


# ---------------------------------------------------------------------------------------------------- H5: the lock


def test_encode_is_refused_while_a_run_reads_its_shards_and_a_run_while_encode_writes_them(tmp_path, cli):
    """The instance: `encode` ran under a training run. Now each refuses the other, naming it; two runs share."""
    folder, logs = tmp_path / "shards", tmp_path / "logs"
    encode(load_config(None, {**DATA, "shards.path": str(folder)}))
    train = ["train", *args({**DATA, **TRAIN, "shards.path": folder, "training.max_steps": 1,
                             "logging.output_dir": tmp_path / "outputs"})]
    reader = hold_in_subprocess(folder, "train", logs, shared=True)  # a run reading the shards
    refused_here(cli, ["encode", *args({**DATA, "shards.path": folder})], reader.pid, "train")
    code, _, err = cli(*train, "--logging.run_name", "beside")  # a second run reads beside it
    assert code == 0, err
    assert record(folder)["pid"] == reader.pid  # and left the live reader's record alone
    kill_9(reader)
    writer = hold_in_subprocess(folder, "encode", logs, shared=False)  # an encode updating them
    refused_here(cli, [*train, "--logging.run_name", "refused"], writer.pid, "encode")
    assert not (tmp_path / "outputs" / "refused").exists()
    kill_9(writer)
    code, _, err = cli(*train, "--logging.run_name", "after")
    assert code == 0, err
    assert not (folder / lock.NAME).exists()  # the run, the last reader out, removed the dead encode's file


def test_readers_share_a_folder_lock_and_only_the_last_one_out_removes_it(tmp_path):
    """The rule, on the lock itself: any number of readers, no writer among them; records stay sane."""
    folder, logs = tmp_path / "f", tmp_path / "logs"
    folder.mkdir()
    path = folder / lock.NAME
    path.write_text(json.dumps({"pid": dead_pid(), "verb": "encode", "host": "h", "since": 0}) + "\n")  # kill -9'd
    first = hold_in_subprocess(folder, "train", logs, shared=True)
    assert record(folder)["pid"] == first.pid and record(folder)["shared"]  # the dead encode's record replaced
    with lock.hold(folder, "resume", shared=True):  # a second reader, here
        assert record(folder)["pid"] == first.pid  # a live reader's record is left as it is
        with pytest.raises(lock.LockHeld, match=rf"in use by ditpipe train \(pid {first.pid} on "):
            with lock.hold(folder, "encode"):
                pass
    assert path.exists()  # the first reader still holds it: the second one out left the file
    with pytest.raises(lock.LockHeld, match=rf"ditpipe train \(pid {first.pid} on "):
        with lock.hold(folder, "encode"):
            pass
    with lock.hold(folder, "train", shared=True):
        kill_9(first)  # the named reader dies while another still reads: the next reader names itself
        with lock.hold(folder, "resume", shared=True):
            assert record(folder)["pid"] == os.getpid() and record(folder)["verb"] == "resume"
        assert path.exists()
    assert not path.exists()  # the last reader out removed it
    with lock.hold(folder, "encode"):
        assert record(folder)["verb"] == "encode" and "shared" not in record(folder)
        with pytest.raises(lock.LockHeld, match=rf"in use by ditpipe encode \(pid {os.getpid()} on "):
            with lock.hold(folder, "train", shared=True):
                pass
    assert sorted(os.listdir(folder)) == []
    with lock.hold(tmp_path / "absent", "train", shared=True):  # a reader creates nothing
        assert not (tmp_path / "absent").exists()


# ------------------------------------------------------------------------------------------------ H5: the open check


def painted(folder: Path, n: int, seed: int = 0) -> None:
    """n 24×24 BMPs: a fixed-size format, so that a repainted image keeps its size to the byte."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(folder / f"{i}.bmp")
        past = time.time_ns() - 3600 * 10**9  # old enough for the stat cache to trust
        os.utime(folder / f"{i}.bmp", ns=(past, past))


def encode_images(cli, images: Path, out: Path, vae: Path) -> str:
    code, _, err = cli("encode", "--dataset", "custom", "--data-path", images, "--vae", vae, "--image-size", 16,
                       "--samples-per-shard", 4, "--num-workers", 0, "--out", out)
    assert code == 0, err
    return " ".join(err.split())


def repaint_keeping_size_and_mtime(path: Path, seed: int) -> None:
    """`cp -p` of another image of the same size: the bytes change, size and mtime do not."""
    st = path.stat()
    rng = np.random.default_rng(seed)
    tmp = path.with_suffix(".tmp.bmp")
    Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(tmp)
    path.write_bytes(tmp.read_bytes())  # in place: the same inode
    tmp.unlink()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns, path.stat().st_ino) == (st.st_size, st.st_mtime_ns,
                                                                                   st.st_ino)


def test_a_shard_an_encode_rewrote_under_a_run_is_refused_when_the_run_opens_it(tmp_path, cli, tiny_vae):
    """The instance: an update rewrote a shard under a run (one that read the manifest before, without the lock:
    an older ditpipe, another machine): the run refuses it instead of reading it with the old manifest."""
    images, out = tmp_path / "images", tmp_path / "s"
    painted(images, 8)
    encode_images(cli, images, out, tiny_vae)
    store, manifest = open_shards(out)  # the run has read the manifest
    store.read(0)  # and opened shard 0
    (images / "5.bmp").write_bytes((images / "0.bmp").read_bytes())  # an image of shard 1 changes
    assert "1 of 2 shards rewritten" in encode_images(cli, images, out, tiny_vae)
    store.read(3)  # shard 0, unchanged, still reads
    with pytest.raises(ShardError, match=r"shard-00001\.tar: its sidecar shard-00001\.meta\.json does not match "
                                         r"the manifest's sha256.*ditpipe verify"):
        store.read(4)


@pytest.mark.parametrize("fmt", ["wds", "parquet"])
def test_every_shard_is_checked_against_the_manifest_when_it_is_opened(tmp_path, fmt):
    """The rule, both formats: a shard file of another size, or a sidecar of other bytes, is refused at open."""
    folder = tmp_path / "s"
    encode(load_config(None, {**DATA, "shards.path": str(folder), "shards.samples_per_shard": 16,
                              "shards.format": fmt}))
    store, manifest = open_shards(folder)
    names = [e["name"] for e in manifest["shards"]]
    side = folder / shards.sidecar_name(names[1])
    side.write_bytes(side.read_bytes().rstrip() + b" \n")  # the same JSON, other bytes: another sidecar
    with open(folder / names[2], "ab") as f:
        f.write(b"\0")  # the shard file grew
    assert store.read(0)[0].shape and store.read(63)[0].shape  # shards 0 and 3 are as the manifest says
    with pytest.raises(ShardError, match=rf"{names[1]}: its sidecar .* does not match the manifest's sha256"):
        store.read(16)
    with pytest.raises(ShardError, match=rf"{names[2]}: .* bytes, the manifest .* says .*ditpipe verify"):
        store.read(32)


# ---------------------------------------------------------------------------------------------------- H6


def test_an_image_rewritten_with_its_size_and_mtime_put_back_is_encoded_again(tmp_path, cli, tiny_vae):
    """The instance: a fixed-size format, rewritten in place (`cp -p`): stale for ever before, while verify said ✓."""
    images, out = tmp_path / "images", tmp_path / "s"
    painted(images, 8)
    encode_images(cli, images, out, tiny_vae)
    repaint_keeping_size_and_mtime(images / "5.bmp", seed=99)
    err = encode_images(cli, images, out, tiny_vae)
    assert "1 files hashed" in err and "1 inputs decoded" in err and "1 changed" in err, err
    for s in shards.iter_samples(out):
        assert s.meta["sha256"] == shards._sha((images / s.meta["file"]).read_bytes()), s.meta["file"]
    assert "0 files hashed" in encode_images(cli, images, out, tiny_vae)  # the cache took the new ctime


def test_the_stat_cache_keys_ctime_inode_and_device_and_an_older_cache_is_stale_not_an_error(tmp_path, cli,
                                                                                             tiny_vae):
    """The rule: every field of the key counts (an inode: a file replaced by another, its times kept), and a cache
    from before (size and mtime only) is hashed once again, then rewritten in the new form."""
    images, out = tmp_path / "images", tmp_path / "s"
    painted(images, 8)
    encode_images(cli, images, out, tiny_vae)
    caches = sorted(out.glob("*.stat.json"))
    entries = [e for c in caches for e in json.loads(c.read_text()).values()]
    st = (images / "0.bmp").stat()
    assert len(entries) == 8 and all(len(e) == 7 for e in entries)
    assert json.loads(caches[0].read_text())["0.bmp"][4:] == [st.st_ctime_ns, st.st_ino, st.st_dev]
    for c in caches:  # the form of an older ditpipe: [size, mtime_ns, sha256, checked_ns]
        c.write_text(json.dumps({f: e[:4] for f, e in json.loads(c.read_text()).items()}))
    err = encode_images(cli, images, out, tiny_vae)
    assert "8 files hashed" in err and "0 inputs decoded" in err and "0 shards written" in err, err
    assert all(len(e) == 7 for c in caches for e in json.loads(c.read_text()).values())
    assert "0 files hashed" in encode_images(cli, images, out, tiny_vae)

    # another file put in its place by a rename, with the same bytes count and times: another inode, hashed
    st = (images / "2.bmp").stat()
    shutil.copy2(images / "2.bmp", images / "2.new")
    os.replace(images / "2.new", images / "2.bmp")
    os.utime(images / "2.bmp", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (images / "2.bmp").stat().st_ino != st.st_ino
    err = encode_images(cli, images, out, tiny_vae)
    assert "1 files hashed" in err and "0 inputs decoded" in err, err  # the same bytes: hashed, not re-encoded
