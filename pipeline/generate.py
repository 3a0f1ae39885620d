"""Sampling a trained DiT: classifier-free guidance, the objective's sampler, and decoding to images.

Shared by validation grids during training, `ditpipe sample` and `ditpipe evaluate`. Latents live in the *scaled*
space the model was trained in; `decode` undoes the latent normalisation (pipeline/latent_norm.py) before the codec
decodes.

Randomness. `generate` draws from one generator seeded with `seed` (the validation grids), unless it is given a
`SampleNoise`: then every sample's draws (its initial noise and each ancestral step's) come from its own stream,
keyed on (seed, global sample index), and a random label likewise (`random_labels`). `sample` and `evaluate` use
those, so sample i is the same image whatever the batch size and however many processes share the work.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ditpipe.pipeline.device import autocast_bf16, generator
from ditpipe.pipeline.order import sample_key

# Epoch slots of `sample_key` for the sampling streams (training's epochs are small, the held-out set's is 1 << 40).
_NOISE_STREAM, _LABEL_STREAM = 1 << 42, (1 << 42) + 1


@dataclass(frozen=True)
class Settings:
    """How to sample: what `sample` and `evaluate` use unless a flag says otherwise."""

    sampler: str
    steps: int
    cfg_scale: float
    cfg_interval: tuple[float, float]  # noise levels (0 data, 1 noise) where guidance applies


class SampleNoise:
    """Each sample's own noise stream, keyed on (seed, sample index). Samplers take it where they take a
    torch.Generator (pipeline.diffusion's draws call `randn`). A draw for k·n rows (the guided batch's
    [conditional, null] halves) repeats the n samples' draws k times: the null half's samples are discarded, and
    official sample.py starts both halves from the same noise too."""

    def __init__(self, seed: int, indices, device: torch.device):
        device = torch.device(device)
        self.generators = [generator(device, sample_key(seed, _NOISE_STREAM, int(i))) for i in indices]

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, shape, device, dtype=torch.float32) -> torch.Tensor:
        shape, n = tuple(shape), len(self.generators)
        if shape[0] % n:
            raise ValueError(f"a draw of {shape[0]} rows for {n} keyed samples")
        rows = torch.stack([torch.randn(shape[1:], generator=g, device=device, dtype=dtype)
                            for g in self.generators])  # (n, ...)
        return rows.repeat(shape[0] // n, *([1] * (len(shape) - 1)))  # (k·n, ...)


def random_labels(seed: int, indices, num_classes: int) -> torch.Tensor:
    """A uniformly random class per sample, keyed on (seed, sample index), as sample_ddp.py draws its labels
    (there from the global RNG, here from the sample's key: the 64-bit key modulo the class count). (n,) long."""
    return torch.tensor([sample_key(seed, _LABEL_STREAM, int(i)) % num_classes for i in indices], dtype=torch.long)


@torch.no_grad()
def generate(model, objective, latent_shape: tuple[int, int, int], labels: torch.Tensor | None, n: int,
             sampler: str | None, steps: int, cfg_scale: float, seed: int, device: torch.device,
             progress=None, cfg_interval: tuple[float, float] = (0.0, 1.0), bf16: bool = True,
             cfg_channels: int | None = None, noise: SampleNoise | None = None) -> torch.Tensor:
    """n latents (N, C, H, W) in the model's scaled space, deterministic for `seed` (or for `noise`'s keys).

    With guidance the batch is doubled as official DiT's sample.py does it: the initial noise z is drawn for n and
    repeated, the labels are [y, null], every sampler draw is for 2n, and `forward_with_cfg` guides the first half.
    `cfg_channels=3` guides the first three eps channels only, as official `forward_with_cfg` does; None guides all
    of them (ditpipe's default for its own models). With cfg_channels=3 the guidance is official DiT's; the noise is
    not theirs (their scripts draw from the global RNG after building the model), so the same weights give
    samples of the same distribution, not the same pixels.

    `cfg_interval` (lo, hi) limits guidance to noise levels in [lo, hi] (0 = data, 1 = pure noise), as in
    Kynkäänniemi et al. 2024; elsewhere the model's plain conditional prediction is used. Guidance decides the
    coarse layout at high noise; at low noise it sharpens towards the class mean and can erase fine structure (on
    `shapes`: guiding below noise 0.5 rounds the squares' corners).

    `bf16`: on CUDA the model runs under bf16 autocast (several times faster than fp32 for 250-step sampling); the
    sampler's own arithmetic stays in fp32 (the objectives cast the model's output). No effect on a CPU."""
    if noise is not None and len(noise) != n:
        raise ValueError(f"noise keyed for {len(noise)} samples, {n} asked for")
    with autocast_bf16(torch.device(device), bf16):
        return _generate(model, objective, latent_shape, labels, n, sampler, steps, cfg_scale, seed, device,
                         progress, cfg_interval, cfg_channels, noise)


def _generate(model, objective, latent_shape, labels, n, sampler, steps, cfg_scale, seed, device, progress,
              cfg_interval, cfg_channels, noise) -> torch.Tensor:
    gen = noise if noise is not None else generator(device, seed)
    if labels is None:
        return objective.sample(lambda x, t: model(x, t), (n, *latent_shape), sampler, steps, gen, device,
                                progress=progress)
    labels = labels.to(device)
    null = _null(model, labels)
    if cfg_scale == 1.0 or null is None:
        return objective.sample(lambda x, t: model(x, t, labels), (n, *latent_shape), sampler, steps, gen, device,
                                progress=progress)
    shape = (n, *latent_shape)
    z = gen.randn(shape, device) if noise is not None else torch.randn(shape, generator=gen, device=device)  # (N, C, H, W)
    y = _cat(labels, null)  # (2N,) labels, or a Caption of 2N
    channels = {} if cfg_channels is None else {"cfg_channels": cfg_channels}

    def guided(x, t):  # x (2N, C, H, W), t (2N,) all equal
        return model.forward_with_cfg(x, t, y, cfg_scale, **channels)  # (2N, C_out, H, W)

    def unguided(x, t):  # the conditional half alone, reused for the null half, which is discarded at the end
        out = model(x[:n], t[:n], labels)  # (N, C_out, H, W)
        return torch.cat([out, out])  # (2N, C_out, H, W)

    out = objective.sample(ByLevel(guided, unguided, cfg_interval), (2 * n, *latent_shape), sampler, steps, gen,
                           device, noise=torch.cat([z, z]), progress=progress)  # (2N, C, H, W)
    return out[:n]


class ByLevel:
    """A model function that guides inside the noise interval (lo, hi) and not outside. The sampler loops know each
    call's noise level as a Python number and pick the function with `at_level` (pipeline.diffusion.at_level):
    reading the level from the device's `t` would wait for the GPU once per sampling step."""

    def __init__(self, inside, outside, interval: tuple[float, float]):
        self.inside, self.outside, self.interval = inside, outside, interval

    def at_level(self, level: float):
        lo, hi = self.interval
        return self.inside if lo <= level <= hi else self.outside

    def __call__(self, x, t):
        raise TypeError("ByLevel needs its noise level: call at_level(level) first (the sampler loops do)")


def _null(model, y):
    """The unconditional `y` for guidance: the null class, or the caption model's null caption; None if untrained."""
    if hasattr(model, "null_condition"):
        return model.null_condition(y)
    null_class = getattr(model, "null_class", None)
    return None if null_class is None else torch.full_like(y, null_class)


def _cat(a, b):
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b])
    return type(a)(*(torch.cat([x, y]) for x, y in zip(a, b)))  # a Caption, field by field


