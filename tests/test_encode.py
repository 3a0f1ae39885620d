"""`ditpipe encode` end to end, through the real CLI: encode then verify, the bad-image corpus, a kill -9 in the
middle and the resume after it, the overwrite rules, offline and config errors, and COCO captions."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ditpipe.pipeline import shards


def shapes(out: Path, *extra, vae="pixel", size=16, n=300, per_shard=100) -> list[str]:
    return ["encode", "--dataset", "shapes", "--vae", str(vae), "--image-size", str(size), "--num-samples", str(n),
            "--samples-per-shard", str(per_shard), "--num-workers", "0", "--out", str(out), *map(str, extra)]


def manifest_of(folder: Path) -> dict:
    return json.loads((folder / shards.MANIFEST).read_text())


def fingerprint(folder: Path) -> dict[str, tuple[int, int, bytes]]:
    """name → (inode, mtime_ns, bytes) of every file: shows whether anything was rewritten, even identically."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.iterdir())}


def flat(text: str) -> str:
    """Rich wraps long lines at the console width; compare messages with the wrapping undone."""
    return " ".join(text.split())


def no_traceback(*texts: str) -> None:
    assert all("Traceback" not in t for t in texts)


# ---------------------------------------------------------------------------------------------------- encode + verify


@pytest.mark.parametrize("fmt", ["wds", "parquet"])
@pytest.mark.parametrize("codec", ["pixel", "tiny-vae"])
def test_shapes_encode_then_verify(tmp_path, cli, tiny_vae, codec, fmt):
    out = tmp_path / "shapes"
    vae = "pixel" if codec == "pixel" else tiny_vae
    code, _, err = cli(*shapes(out, "--format", fmt, vae=vae))
    assert code == 0, err
    files = [shards.shard_name(fmt, i) for i in range(3)]
    assert sorted(p.name for p in out.glob("*.tar")) + sorted(p.name for p in out.glob("*.parquet")) == files
    m = manifest_of(out)
    assert m["format"] == fmt and m["num_samples"] == 300 and [s["samples"] for s in m["shards"]] == [100] * 3
    assert m["latent"]["shape"] == ([1, 3, 16, 16] if codec == "pixel" else [4, 4, 8, 8])
    assert re.search(r"│ encoded\s+│ 300\s+│", err)  # the final table
    code, _, err = cli("verify", out)
    assert code == 0, err
    assert "3 shard(s), 300 samples" in flat(err)


def test_bad_corpus_is_skipped_or_converted_and_recorded(tmp_path, cli, bad_corpus, tiny_vae):
    folder, expected = bad_corpus
    out = tmp_path / "shards-custom"
    code, _, err = cli("encode", "--dataset", "custom", "--data-path", folder, "--vae", tiny_vae, "--image-size", 16,
                       "--samples-per-shard", 5, "--num-workers", 1, "--out", out)
    assert code == 0, err
    no_traceback(err)
    m = manifest_of(out)
    skips = {f: frag for f, (what, frag) in expected.items() if what == "skip"}
    converts = {f: frag for f, (what, frag) in expected.items() if what == "convert"}
    assert len(skips) >= 6 and len(converts) >= 6

    skipped = {s["file"]: s["reason"] for s in m["skipped"]}
    assert set(skipped) == set(skips), m["skipped"]
    for f, frag in skips.items():
        assert frag in skipped[f], (f, skipped[f])
    converted = {c["file"]: " | ".join(c["notes"]) for c in m["converted"]}
    assert set(converted) == set(converts), m["converted"]
    for f, frag in converts.items():
        assert frag in converted[f], (f, converted[f])
    assert m["num_inputs"] == len(expected) and m["num_samples"] == len(expected) - len(skips)
    assert m["labels"] is None  # a flat folder is unconditional

    samples = {s.meta["file"]: s for s in shards.iter_samples(out)}
    assert set(samples) == set(expected) - set(skips)
    assert "notes" not in samples["good.jpg"].meta
    for f in converts:
        assert samples[f].meta["notes"] == next(c["notes"] for c in m["converted"] if c["file"] == f)
        assert np.isfinite(samples[f].latent.astype(np.float32)).all()

    # the summary: the count in the final table, then the reasons and each skipped file
    assert re.search(rf"│ skipped\s+│ {len(skips)}\s+│", err) and "skipped: " in err
    for f in skips:
        assert f in flat(err)
    code, _, err = cli("verify", out)
    assert code == 0, err


