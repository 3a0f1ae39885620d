"""Latent codecs: a diffusers AutoencoderKL, or `pixel` (the image itself, for VAE-free runs).

encode: uint8 images (N, H, W, 3) → posterior (mean, std) in float32, std None for the pixel codec.
decode: unscaled latents → images in [-1, 1]. Training applies `(z - shift) * scale` from the manifest, never
literals; `identity()` is what the manifest records so a cache can never be reused with another codec.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.errors import CodecError

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) → float32 (N, 3, H, W) in [-1, 1]."""
    return images.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


@dataclass
class PixelCodec:
    """The image in [-1, 1] is the latent. Its flip is exact, so it is done at load time, not stored."""

    name: str = "pixel"
    device: torch.device = torch.device("cpu")
    downsample: int = 1
    latent_channels: int = 3
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    stores_std: bool = False

    def identity(self) -> dict:
        return {"kind": "pixel", "name": "pixel", "hash": hashlib.sha256(b"ditpipe-pixel-codec-v1").hexdigest(),
                "dtype": "fp32", "scaling_factor": self.scaling_factor, "shift_factor": self.shift_factor,
                "downsample": self.downsample, "latent_channels": self.latent_channels}

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, None]:
        return to_unit_range(images), None  # (N, 3, H, W)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z.float().clamp(-1, 1)

    def to(self, device) -> "PixelCodec":
        self.device = torch.device(device)
        return self

    def release_memory(self) -> None:
        pass  # nothing on a device to free


