"""Representation targets: a frozen image encoder's tokens, computed once at encode time and stored beside the
latents, so REPA / REG training (pipeline/repa.py) never runs DINOv2 in a step.

`ditpipe encode --targets NAME` runs every kept image (and, when training can flip it, its mirror) through the
encoder once, at the recipe's resolution and normalisation (REPA, sihyun-yu/REPA `preprocess_raw_image`: the crop as
floats in [0, 1], ImageNet-normalised, resized bicubically), and stores per sample one record:

    `<key>.target.npy` (tar) or the `target` column (Parquet, fixed-size bytes), shaped by `Layout`:
      fp16:  (m, T, D) float16
      int8:  (m, T) of [("q", int8, (D,)), ("scale", float16)]: q · scale, one symmetric scale a token
    m = 1, or 2 with the mirror's tokens second; T = [1 class token +] gh·gw patch tokens, row-major.

The token grid is the DiT's: (latent H / model patch, latent W / model patch), per bucket, which is how REPA matches
them (256 px, SD-VAE f8, patch 2: 16×16 tokens; DINOv2-B/14 at 16·14 = 224 px: 16×16 tokens). So the encoder sees
the image at (gh·p, gw·p) for its patch size p; an encoder without patches (the offline Inception) is
average-pooled to the grid.

Encoders: `dinov2` (facebook/dinov2-base, REPA's), any transformers vision model `AutoModel` loads (a hub id or a
local folder: its last_hidden_state after the final norm, DINOv2's `x_norm_patchtokens`; the tokens before the patch
grid are the class token and registers), or `inception` (the TF-FID InceptionV3 of the `eval` extra, offline:
pipeline/inception_tokens.py). The identity (with a sha256 of the weights) goes into the manifest: stale targets
are other shards, and a run refuses them like stale latents.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ditpipe.pipeline.config import TARGET_ALIASES as ALIASES, TARGET_INCEPTION as INCEPTION
from ditpipe.pipeline.errors import DitpipeError

DTYPES = ("fp16", "int8")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # timm's IMAGENET_DEFAULT_*
MAX_DIM = 16_384
INSTALL = "pip install 'ditpipe[text]'"  # transformers comes with the text extra
RECORD = ("<key>.target.npy (Parquet: column 'target', the same bytes without the .npy header): fp16 (m, T, D), or "
          "int8 (m, T) of [('q', 'i1', (D,)), ('scale', '<f2')] = q * scale; m = slices (the mirror's second), T = "
          "[class token +] grid rows x columns; np.load(allow_pickle=False) reads it")


class TargetsError(DitpipeError):
    """The target encoder cannot be loaded, or its targets do not fit the run."""


# ---------------------------------------------------------------------------------------------------- the record


@dataclass(frozen=True)
class Layout:
    """One sample's stored targets: `slices` (1, or 2 with the mirror's) × `tokens` × `dim`, in `dtype`."""

    slices: int
    tokens: int
    dim: int
    dtype: str  # fp16 | int8

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(np.float16) if self.dtype == "fp16" else np.dtype([("q", "i1", (self.dim,)), ("scale", "<f2")])

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.slices, self.tokens, self.dim) if self.dtype == "fp16" else (self.slices, self.tokens)

    @property
    def data_bytes(self) -> int:
        """The record's bytes without a header: a Parquet cell."""
        return int(np.prod(self.shape)) * self.np_dtype.itemsize

    @property
    def header(self) -> bytes:
        """The exact .npy header of every record of this layout (a tar member is this + `data_bytes`)."""
        from ditpipe.pipeline.shards import npy_bytes

        return npy_bytes(np.zeros(self.shape, self.np_dtype))[: -self.data_bytes]

    @property
    def slice_bytes(self) -> int:
        return self.data_bytes // self.slices

    def pack(self, x: np.ndarray) -> np.ndarray:
        """(slices, T, D) float32 → the stored array."""
        assert x.shape == (self.slices, self.tokens, self.dim), (x.shape, self)
        if self.dtype == "fp16":
            return x.astype(np.float16)
        return quantize(x)

    def view(self, data: bytes | np.ndarray) -> np.ndarray:
        """A record's data bytes (no header) as the stored array, read-only; refused unless exactly this size."""
        buf = np.frombuffer(data, dtype=np.uint8)
        if len(buf) != self.data_bytes:
            raise ValueError(f"{len(buf):,} bytes, the layout {self.shape} {self.dtype} needs {self.data_bytes:,}")
        return buf.view(self.np_dtype).reshape(self.shape)

    def decode_into(self, stored: np.ndarray, out: np.ndarray) -> None:
        """One slice's stored targets ((T, D) float16, or (T,) int8 records) → out (T, D) float16."""
        if self.dtype == "fp16":
            out[...] = stored
        else:
            np.multiply(stored["q"], stored["scale"][:, None], out=out, casting="unsafe")


