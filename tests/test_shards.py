"""The on-disk shard format: round trips against the codec's own output, the fast reader against plain tar parsing,
the manifest's fields, tamper detection by `verify`, the no-unpickling rule, and byte-for-byte determinism.

Every shard here is written by the real `ditpipe encode` (in-process, through the CLI's entry point) from the built-in
shapes dataset or a small folder of images, with the tiny on-disk VAE or the pixel codec. Nothing is mocked.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import jpeg_bytes, photo
from ditpipe.pipeline import shards
from ditpipe.pipeline.codec import load_codec
from ditpipe.pipeline.config import load_config
from ditpipe.pipeline.errors import ShardError
from ditpipe.pipeline.manifest import load_manifest
from ditpipe.pipeline.sources import SHAPES_CLASS_NAMES, make_source
from ditpipe.stages.cli import main as cli_main

SIZE = 16


# ---------------------------------------------------------------------------------------------------- helpers


def encode_args(out: Path, vae: str | Path = "pixel", *extra, n: int = 12, per_shard: int = 5) -> list[str]:
    return ["encode", "--dataset", "shapes", "--vae", str(vae), "--image-size", str(SIZE), "--num-samples", str(n),
            "--samples-per-shard", str(per_shard), "--num-workers", "0", "--out", str(out), *map(str, extra)]


def encode(out: Path, vae: str | Path = "pixel", *extra, n: int = 12, per_shard: int = 5) -> dict:
    """`ditpipe encode` through the real entry point; returns the manifest it wrote."""
    code = cli_main(encode_args(out, vae, *extra, n=n, per_shard=per_shard))
    assert code == 0, f"encode exited {code}"
    return json.loads((out / shards.MANIFEST).read_text())


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def shapes_pixels(n: int, size: int = SIZE) -> np.ndarray:
    """The preprocessed inputs, from the real source: (n, size, size, 3) uint8."""
    cfg = load_config(None, {"data.dataset_name": "shapes", "data.num_samples": n, "data.image_size": size})
    source = make_source(cfg.data)
    return np.stack([source.load(i).pixels for i in range(n)])


def stored(folder: Path) -> tuple[list[str], np.ndarray, list[dict]]:
    samples = list(shards.iter_samples(folder))
    return [s.key for s in samples], np.stack([s.latent for s in samples]), [s.meta for s in samples]


def assert_fp16_equal_within_one_ulp(actual: np.ndarray, expected: np.ndarray) -> None:
    """Equal fp16 values, allowing one ulp where a different batch composition rounds the other way."""
    assert actual.dtype == expected.dtype == np.float16 and actual.shape == expected.shape
    np.testing.assert_allclose(actual.astype(np.float32), expected.astype(np.float32), rtol=1e-3, atol=1e-7)


def tar_members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path, "r:") as tar:
        return [(info.name, tar.extractfile(info).read()) for info in tar]


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))


def attacker_rehash(folder: Path, shard: str) -> None:
    """What a careful attacker does after editing a shard: make its sidecar (offset index, size, sha256) and the
    manifest (size, sha256, sidecar sha256) agree with the new bytes, so every checksum check passes."""
    path, side_path = folder / shard, folder / shards.sidecar_name(shard)
    side = json.loads(side_path.read_text())
    if path.suffix == ".tar":
        with tarfile.open(path, "r:") as tar:
            where = {info.name: [info.offset_data, info.size] for info in tar}
        side["index"] = [where[f"{k}.latent.npy"] + where[f"{k}.json"] for k in side["keys"]]
    side["bytes"], side["sha256"] = path.stat().st_size, sha256(path)
    side_path.write_text(json.dumps(side))
    manifest = json.loads((folder / shards.MANIFEST).read_text())
    entry = next(e for e in manifest["shards"] if e["name"] == shard)
    entry["bytes"], entry["sha256"], entry["sidecar_sha256"] = side["bytes"], side["sha256"], sha256(side_path)
    (folder / shards.MANIFEST).write_text(json.dumps(manifest))


class TouchOnUnpickle:
    """A pickle payload: unpickling it creates `marker` (what `os.system` would do, made observable)."""

    def __init__(self, marker: Path):
        self.marker = Path(marker)

    def __reduce__(self):
        return (Path.touch, (self.marker,))


# ---------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> dict[str, Path]:
    """One finished, clean shard folder per format (pixel codec, 3 shards of 5, 5, 2 samples)."""
    root = tmp_path_factory.mktemp("clean")
    for fmt in ("wds", "parquet"):
        encode(root / fmt, "pixel", "--format", fmt)
    return {fmt: root / fmt for fmt in ("wds", "parquet")}


@pytest.fixture
def copy_of(clean, tmp_path):
    def make(fmt: str = "wds") -> Path:
        return Path(shutil.copytree(clean[fmt], tmp_path / f"copy-{fmt}"))

    return make


@pytest.fixture(scope="module")
def vae_wds(tmp_path_factory, tiny_vae) -> Path:
    """A default-layout ([mean, std, mean_flip, std_flip]) tar folder from the tiny VAE."""
    out = tmp_path_factory.mktemp("vae") / "wds"
    encode(out, tiny_vae)
    return out


# ---------------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("fmt", ["wds", "parquet"])
def test_vae_round_trip_is_the_codecs_own_output_bit_for_bit(tmp_path, tiny_vae, fmt):
    """With --batch-size 1 the encode calls the codec on exactly the tensors we do, so the bytes must be equal."""
    n = 7
    manifest = encode(tmp_path / "s", tiny_vae, "--format", fmt, "--batch-size", "1", n=n, per_shard=3)
    keys, latents, metas = stored(tmp_path / "s")
    assert keys == [f"{i:08d}" for i in range(n)] and [m["index"] for m in metas] == list(range(n))
    assert manifest["latent"]["slices"] == ["mean", "std", "mean_flip", "std_flip"]
    assert latents.shape == (n, 4, 4, SIZE // 2, SIZE // 2) and latents.dtype == np.float16

    codec = load_codec(str(tiny_vae))
    pixels = shapes_pixels(n)
    for i in range(n):
        mean, std = codec.encode(torch.from_numpy(pixels[i : i + 1]))
        mean_f, std_f = codec.encode(torch.from_numpy(np.ascontiguousarray(pixels[i : i + 1, :, ::-1])))
        expected = np.concatenate([mean, std, mean_f, std_f]).astype(np.float16)
        assert latents[i].tobytes() == expected.tobytes(), f"sample {i}"
    # The flip slices really are another image's latents, and the std really is the posterior's std.
    assert not np.array_equal(latents[:, 0], latents[:, 2])
    assert (latents[:, 1] > 0).all() and not np.array_equal(latents[:, 0], latents[:, 1])


@pytest.mark.parametrize("fmt", ["wds", "parquet"])
@pytest.mark.parametrize("flags, slices", [
    ((), ["mean", "std", "mean_flip", "std_flip"]),
    (("--store", "mean"), ["mean", "mean_flip"]),
    (("--no-flip",), ["mean", "std"]),
    (("--store", "mean", "--no-flip"), ["mean"]),
])
def test_vae_layouts_store_the_named_slices(tmp_path, tiny_vae, fmt, flags, slices):
    """Default batching (images and mirrors in one batch, split back afterwards): each slice is what its name says."""
    n = 10
    manifest = encode(tmp_path / "s", tiny_vae, "--format", fmt, "--batch-size", "4", *flags, n=n, per_shard=6)
    lat = manifest["latent"]
    assert lat["slices"] == slices and lat["shape"] == [len(slices), 4, SIZE // 2, SIZE // 2]
    assert lat["std_stored"] == ("std" in slices) and lat["flip_stored"] == ("mean_flip" in slices)
    assert lat["flip_at_load"] is False and lat["dtype"] == "float16"
    _, latents, _ = stored(tmp_path / "s")
    assert latents.shape == (n, *lat["shape"])

    codec = load_codec(str(tiny_vae))
    pixels = shapes_pixels(n)
    mean, std = codec.encode(torch.from_numpy(pixels))
    mean_f, std_f = codec.encode(torch.from_numpy(np.ascontiguousarray(pixels[:, :, ::-1])))
    reference = {"mean": mean, "std": std, "mean_flip": mean_f, "std_flip": std_f}
    for k, name in enumerate(slices):
        assert_fp16_equal_within_one_ulp(latents[:, k], reference[name].numpy().astype(np.float16))


@pytest.mark.parametrize("fmt", ["wds", "parquet"])
def test_pixel_codec_stores_the_image_in_unit_range(tmp_path, fmt):
    n = 12
    manifest = encode(tmp_path / "s", "pixel", "--format", fmt, n=n)
    assert manifest["latent"] == {"shape": [1, 3, SIZE, SIZE], "dtype": "float16", "slices": ["image"],
                                  "std_stored": False, "flip_stored": False, "flip_at_load": True}
    _, latents, _ = stored(tmp_path / "s")
    pixels = shapes_pixels(n)
    own, std = load_codec("pixel").encode(torch.from_numpy(pixels))
    assert std is None
    assert latents.shape == (n, 1, 3, SIZE, SIZE)
    assert latents[:, 0].tobytes() == own.numpy().astype(np.float16).tobytes()
    by_hand = pixels.transpose(0, 3, 1, 2).astype(np.float64) / 127.5 - 1.0  # (N, 3, H, W) in [-1, 1]
    np.testing.assert_allclose(latents[:, 0].astype(np.float64), by_hand, atol=1e-3)
    assert latents.min() == -1.0 and latents.max() == 1.0  # black background, saturated colours


def test_pixel_codec_ignores_store_and_flip_flags_except_flip_at_load(tmp_path):
    manifest = encode(tmp_path / "s", "pixel", "--store", "mean", "--no-flip")
    assert manifest["latent"]["slices"] == ["image"] and manifest["latent"]["shape"] == [1, 3, SIZE, SIZE]
    assert manifest["latent"]["flip_at_load"] is False


# ---------------------------------------------------------------------------------------------------- readers


def test_fast_tar_reader_equals_plain_tarfile_and_np_load(vae_wds):
    manifest = load_manifest(vae_wds)
    shape = tuple(manifest["latent"]["shape"])
    fast = list(shards.iter_samples(vae_wds))
    plain = []
    for entry in manifest["shards"]:
        members = tar_members(vae_wds / entry["name"])
        names = [name for name, _ in members]
        keys = [name.split(".", 1)[0] for name in names[::2]]
        # exactly <key>.latent.npy then <key>.json per sample, nothing else, and keys without dots
        assert names == [f"{k}.{ext}" for k in keys for ext in ("latent.npy", "json")]
        assert all("." not in k and "/" not in k for k in keys)
        assert len(keys) == entry["samples"]
        data = dict(members)
        for k in keys:
            arr = np.load(io.BytesIO(data[f"{k}.latent.npy"]), allow_pickle=False)
            assert arr.dtype == np.float16 and arr.shape == shape
            plain.append((k, arr, json.loads(data[f"{k}.json"])))
    assert len(fast) == len(plain) == manifest["num_samples"] == 12
    for s, (key, arr, meta) in zip(fast, plain):
        assert s.key == key == meta["key"]
        assert s.latent.dtype == np.float16 and s.latent.tobytes() == arr.tobytes()
        assert s.meta == meta


def test_fast_parquet_reader_equals_plain_pyarrow(tmp_path, tiny_vae):
    import pyarrow.parquet as pq

    manifest = encode(tmp_path / "s", tiny_vae, "--format", "parquet", n=12, per_shard=5)
    shape = tuple(manifest["latent"]["shape"])
    nbytes = int(np.prod(shape)) * 2
    fast = list(shards.iter_samples(tmp_path / "s"))
    plain = []
    for entry in manifest["shards"]:
        assert entry["name"].startswith("part-") and entry["name"].endswith(".parquet")
        table = pq.read_table(tmp_path / "s" / entry["name"])
        assert table.column_names == ["key", "latent", "json"]
        assert str(table.schema.field("latent").type) == f"fixed_size_binary[{nbytes}]"
        meta = table.schema.metadata
        assert json.loads(meta[b"ditpipe.latent_shape"]) == list(shape)
        assert meta[b"ditpipe.latent_dtype"] == b"float16"
        for key, blob, text in zip(*(table.column(c).to_pylist() for c in ("key", "latent", "json"))):
            plain.append((key, np.frombuffer(blob, np.float16).reshape(shape), json.loads(text)))
    assert len(fast) == len(plain) == 12
    for s, (key, arr, meta) in zip(fast, plain):
        assert (s.key, s.meta) == (key, meta) and s.latent.tobytes() == arr.tobytes()


def test_tar_shards_are_plain_webdataset_and_tar(vae_wds):
    import webdataset as wds

    manifest = load_manifest(vae_wds)
    urls = [str(vae_wds / e["name"]) for e in manifest["shards"]]
    fast = list(shards.iter_samples(vae_wds))
    # Plain webdataset, no .decode() (its default decoders unpickle); .npy decoded by us, without pickle.
    seen = list(wds.WebDataset(urls, shardshuffle=False))
    assert len(seen) == len(fast)
    for raw, s in zip(seen, fast):
        assert {k for k in raw if not k.startswith("__")} == {"latent.npy", "json"}
        assert raw["__key__"] == s.key
        assert np.load(io.BytesIO(raw["latent.npy"]), allow_pickle=False).tobytes() == s.latent.tobytes()
        assert json.loads(raw["json"]) == s.meta
    for entry, url in zip(manifest["shards"], urls):
        listed = subprocess.run(["tar", "-tf", url], capture_output=True, text=True, check=True).stdout.split()
        assert listed == [n for n, _ in tar_members(Path(url))] and len(listed) == 2 * entry["samples"]


def test_fast_reader_refuses_a_latent_of_another_dtype(copy_of):
    """The offset index points at a well-formed .npy of the wrong dtype: the fast path must not reinterpret it."""
    folder = copy_of("wds")
    shard = "shard-00000.tar"
    members = tar_members(folder / shard)
    name, data = members[0]
    wrong = np.load(io.BytesIO(data), allow_pickle=False).astype(np.float32)
    members[0] = (name, shards.npy_bytes(wrong))
    write_tar(folder / shard, members)
    attacker_rehash(folder, shard)
    with pytest.raises(ShardError, match="not a float16"):
        list(shards.iter_samples(folder))
    problems, _ = shards.verify(folder)
    assert any("float32" in p for p in problems), problems


# ---------------------------------------------------------------------------------------------------- manifest


def test_manifest_fields(vae_wds, tiny_vae):
    m = json.loads((vae_wds / shards.MANIFEST).read_text())
    assert m["format_version"] == shards.FORMAT_VERSION == 1
    assert m["source"] == {"dataset": "shapes", "num_samples": 12, "seed": 0, "image_size": SIZE,
                           "crop": "generated at size"}
    vae_config = json.loads((tiny_vae / "config.json").read_text())
    codec = m["codec"]
    assert codec["kind"] == "vae" and codec["name"] == str(tiny_vae.resolve()) and codec["dtype"] == "fp32"
    assert codec["scaling_factor"] == vae_config["scaling_factor"] == 0.18215
    assert vae_config.get("shift_factor") is None and codec["shift_factor"] == 0.0
    assert codec["downsample"] == 2 and codec["latent_channels"] == 4
    assert len(codec["hash"]) == 64 and int(codec["hash"], 16) >= 0
    assert m["latent"] == {"shape": [4, 4, SIZE // 2, SIZE // 2], "dtype": "float16",
                           "slices": ["mean", "std", "mean_flip", "std_flip"], "std_stored": True,
                           "flip_stored": True, "flip_at_load": False}
    assert m["labels"] == {"num_classes": 8, "names": SHAPES_CLASS_NAMES}
    assert SHAPES_CLASS_NAMES[:2] == ["red_circle", "red_square"] and len(set(SHAPES_CLASS_NAMES)) == 8
    assert m["captions"] == {"text": True, "encoder": None}  # shapes captions in the json, not embedded
    assert m["format"] == "wds" and m["samples_per_shard"] == 5 and m["num_inputs"] == 12
    assert m["num_samples"] == 12 and m["num_shards"] == 3 and m["skipped"] == [] and m["converted"] == []

    assert [s["name"] for s in m["shards"]] == ["shard-00000.tar", "shard-00001.tar", "shard-00002.tar"]
    assert [s["samples"] for s in m["shards"]] == [5, 5, 2]
    for s in m["shards"]:
        path = vae_wds / s["name"]
        assert s["bytes"] == path.stat().st_size and s["sha256"] == sha256(path)
        assert s["sidecar"] == s["name"].replace(".tar", ".meta.json")
        assert s["sidecar_sha256"] == sha256(vae_wds / s["sidecar"])
        side = json.loads((vae_wds / s["sidecar"]).read_text())
        assert side["samples"] == s["samples"] and side["sha256"] == s["sha256"] and side["bytes"] == s["bytes"]

    samples = list(shards.iter_samples(vae_wds))
    for s in samples:  # labels, class names and the source file in the per-sample JSON
        assert 0 <= s.meta["label"] < 8 and s.meta["class_name"] == SHAPES_CLASS_NAMES[s.meta["label"]]
        assert s.meta["file"] == f"shapes:0:{s.meta['index']}" and len(s.meta["sha256"]) == 64
    means = np.stack([s.latent[0] for s in samples]).astype(np.float64)  # (N, C, h, w): the stored mean slices
    stats = m["stats"]
    np.testing.assert_allclose(stats["channel_mean"], means.mean(axis=(0, 2, 3)), rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(stats["channel_std"], means.std(axis=(0, 2, 3)), rtol=1e-3, atol=1e-3)
    assert np.ptp(stats["channel_mean"]) > 0  # per channel, not one number repeated


def test_manifest_records_skips_and_pixel_stats(tmp_path, cli):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(4):
        (folder / f"ok{i}.jpg").write_bytes(jpeg_bytes(photo(24, 20, i)))
    (folder / "empty.png").write_bytes(b"")
    (folder / "words.jpg").write_text("not a picture")
    code, _, err = cli("encode", "--dataset", "custom", "--data-path", folder, "--vae", "pixel", "--image-size",
                       SIZE, "--samples-per-shard", 4, "--num-workers", 0, "--out", tmp_path / "s")
    assert code == 0, err
    m = load_manifest(tmp_path / "s")
    assert m["num_inputs"] == 6 and m["num_samples"] == 4 and m["labels"] is None
    assert m["source"]["dataset"] == "custom" and m["source"]["path"] == str(folder.resolve())
    skipped = {s["file"]: s for s in m["skipped"]}
    assert set(skipped) == {"empty.png", "words.jpg"}
    assert "empty" in skipped["empty.png"]["reason"] and "not an image" in skipped["words.jpg"]["reason"]
    assert all(isinstance(s["index"], int) and s["reason"] for s in m["skipped"])
    images = np.stack([s.latent[0] for s in shards.iter_samples(tmp_path / "s")]).astype(np.float64)
    np.testing.assert_allclose(m["stats"]["channel_mean"], images.mean(axis=(0, 2, 3)), atol=2e-3)
    np.testing.assert_allclose(m["stats"]["channel_std"], images.std(axis=(0, 2, 3)), atol=2e-3)


def test_codec_hash_covers_weights_and_config(tmp_path, tiny_vae):
    from diffusers import AutoencoderKL

    base = encode(tmp_path / "a", tiny_vae, n=2)["codec"]
    same = tmp_path / "same-weights"
    shutil.copytree(tiny_vae, same)
    assert encode(tmp_path / "b", same, n=2)["codec"]["hash"] == base["hash"]  # another path, the same codec

    vae = AutoencoderKL.from_pretrained(tiny_vae)
    with torch.no_grad():
        vae.encoder.conv_in.bias.add_(1e-3)
    vae.save_pretrained(tmp_path / "other-weights")
    assert encode(tmp_path / "c", tmp_path / "other-weights", n=2)["codec"]["hash"] != base["hash"]

    shifted = AutoencoderKL.from_pretrained(tiny_vae, scaling_factor=0.3611, shift_factor=0.1159)
    shifted.save_pretrained(tmp_path / "shifted")
    codec = encode(tmp_path / "d", tmp_path / "shifted", n=2)["codec"]
    assert (codec["scaling_factor"], codec["shift_factor"]) == (0.3611, 0.1159)
    assert codec["hash"] != base["hash"]


# ---------------------------------------------------------------------------------------------------- verify


def verify_cli(cli, folder: Path) -> tuple[int, str]:
    code, out, err = cli("verify", folder)
    assert "Traceback" not in out + err
    return code, " ".join((out + err).split())  # rich wraps long lines; undo it


@pytest.mark.parametrize("fmt", ["wds", "parquet"])
def test_verify_passes_clean_shards(clean, cli, fmt):
    problems, checked = shards.verify(clean[fmt])
    assert problems == [] and checked == 12
    code, text = verify_cli(cli, clean[fmt])
    assert code == 0 and "12 samples" in text


@pytest.mark.parametrize("fmt", ["wds", "parquet"])
def test_verify_detects_a_flipped_byte(copy_of, cli, fmt):
    folder = copy_of(fmt)
    name = shards.shard_name(fmt, 1)
    data = bytearray((folder / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (folder / name).write_bytes(bytes(data))
    problems, _ = shards.verify(folder)
    assert any(p.startswith(name) and "sha256" in p for p in problems), problems
    code, text = verify_cli(cli, folder)
    assert code != 0 and name in text and "sha256" in text


@pytest.mark.parametrize("fmt", ["wds", "parquet"])
def test_verify_detects_a_truncated_shard(copy_of, cli, fmt):
    folder = copy_of(fmt)
    name = shards.shard_name(fmt, 0)
    data = (folder / name).read_bytes()
    (folder / name).write_bytes(data[: len(data) * 2 // 3])
    problems, _ = shards.verify(folder)
    assert any(name in p and "truncated" in p for p in problems), problems
    assert any(name in p and "readable samples" in p for p in problems), problems  # the decode noticed, too
    code, text = verify_cli(cli, folder)
    assert code != 0 and "truncated" in text


@pytest.mark.parametrize("fmt", ["wds", "parquet"])
def test_verify_detects_a_missing_shard(copy_of, cli, fmt):
    folder = copy_of(fmt)
    name = shards.shard_name(fmt, 2)
    (folder / name).unlink()
    problems, _ = shards.verify(folder)
    assert f"{name}: missing" in problems
    code, text = verify_cli(cli, folder)
    assert code != 0 and f"{name}: missing" in text


def test_verify_detects_a_tampered_sidecar(copy_of, cli):
    folder = copy_of("wds")
    side_path = folder / "shard-00001.meta.json"
    side = json.loads(side_path.read_text())
    side["labels"][0] = (side["labels"][0] + 1) % 8
    side_path.write_text(json.dumps(side, indent=1))
    problems, _ = shards.verify(folder)
    assert any(p.startswith("shard-00001.meta.json") for p in problems), problems
    code, text = verify_cli(cli, folder)
    assert code != 0 and "shard-00001.meta.json" in text


def test_verify_detects_a_wrong_offset_index_even_with_matching_hashes(copy_of):
    folder = copy_of("wds")
    side_path = folder / "shard-00000.meta.json"
    side = json.loads(side_path.read_text())
    side["index"][2][0] += 512  # the loader would read sample 2's latent from the wrong place
    side_path.write_text(json.dumps(side))
    manifest = json.loads((folder / shards.MANIFEST).read_text())
    manifest["shards"][0]["sidecar_sha256"] = sha256(side_path)
    (folder / shards.MANIFEST).write_text(json.dumps(manifest))
    problems, _ = shards.verify(folder)
    assert any("offset index" in p for p in problems), problems


@pytest.mark.parametrize("fmt", ["wds", "parquet"])
def test_verify_detects_a_shard_file_not_in_the_manifest(copy_of, cli, fmt):
    folder = copy_of(fmt)
    extra = shards.shard_name(fmt, 3)
    shutil.copy(folder / shards.shard_name(fmt, 0), folder / extra)
    problems, _ = shards.verify(folder)
    assert any(p.startswith(extra) and "not listed" in p for p in problems), problems
    code, text = verify_cli(cli, folder)
    assert code != 0 and extra in text


def test_verify_detects_a_json_whose_key_does_not_match(copy_of):
    folder = copy_of("wds")
    shard = "shard-00000.tar"
    members = tar_members(folder / shard)
    meta = json.loads(members[1][1])
    meta["key"] = "00000999"
    members[1] = (members[1][0], shards.json_bytes(meta))
    write_tar(folder / shard, members)
    attacker_rehash(folder, shard)
    problems, _ = shards.verify(folder)
    assert any("00000999" in p for p in problems), problems


def test_verify_detects_members_that_plain_webdataset_would_misgroup(copy_of):
    """webdataset groups consecutive members by key: interleaved or repeated members would pass our offset index
    but give other readers broken samples, so verify must reject them even when every hash matches."""
    folder = copy_of("wds")
    members = tar_members(folder / "shard-00000.tar")
    members[1], members[2] = members[2], members[1]  # a.latent, b.latent, a.json, b.json, ...
    write_tar(folder / "shard-00000.tar", members)
    attacker_rehash(folder, "shard-00000.tar")
    members = tar_members(folder / "shard-00001.tar")
    members.insert(2, members[0])  # the first sample's latent twice
    write_tar(folder / "shard-00001.tar", members)
    attacker_rehash(folder, "shard-00001.tar")
    problems, _ = shards.verify(folder)
    assert any(p.startswith("shard-00000.tar") and "not consecutive" in p for p in problems), problems
    assert any(p.startswith("shard-00001.tar") and "duplicate member" in p for p in problems), problems


# ---------------------------------------------------------------------------------------------------- pickles


def pickle_payload(marker: Path) -> bytes:
    payload = pickle.dumps(TouchOnUnpickle(marker))
    # The control: this payload is live. Unpickling it elsewhere creates that file, so the test would notice.
    control = marker.with_name(marker.name + ".control")
    pickle.loads(pickle.dumps(TouchOnUnpickle(control)))
    assert control.exists()
    control.unlink()
    return payload


def run_every_reader(folder: Path, cli) -> tuple[list[str], list[int]]:
    problems, _ = shards.verify(folder)
    codes = [verify_cli(cli, folder)[0]]
    for args in (("inspect", folder), ("inspect", "--json", folder)):
        code, out, err = cli(*args)
        assert code == 0 and "Traceback" not in err
        codes.append(code)
    return problems, codes


def test_a_pyd_member_is_never_unpickled(copy_of, cli, tmp_path):
    folder = copy_of("wds")
    marker = tmp_path / "pwned-pyd"
    shard = "shard-00001.tar"
    clean_samples = list(shards.iter_samples(folder))
    members = tar_members(folder / shard)
    key = members[0][0].split(".", 1)[0]
    members.insert(1, (f"{key}.pyd", pickle_payload(marker)))  # between the sample's latent and its json
    members.append((f"{key}.pkl", pickle_payload(marker)))
    write_tar(folder / shard, members)
    attacker_rehash(folder, shard)  # every sha256 now matches: only the member check can notice

    again = list(shards.iter_samples(folder))
    assert [(s.key, s.latent.tobytes()) for s in again] == [(s.key, s.latent.tobytes()) for s in clean_samples]
    problems, codes = run_every_reader(folder, cli)
    assert not marker.exists(), "a reader unpickled a .pyd/.pkl member"
    assert not any("sha256" in p for p in problems), problems  # the rehash worked; the member check is what fails
    assert any(f"unexpected member '{key}.pyd'" in p for p in problems), problems
    assert any(f"unexpected member '{key}.pkl'" in p for p in problems), problems
    assert codes[0] != 0
    code, text = verify_cli(cli, folder)
    assert f"{key}.pyd" in text and not marker.exists()


def test_an_object_array_latent_is_refused_not_executed(copy_of, cli, tmp_path):
    folder = copy_of("wds")
    marker = tmp_path / "pwned-npy"
    shard = "shard-00000.tar"
    members = tar_members(folder / shard)
    evil = np.empty(1, dtype=object)
    evil[0] = TouchOnUnpickle(marker)
    buf = io.BytesIO()
    np.save(buf, evil, allow_pickle=True)
    control = tmp_path / "control-npy"
    control_buf = io.BytesIO()
    np.save(control_buf, np.array([TouchOnUnpickle(control)], dtype=object), allow_pickle=True)
    np.load(io.BytesIO(control_buf.getvalue()), allow_pickle=True)  # proves the payload is live
    assert control.exists()
    with pytest.raises(ValueError):
        np.load(io.BytesIO(buf.getvalue()), allow_pickle=False)

    name = members[2][0]
    assert name.endswith(".latent.npy")
    members[2] = (name, buf.getvalue())
    write_tar(folder / shard, members)
    attacker_rehash(folder, shard)

    with pytest.raises(ShardError, match="not a float16"):
        list(shards.iter_samples(folder))
    problems, codes = run_every_reader(folder, cli)
    assert not marker.exists(), "a reader unpickled an object-array .npy"
    key = name.split(".", 1)[0]
    assert any(key in p and "does not decode" in p for p in problems), problems
    assert codes[0] != 0


# ---------------------------------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("fmt", ["wds", "parquet"])
def test_same_command_writes_the_same_bytes(tmp_path, tiny_vae, fmt):
    a = encode(tmp_path / "a", tiny_vae, "--format", fmt, n=9, per_shard=4)
    b = encode(tmp_path / "b", tiny_vae, "--format", fmt, n=9, per_shard=4)
    assert a == b
    files_a = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files_a == sorted(p.name for p in (tmp_path / "b").iterdir())
    assert len([f for f in files_a if f.endswith((".tar", ".parquet"))]) == 3
    for name in files_a:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


# ---------------------------------------------------------------------------------------------------- labels


def set_label(folder: Path, shard: str, position: int, label) -> None:
    """Write `label` into a sample's json member and its sidecar, then rehash everything (as an attacker would), so
    only the range check can notice."""
    members = tar_members(folder / shard)
    name, data = [(n, d) for n, d in members if n.endswith(".json")][position]
    meta = json.loads(data)
    meta["label"] = label
    members[members.index((name, data))] = (name, shards.json_bytes(meta))
    write_tar(folder / shard, members)
    side_path = folder / shards.sidecar_name(shard)
    side = json.loads(side_path.read_text())
    side["labels"][position] = label
    side_path.write_text(json.dumps(side))
    attacker_rehash(folder, shard)


@pytest.mark.parametrize("label", [8, 9, -2, 1.5, "red_circle"])
def test_a_label_outside_the_class_range_is_refused_by_verify_and_the_loader(copy_of, cli, label):
    from ditpipe.pipeline.store import open_shards

    folder = copy_of("wds")
    set_label(folder, "shard-00001.tar", 2, label)  # shapes has 8 classes: 8 would train as the null class
    problems, _ = shards.verify(folder)
    assert any(p.startswith("shard-00001") and "label" in p and "8 classes" in p for p in problems), problems
    code, text = verify_cli(cli, folder)
    assert code != 0 and "shard-00001" in text and "label" in text
    store, _ = open_shards(folder)
    store.read(0)  # shard 0 is clean
    with pytest.raises(ShardError, match=r"shard-00001\.tar.*label"):
        store.read(5)


def test_labels_at_the_edges_of_the_range_are_accepted(copy_of):
    from ditpipe.pipeline.store import open_shards

    folder = copy_of("wds")
    set_label(folder, "shard-00001.tar", 0, 7)
    set_label(folder, "shard-00001.tar", 1, 0)
    problems, _ = shards.verify(folder)
    assert problems == []
    store, _ = open_shards(folder)
    assert [store.read(g)[1] for g in (5, 6)] == [7, 0]
