"""Latent codecs: any diffusers autoencoder of the families below, or `pixel` (the image itself, VAE-free runs).

The family comes from the autoencoder's own config (`_class_name`), and this is the one module that names one:
  AutoencoderKL    SD, SDXL, SD3, FLUX (16 channels, a shift factor): a posterior, so the shards store mean and std
                   and training draws z = mean + std·ε;
  AutoencoderDC    DC-AE (Sana; 32× down): deterministic, so the shards store the latent alone, and training draws
                   no posterior noise;
  AutoencoderTiny  TAESD / TAEF1 / TAESD3: deterministic, milliseconds to decode (fast validation grids).
encode: uint8 images (N, H, W, 3) → (mean, std) in float32, std None for deterministic codecs and the pixel codec.
decode: unscaled latents → images in [-1, 1]. Training applies `(z - shift) * scale` from the manifest, never
literals; `identity()` is what the manifest records (class, downsample factor, channels, a hash of config and
weights) so a cache can never be reused with another codec. `load_decoder` decodes one codec's latents with
another autoencoder of the same latent space (TAESD for an SD-VAE run), after checking that it can.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from ditpipe.pipeline.errors import CodecError

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class Family(NamedTuple):
    """How ditpipe drives one diffusers autoencoder class."""

    levels: str  # the config key whose length L sets the downsample factor, 2 ** (L - 1)
    output: str  # the attribute of `encode(x)`'s output that holds the latent (or the posterior)
    posterior: bool  # a distribution with mean and std (stored both), or a deterministic latent (stored alone)


FAMILIES = {
    "AutoencoderKL": Family("block_out_channels", "latent_dist", True),
    "AutoencoderDC": Family("encoder_block_out_channels", "latent", False),
    "AutoencoderTiny": Family("encoder_block_out_channels", "latents", False),
}


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) → float32 (N, 3, H, W) in [-1, 1]."""
    return images.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


@dataclass
class PixelCodec:
    """The image in [-1, 1] is the latent. Its flip is exact, so it is done at load time, not stored."""

    kind = "pixel"
    tuning: dict | None = None  # what tune_for_device set; None: never tuned
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

    def slices(self, store: str, flip: bool) -> list[str]:
        from ditpipe.pipeline.shards import latent_slices

        return latent_slices(False, store, flip, image=True)

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
    """A diffusers autoencoder of one of FAMILIES. Runs in fp32 or bf16 and never under fp16 autocast: SD VAEs
    overflow to NaN there."""

    kind = "vae"
    tuning: dict | None = None  # what tune_for_device set; None: never tuned

    def __init__(self, vae, name: str, dtype: str, device: torch.device):
        self.vae, self.name, self.dtype_name, self.device = vae, name, dtype, device
        self.dtype = _DTYPES[dtype]
        self.family_name = type(vae).__name__
        self.family = FAMILIES[self.family_name]
        self.stores_std = self.family.posterior  # mean and std (posterior), or the latent alone
        cfg = vae.config
        self.downsample = 2 ** (len(getattr(cfg, self.family.levels)) - 1)
        self.latent_channels = int(cfg.latent_channels)
        self.scaling_factor = float(cfg.scaling_factor)
        self.shift_factor = float(cfg.shift_factor) if getattr(cfg, "shift_factor", None) is not None else 0.0
        self._hash: str | None = None

    def identity(self) -> dict:
        return {"kind": "vae", "class": self.family_name, "name": self.name, "hash": self.weights_hash(),
                "dtype": self.dtype_name, "scaling_factor": self.scaling_factor, "shift_factor": self.shift_factor,
                "downsample": self.downsample, "latent_channels": self.latent_channels}

    def slices(self, store: str, flip: bool) -> list[str]:
        """The named slices its shards store (docs/design.md, Shards): a deterministic latent has no std."""
        from ditpipe.pipeline.shards import latent_slices

        return latent_slices(self.stores_std, store, flip, image=False)

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
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """uint8 (N, H, W, 3), on any device → (mean, std), std None for a deterministic codec. The bytes move
        (asynchronously from pinned memory) and become floats on the VAE's device; NHWC permuted is channels_last,
        the layout the VAE runs in."""
        return self.forward(to_unit_range(images.to(self.device, non_blocking=True)).to(self.dtype))

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The autoencoder's encoder alone on images already in [-1, 1], in its dtype on its device: (mean, std)."""
        with torch.autocast(device_type=self.device.type, enabled=False):
            out = getattr(self.vae.encode(x), self.family.output)
        if self.family.posterior:
            return out.mean.float(), out.std.float()  # (N, C, H/f, W/f) each
        return out.float(), None  # (N, C, H/f, W/f)

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