def quantize(x: np.ndarray) -> np.ndarray:
    """(..., D) float32 → (...,) int8 records: per token, scale = max|x| / 127 (in fp16), q = round(x / scale)."""
    scale = (np.abs(x).max(axis=-1) / 127.0).astype(np.float16)  # (...,)
    safe = np.where(scale > 0, scale.astype(np.float32), 1.0)[..., None]
    out = np.zeros(x.shape[:-1], np.dtype([("q", "i1", (x.shape[-1],)), ("scale", "<f2")]))
    out["q"] = np.clip(np.rint(x / safe), -127, 127).astype(np.int8)
    out["scale"] = scale
    return out


def layout_of(section: dict, latent_shape: tuple[int, ...]) -> Layout:
    """The layout of a shard's targets from the manifest's `targets` section and the shard's latent shape (its
    bucket's): the grid is the latent's (H, W) over the model patch the targets were cut for."""
    p = section["model_patch"]
    tokens = (latent_shape[-2] // p) * (latent_shape[-1] // p) + int(section["class_token"])
    return Layout(len(section["slices"]), tokens, section["encoder"]["dim"], section["dtype"])


def grid_of(latent_shape: tuple[int, ...], model_patch: int) -> tuple[int, int]:
    return latent_shape[-2] // model_patch, latent_shape[-1] // model_patch


def check_section(manifest: dict, where) -> None:
    """A manifest's `targets` section, which sizes every batch's target arrays: bounded, consistent, ours."""
    from ditpipe.pipeline.config import MAX_PATCH, MAX_TOKENS
    from ditpipe.pipeline.errors import ShardError
    from ditpipe.pipeline.manifest import Manifest

    t = manifest.get("targets")
    if t is None:
        return
    enc = t.get("encoder") if isinstance(t, dict) else None
    ok = isinstance(enc, dict) and type(enc.get("dim")) is int and 0 < enc["dim"] <= MAX_DIM
    ok = ok and type(t.get("model_patch")) is int and 0 < t["model_patch"] <= MAX_PATCH
    ok = ok and t.get("dtype") in DTYPES and type(t.get("class_token")) is bool
    ok = ok and t.get("slices") in (["target"], ["target", "target_flip"])
    if ok:
        shape = manifest["latent"]["shape"]
        shapes = [shape] + [b["latent_shape"] for b in Manifest(manifest).buckets]
        ok = all(s[-2] % t["model_patch"] == 0 and s[-1] % t["model_patch"] == 0
                 and (s[-2] // t["model_patch"]) * (s[-1] // t["model_patch"]) <= MAX_TOKENS for s in shapes)
    if not ok:
        raise ShardError(f"'{where}': its targets section (encoder dim, model_patch, dtype, slices, class_token) is "
                         "not one ditpipe writes or does not fit the latent shape; the manifest is damaged or was "
                         "altered (re-encode it)")


# ---------------------------------------------------------------------------------------------------- encoders


class TargetEncoder:
    """A frozen image encoder: uint8 images → (N, [1 +] gh·gw, D) float32 tokens on the grid the DiT will use."""

    def __init__(self, name: str, source: str, kind: str, model: torch.nn.Module, device: torch.device,
                 patch: int | None, mean: tuple, std: tuple, layer: str, dim: int):
        self.name, self.source, self.kind, self.model, self.device = name, source, kind, model, device
        self.patch, self.mean, self.std, self.layer, self.dim = patch, mean, std, layer, dim
        self._hash: str | None = None
        self._native = self._tables = None
        if getattr(getattr(model, "config", None), "model_type", None) == "dinov2":
            self.weights_hash()  # before any position table is swapped in
            self._native = model.embeddings.position_embeddings.data.clone()  # (1, 1 + n², D)
            self._tables = {}

    def _positions_for(self, grid: tuple[int, int]) -> None:
        """DINOv2's position embeddings for a square grid, resampled once the way REPA does (timm's
        resample_abs_pos_embed: bicubic with antialias, the class token's kept), so the encoder reads them as they
        are; transformers would interpolate them at every call without antialias. Another grid (a bucket's) gets
        the pretrained table, which transformers interpolates its own way."""
        if self._native is None:
            return
        native = self._native
        n = int(round((native.shape[1] - 1) ** 0.5))
        if grid[0] != grid[1] or grid[0] == n:
            table = native
        else:
            if grid not in self._tables:
                patch = native[:, 1:].reshape(1, n, n, -1).permute(0, 3, 1, 2).float()  # (1, D, n, n)
                patch = torch.nn.functional.interpolate(patch, size=grid, mode="bicubic", antialias=True)
                self._tables[grid] = torch.cat([native[:, :1], patch.permute(0, 2, 3, 1).reshape(1, -1, native.shape[
                    -1]).to(native.dtype)], dim=1)  # (1, 1 + gh·gw, D)
            table = self._tables[grid]
        self.model.embeddings.position_embeddings.data = table

    def identity(self) -> dict:
        """What the manifest records of the encoder (a fine-tuned or other encoder has another hash)."""
        return {"kind": self.kind, "name": self.name, "source": self.source, "class": type(self.model).__name__,
                "hash": self.weights_hash(), "layer": self.layer, "dim": self.dim, "patch": self.patch,
                "normalize": {"mean": list(self.mean), "std": list(self.std)},
                "resize": "bicubic to grid x patch" if self.patch else "the network's own (299 px), then the grid's "
                                                                       "average pool",
                **({"positions": "resampled once per square grid: bicubic, antialias (timm, as REPA)"}
                   if self._native is not None else {}),
                "dtype": "float32"}

    def weights_hash(self) -> str:
        if self._hash is None:
            if self.kind == INCEPTION:
                self._hash = self.model.identity()["hash"]
            else:
                h = hashlib.sha256(self.kind.encode())
                for name, p in sorted(self.model.state_dict().items()):
                    h.update(name.encode())
                    h.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
                self._hash = h.hexdigest()
        return self._hash

    def resolution(self, grid: tuple[int, int]) -> list[int] | None:
        """The encoder's input (H, W) for a token grid: the grid times its patch (REPA: 16 × 14 = 224)."""
        return None if self.patch is None else [grid[0] * self.patch, grid[1] * self.patch]

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor, grid: tuple[int, int], class_token: bool) -> torch.Tensor:
        """pixels (N, H, W, 3) uint8 on the encoder's device → (N, [1 +] gh·gw, D) float32."""
        tokens = self.model(pixels, grid, class_token) if self.kind == INCEPTION else self._vit(pixels, grid,
                                                                                                class_token)
        if not torch.isfinite(tokens).all():
            raise TargetsError(f"target encoder {self.name} produced NaN/Inf")
        return tokens  # (N, T, D)

    def _vit(self, pixels: torch.Tensor, grid: tuple[int, int], class_token: bool) -> torch.Tensor:
        x = pixels.permute(0, 3, 1, 2).float() / 255.0  # (N, 3, H, W) in [0, 1]
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        x = (x - mean) / std  # REPA normalises first, then resizes
        x = torch.nn.functional.interpolate(x, size=self.resolution(grid), mode="bicubic")  # (N, 3, gh·p, gw·p)
        self._positions_for(grid)
        out = self.model(pixel_values=x).last_hidden_state.float()  # (N, prefix + gh·gw, D), after the final norm
        prefix = out.shape[1] - grid[0] * grid[1]  # the class token and any registers come first
        if prefix < 0 or (class_token and prefix < 1):
            raise TargetsError(f"target encoder {self.name} gave {out.shape[1]} tokens for a {grid[0]}x{grid[1]} "
                               f"grid{' and a class token' if class_token else ''}; it is not a ViT with patch "
                               f"{self.patch} and a class token")
        tokens = out[:, prefix:]  # (N, gh·gw, D): x_norm_patchtokens
        if class_token:
            tokens = torch.cat([out[:, :1], tokens], dim=1)  # (N, 1 + gh·gw, D): x_norm_clstoken first
        return tokens


def load_target_encoder(name: str, device: torch.device | None = None) -> TargetEncoder:
    """`dinov2`, `inception` (offline), a transformers hub id, or a local folder saved with `save_pretrained`."""
    device = device or torch.device("cpu")
    if name == INCEPTION:
        from ditpipe.pipeline.inception_tokens import InceptionTokens

        model = InceptionTokens(device)
        return TargetEncoder(INCEPTION, model.identity()["name"], INCEPTION, model, device, None, (), (),
                             model.identity()["layer"], model.dim)
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise TargetsError(f"--targets {name} needs transformers: {INSTALL}") from None
    if Path(name).exists():
        where = source = str(Path(name).resolve())
    else:
        where = source = ALIASES.get(name, name)
    model = _load(where, name).to(device).eval().requires_grad_(False)
    cfg = model.config
    patch = getattr(cfg, "patch_size", None)
    dim = getattr(cfg, "hidden_size", None)
    if not isinstance(patch, int) or not isinstance(dim, int):
        raise TargetsError(f"target encoder '{name}' ({type(model).__name__}) has no integer patch_size and "
                           "hidden_size in its config; ditpipe reads ViT-style encoders (DINOv2, CLIP, SigLIP, MAE)")
    mean, std = _normalisation(where)
    return TargetEncoder(name if name in ALIASES else source, source, "transformers", model, device, patch, mean, std,
                         "last_hidden_state (final norm)", dim)


def _normalisation(where: str) -> tuple[tuple, tuple]:
    """The model's own image mean and std (preprocessor_config.json, where it has one), else ImageNet's."""
    try:
        from huggingface_hub import hf_hub_download

        path = Path(where) / "preprocessor_config.json" if Path(where).exists() else Path(
            hf_hub_download(where, "preprocessor_config.json", local_files_only=True))
        cfg = json.loads(path.read_text()[: 1 << 20])
        mean, std = tuple(float(x) for x in cfg["image_mean"]), tuple(float(x) for x in cfg["image_std"])
        if len(mean) == len(std) == 3 and all(s > 0 for s in std):
            return mean, std
    except Exception:  # absent or unreadable: ImageNet's, which DINOv2 uses
        pass
    return IMAGENET_MEAN, IMAGENET_STD


def fetch_command(where: str) -> str:
    folder = f"models/{where.rsplit('/', 1)[-1]}"
    return (f"python -c \"from transformers import AutoModel; AutoModel.from_pretrained('{where}')"
            f".save_pretrained('{folder}')\"  (or `hf download {where} --local-dir {folder}`), then --targets {folder}")


def _load(where: str, name: str):
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    local = Path(where).exists()
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    errors = []
    for local_only in ((True,) if local or offline else (True, False)):
        try:
            return AutoModel.from_pretrained(where, local_files_only=local_only).float()  # fp32: one hash, exact
        except Exception as e:  # transformers raises OSError, ValueError, HF errors... for a missing model
            errors.append(str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__)
    if local:
        raise TargetsError(f"cannot load target encoder '{name}' from its folder: {errors[-1]}")
    why = "it is not a local folder and not in the Hugging Face cache" + (", and HF_HUB_OFFLINE is set" if offline
                                                                         else f" ({errors[-1]})")
    raise TargetsError(f"cannot load target encoder '{name}': {why}. On a machine with network: {fetch_command(where)}")
