"""What sampling needs from a checkpoint, and the settings it samples with: `load_sampleable` turns our checkpoint
folders, exports and official DiT checkpoints into a `Sampleable`; `generated` yields its images batch by batch.
`sample` and `evaluate` (stages/) both draw on it.

Our checkpoint folders carry their config and the shard manifest's codec section, so the model, objective, latent
shape, label names and decoder all come from the checkpoint alone. An official DiT `.pt` (a raw state dict, e.g.
DiT-XL-2-256x256.pt) carries none of that: `--model` and `--image-size` give the shape, `--vae` the decoder, and the
VAE's own config the scaling factor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ditpipe.pipeline import checkpoint, exported
from ditpipe.pipeline.codec import default_device, load_codec, load_decoder
from ditpipe.pipeline.diffusion import make_objective
from ditpipe.pipeline.errors import DitpipeError
from ditpipe.pipeline.generate import Settings, sample_batches
from ditpipe.pipeline.latent_norm import LatentNorm
from ditpipe.pipeline.manifest import Manifest
from ditpipe.pipeline.model import build_dit
from ditpipe.pipeline.spread import Spread

OFFICIAL_DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"

# An official DiT .pt carries no settings: the official scripts' own defaults, DDPM × 250 guided at every step, at
# cfg 4.0 in sample.py and 1.5 in sample_ddp.py (the paper's FID-50K).
OFFICIAL_SETTINGS = {"sample": Settings("ddpm", 250, 4.0, (0.0, 1.0)), "evaluate": Settings("ddpm", 250, 1.5, (0.0, 1.0))}


@dataclass
class Sampleable:
    """Everything needed to turn noise into images."""

    model: torch.nn.Module
    objective: object
    latent_shape: tuple[int, int, int]  # (C, H, W)
    codec: object
    norm: LatentNorm  # what training applied to the latents; decoding inverts it
    class_names: list[str] | None
    description: str
    text_encoder: dict | None = None  # a caption model's encoder identity (the manifest's), else None
    settings: Settings | None = None  # the run's validation.* sampling settings; None: an official checkpoint
    origin: str = "official DiT's scripts"  # where `settings` come from, for the printed line
    buckets: list[list[int]] | None = None  # the image sizes [w, h] the run trained on; None: an official checkpoint

    @property
    def guidable(self) -> bool:
        """Conditional with a learned null condition (a class model trained with label dropout, or captions)."""
        if self.text_encoder is not None:
            return True
        return self.model.y_embedder is not None and getattr(self.model, "null_class", None) is not None


def load_sampleable(path: Path, *, use_ema: bool = True, vae: str | None = None, model_name: str | None = None,
                    image_size: int | None = None, device: torch.device | None = None,
                    warn=lambda msg: None, decoder: str | None = None) -> Sampleable:
    """`decoder` (or `vae`): another autoencoder to decode with, checked against the run's codec (load_decoder)."""
    device = device or default_device()
    vae = decoder or vae
    path = Path(path)
    if not path.exists():
        raise DitpipeError(f"checkpoint '{path}' does not exist; pass a checkpoint folder, a run folder (e.g. "
                           "outputs/quickstart; `ditpipe runs` lists them), an export folder or an official DiT .pt")
    folder = exported.folder_of(path)  # an export (`ditpipe export --format safetensors`, `ditpipe ema --out`)
    if path.is_file() and folder is None:
        return _official(path, model_name, image_size, vae or OFFICIAL_DEFAULT_VAE, device)
    from ditpipe.pipeline.training import build_model, conditioning_for, num_classes_for

    if folder is not None and not use_ema:
        raise DitpipeError(f"'{folder}' is an export that holds one set of weights; drop --no-ema")
    w = checkpoint.open_weights(path, "ema" if use_ema else "model", warn=warn)
    cfg, manifest, state = w.cfg, Manifest.of(w.manifest), w.state
    if w.kind == "export":
        description = f"{w.source} ({w.which} weights, step {w.step})"
    else:
        _warn_if_young(w, warn)
        description = f"{w.source} ({w.which}.pt, step {w.step})"
    num_classes = num_classes_for(cfg, manifest)
    model = build_model(cfg, manifest, num_classes)
    model.load_state_dict(state, strict=True)
    codec = load_decoder(vae or manifest.codec["name"], manifest.codec, manifest.codec["dtype"], device)
    labels = manifest.labels
    caption = conditioning_for(cfg, manifest) == "caption"
    objective, v = make_objective(cfg.diffusion.objective, model.learn_sigma, cfg.diffusion), cfg.validation
    return Sampleable(model.to(device).eval(), objective, manifest.grid, codec, checkpoint_norm(cfg, manifest),
                      labels["names"] if labels and num_classes else None, description,
                      manifest.text_encoder if caption else None,
                      Settings(v.sampler or objective.default_sampler, v.sampling_steps, v.cfg_scale,
                               tuple(v.cfg_interval)), "the run's validation settings", manifest.sizes)