def with_class(record: dict) -> dict:
    """A manifest's codec record, with the class that records from before it was recorded omit: they were all
    AutoencoderKL, the only family then."""
    return {"class": "AutoencoderKL", **record} if record.get("kind") == "vae" else record


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def load_codec(name: str, dtype: str = "fp32", device: torch.device | None = None, use_slicing: bool = False):
    """`pixel`, a local diffusers folder (the autoencoder itself, or a pipeline folder with `vae/`), or a hub id; the
    class comes from the folder's config.json (`_class_name`), and must be one of FAMILIES."""
    device = device or default_device()
    if name == "pixel":
        return PixelCodec(device=device)
    path = Path(name)
    if path.exists():
        sub = "vae" if (path / "vae" / "config.json").is_file() and not (path / "config.json").is_file() else None
        try:
            cls = _family_class(_read_config(path, sub), str(path))
            vae = cls.from_pretrained(path, subfolder=sub, torch_dtype=_DTYPES[dtype])
            name = str(path.resolve())  # one folder, one name, however it was spelled
        except CodecError:
            raise
        except Exception as e:  # diffusers raises many types for a bad folder
            raise CodecError(f"cannot load a diffusers autoencoder from '{path}': {e}. The folder needs "
                             "config.json and diffusion_pytorch_model.safetensors (save_pretrained's layout)") from None
    else:
        vae = _from_hub(name, _DTYPES[dtype])
    vae = vae.eval().requires_grad_(False)
    if use_slicing:
        vae.enable_slicing()
    codec = VaeCodec(vae, name, dtype, torch.device("cpu"))
    codec.weights_hash()  # while the weights are still in host memory: no device-to-host copy of every tensor
    return codec.to(device)


def tune_for_device(codec, cudnn_benchmark: bool) -> None:
    """The one tuning of a VAE that runs at scale, shared by encode, the bench's bare VAE and the online-VAE baseline
    (so the bench's speed-up of precomputed latents compares like with like). On CUDA: the VAE in channels_last (the
    layout tensor cores want; the uint8 NHWC batch permuted is already in it) and cuDNN's timed choice of convolution
    kernels (vae.cudnn_benchmark; process-wide). Elsewhere nothing changes. `codec.tuning` records what was set."""
    cuda = codec.device.type == "cuda" and codec.kind != "pixel"
    if cuda:
        torch.backends.cudnn.benchmark = cudnn_benchmark
        codec.vae.to(memory_format=torch.channels_last)
    codec.tuning = {"channels_last": cuda, "cudnn_benchmark": cuda and cudnn_benchmark}


def _read_config(path: Path, sub: str | None) -> dict:
    file = path / (sub or ".") / "config.json"
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise CodecError(f"cannot load a diffusers autoencoder from '{path}': {file.name} is missing or unreadable "
                         f"({type(e).__name__}). The folder needs config.json and diffusion_pytorch_model.safetensors "
                         "(save_pretrained's layout)") from None
    if not isinstance(config, dict):
        raise CodecError(f"'{file}' is not a diffusers config (a JSON object)")
    return config


def _family_class(config: dict, where: str):
    """The diffusers class that config.json names, when it is one ditpipe encodes with."""
    import diffusers  # heavy; only autoencoder runs pay for it

    name = config.get("_class_name")
    if name not in FAMILIES:
        raise CodecError(f"'{where}' holds a {name or 'model of no stated class'} (config.json's _class_name); "
                         f"ditpipe encodes with {', '.join(FAMILIES)}, or --vae pixel")
    return getattr(diffusers, name)