def test_coco_fixture_keeps_all_five_captions(tmp_path, cli, coco_root):
    out = tmp_path / "shards-coco"
    code, _, err = cli("encode", "--dataset", "coco", "--split", "val", "--data-path", coco_root, "--vae", "pixel",
                       "--image-size", 16, "--num-workers", 0, "--out", out)
    assert code == 0, err
    m = manifest_of(out)
    assert m["num_samples"] == 6 and m["source"]["dataset"] == "coco" and m["source"]["split"] == "val"
    assert m["captions"] == {"text": True, "encoder": None} and m["labels"] is None
    samples = list(shards.iter_samples(out))
    assert len(samples) == 6
    for s in samples:
        i = int(s.meta["file"].removeprefix("val2017/").removesuffix(".jpg")) - 1000
        assert s.meta["captions"] == [f"image {i} caption {k}" for k in range(5)]
    assert cli("verify", out)[0] == 0


# ---------------------------------------------------------------------------------------------------- kill -9 + resume


def run_encode_process(out: Path, vae: Path, *, kill_when_partial: bool = False) -> tuple[int, str]:
    """`ditpipe encode` as a real subprocess (its own session, so a kill takes its decode workers too). With
    `kill_when_partial`, SIGKILL it as soon as a shard is complete but the manifest is not written yet."""
    cmd = [sys.executable, "-c", "from ditpipe.stages.cli import entry; entry()",
           *shapes(out, "--batch-size", 16, vae=vae, size=32, n=800, per_shard=50)]
    cmd[cmd.index("--num-workers") + 1] = "1"
    log = out.with_name(out.name + ".log")  # a file, not a pipe: nobody reads a pipe while we poll
    with open(log, "wb") as stderr:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.monotonic() + 120
        while kill_when_partial and time.monotonic() < deadline and proc.poll() is None:
            if list(out.glob("*.meta.json")) and not (out / shards.MANIFEST).exists():
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.005)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    return proc.returncode, log.read_text(errors="replace")


