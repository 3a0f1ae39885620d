"""Sampling a trained DiT: classifier-free guidance, the objective's sampler, and decoding to images.

Shared by validation grids during training and `ditpipe sample`. Latents live in the *scaled* space the model was
trained in; `decode` undoes the manifest's scaling and shift before the codec decodes.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def generate(model, objective, latent_shape: tuple[int, int, int], labels: torch.Tensor | None, n: int,
             sampler: str | None, steps: int, cfg_scale: float, seed: int, device: torch.device,
             progress=None) -> torch.Tensor:
    """n latents (N, C, H, W) in the model's scaled space, deterministic for `seed`.

    With guidance the batch is doubled exactly as official DiT's sample.py does it: the initial noise z is drawn
    for n and repeated, the labels are [y, null], every sampler draw is for 2n, and `forward_with_cfg` guides the
    first half. So the same weights and seed give the official samples."""
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
    fn = lambda x, t: model.forward_with_cfg(x, t, y, cfg_scale)  # noqa: E731
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
def decode(z: torch.Tensor, codec, scaling_factor: float, shift_factor: float) -> torch.Tensor:
    """Scaled latents → images in [-1, 1] (N, 3, H, W), with the manifest's factors, never literals."""
    return codec.decode(z / scaling_factor + shift_factor)
