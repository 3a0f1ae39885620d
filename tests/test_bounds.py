"""Never trust a size, a count or a name from a file (issue 25, class 3): every name, count and shape read from a
manifest, sidecar, checkpoint, config or `.npz` is checked against what the file itself holds, and bounded, before
anything is allocated or opened. Each answer is one line naming the file and the key."""

from __future__ import annotations

import json
import shutil
import time
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest

from ditpipe.pipeline import npz, shards
from ditpipe.pipeline.errors import DataError, ShardError
from ditpipe.pipeline.manifest import check_entries
from ditpipe.pipeline.safe_yaml import AliasRefused, safe_load

from conftest import resign, train_tiny
from test_hostile import edit_json, on_shards, one_error


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny trained run on 32 shapes (two shards of 16): checkpoint-2 in run/."""
    return train_tiny(tmp_path_factory.mktemp("bounds"), 32, **{"training.max_steps": 2})


@pytest.fixture
def folder(run, tmp_path) -> Path:
    copy = tmp_path / "shards"
    shutil.copytree(run.parent.parent / "shards", copy)
    return copy


def forge(folder: Path, **entry) -> None:
    """Change the first shard entry of the manifest (num_samples follows its samples, as a careful forger's would)."""
    def change(m):
        m["shards"][0].update(entry)
        m["num_samples"] = sum(s["samples"] for s in m["shards"])
    edit_json(folder / "manifest.json", change)


# ---------------------------------------------------------------------------------------------------- H9 names


def test_manifest_names_never_leave_the_shard_folder(folder, tmp_path, cli):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    for name in ("shard-00000.tar", "shard-00000.meta.json"):  # a faithful copy outside: the old verify said ✓
        shutil.copy(folder / name, outside / name)
    original = (folder / "manifest.json").read_text()
    for name in ("../elsewhere/shard-00000.tar", str(outside / "shard-00000.tar"), "sub/shard-00000.tar",
                 "shard-00000.tar\n", "part-00000.parquet"):
        forge(folder, name=name, sidecar=shards.sidecar_name(name))
        for verb in ("verify", "inspect"):
            line = one_error(cli, verb, folder)
            assert f"manifest.json': shards[0].name {name!r} is not a shard file name of this folder" in line
        (folder / "manifest.json").write_text(original)
    forge(folder, sidecar="/dev/zero")  # was read until memory ran out
    line = one_error(cli, "train", *on_shards(folder, tmp_path / "o"))
    assert "shards[0].sidecar '/dev/zero' is not 'shard-00000.meta.json'" in line
    (folder / "manifest.json").write_text(original)
    # the rule beyond the name: a link planted under the right name is still not read past a bound
    (folder / "shard-00000.meta.json").unlink()
    (folder / "shard-00000.meta.json").symlink_to("/dev/zero")
    line = one_error(cli, "train", *on_shards(folder, tmp_path / "o"))
    assert "shard-00000.meta.json' is not a regular file" in line
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").rglob("checkpoint-*"))


# ---------------------------------------------------------------------------------------------------- H10, H20 counts


def test_a_count_is_checked_against_the_shard_file_before_anything_is_allocated(folder, tmp_path, cli):
    size = (folder / "shard-00000.tar").stat().st_size
    original = (folder / "manifest.json").read_text()
    tracemalloc.start()
    start = time.monotonic()
    forge(folder, samples=200_000_000)  # the issue's: 5 GB of order before any read
    line = one_error(cli, "train", *on_shards(folder, tmp_path / "o"))
    assert "shards[0] (shard-00000.tar) claims 200,000,000 samples, more than its" in line
    forge(folder, samples=200_000_000, bytes=200_000_000 * 1536)  # bytes forged to match: the file's own size
    line = one_error(cli, "train", *on_shards(folder, tmp_path / "o"))
    assert f"shard-00000.tar: {size:,} bytes, the manifest (manifest.json) says 307,200,000,000" in line
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 200 << 20 and time.monotonic() - start < 30, (peak, time.monotonic() - start)
    (folder / "manifest.json").write_text(original)

    forge(folder, samples=64)  # H20: 64 for 32 fits the bytes, not the sidecar: was an IndexError in training
    line = one_error(cli, "train", *on_shards(folder, tmp_path / "o2"))
    assert "its sidecar shard-00000.meta.json lists {'keys': 32, 'labels': 32, 'index': 32}, the manifest says 64" \
        in line
    code, _, err = cli("verify", folder)
    assert code == 1 and "32 readable samples, the manifest says 64" in " ".join(err.split())
    edit_json(folder / "manifest.json", lambda m: m.update(num_samples=128))  # totals that do not add up
    line = one_error(cli, "inspect", folder)
    assert "num_samples 128 and num_shards 1 are not the shards' 64 samples in 1 shards" in line


def test_counts_and_widths_that_size_allocations_are_bounded():
    manifest = json.loads((Path(__file__).parent / "data" / "manifest-captions.json").read_text()) \
        if (Path(__file__).parent / "data" / "manifest-captions.json").exists() else None
    base = {"format": "wds", "num_samples": 0, "num_shards": 0, "shards": [], "latent": {"shape": [1, 3, 16, 16]},
            "captions": {"text": True, "encoder": {"dim": 768, "max_tokens": 77}, "max_tokens_seen": 20}}
    check_entries(base, "m.json")
    for change in ({"max_tokens_seen": 10**9}, {"encoder": {"dim": 10**7, "max_tokens": 77}},
                   {"encoder": {"dim": 768, "max_tokens": "77"}}):
        with pytest.raises(ShardError, match="captions.encoder dim"):
            check_entries({**base, "captions": {**base["captions"], **change}}, "m.json")
    entry = {"name": "shard-00000.tar", "sidecar": "shard-00000.meta.json", "samples": 2, "bytes": 2 * 1536}
    check_entries({**base, "num_samples": 2, "num_shards": 1, "shards": [entry]}, "m.json")
    for bad in ({"samples": -1}, {"samples": 2.0}, {"bytes": True}, {"bucket": 0}):
        with pytest.raises(ShardError, match=r"shards\[0\]"):
            check_entries({**base, "num_samples": 2, "num_shards": 1, "shards": [{**entry, **bad}]}, "m.json")
    assert manifest is None or isinstance(manifest, dict)


# ---------------------------------------------------------------------------------------------------- H11 YAML


def laughs(levels: int) -> str:
    """YAML whose aliases name 9^levels strings."""
    text = "a0: &a0 [x, x, x, x, x, x, x, x, x]\n"
    for i in range(1, levels):
        text += f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]\n"
    return text


