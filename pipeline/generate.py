"""Sampling a trained DiT: classifier-free guidance, the objective's sampler, and decoding to images.

Shared by validation grids during training and `ditpipe sample`. Latents live in the *scaled* space the model was
trained in; `decode` undoes the latent normalisation (pipeline/latent_norm.py) before the codec decodes.
"""

from __future__ import annotations

import torch

from pipeline.device import autocast_bf16


@torch.no_grad()
def generate(model, objective, latent_shape: tuple[int, int, int], labels: torch.Tensor | None, n: int,
             sampler: str | None, steps: int, cfg_scale: float, seed: int, device: torch.device,
             progress=None, cfg_interval: tuple[float, float] = (0.0, 1.0), bf16: bool = True) -> torch.Tensor:
    """n latents (N, C, H, W) in the model's scaled space, deterministic for `seed`.

    With guidance the batch is doubled exactly as official DiT's sample.py does it: the initial noise z is drawn
    for n and repeated, the labels are [y, null], every sampler draw is for 2n, and `forward_with_cfg` guides the
    first half. So the same weights and seed give the official samples.

    `cfg_interval` (lo, hi) limits guidance to noise levels in [lo, hi] (0 = data, 1 = pure noise), as in
    Kynkäänniemi et al. 2024; elsewhere the model's plain conditional prediction is used. Guidance decides the
    coarse layout at high noise; at low noise it sharpens towards the class mean and can erase fine structure (on
    `shapes`: guiding below noise 0.5 rounds the squares' corners).

    `bf16`: on CUDA the model runs under bf16 autocast (several times faster than fp32 for 250-step sampling); the
    sampler's own arithmetic stays in fp32 (the objectives cast the model's output). No effect on a CPU."""
    with autocast_bf16(torch.device(device), bf16):
        return _generate(model, objective, latent_shape, labels, n, sampler, steps, cfg_scale, seed, device,
                         progress, cfg_interval)


def _generate(model, objective, latent_shape, labels, n, sampler, steps, cfg_scale, seed, device, progress,
              cfg_interval) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(seed)
    if labels is None:
        return objective.sample(lambda x, t: model(x, t), (n, *latent_shape), sampler, steps, gen, device,
                                progress=progress)
    labels = labels.to(device)
    null = _null(model, labels)
    if cfg_scale == 1.0 or null is None:
        return objective.sample(lambda x, t: model(x, t, labels), (n, *latent_shape), sampler, steps, gen, device,
                                progress=progress)
    z = torch.randn((n, *latent_shape), generator=gen, device=device)  # (N, C, H, W)
    y = _cat(labels, null)  # (2N,) labels, or a Caption of 2N
    lo, hi = cfg_interval

    def fn(x, t):  # x (2N, C, H, W), t (2N,) all equal
        if lo <= objective.noise_level(t[0]) <= hi:
            return model.forward_with_cfg(x, t, y, cfg_scale)  # (2N, C_out, H, W)
        # Unguided: the conditional half alone, reused for the null half, which is discarded at the end.
        out = model(x[:n], t[:n], labels)  # (N, C_out, H, W)
        return torch.cat([out, out])  # (2N, C_out, H, W)

    out = objective.sample(fn, (2 * n, *latent_shape), sampler, steps, gen, device, noise=torch.cat([z, z]),
                           progress=progress)  # (2N, C, H, W)
    return out[:n]


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
