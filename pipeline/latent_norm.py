"""Latent normalisation: how stored codec latents become the model's input space, and back.

    normalise:    z_model = (z − shift_c) · scale_c      (per channel c)
    denormalise:  z       = z_model / scale_c + shift_c

`scale` (`data.latent_norm: scale`, DiT's choice) takes the codec's scaling and shift factors, the same for every
channel. `channel` (LightningDiT, EDM2) takes the manifest's per-channel mean and std of the encoded latents, so each
channel reaches zero mean and unit variance. The constants always come from the manifest (never literals), and the
resolved values are recorded in every checkpoint's manifest.json (`latent_norm`), so sampling inverts exactly what
training applied, even with another decoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from ditpipe.pipeline.errors import ConfigError

KINDS = ("scale", "channel")


@dataclass(frozen=True)
class LatentNorm:
    kind: str
    shift: tuple[float, ...]  # per channel, subtracted first
    scale: tuple[float, ...]  # per channel, multiplied after

    @classmethod
    def from_manifest(cls, manifest, kind: str) -> "LatentNorm":
        """The normalisation `kind` with the constants of a shard manifest (its codec section or its stats)."""
        from ditpipe.pipeline.manifest import Manifest

        manifest = Manifest.of(manifest)
        channels = int(manifest.latent_shape()[1])
        if kind == "scale":
            codec = manifest.codec
            return cls("scale", (float(codec["shift_factor"]),) * channels,
                       (float(codec["scaling_factor"]),) * channels)
        if kind != "channel":
            raise ConfigError([("data.latent_norm", f"unknown normalisation {kind!r}; use one of {', '.join(KINDS)}")])
        stats = manifest.stats
        if not stats or not stats.get("channel_std"):
            raise ConfigError([("data.latent_norm", "'channel' needs the per-channel mean and std that `ditpipe "
                                                    "encode` stores in the shard manifest (`stats`), and these "
                                                    "latents have none (online images mode, or no samples); use "
                                                    "'scale'")])
        mean, std = [float(x) for x in stats["channel_mean"]], [float(x) for x in stats["channel_std"]]
        flat = [c for c, s in enumerate(std) if not s > 1e-8]
        if flat:
            raise ConfigError([("data.latent_norm", f"latent channel(s) {flat} are constant over the data set (std 0),"
                                                    " so 'channel' would divide by zero; use 'scale'")])
        return cls("channel", tuple(mean), tuple(1.0 / s for s in std))

    @classmethod
    def from_record(cls, record: dict) -> "LatentNorm":
        """The normalisation a checkpoint recorded (see `record`)."""
        return cls(record["kind"], tuple(float(x) for x in record["shift"]), tuple(float(x) for x in record["scale"]))

    def record(self) -> dict:
        return {"kind": self.kind, "shift": list(self.shift), "scale": list(self.scale)}

    def normalize_array(self, z: np.ndarray) -> np.ndarray:
        """In place on a float32 (C, H, W) array: (z − shift)·scale, in float32, skipping exact no-ops."""
        shift, scale = self._np
        if shift is not None:
            z -= shift
        if scale is not None:
            z *= scale
        return z

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) codec latents → the model's space."""
        shift, scale = self._torch(z)
        return (z - shift) * scale  # (N, C, H, W)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) model-space latents → codec latents (what the decoder takes)."""
        shift, scale = self._torch(z)
        return z / scale + shift  # (N, C, H, W)

    @cached_property
    def _np(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(shift, scale) as float32 (C, 1, 1), None where it is an exact no-op (z − 0, z·1), built once: the
        loader applies them per sample. Float32 like `z -= float(shift)` on a float32 array."""
        shift = np.asarray(self.shift, np.float32).reshape(-1, 1, 1)  # (C, 1, 1)
        scale = np.asarray(self.scale, np.float32).reshape(-1, 1, 1)  # (C, 1, 1)
        return (shift if shift.any() else None), (None if (scale == 1).all() else scale)

    def _torch(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(shift, scale) as (1, C, 1, 1) tensors on like's device, made once per device and dtype: a host-to-device
        copy in every training step would wait for the GPU."""
        if like.shape[1] != len(self.shift):
            raise ValueError(f"latents have {like.shape[1]} channels, the normalisation {len(self.shift)}")
        dtype = like.dtype if like.is_floating_point() else torch.float32
        key = (str(like.device), dtype)
        if key not in self._on_device:
            self._on_device[key] = tuple(torch.tensor(v, dtype=dtype, device=like.device).view(1, -1, 1, 1)
                                         for v in (self.shift, self.scale))  # (1, C, 1, 1) each
        return self._on_device[key]

    @cached_property
    def _on_device(self) -> dict:
        return {}