@torch.no_grad()
def decode(z: torch.Tensor, codec, norm) -> torch.Tensor:
    """Model-space latents (N, C, h, w) → images in [-1, 1] (N, 3, H, W): `norm` (a LatentNorm, the one training
    applied, with the manifest's constants) is inverted, then the codec decodes."""
    return codec.decode(norm.denormalize(z))


def sample_batches(model, objective, latent_shape: tuple[int, int, int], codec, norm, indices, batch_size: int,
                   settings: Settings, seed: int, device: torch.device, condition, *, bf16: bool = True,
                   cfg_channels: int | None = None, progress=None):
    """Yield (indices, uint8 images (B, H, W, 3)) for the samples `indices`, `batch_size` at a time, each sample's
    noise keyed on (seed, index). `condition(indices)` gives the batch's `y` (labels, a Caption, or None);
    `progress(step, steps)` is called after every sampling step."""
    from ditpipe.pipeline.images import to_uint8

    indices = list(indices)
    for start in range(0, len(indices), batch_size):
        idx = indices[start : start + batch_size]
        z = generate(model, objective, latent_shape, condition(idx), len(idx), settings.sampler, settings.steps,
                     settings.cfg_scale, seed, device, progress, cfg_interval=settings.cfg_interval, bf16=bf16,
                     cfg_channels=cfg_channels, noise=SampleNoise(seed, idx, device))  # (B, C, h, w)
        yield idx, to_uint8(decode(z, codec, norm))  # (B, H, W, 3)
