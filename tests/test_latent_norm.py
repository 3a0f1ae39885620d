"""Latent normalisation (`data.latent_norm`): the round trip is the identity, `channel` whitens real shards with the
manifest's statistics, training records it in the checkpoint, and `sample` inverts exactly what was recorded."""

import json

import numpy as np
import pytest
import torch

from ditpipe.pipeline.config import ConfigError, load_config
from ditpipe.pipeline.generate import SampleNoise, decode, generate
from ditpipe.pipeline.images import to_uint8
from ditpipe.pipeline.latent_norm import LatentNorm
from ditpipe.pipeline.loader import LatentView
from ditpipe.pipeline.order import sample_key
from ditpipe.pipeline.store import open_shards
from ditpipe.stages.encode import encode
from ditpipe.pipeline.sample_options import SampleOptions
from ditpipe.pipeline.sampleable import load_sampleable
from ditpipe.stages.sample import sample

from conftest import train_tiny

MANIFEST = {"codec": {"scaling_factor": 0.3611, "shift_factor": 0.1159}, "latent": {"shape": [4, 4, 8, 8]},
            "stats": {"channel_mean": [5.81, 3.25, 0.12, -2.15], "channel_std": [4.17, 4.62, 3.71, 3.28]}}


@pytest.mark.parametrize("kind", ["scale", "channel"])
def test_normalise_then_denormalise_is_the_identity(kind):
    norm = LatentNorm.from_manifest(MANIFEST, kind)
    z = torch.randn(3, 4, 8, 8, dtype=torch.float64) * 4 + 2  # (N, C, H, W) codec latents
    assert torch.allclose(norm.denormalize(norm.normalize(z)), z, rtol=0, atol=1e-12)
    assert torch.allclose(norm.normalize(norm.denormalize(z)), z, rtol=0, atol=1e-12)
    # the loader's in-place numpy path computes the same as the tensor path
    arr = z[0].float().numpy().copy()
    assert np.allclose(norm.normalize_array(arr), norm.normalize(z[:1].float())[0].numpy(), rtol=1e-6, atol=1e-6)
    # a checkpoint's record restores the same normalisation
    assert LatentNorm.from_record(json.loads(json.dumps(norm.record()))) == norm


def test_constants_come_from_the_manifest():
    scale = LatentNorm.from_manifest(MANIFEST, "scale")
    assert scale.shift == (0.1159,) * 4 and scale.scale == (0.3611,) * 4
    channel = LatentNorm.from_manifest(MANIFEST, "channel")
    assert channel.shift == tuple(MANIFEST["stats"]["channel_mean"])
    assert channel.scale == pytest.approx([1 / s for s in MANIFEST["stats"]["channel_std"]])


def test_channel_needs_statistics_and_a_spread():
    with pytest.raises(ConfigError, match="data.latent_norm.*stats"):
        LatentNorm.from_manifest({**MANIFEST, "stats": None}, "channel")
    flat = {**MANIFEST, "stats": {"channel_mean": [0, 0, 0, 0], "channel_std": [1, 0, 1, 1]}}
    with pytest.raises(ConfigError, match=r"channel\(s\) \[1\] are constant"):
        LatentNorm.from_manifest(flat, "channel")


def test_channel_norm_whitens_real_shards(tmp_path):
    """Pixel-codec shapes: every channel of the normalised data set has mean 0 and std 1 (flips do not change
    per-channel statistics, and the pixel codec stores no posterior noise)."""
    encode(load_config(None, {"data.dataset_name": "shapes", "data.image_size": 16, "data.num_samples": 64,
                              "vae.name": "pixel", "shards.path": str(tmp_path / "s"), "data.num_workers": 0}))
    store, manifest = open_shards(tmp_path / "s")
    raw = np.stack([store.read(g)[0][0].astype(np.float32) for g in range(64)])  # (N, 3, H, W)
    assert abs(raw.mean(axis=(0, 2, 3))).max() > 0.3  # black backgrounds: far from centred before
    view = LatentView(manifest, LatentNorm.from_manifest(manifest, "channel"))
    z = np.stack([view(store.read(g)[0], sample_key(0, 0, g)) for g in range(64)])  # (N, 3, H, W)
    assert np.allclose(z.mean(axis=(0, 2, 3)), 0, atol=1e-3) and np.allclose(z.std(axis=(0, 2, 3)), 1, atol=1e-3)


def test_training_records_channel_norm_and_sample_inverts_it(tmp_path):
    run = train_tiny(tmp_path, 64, **{"data.latent_norm": "channel", "training.max_steps": 3})
    ckpt = run / "checkpoint-3"
    shards = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    record = json.loads((ckpt / "manifest.json").read_text())["latent_norm"]
    assert record["kind"] == "channel" and record["shift"] == shards["stats"]["channel_mean"]
    assert record["scale"] == pytest.approx([1 / s for s in shards["stats"]["channel_std"]])

    s = load_sampleable(run)
    assert s.norm == LatentNorm.from_record(record)
    images = sample(run, SampleOptions(steps=3, seed=7), classes="0,5", out=None)
    z = generate(s.model, s.objective, s.latent_shape, torch.tensor([0, 5]), 2, None, 3, 4.0, 7, torch.device("cpu"),
                 noise=SampleNoise(7, [0, 1], torch.device("cpu")))  # sample i's noise keyed on (seed, i), as sample's
    mean = torch.tensor(record["shift"]).view(1, 3, 1, 1)
    std = 1 / torch.tensor(record["scale"]).view(1, 3, 1, 1)
    expected = ((z * std + mean).clamp(-1, 1) + 1) * 127.5  # the pixel codec decodes by clamping
    assert np.abs(images.astype(np.float32) - expected.permute(0, 2, 3, 1).numpy()).max() <= 1.0
    assert np.array_equal(images, to_uint8(decode(z, s.codec, s.norm)))
    assert not np.array_equal(images, to_uint8(decode(z, s.codec, LatentNorm.from_manifest(shards, "scale"))))


def test_channel_norm_refuses_the_online_images_mode(tmp_path):
    from ditpipe.stages.train import train

    cfg = load_config(None, {"data.dataset_name": "shapes", "data.image_size": 16, "data.num_samples": 32,
                             "vae.name": "pixel", "data.source": "images", "data.latent_norm": "channel",
                             "logging.output_dir": str(tmp_path)})
    with pytest.raises(ConfigError, match="data.latent_norm"):
        train(cfg)
