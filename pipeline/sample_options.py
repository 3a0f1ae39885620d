"""The options `sample` and `evaluate` share (stages/sample.py, stages/evaluate.py): one frozen object, built by the
CLI. Torch-free: the CLI reads its batch defaults for `--help`. Sampling settings left None come from the protocol,
else the checkpoint (its validation.*), else, for an official DiT .pt, the official scripts'."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SAMPLE_BATCH = 64  # `sample`: samples per batch
EVALUATE_BATCH = 50  # `evaluate`: images per batch, for generation and the Inception


@dataclass(frozen=True)
class SampleOptions:
    num: int | None = None  # samples; None: the verb's own count (sample: one per class, or 16; evaluate: 10,000)
    seed: int = 0  # sample i's noise (and random label) is keyed on (seed, i)
    use_ema: bool = True  # the EMA weights, where the checkpoint has them
    sampler: str | None = None  # one of pipeline/samplers.py's for the model's objective
    steps: int | None = None
    cfg_scale: float | None = None
    cfg_interval: tuple[float, float] | None = None  # noise levels (low, high) where guidance applies
    batch_size: int | None = None  # None: SAMPLE_BATCH for sample, EVALUATE_BATCH for evaluate
    vae: str | None = None  # decode with another autoencoder; an official .pt: its VAE (sd-vae-ft-ema if None)
    model_name: str | None = None  # an official .pt: its preset, e.g. DiT-XL/2
    image_size: int | None = None  # an official .pt: its pixels, e.g. 256
    text_encoder: str | None = None  # caption models: a local copy of the manifest's text encoder
    protocol: str | None = None  # "dit": the DiT paper's sampling (pipeline/protocol.py)
    cfg_channels: str | None = None  # official (the first 3 latent channels) | all; None: by checkpoint
    precision: str | None = None  # bf16 | fp32; None: bf16 on CUDA
    npz_out: Path | None = None  # also the samples as an ADM `.npz`
