"""Latent codecs: the diffusers AutoencoderKL wrapper (a tiny random VAE loaded from disk), the pixel codec,
offline hub failures, and out-of-memory backoff."""

from __future__ import annotations

import json
import shutil
import time
import weakref
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL

from ditpipe.pipeline.codec import PixelCodec, VaeCodec, encode_with_backoff, is_oom, load_codec
from ditpipe.pipeline.errors import CodecError

CPU = torch.device("cpu")


def images(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    """uint8 (n, size, size, 3) with structure (a ramp) plus noise, so every sample differs."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 255, size).view(1, 1, size, 1).expand(n, size, size, 3)
    noise = torch.randint(-40, 40, (n, size, size, 3), generator=g)
    return (ramp + noise).clamp(0, 255).to(torch.uint8)


def direct(path: Path, x_uint8: torch.Tensor, dtype=torch.float32):
    """What diffusers itself gives for the same images: the reference the codec must match."""
    vae = AutoencoderKL.from_pretrained(path, torch_dtype=dtype).eval()
    x = (x_uint8.permute(0, 3, 1, 2).float() / 127.5 - 1.0).to(dtype)
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
    return vae, dist


def save_vae(path: Path, seed: int = 1, **config) -> Path:
    torch.manual_seed(seed)
    kw = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
              up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
              latent_channels=4, norm_num_groups=8, sample_size=32)
    kw.update(config)
    AutoencoderKL(**kw).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def codec(tiny_vae) -> VaeCodec:
    return load_codec(str(tiny_vae), "fp32", device=CPU)


# ---------------------------------------------------------------------------------------------------- VAE codec


def test_encode_equals_diffusers_posterior(codec, tiny_vae):
    x = images(5, 16)
    mean, std = codec.encode(x)
    assert isinstance(codec, VaeCodec) and codec.stores_std
    assert mean.shape == std.shape == (5, 4, 8, 8)
    assert mean.dtype == std.dtype == torch.float32
    assert torch.isfinite(mean).all() and torch.isfinite(std).all()
    assert (std > 0).all()
    _, dist = direct(tiny_vae, x)
    assert torch.allclose(mean, dist.mean, atol=1e-6, rtol=0)
    assert torch.allclose(std, dist.std, atol=1e-6, rtol=0)
    # Per-sample: the samples are not all the same latent, and a sample does not depend on its batch mates.
    assert not torch.allclose(mean[0], mean[1])
    alone, _ = codec.encode(x[2:3])
    assert torch.allclose(alone[0], mean[2], atol=1e-5)


def test_encode_non_square_shapes(codec):
    x = images(2, 24)[:, :, :16]  # (2, 24, 16, 3): H=24, W=16
    mean, std = codec.encode(x.contiguous())
    assert mean.shape == std.shape == (2, 4, 12, 8)


def test_encode_is_never_under_fp16_autocast(codec):
    x = images(3, 16)
    mean, std = codec.encode(x)
    with torch.autocast("cpu", dtype=torch.float16):
        m16, s16 = codec.encode(x)
    assert m16.dtype == torch.float32
    assert torch.equal(m16, mean) and torch.equal(s16, std)
    with torch.autocast("cpu", dtype=torch.float16):
        z = codec.decode(mean)
    assert z.dtype == torch.float32 and torch.equal(z, codec.decode(mean))


def test_decode_range_and_shape(codec, tiny_vae):
    x = images(3, 16)
    mean, _ = codec.encode(x)
    out = codec.decode(mean)
    assert out.shape == (3, 3, 16, 16) and out.dtype == torch.float32
    assert out.min() >= -1 and out.max() <= 1
    vae, _ = direct(tiny_vae, x)
    with torch.no_grad():
        ref = vae.decode(mean).sample
    assert torch.allclose(out, ref.clamp(-1, 1), atol=1e-5)
    big = codec.decode(mean * 50)  # far outside the usual range: still clamped into [-1, 1]
    assert big.min() >= -1 and big.max() <= 1


def test_identity_reads_the_vae_config(codec, tmp_path):
    ident = codec.identity()
    assert ident["kind"] == "vae" and ident["dtype"] == "fp32"
    assert ident["scaling_factor"] == pytest.approx(0.18215)  # diffusers' default, read from the config
    assert ident["shift_factor"] == 0.0  # config None → 0
    assert ident["downsample"] == 2 and ident["latent_channels"] == 4
    assert len(ident["hash"]) == 64

    other = save_vae(tmp_path / "f4", block_out_channels=(8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 3,
                     up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=8, scaling_factor=0.3611,
                     shift_factor=0.1159)
    c2 = load_codec(str(other), device=CPU)
    i2 = c2.identity()
    assert i2["scaling_factor"] == pytest.approx(0.3611)
    assert i2["shift_factor"] == pytest.approx(0.1159)
    assert i2["downsample"] == 4 and i2["latent_channels"] == 8
    assert c2.scaling_factor == pytest.approx(0.3611) and c2.shift_factor == pytest.approx(0.1159)
    mean, std = c2.encode(images(2, 16))
    assert mean.shape == std.shape == (2, 8, 4, 4)
    assert i2["hash"] != ident["hash"]


def test_hash_stable_across_loads_and_sensitive_to_one_weight(tiny_vae, tmp_path):
    a = load_codec(str(tiny_vae), device=CPU).identity()["hash"]
    b = load_codec(str(tiny_vae), device=CPU).identity()["hash"]
    assert a == b
    vae = AutoencoderKL.from_pretrained(tiny_vae)
    with torch.no_grad():
        vae.encoder.conv_in.weight[0, 0, 0, 0] += 1e-3
    vae.save_pretrained(tmp_path / "nudged")
    assert load_codec(str(tmp_path / "nudged"), device=CPU).identity()["hash"] != a
    # The config is hashed too: the same weights with another scaling factor are another codec.
    cfg_changed = tmp_path / "rescaled"
    shutil.copytree(tiny_vae, cfg_changed)
    cfg = json.loads((cfg_changed / "config.json").read_text())
    cfg["scaling_factor"] = 0.5
    (cfg_changed / "config.json").write_text(json.dumps(cfg))
    c = load_codec(str(cfg_changed), device=CPU)
    assert c.identity()["scaling_factor"] == 0.5 and c.identity()["hash"] != a
    # Where the folder lives is not part of the identity's hash: a copy elsewhere is the same codec.
    copy = tmp_path / "elsewhere" / "copy-of-vae"
    shutil.copytree(tiny_vae, copy)
    copied = load_codec(str(copy), device=CPU).identity()
    assert copied["hash"] == a and copied["name"] == str(copy.resolve())


def test_local_folder_name_is_resolved_absolute_path(tiny_vae, monkeypatch):
    monkeypatch.chdir(tiny_vae.parent)
    expect = str(tiny_vae.resolve())
    for spelling in (tiny_vae.name, f"./{tiny_vae.name}", f"../{tiny_vae.parent.name}/{tiny_vae.name}",
                     str(tiny_vae)):
        codec = load_codec(spelling, device=CPU)
        assert codec.name == expect and codec.identity()["name"] == expect
        assert Path(codec.name).is_absolute()


def test_pipeline_folder_with_vae_subfolder(tiny_vae, tmp_path):
    root = tmp_path / "pipe"
    root.mkdir()
    shutil.copytree(tiny_vae, root / "vae")
    (root / "model_index.json").write_text("{}")
    codec = load_codec(str(root), device=CPU)
    base = load_codec(str(tiny_vae), device=CPU)
    assert codec.identity()["hash"] == base.identity()["hash"]
    x = images(2, 16)
    assert torch.equal(codec.encode(x)[0], base.encode(x)[0])


def test_bf16_on_cpu_close_to_fp32(codec, tiny_vae):
    c16 = load_codec(str(tiny_vae), "bf16", device=CPU)
    assert next(c16.vae.parameters()).dtype == torch.bfloat16
    ident = c16.identity()
    assert ident["dtype"] == "bf16"
    x = images(4, 16)
    m32, s32 = codec.encode(x)
    m16, s16 = c16.encode(x)
    assert m16.dtype == torch.float32 and m16.shape == m32.shape
    assert torch.isfinite(m16).all() and (s16 > 0).all()
    scale = m32.abs().max()
    assert (m16 - m32).abs().max() < 0.05 * scale
    assert (s16 - s32).abs().max() < 0.05 * s32.abs().max()
    assert not torch.equal(m16, m32)  # it really ran in bf16
    out = c16.decode(m16)
    assert out.dtype == torch.float32 and out.shape == (4, 3, 16, 16)
    assert (out - codec.decode(m32)).abs().max() < 0.1


def test_use_slicing_gives_the_same_latents(codec, tiny_vae):
    sliced = load_codec(str(tiny_vae), device=CPU, use_slicing=True)
    assert sliced.vae.use_slicing
    x = images(3, 16)
    assert torch.allclose(sliced.encode(x)[0], codec.encode(x)[0], atol=1e-5)


# ---------------------------------------------------------------------------------------------------- pixel codec


def test_pixel_codec_is_the_image_in_unit_range():
    codec = load_codec("pixel", device=CPU)
    assert isinstance(codec, PixelCodec) and not codec.stores_std
    values = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    x = torch.stack([values.view(16, 16), values.flip(0).view(16, 16), torch.zeros(16, 16, dtype=torch.uint8)],
                    -1).unsqueeze(0)  # (1, 16, 16, 3): R = 0..255, G = 255..0, B = 0
    z, std = codec.encode(x)
    assert std is None
    assert z.dtype == torch.float32 and z.shape == (1, 3, 16, 16)
    expect = x.permute(0, 3, 1, 2).to(torch.float32) / torch.tensor(127.5, dtype=torch.float32) - 1.0
    assert torch.equal(z, expect)
    assert z[0, 0].min() == -1.0 and z[0, 0].max() == 1.0  # exact ends
    assert z[0, 0, 0, 0] == -1.0 and z[0, 1, 0, 0] == 1.0 and (z[0, 2] == -1.0).all()  # channel order R, G, B
    ident = codec.identity()
    assert ident["kind"] == "pixel" and ident["name"] == "pixel"
    assert ident["downsample"] == 1 and ident["latent_channels"] == 3
    assert ident["scaling_factor"] == 1.0 and ident["shift_factor"] == 0.0
    assert ident["hash"] == PixelCodec().identity()["hash"]
    back = codec.decode(torch.tensor([[-3.0, -1.0, 0.25, 1.0, 7.0]]))
    assert back.tolist() == [[-1.0, -1.0, 0.25, 1.0, 1.0]]
    assert torch.equal(codec.decode(z), z)


def test_pixel_codec_does_not_import_diffusers_weights():
    codec = load_codec("pixel", device=CPU)
    assert not hasattr(codec, "vae")


# ---------------------------------------------------------------------------------------------------- load errors


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument is deprecated")  # diffusers → hf_hub
@pytest.mark.parametrize("hub_id", ["stabilityai/sd-vae-ft-ema", "ditpipe-tests/no-such-vae"])
def test_hub_id_offline_fails_clearly_and_fast(hub_id, tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    home = tmp_path / "hf-home"
    home.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(hf_constants, "HF_HOME", str(home))  # read at import time: point the live values too
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # so the id is not accidentally a local folder
    start = time.perf_counter()
    with pytest.raises(CodecError) as err:
        load_codec(hub_id, device=CPU)
    assert time.perf_counter() - start < 10
    msg = str(err.value)
    assert hub_id in msg
    assert "--vae pixel" in msg
    folder = f"/models/{hub_id.rsplit('/', 1)[-1]}"
    assert f"`hf download {hub_id} --local-dir {folder}`" in msg and f"--vae {folder}" in msg  # the local-path fix
    assert "HF_HUB_OFFLINE" in msg


def test_bad_local_folder_names_it(tmp_path):
    folder = tmp_path / "not-a-vae"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(CodecError) as err:
        load_codec(str(folder), device=CPU)
    assert str(folder) in str(err.value)
    assert "config.json" in str(err.value)


def test_local_folder_with_broken_weights(tiny_vae, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(tiny_vae, folder)
    for f in folder.glob("*.safetensors"):
        f.write_bytes(b"garbage")
    with pytest.raises(CodecError, match="broken"):
        load_codec(str(folder), device=CPU)


# ---------------------------------------------------------------------------------------------------- OOM backoff


class LimitedCodec(VaeCodec):
    """Our VAE codec on a device with room for `limit` images at once: a larger batch allocates its activations and
    then fails as CUDA does, with torch.OutOfMemoryError (or `error`). Records each call's batch and, whenever the
    back-off frees memory, whether the failed call's activations were still alive then."""

    def __init__(self, real: VaeCodec, limit: int, error=None):
        super().__init__(real.vae, real.name, real.dtype_name, real.device)
        self.limit, self.calls, self.alive_at_release = limit, [], []
        self.error = error or (lambda n: torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {n} GiB"))
        self._failed = lambda: None

    def encode(self, x):
        self.calls.append(len(x))
        if len(x) > self.limit:
            activations = torch.empty(len(x), 4, 1 << 12)  # what the failed forward held when it ran out
            self._failed = weakref.ref(activations)
            raise self.error(len(x))
        return super().encode(x)

    def release_memory(self):
        self.alive_at_release.append(self._failed() is not None)
        super().release_memory()


def test_backoff_halves_and_matches_unconstrained(codec):
    x = images(11, 16)
    full_mean, full_std = codec.encode(x)
    limited = LimitedCodec(codec, limit=2)
    state = {"batch": 8}
    mean, std = encode_with_backoff(limited, x, state)
    assert state["batch"] == 2 and state["halvings"] == 2  # 8 → 4 → 2
    assert limited.calls[:2] == [8, 4] and max(limited.calls[2:]) <= 2
    assert sum(n for n in limited.calls if n <= 2) == 11  # every image encoded exactly once
    assert mean.shape == full_mean.shape == (11, 4, 8, 8)
    assert torch.allclose(mean, full_mean, atol=1e-5) and torch.allclose(std, full_std, atol=1e-5)
    # The smaller batch is kept for the next call: no new failures.
    limited.calls.clear()
    encode_with_backoff(limited, x[:5], state)
    assert limited.calls == [2, 2, 1] and state["halvings"] == 2


def test_backoff_frees_memory_after_leaving_the_except_block(codec):
    """Inside `except`, the traceback still holds the failed call's frames and so its activations: memory freed there
    frees nothing. The back-off frees (gc + empty_cache) once the exception is gone, before each retry."""
    limited = LimitedCodec(codec, limit=1)
    encode_with_backoff(limited, images(4, 16), {"batch": 4})
    assert limited.alive_at_release == [False, False]  # one release per halving (4 → 2 → 1), none held alive


def test_backoff_recognises_runtime_oom_message(codec):
    x = images(4, 16)
    limited = LimitedCodec(codec, limit=1, error=lambda n: RuntimeError("CUDA error: out of memory"))
    state = {"batch": 4}
    mean, _ = encode_with_backoff(limited, x, state)
    assert state["batch"] == 1 and state["halvings"] == 2
    assert torch.allclose(mean, codec.encode(x)[0], atol=1e-5)
    assert is_oom(torch.OutOfMemoryError("x")) and not is_oom(RuntimeError("shape mismatch"))


class LimitedPixelCodec(PixelCodec):
    def encode(self, x):
        if len(x) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return super().encode(x)


def test_backoff_pixel_codec_keeps_std_none():
    x = images(5, 8)
    mean, std = encode_with_backoff(LimitedPixelCodec(), x, {"batch": 4})
    assert std is None and torch.equal(mean, PixelCodec().encode(x)[0])


def test_oom_at_batch_one_is_a_codec_error_with_fixes(codec):
    limited = LimitedCodec(codec, limit=0)
    state = {"batch": 4}
    with pytest.raises(CodecError) as err:
        encode_with_backoff(limited, images(3, 16), state)
    msg = str(err.value)
    assert "batch 1" in msg and "bf16" in msg and "use_slicing" in msg and "--image-size" in msg
    assert limited.calls == [3, 2, 1]  # 3 images at batch 4, then halved twice


def test_non_oom_runtime_error_propagates_unchanged(codec):
    boom = RuntimeError("Given groups=1, weight of size [8, 3, 3, 3], expected input to have 3 channels")
    limited = LimitedCodec(codec, limit=0, error=lambda n: boom)
    state = {"batch": 4}
    with pytest.raises(RuntimeError) as err:
        encode_with_backoff(limited, images(3, 16), state)
    assert err.value is boom and not isinstance(err.value, CodecError)
    assert state == {"batch": 4} and limited.calls == [3]  # no retry, no halving