def _warn_if_young(w: checkpoint.Weights, warn) -> None:
    """An EMA that has seen fewer updates than it averages over looks like the initial model."""
    cfg = w.cfg
    if w.which == "ema" and not cfg.training.ema_warmup and w.step < 1 / max(1e-12, 1 - cfg.training.ema_decay):
        warn(f"the EMA has seen only {w.step} updates with decay {cfg.training.ema_decay} (it averages over "
             f"about {1 / (1 - cfg.training.ema_decay):,.0f}); its samples may look like the initial model. "
             "Use --no-ema for the raw weights")


def checkpoint_norm(cfg, manifest: Manifest) -> LatentNorm:
    """The latent normalisation a checkpoint was trained with: as recorded (`latent_norm` in its manifest.json),
    or, for checkpoints from before it was recorded, the codec's factors. Another decoder (`--decoder`) takes the
    run codec's raw latents and maps them into its own space itself (pipeline/codec.py, CrossDecoder)."""
    return (LatentNorm.from_record(manifest.latent_norm) if manifest.latent_norm
            else LatentNorm.from_manifest(manifest, cfg.data.latent_norm))


def _official(path: Path, model_name: str | None, image_size: int | None, vae: str, device) -> Sampleable:
    if not model_name or not image_size:
        raise DitpipeError(f"'{path}' is a bare state dict (an official DiT checkpoint?): pass --model (e.g. "
                           "DiT-XL/2) and --image-size (e.g. 256) so ditpipe knows its shape")
    from ditpipe.pipeline.finetune import describe

    state = checkpoint.open_weights(path, "ema").state  # weights_only; an official training checkpoint's "ema" entry
    if not {"x_embedder.proj.weight", "final_layer.linear.weight"} <= set(state):
        raise DitpipeError(f"'{path}' is not a DiT state dict: {describe(state)}")
    codec = load_codec(vae, "fp32", device)
    if image_size % codec.downsample:
        raise DitpipeError(f"--image-size {image_size} is not a multiple of the VAE's downsample {codec.downsample}")
    table = state.get("y_embedder.embedding_table.weight")
    num_classes = 0 if table is None else table.shape[0] - 1
    out_rows = state["final_layer.linear.weight"].shape[0]
    in_channels = state["x_embedder.proj.weight"].shape[1]
    patch = state["x_embedder.proj.weight"].shape[-1]
    learn_sigma = out_rows == patch * patch * in_channels * 2
    size = image_size // codec.downsample
    model = build_dit(model_name, input_size=size, in_channels=in_channels, num_classes=num_classes,
                      learn_sigma=learn_sigma)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise DitpipeError(f"'{path}' does not match {model_name} at {image_size}px: {str(e).splitlines()[0]}") from None
    norm = LatentNorm.from_manifest({"codec": codec.identity(), "latent": {"shape": [1, in_channels, size, size]}},
                                    "scale")  # official DiT: the VAE's own scaling factor
    return Sampleable(model.to(device).eval(), make_objective("ddpm", learn_sigma), (in_channels, size, size), codec,
                      norm, None, f"{path} (official layout, {model_name})")