@pytest.mark.slow  # over 30 s on 2 cores
def test_killed_encode_resumes_to_the_same_bytes(tmp_path, tiny_vae):
    killed, fresh = tmp_path / "killed", tmp_path / "fresh"
    code, err = run_encode_process(killed, tiny_vae, kill_when_partial=True)
    assert code == -signal.SIGKILL, f"the encode finished before it could be killed ({code}): {err[-2000:]}"
    assert not (killed / shards.MANIFEST).exists()
    complete = sorted(p.name.replace(".meta.json", ".tar") for p in killed.glob("*.meta.json"))
    assert 1 <= len(complete) < 16
    before = {n: (killed / n).stat() for n in complete}
    before_sidecars = {n: (killed / shards.sidecar_name(n)).read_bytes() for n in complete}
    # The kill usually leaves the next shard's temporary behind; plant one more so the clean-up is always tested.
    (killed / ".shard-00015.tar.999999.tmp").write_bytes(b"half a shard")

    code, err = run_encode_process(killed, tiny_vae)
    assert code == 0, err
    assert f"{len(complete) * 50:,} inputs reused" in flat(err)
    code, err = run_encode_process(fresh, tiny_vae)
    assert code == 0, err

    assert sorted(p.name for p in killed.iterdir()) == sorted(p.name for p in fresh.iterdir())
    differ = [p.name for p in sorted(fresh.iterdir()) if (killed / p.name).read_bytes() != p.read_bytes()]
    assert differ == [], f"kept before the kill: {complete}; differ: {differ}"
    m_killed, m_fresh = manifest_of(killed), manifest_of(fresh)
    assert m_killed == m_fresh and m_killed["num_shards"] == 16 and m_killed["num_samples"] == 800
    for n in complete:  # complete shards were kept, not re-encoded
        st = (killed / n).stat()
        assert (st.st_ino, st.st_mtime_ns) == (before[n].st_ino, before[n].st_mtime_ns), n
        assert (killed / shards.sidecar_name(n)).read_bytes() == before_sidecars[n]
    assert not [p.name for p in killed.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp")]
    assert subprocess.run([sys.executable, "-c", "from ditpipe.stages.cli import entry; entry()", "verify",
                           str(killed)], capture_output=True).returncode == 0


def test_a_deleted_or_damaged_shard_is_re_encoded_and_nothing_else(tmp_path, cli):
    out = tmp_path / "s"
    assert cli(*shapes(out))[0] == 0
    original = fingerprint(out)
    (out / "shard-00001.tar").unlink()
    data = bytearray((out / "shard-00002.tar").read_bytes())
    data[5000] ^= 0xFF
    (out / "shard-00002.tar").write_bytes(bytes(data))
    assert cli("verify", out)[0] != 0

    code, _, err = cli(*shapes(out))
    assert code == 0, err
    assert "100 inputs reused" in flat(err)
    after = fingerprint(out)
    assert after["shard-00000.tar"] == original["shard-00000.tar"]  # untouched: same inode, mtime and bytes
    for name in ("shard-00001.tar", "shard-00002.tar"):
        assert after[name][2] == original[name][2]  # re-encoded to the very same bytes
    assert after[shards.MANIFEST][2] == original[shards.MANIFEST][2]
    assert cli("verify", out)[0] == 0


# ---------------------------------------------------------------------------------------------------- overwrite rules


def test_rerunning_a_finished_encode_is_a_no_op(tmp_path, cli):
    out = tmp_path / "s"
    assert cli(*shapes(out))[0] == 0
    before = fingerprint(out)
    code, _, err = cli(*shapes(out))
    assert code == 0, err
    after = fingerprint(out)
    assert set(after) == set(before)
    for name, (ino, mtime, data) in before.items():
        assert after[name][2] == data, name
        if name != shards.MANIFEST:  # the manifest is re-merged (to the same bytes); shards are not touched
            assert after[name][:2] == (ino, mtime), name
    assert "300 inputs reused" in flat(err)


def test_other_parameters_are_refused_then_overwritten(tmp_path, cli):
    out = tmp_path / "s"
    assert cli(*shapes(out))[0] == 0
    before = fingerprint(out)

    code, _, err = cli(*shapes(out, size=32, n=200))
    assert code != 0
    no_traceback(err)
    err = flat(err)
    assert "source.image_size: 16 there, 32 now" in err and "--overwrite" in err
    assert fingerprint(out) == before  # nothing touched, not even the manifest

    code, _, err = cli(*shapes(out, "--format", "parquet"))  # a format change is a parameter change too
    assert code != 0 and "format: 'wds' there, 'parquet' now" in flat(err) and "--overwrite" in flat(err)
    assert fingerprint(out) == before

    code, _, err = cli(*shapes(out, "--overwrite", size=32, n=200))
    assert code == 0, err
    m = manifest_of(out)
    assert m["source"]["image_size"] == 32 and m["num_samples"] == 200 and m["num_shards"] == 2
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-00000.meta.json", "shard-00000.tar",
                                                           "shard-00001.meta.json", "shard-00001.tar"]
    assert cli("verify", out)[0] == 0

    code, _, err = cli(*shapes(out, "--format", "parquet", "--overwrite", size=32, n=200))
    assert code == 0, err
    assert not list(out.glob("shard-*")) and len(list(out.glob("part-*.parquet"))) == 2
    assert cli("verify", out)[0] == 0


def test_a_folder_that_is_not_a_shard_folder_is_refused_and_left_alone(tmp_path, cli):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.txt").write_text("do not delete")
    (out / "shard-00000.tar").write_bytes(b"my own tar, not ditpipe's")
    before = fingerprint(out)
    for extra in ((), ("--overwrite",)):
        code, _, err = cli(*shapes(out, *extra))
        assert code != 0 and "not a ditpipe shard folder" in flat(err)
        no_traceback(err)
        assert fingerprint(out) == before


def test_an_out_path_that_is_a_file_is_refused(tmp_path, cli):
    out = tmp_path / "not-a-folder"
    out.write_text("mine")
    code, _, err = cli(*shapes(out, n=4))
    assert code != 0 and "is not a folder" in flat(err)
    no_traceback(err)
    assert out.read_text() == "mine"


# ---------------------------------------------------------------------------------------------------- errors


def test_hub_vae_offline_fails_with_one_clear_line(tmp_path, cli):
    out = tmp_path / "s"
    code, stdout, err = cli(*shapes(out, vae="stabilityai/sd-vae-ft-ema", n=4))
    assert code != 0
    no_traceback(stdout, err)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "stabilityai/sd-vae-ft-ema" in errors[0] and "--vae pixel" in errors[0], err
    assert not out.exists() or not any(out.iterdir())


def test_image_size_not_a_multiple_of_the_downsample_factor(tmp_path, cli, tiny_vae):
    out = tmp_path / "s"
    code, _, err = cli(*shapes(out, vae=tiny_vae, size=17, n=4))
    assert code == 2
    no_traceback(err)
    err = flat(err)
    assert "data.image_size" in err and "17 is not a multiple" in err and "factor 2" in err
    assert not out.exists()
