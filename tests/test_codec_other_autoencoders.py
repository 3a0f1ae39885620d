"""Any autoencoder (issue 19): a tiny random-init AutoencoderDC (deterministic, 32× down in real life), an
SD3-shaped AutoencoderKL (16 channels, a shift factor) and an AutoencoderTiny (TAESD), each saved with
save_pretrained and loaded from disk by the real code, through encode, verify, train, resume, sample and export;
and another decoder for a run's latents (validation.decoder, sample --decoder), checked before it is used."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ditpipe.pipeline import shards
from ditpipe.pipeline.codec import CrossDecoder, load_codec, load_decoder
from ditpipe.pipeline.config import load_config
from ditpipe.pipeline.errors import CodecError
from ditpipe.stages.encode import encode
from ditpipe.stages.export import export
from ditpipe.pipeline.sample_options import SampleOptions
from ditpipe.stages.sample import sample
from ditpipe.pipeline.run import resume_config
from ditpipe.stages.train import train

from conftest import assert_common_checkpoints_equal, reset_accelerate
from tiny import TINY_MODEL

CPU = torch.device("cpu")


def save_dc(path: Path) -> Path:
    from diffusers import AutoencoderDC

    torch.manual_seed(0)  # f4: 3 levels; ResBlocks, then an EfficientViT block with multi-scale attention, as Sana's
    AutoencoderDC(in_channels=3, latent_channels=8, attention_head_dim=8,
                  encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
                  decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
                  encoder_block_out_channels=(8, 16, 16), decoder_block_out_channels=(8, 16, 16),
                  encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1),
                  encoder_qkv_multiscales=((), (), (5,)), decoder_qkv_multiscales=((), (), (5,)),
                  downsample_block_type="Conv", upsample_block_type="interpolate",
                  scaling_factor=0.41407).save_pretrained(path)
    return path


def save_sd3(path: Path) -> Path:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)  # SD3's latent space: 16 channels, scaling 1.5305 and shift 0.0609, no quant convs (f2 here)
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                  latent_channels=16, norm_num_groups=8, sample_size=32, scaling_factor=1.5305, shift_factor=0.0609,
                  use_quant_conv=False, use_post_quant_conv=False).save_pretrained(path)
    return path


def save_tiny(path: Path, channels: int = 4) -> Path:
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)  # TAESD's layout at f2: 2 levels
    AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 1),
                    num_decoder_blocks=(1, 1), latent_channels=channels).save_pretrained(path)
    return path


# kind: (builder, class, downsample, channels, slices, patch)
KINDS = {
    "dc-ae": (save_dc, "AutoencoderDC", 4, 8, ["mean", "mean_flip"], 1),
    "sd3": (save_sd3, "AutoencoderKL", 2, 16, ["mean", "std", "mean_flip", "std_flip"], 2),
    "taesd": (save_tiny, "AutoencoderTiny", 2, 4, ["mean", "mean_flip"], 2),
}


@pytest.fixture(scope="module")
def autoencoders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("autoencoders")
    return {kind: spec[0](root / kind) for kind, spec in KINDS.items()}


def data(vae: Path, shards_path: Path, n: int = 32) -> dict:
    return {"data.dataset_name": "shapes", "data.image_size": 16, "data.num_samples": n, "vae.name": str(vae),
            "shards.path": str(shards_path), "data.num_workers": 0}


def run_over(base: dict, out: Path, name: str, patch: int, **over) -> dict:
    return {**base, **TINY_MODEL, "model.name": "DiT-S/2", "model.patch_size": patch,
            "training.mixed_precision": "no", "training.batch_size": 8,
            "training.gradient_accumulation_steps": 1, "training.max_steps": 4, "checkpointing.steps": 2,
            "logging.output_dir": str(out), "logging.run_name": name, "logging.tensorboard": False,
            "lr_scheduler.warmup_steps": 1, **over}


@pytest.mark.parametrize("kind", list(KINDS))
def test_autoencoder_through_encode_verify_train_resume_sample_export(tmp_path, autoencoders, kind, capsys):
    _, cls, down, channels, slices, patch = KINDS[kind]
    base = data(autoencoders[kind], tmp_path / "shards")
    manifest = encode(load_config(None, base))
    codec = manifest["codec"]
    assert (codec["class"], codec["downsample"], codec["latent_channels"]) == (cls, down, channels)
    assert manifest["latent"]["slices"] == slices and manifest["latent"]["shape"] == [len(slices), channels,
                                                                                       16 // down, 16 // down]
    assert manifest["latent"]["std_stored"] == (kind == "sd3")
    if kind == "sd3":  # the shift factor travels into the latent normalisation
        assert codec["shift_factor"] == pytest.approx(0.0609) and codec["scaling_factor"] == pytest.approx(1.5305)
    assert shards.verify(tmp_path / "shards") == ([], 32)

    # A deterministic codec ships no std, so the step has no posterior noise to draw.
    from ditpipe.pipeline.loader import MicroBatches
    from ditpipe.pipeline.order import EpochOrder, Plan
    from ditpipe.pipeline.store import open_shards

    store, _ = open_shards(tmp_path / "shards")
    batch = MicroBatches(store, EpochOrder(store.counts, 0, 8), Plan(32, 8, 1, 1), 0, 0)[(0, 0)]
    assert batch["mean"].shape == (8, channels, 16 // down, 16 // down) and ("std" in batch) == (kind == "sd3")

    out = tmp_path / "out"
    capsys.readouterr()
    full = train(load_config(None, run_over(base, out, "full", patch)))
    reset_accelerate()
    tokens = (16 // down // patch) ** 2  # DC-AE at patch 1: 4×4 latents, 16 tokens; the f2 ones at patch 2: 16
    assert f"{tokens} tokens per image" in capsys.readouterr().err  # the preflight
    half = train(load_config(None, run_over(base, out, "half", patch, **{"training.max_steps": 2})))
    reset_accelerate()
    ckpt = half / "checkpoint-2"
    train(resume_config(ckpt, overrides={"training.max_steps": 4}), resume=ckpt)
    reset_accelerate()
    assert "checkpoint-4" in assert_common_checkpoints_equal(half, full)  # the resumed run is the uninterrupted one

    images = sample(full, SampleOptions(num=2, steps=2), out=tmp_path / "grid.png", out_dir=None)
    assert images.shape == (2, 16, 16, 3) and (tmp_path / "grid.png").is_file()

    export(full / "checkpoint-4", "safetensors", tmp_path / "export")
    meta = json.loads((tmp_path / "export" / "config.json").read_text())
    assert meta["manifest"]["codec"]["class"] == cls and (tmp_path / "export" / "model.safetensors").is_file()


def test_unknown_autoencoder_class_is_refused_naming_the_families(tmp_path, tiny_vae):
    import shutil

    folder = tmp_path / "unet"
    shutil.copytree(tiny_vae, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "_class_name": "UNet2DModel"}))
    with pytest.raises(CodecError, match=r"holds a UNet2DModel.*AutoencoderKL, AutoencoderDC, AutoencoderTiny"):
        load_codec(str(folder), device=CPU)


def test_another_decoder_maps_the_latent_space_and_is_checked(tmp_path, tiny_vae, autoencoders):
    run_codec = load_codec(str(tiny_vae), device=CPU)  # f2, 4 channels, scaling 0.18215: an SD-VAE's shape
    record = run_codec.identity()
    taesd = save_tiny(tmp_path / "taesd")  # f2, 4 channels, its own factors 1 and 0: TAESD's
    decoder = load_decoder(str(taesd), record, device=CPU)
    assert isinstance(decoder, CrossDecoder)
    z = torch.randn(2, 4, 4, 4)  # raw latents of the run's codec
    direct = load_codec(str(taesd), device=CPU).decode(z * 0.18215)  # SD's shared space is TAESD's raw one
    assert torch.allclose(decoder.decode(z), direct, atol=1e-6)
    assert not isinstance(load_decoder(str(tiny_vae), record, device=CPU), CrossDecoder)  # the run's own: as is
    with pytest.raises(CodecError, match=r"8 channels, 4× down\) cannot decode latents .* 4 channels, 2× down"):
        load_decoder(str(autoencoders["dc-ae"]), record, device=CPU)
    with pytest.raises(CodecError, match="cannot decode"):
        load_decoder("pixel", record, device=CPU)


def test_validation_decoder_and_sample_decoder_use_the_other_autoencoder(tmp_path, tiny_vae, autoencoders):
    taesd = save_tiny(tmp_path / "taesd")
    base = data(tiny_vae, tmp_path / "shards", n=16)
    encode(load_config(None, base))
    run = train(load_config(None, run_over(base, tmp_path / "out", "r", 2, **{
        "training.max_steps": 2, "validation.every_steps": 2, "validation.num_samples": 2,
        "validation.sampling_steps": 2, "validation.decoder": str(taesd)})))
    reset_accelerate()
    assert (run / "samples" / "step-0000002.png").is_file()
    ours = sample(run, SampleOptions(num=2, steps=2), out=None, decoder=str(taesd))
    theirs = sample(run, SampleOptions(num=2, steps=2), out=None)
    assert ours.shape == theirs.shape == (2, 16, 16, 3) and not (ours == theirs).all()  # another decoder decoded
    with pytest.raises(CodecError, match="cannot decode"):
        sample(run, SampleOptions(num=2, steps=2), out=None, decoder=str(autoencoders["dc-ae"]))


@pytest.mark.slow  # builds and saves DC-AE f32c32's real architecture (random weights, 1.2 GB): about 80 s here
def test_bench_encode_measures_dc_ae_against_its_bare_forward(tmp_path):
    from test_bench import close, ditpipe, positive

    proc = ditpipe("bench", "encode", "--vae-shape", "dc-ae", "--image-size", "32", "--encode-images", "4",
                   "--encode-batch", "2", "--jpeg-count", "2", "--num-workers", "1", "--threads", "1",
                   "--json", str(tmp_path / "r.json"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    e = json.loads(proc.stdout)["encode"]
    assert (e["vae_shape"], e["image_size"], e["batch_size"], e["forwards_per_image"]) == ("dc-ae", 32, 2, 2)
    assert positive(e["pipeline_images_per_s"], e["bare_images_per_s"], e["vae_encoder_gflops_per_image"])
    assert close(e["ratio"], e["pipeline_images_per_s"] / e["bare_images_per_s"])
    assert e["vae_encoder_gflops_per_image"] > 4  # the real f32c32 encoder (5 GFLOPs at 32 px), not a toy