def resolve_settings(s: Sampleable, purpose: str, sampler: str | None = None, steps: int | None = None,
                     cfg_scale: float | None = None, cfg_interval: tuple[float, float] | None = None) -> Settings:
    """The flags given, and for the rest the checkpoint's own settings (its validation.*), or for an official
    checkpoint the official scripts' (`purpose`: sample or evaluate)."""
    base = s.settings or OFFICIAL_SETTINGS[purpose]
    chosen = Settings(sampler or base.sampler, steps or base.steps, base.cfg_scale if cfg_scale is None else cfg_scale,
                      tuple(cfg_interval or base.cfg_interval))
    if chosen.sampler not in s.objective.samplers:
        raise DitpipeError(f"unknown sampler {chosen.sampler!r} for a {s.objective.name} model; valid samplers: "
                           f"{', '.join(s.objective.samplers)}")
    if steps is not None and steps < 1:
        raise DitpipeError(f"--steps {steps}: needs at least 1 sampling step")
    if cfg_scale is not None and not s.guidable and cfg_scale != 1.0:
        raise DitpipeError(f"--cfg-scale {cfg_scale:g}: this model has no null condition to guide with ("
                           + ("it is unconditional" if s.model.y_embedder is None and s.text_encoder is None
                              else "trained without label dropout") + "); drop --cfg-scale")
    return chosen


def describe_settings(s: Sampleable, st: Settings, seed: int, given: set[str]) -> str:
    """One line with every value used: `heun × 20 steps, cfg 3 at noise 0.5–1, seed 0 (...)`; no cfg for models
    that cannot be guided."""
    parts = [f"{st.sampler} × {st.steps} steps"]
    if s.guidable:
        low, high = st.cfg_interval
        parts.append(f"cfg {st.cfg_scale:g}" + (" (no guidance)" if st.cfg_scale == 1.0 else
                                                 f" at noise {low:g}–{high:g}"))
    else:
        parts.append("unconditional" if s.model.y_embedder is None and s.text_encoder is None
                     else "no guidance (trained without label dropout)")
    parts.append(f"seed {seed}")
    defaults = [k for k in ("sampler", "steps", "cfg_scale", "cfg_interval") if k not in given]
    if not s.guidable:
        defaults = [k for k in defaults if not k.startswith("cfg")]
    return ", ".join(parts) + (f" (defaults from {s.origin})" if defaults else "")


def settings_with(s: Sampleable, purpose: str, base: dict, sampler, steps, cfg_scale, cfg_interval):
    """(Settings, the names set by a flag or the protocol): flags win over the protocol's `base`, which wins over
    the checkpoint's defaults."""
    pick = lambda flag, key: flag if flag is not None else base.get(key)  # noqa: E731
    given = {k for k, v in {"sampler": sampler, "steps": steps, "cfg_scale": cfg_scale,
                            "cfg_interval": cfg_interval}.items() if v is not None} | (set(base) - {"num", "labels"})
    return resolve_settings(s, purpose, pick(sampler, "sampler"), pick(steps, "steps"), pick(cfg_scale, "cfg_scale"),
                            pick(cfg_interval, "cfg_interval")), given


def generated(s: Sampleable, spread: Spread, n: int, settings: Settings, seed: int, batch_size: int, condition,
              plan, console: Console, what: str = "sample"):
    """This process's share of the n samples: (indices, uint8 images (B, H, W, 3)) batch by batch, with a progress
    bar (rank 0) over its sampling steps."""
    share = spread.share(n)
    with Progress(TextColumn(what), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console,
                  disable=not spread.main) as bar:
        task = bar.add_task(what, total=math.ceil(len(share) / batch_size) * settings.steps)
        yield from sample_batches(s.model, s.objective, s.latent_shape, s.codec, s.norm, share, batch_size, settings,
                                  seed, spread.device, condition, bf16=plan.bf16, cfg_channels=plan.cfg_channels,
                                  progress=lambda i, total: bar.advance(task))