def test_yaml_aliases_are_refused_in_every_file_we_read(run, tmp_path, cli):
    ckpt = tmp_path / "run" / "checkpoint-2"
    shutil.copytree(run / "checkpoint-2", ckpt)
    config = ckpt / "config.yaml"
    # resume round-tripped this through JSON: 9^9 strings, gigabytes; here 9^5 (fails fast on the old code too)
    config.write_text(config.read_text() + laughs(5) + "extra: *a4\n")
    resign(ckpt)
    line = one_error(cli, "resume", ckpt, "--training.max_steps", "3")
    assert f"'{config}' is not a readable config (" in line and "is not accepted (aliases" in line  # said why
    start = time.monotonic()
    own = tmp_path / "own.yaml"  # the rule beyond the instance: a config named on the command line
    own.write_text("data: {dataset_name: shapes}\n" + laughs(9) + "validation: {prompts: *a8}\n")
    line = one_error(cli, "train", "--config", own, code=2)
    assert f"{own}: is not valid YAML: a0: YAML anchor &a0 is not accepted" in line and "(line 2, column 5)" in line
    assert time.monotonic() - start < 5
    with pytest.raises(AliasRefused, match=r"training.x\[1\]: YAML alias \*b"):
        safe_load("training: {x: [1, *b]}\n")
    with pytest.raises(ValueError):  # readers that treat a bad value as a damaged file catch it too
        safe_load("<<: &base {a: 1}\n")
    assert safe_load("a: [1, {b: 2}]\n") == {"a": [1, {"b": 2}]}
    from ditpipe.pipeline.config import parse_value

    assert parse_value("&x 1") == "&x 1"  # a command-line value with an anchor stays text


# ---------------------------------------------------------------------------------------------------- H13 .npz


def stats_npz(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, data in members.items():
            z.writestr(name + ".npy", data)
    return path


def npy_header(shape, dtype="<f8") -> bytes:
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def test_adm_statistics_are_checked_from_their_headers_before_loading(tmp_path):
    mu, sigma = np.arange(8.0), np.eye(8) * 2
    good = tmp_path / "good.npz"
    np.savez(good, mu=mu, sigma=sigma)
    stats = npz.read_stats(good)
    assert np.array_equal(stats["mu"], mu) and np.array_equal(stats["sigma"], sigma)

    tracemalloc.start()
    # a 1 KB file whose sigma header claims 4000 × 4000 float64: the old reader allocated 128 MB, then failed
    # with "cannot be read without unpickling"
    small = stats_npz(tmp_path / "claims.npz", {"mu": npy_header((4000,)) + bytes(800),
                                                 "sigma": npy_header((4000, 4000)) + bytes(800)})
    with pytest.raises(DataError, match=r"its mu holds 800 bytes of data where its header \(4000,\) float64 needs "
                                        r"32,000 \(truncated\)"):
        npz.read_stats(small)
    huge = stats_npz(tmp_path / "huge.npz", {"mu": npy_header((20000,)), "sigma": npy_header((20000, 20000))})
    with pytest.raises(DataError, match=r"its mu is float64 \(20000,\), not a float vector of at most 8192"):
        npz.read_stats(huge)
    ints = stats_npz(tmp_path / "ints.npz", {"mu": npy_header((8,), "<i8") + bytes(64),
                                             "sigma": npy_header((8, 8)) + bytes(512)})
    with pytest.raises(DataError, match="its mu is int64"):
        npz.read_stats(ints)
    assert tracemalloc.get_traced_memory()[1] < 16 << 20
    tracemalloc.stop()
    # a member cut short inside a zip that says otherwise: what is wrong, not "without unpickling"
    data = good.read_bytes()
    cut = tmp_path / "cut.npz"
    with zipfile.ZipFile(good) as z, zipfile.ZipFile(cut, "w") as out:
        for info in z.infolist():
            out.writestr(info, z.read(info)[:-100] if info.filename == "sigma.npy" else z.read(info))
    with pytest.raises(DataError, match=r"its sigma holds 412 bytes of data where its header \(8, 8\) float64 needs "
                                        r"512 \(truncated\)"):
        npz.read_stats(cut)
    assert data
