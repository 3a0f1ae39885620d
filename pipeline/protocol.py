"""How `sample` and `evaluate` sample, past the sampler settings: the DiT paper's protocol in one word, which
channels guidance acts on, the precision, and each sample's conditioning.

- `--protocol dit`: official sample_ddp.py's FID-50K settings: 250 ancestral DDPM steps, cfg 1.5 on every step
  (`--cfg-scale 1` for the unguided row), 50,000 samples, each label drawn uniformly at random; flags given
  explicitly still win.
- `--cfg-channels official|all`: official DiT's `forward_with_cfg` guides the first 3 of the 4 latent channels;
  ditpipe's models guide all of them. The default follows the checkpoint's origin (an official .pt: official).
- `--precision bf16|fp32`: bf16 autocast for the model on CUDA (TF32 allowed for what stays fp32: the VAE), or
  true fp32 (no autocast, TF32 off). A CPU always computes in fp32. The Inception always runs in exact fp32
  (pipeline/fid.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ditpipe.pipeline.device import bf16_native, configure
from ditpipe.pipeline.errors import DitpipeError
from ditpipe.pipeline.generate import random_labels

PROTOCOLS = ("dit",)
DIT = {"sampler": "ddpm", "steps": 250, "cfg_scale": 1.5, "cfg_interval": (0.0, 1.0), "num": 50_000,
       "labels": "random"}
OFFICIAL_CFG_CHANNELS = 3  # official forward_with_cfg: `eps, rest = model_out[:, :3], model_out[:, 3:]`


@dataclass(frozen=True)
class Plan:
    """The choices besides the sampler settings, resolved and printable."""

    cfg_channels: int | None  # channels guidance acts on; None: all of them
    cfg_channels_name: str  # official | all
    precision: str  # bf16 | fp32
    bf16: bool  # generate()'s flag: autocast on CUDA
    labels: str  # cycled | random | given (class models), prompts (caption models), none
    protocol: str | None

    def describe(self, guided: bool, in_channels: int, device: torch.device) -> str:
        parts = []
        if guided:
            n = in_channels if self.cfg_channels is None else min(self.cfg_channels, in_channels)
            parts.append(f"guidance on {n} of {in_channels} channels ({self.cfg_channels_name})")
        parts.append(f"precision {self.precision}" + (
            " (bf16 autocast on CUDA)" if self.bf16 and device.type == "cuda"
            else " (TF32 off)" if device.type == "cuda" else f" ({device.type} computes in fp32)"))
        parts.append({"cycled": "classes cycled", "random": "labels uniform at random per sample (keyed on seed and "
                      "index)", "given": "the classes given", "prompts": "one image per prompt",
                      "none": "unconditional"}[self.labels])
        if self.protocol:
            parts.append(f"protocol {self.protocol}")
        return ", ".join(parts)


def protocol_defaults(protocol: str | None, s) -> dict:
    """The protocol's settings for `s` (a pipeline.sampleable.Sampleable), or {} without one; refused for models the
    protocol does not describe."""
    if protocol is None:
        return {}
    if protocol not in PROTOCOLS:
        raise DitpipeError(f"--protocol {protocol!r}: known protocols: {', '.join(PROTOCOLS)}")
    if s.objective.name != "ddpm" or s.text_encoder is not None or s.model.y_embedder is None:
        kind = ("a flow model" if s.objective.name != "ddpm" else "a caption model" if s.text_encoder is not None
                else "an unconditional model")
        raise DitpipeError(f"--protocol dit is the DiT paper's class-conditional DDPM sampling; this is {kind}: "
                           "drop --protocol and give --steps/--cfg-scale/--num")
    return {**DIT, "cfg_scale": DIT["cfg_scale"] if s.guidable else 1.0}


def make_plan(s, *, official: bool, protocol: str | None, labels: str, cfg_channels: str | None,
              precision: str | None, device: torch.device) -> Plan:
    """Resolve --cfg-channels and --precision (and set TF32 for the process accordingly)."""
    if cfg_channels not in (None, "official", "all"):
        raise DitpipeError(f"--cfg-channels {cfg_channels!r}: use official (the first 3 channels, as official DiT) "
                           "or all")
    name = cfg_channels or ("official" if official else "all")
    if name == "official" and s.text_encoder is not None:
        raise DitpipeError("--cfg-channels official is official DiT's class-model guidance; caption models guide "
                           "all channels: drop it")
    if precision not in (None, "bf16", "fp32"):
        raise DitpipeError(f"--precision {precision!r}: use bf16 (autocast on CUDA) or fp32")
    chosen = precision or ("bf16" if device.type == "cuda" and bf16_native(device) else "fp32")
    configure(device, tf32=chosen == "bf16")
    return Plan(OFFICIAL_CFG_CHANNELS if name == "official" else None, name, chosen, chosen == "bf16", labels,
                protocol)


def conditioner(s, labels: str, seed: int, given: list[int] | None = None, prompts: list[str] | None = None,
                text_encoder: str | None = None):
    """idx → the model's `y` for those sample indices: class ids cycled over the classes, drawn at random (keyed
    on seed and index), taken from `given` (one per sample), encoded prompts (one per sample), or None."""
    if labels == "prompts":
        from ditpipe.pipeline.text import encode_prompts, load_for_manifest

        enc = load_for_manifest(s.text_encoder, next(s.model.parameters()).device, text_encoder)
        return lambda idx: encode_prompts(enc, [prompts[i] for i in idx])
    if labels == "none":
        return lambda idx: None
    k = s.model.num_classes
    if labels == "random":
        return lambda idx: random_labels(seed, idx, k)
    if labels == "given":
        return lambda idx: torch.tensor([given[i] for i in idx])
    return lambda idx: torch.tensor(list(idx)) % k