class VaeCodec:
    """diffusers AutoencoderKL. Runs in fp32 or bf16 and never under fp16 autocast: SD VAEs overflow to NaN there."""

    stores_std = True

    def __init__(self, vae, name: str, dtype: str, device: torch.device):
        self.vae, self.name, self.dtype_name, self.device = vae, name, dtype, device
        self.dtype = _DTYPES[dtype]
        cfg = vae.config
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)
        self.latent_channels = int(cfg.latent_channels)
        self.scaling_factor = float(cfg.scaling_factor)
        self.shift_factor = float(cfg.shift_factor) if getattr(cfg, "shift_factor", None) is not None else 0.0
        self._hash: str | None = None

    def identity(self) -> dict:
        return {"kind": "vae", "name": self.name, "hash": self.weights_hash(), "dtype": self.dtype_name,
                "scaling_factor": self.scaling_factor, "shift_factor": self.shift_factor,
                "downsample": self.downsample, "latent_channels": self.latent_channels}

    def weights_hash(self) -> str:
        """sha256 of the config and every weight: the same id with other weights is another codec."""
        if self._hash is None:
            # Keys starting with "_" (`_name_or_path`, `_diffusers_version`) say where and by what it was saved,
            # not what the model is: a copied folder or a diffusers upgrade is the same codec.
            config = {k: v for k, v in dict(self.vae.config).items() if not k.startswith("_")}
            h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
            for name, tensor in sorted(self.vae.state_dict().items()):
                h.update(name.encode())
                h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
            self._hash = h.hexdigest()
        return self._hash

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (N, H, W, 3), on any device → posterior (mean, std). The bytes move (asynchronously from pinned
        memory) and become floats on the VAE's device; NHWC permuted is channels_last, the layout the VAE runs in."""
        x = to_unit_range(images.to(self.device, non_blocking=True)).to(self.dtype)  # (N, 3, H, W)
        with torch.autocast(device_type=self.device.type, enabled=False):
            dist = self.vae.encode(x).latent_dist
        return dist.mean.float(), dist.std.float()  # (N, C, H/f, W/f) each

    def release_memory(self) -> None:
        """After an out-of-memory: collect what the failed call left in reference cycles, then hand the allocator's
        cached blocks back to the device, so the retry at half the batch starts from a clean pool."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=self.device.type, enabled=False):
            return self.vae.decode(z.to(self.device, self.dtype)).sample.float().clamp(-1, 1)

    def to(self, device) -> "VaeCodec":
        """Move the VAE (training parks a validation decoder on the CPU between validations)."""
        self.vae.to(device)
        self.device = torch.device(device)
        return self


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def load_codec(name: str, dtype: str = "fp32", device: torch.device | None = None, use_slicing: bool = False):
    """`pixel`, a local diffusers folder (the VAE itself, or a pipeline folder with `vae/`), or a hub id."""
    device = device or default_device()
    if name == "pixel":
        return PixelCodec(device=device)
    from diffusers import AutoencoderKL  # heavy; only VAE runs pay for it

    path = Path(name)
    if path.exists():
        sub = "vae" if (path / "vae" / "config.json").is_file() and not (path / "config.json").is_file() else None
        try:
            vae = AutoencoderKL.from_pretrained(path, subfolder=sub, torch_dtype=_DTYPES[dtype])
            name = str(path.resolve())  # one folder, one name, however it was spelled
        except Exception as e:  # diffusers raises many types for a bad folder
            raise CodecError(f"cannot load a diffusers AutoencoderKL from '{path}': {e}. The folder needs "
                             "config.json and diffusion_pytorch_model.safetensors (save_pretrained's layout)") from None
    else:
        vae = _from_hub(AutoencoderKL, name, _DTYPES[dtype])
    vae = vae.eval().requires_grad_(False)
    if use_slicing:
        vae.enable_slicing()
    codec = VaeCodec(vae, name, dtype, torch.device("cpu"))
    codec.weights_hash()  # while the weights are still in host memory: no device-to-host copy of every tensor
    return codec.to(device)


def _from_hub(cls, name: str, dtype: torch.dtype):
    folder = f"/models/{name.rstrip('/').rsplit('/', 1)[-1]}"
    fixes = (f"Fixes: on a machine with network, `hf download {name} --local-dir {folder}`, copy that folder here and"
             f" pass --vae {folder}; or use --vae pixel for a VAE-free run.")
    try:  # the local Hugging Face cache first: works offline and never touches the network
        return cls.from_pretrained(name, local_files_only=True, torch_dtype=dtype)
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise CodecError(f"VAE '{name}' is not a local folder and not in the Hugging Face cache, and HF_HUB_OFFLINE "
                         f"is set. {fixes}")
    try:
        return cls.from_pretrained(name, torch_dtype=dtype)
    except Exception as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise CodecError(f"cannot load VAE '{name}': it is not a local folder, not in the Hugging Face cache, and "
                         f"the hub failed ({first}). {fixes}") from None


def is_oom(err: BaseException) -> bool:
    text = str(err).lower()
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in text or "cudnn_status_alloc_failed" in text


def encode_with_backoff(codec, images: torch.Tensor, state: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Encode in chunks of `state["batch"]`; on out-of-memory halve it (kept for later batches) and retry. The retry
    happens after the `except` block is left: until then the exception's traceback holds the failed chunk's
    activations, and freeing memory inside the block would free nothing."""
    means, stds, start = [], [], 0
    while start < len(images):
        n = state["batch"]
        result = _encode_or_oom(codec, images[start : start + n])
        if isinstance(result, str):  # out of memory; the exception and its frames are gone by now
            if n == 1:
                raise CodecError(f"the VAE ran out of memory even at batch 1 ({result}); try --vae-dtype bf16, "
                                 "vae.use_slicing, or a smaller --image-size")
            state["batch"] = max(1, n // 2)
            state["halvings"] = state.get("halvings", 0) + 1
            codec.release_memory()
            continue
        means.append(result[0])
        stds.append(result[1])
        start += n
    return torch.cat(means), (torch.cat(stds) if stds[0] is not None else None)


def _encode_or_oom(codec, chunk: torch.Tensor):
    """(mean, std), or the out-of-memory message as a string: only the text leaves the `except` block."""
    try:
        return codec.encode(chunk)
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not is_oom(e):
            raise
        return str(e)