def _from_hub(name: str, dtype: torch.dtype):
    from diffusers import ConfigMixin
    from huggingface_hub import constants

    folder = f"/models/{name.rstrip('/').rsplit('/', 1)[-1]}"
    fixes = (f"Fixes: on a machine with network, `hf download {name} --local-dir {folder}`, copy that folder here and"
             f" pass --vae {folder}; or use --vae pixel for a VAE-free run.")

    class _Config(ConfigMixin):  # reads any model's config.json
        config_name = "config.json"

    try:  # the local Hugging Face cache first: works offline and never touches the network
        cls = _family_class(_Config.load_config(name, local_files_only=True), name)
        return cls.from_pretrained(name, local_files_only=True, torch_dtype=dtype)
    except CodecError:
        raise
    except Exception:
        pass
    missing = f"VAE '{name}' is not a local folder and not in the Hugging Face cache ({constants.HF_HUB_CACHE})"
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise CodecError(f"{missing}, and HF_HUB_OFFLINE is set (offline), so the hub is not asked. {fixes}")
    endpoint = (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    unreachable = hub_unreachable(endpoint)
    if unreachable:  # asked once, briefly: the hub's client would retry for about 25 s, then blame config.json
        raise CodecError(f"{missing}, and the hub ({endpoint}) is unreachable: {unreachable}. {fixes}")
    try:
        cls = _family_class(_Config.load_config(name), name)
        return cls.from_pretrained(name, torch_dtype=dtype)
    except CodecError:
        raise
    except Exception as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise CodecError(f"cannot load VAE '{name}': it is not a local folder, not in the Hugging Face cache, and "
                         f"the hub failed ({first}). {fixes}") from None


HUB_PROBE_S = 3.0  # how long the hub may take to answer before it counts as unreachable


@functools.lru_cache(maxsize=None)
def hub_unreachable(endpoint: str, timeout: float = HUB_PROBE_S) -> str | None:
    """Why the hub at `endpoint` cannot be reached (no answer within `timeout` seconds, name resolution included, or
    a gateway error), or None when it answers. One HEAD request through the environment's proxies (HTTPS_PROXY,
    NO_PROXY: urllib's rules), asked once per process."""
    import threading
    import urllib.error
    import urllib.request

    answer: list[str | None] = []

    def ask() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout).close()
            answer.append(None)
        except urllib.error.HTTPError as e:  # it answered: a 4xx is an answer; a 5xx, a proxy's or the hub's fault
            answer.append(f"it answered HTTP {e.code}" if e.code >= 500 else None)
        except Exception as e:  # noqa: BLE001 (refused, no route, no DNS, a bad proxy, a bad URL: all unreachable)
            reason = getattr(e, "reason", e)
            answer.append(str(reason) or type(reason).__name__)

    thread = threading.Thread(target=ask, daemon=True)  # getaddrinfo has no timeout of its own: bound it here
    thread.start()
    thread.join(timeout + 0.5)
    return answer[0] if answer else f"no answer in {timeout:g} s"


class CrossDecoder:
    """Decodes one codec's latents with another autoencoder of the same latent space. Both scale their raw latents
    into one shared space ((z - shift) · scale: TAESD's factors 1 and 0 against the SD-VAE's 0.18215, TAEF1's
    against FLUX's 0.3611 and 0.1159), so a raw latent of the encoder becomes the decoder's raw latent through it."""

    def __init__(self, decoder, encoder: dict):
        self.decoder, self.encoder = decoder, encoder
        self.downsample, self.latent_channels = decoder.downsample, decoder.latent_channels

    @property
    def device(self) -> torch.device:
        return self.decoder.device

    def identity(self) -> dict:
        return self.decoder.identity()

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        e, d = self.encoder, self.decoder
        shared = (z.float() - e["shift_factor"]) * e["scaling_factor"]  # (N, C, h, w)
        return d.decode(shared / d.scaling_factor + d.shift_factor)

    def to(self, device) -> "CrossDecoder":
        self.decoder.to(device)
        return self


def load_decoder(name: str, encoder: dict, dtype: str = "fp32", device: torch.device | None = None):
    """A codec that decodes the latents of `encoder` (a manifest's codec record): that codec itself, or another
    autoencoder `name` whose latent space matches. Checked: both are autoencoders (or both pixel), the same latent
    channels, the same downsample factor, and a probe latent decodes to that factor's size, finite. Whether its
    latents mean the same (TAESD was trained to match the SD-VAE) no check on weights can tell: that is the
    pairing the user names."""
    if name == encoder["name"] or (Path(name).exists() and str(Path(name).resolve()) == encoder["name"]):
        return load_codec(name, dtype if name != "pixel" else "fp32", device)
    codec = load_codec(name, dtype, device)
    theirs = (encoder.get("kind"), encoder.get("latent_channels"), encoder.get("downsample"))
    ours = (codec.kind, codec.latent_channels, codec.downsample)
    if theirs != ours or codec.kind == "pixel":
        raise CodecError(f"decoder '{name}' ({codec.kind}, {codec.latent_channels} channels, {codec.downsample}× "
                         f"down) cannot decode latents of '{encoder['name']}' ({theirs[0]}, {theirs[1]} channels, "
                         f"{theirs[2]}× down); name one of the same latent space (TAESD for SD-VAE latents, TAEF1 "
                         "for FLUX's)")
    side = 2
    probe = torch.zeros((1, codec.latent_channels, side, side), device=codec.device)  # (1, C, 2, 2)
    out = codec.decode(probe)
    if tuple(out.shape) != (1, 3, side * codec.downsample, side * codec.downsample) or not torch.isfinite(out).all():
        raise CodecError(f"decoder '{name}' turned a {side}×{side} latent into {tuple(out.shape)} (finite: "
                         f"{bool(torch.isfinite(out).all())}), not a finite {side * codec.downsample}-pixel image")
    return CrossDecoder(codec, encoder)


# Random-init autoencoders of real architectures, for benchmarks (the cost of the real one, offline).
SHAPES = {
    "sd": ("AutoencoderKL", dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
                                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                                 latent_channels=4, sample_size=256)),  # sd-vae-ft-ema (docs/design.md)
    "tiny": ("AutoencoderKL", dict(block_out_channels=(8, 16, 32, 32), layers_per_block=1, norm_num_groups=8,
                                   down_block_types=("DownEncoderBlock2D",) * 4,
                                   up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4)),
    # dc-ae-f32c32-sana-1.0: 32× down, 32 channels, ResBlocks then EfficientViT blocks with 5×5 multi-scale attention
    "dc-ae": ("AutoencoderDC", dict(latent_channels=32, attention_head_dim=32,
                                    encoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
                                    decoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
                                    encoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
                                    decoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
                                    encoder_layers_per_block=(2, 2, 2, 3, 3, 3),
                                    decoder_layers_per_block=(3, 3, 3, 3, 3, 3),
                                    encoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
                                    decoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
                                    downsample_block_type="Conv", upsample_block_type="interpolate",
                                    decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407)),
}


def save_random_autoencoder(shape: str, path: Path, sample_size: int | None = None) -> dict:
    """A random-init autoencoder of SHAPES[shape], saved with save_pretrained (loaded later for real); returns its
    parameter counts."""
    import diffusers

    family, config = SHAPES[shape]
    if sample_size and "sample_size" not in config and family == "AutoencoderKL":
        config = {**config, "sample_size": sample_size}
    torch.manual_seed(0)
    vae = getattr(diffusers, family)(in_channels=3, **config)
    vae.save_pretrained(path)
    return {"parameters": sum(p.numel() for p in vae.parameters()),
            "encoder_parameters": sum(p.numel() for p in vae.encoder.parameters())}


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
