"""`ditpipe sample`: image grids and per-sample PNGs from our checkpoints or official DiT checkpoints.

Our checkpoint folders carry their config and the shard manifest's codec section, so the model, objective, latent
shape, label names and decoder all come from the checkpoint alone. An official DiT `.pt` (a raw state dict, e.g.
DiT-XL-2-256x256.pt) carries none of that: `--model` and `--image-size` give the shape, `--vae` the decoder, and the
VAE's own config the scaling factor. A caption model samples from `--prompt`s, encoded by the text encoder its
manifest names (offline for minilm), checked against the recorded weights hash.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from pipeline import checkpoint, exported
from pipeline.codec import default_device, load_codec
from pipeline.config import validate_tree
from pipeline.diffusion import make_objective
from pipeline.errors import DitpipeError
from pipeline.generate import decode, generate
from pipeline.images import make_grid, to_uint8
from pipeline.latent_norm import LatentNorm
from pipeline.model import build_dit

OFFICIAL_DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"


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


def load_sampleable(path: Path, *, use_ema: bool = True, vae: str | None = None, model_name: str | None = None,
                    image_size: int | None = None, device: torch.device | None = None,
                    warn=lambda msg: None) -> Sampleable:
    device = device or default_device()
    path = Path(path)
    folder = exported.folder_of(path)  # an export (`ditpipe export --format safetensors`, `ditpipe ema --out`)
    if path.is_file() and folder is None:
        return _official(path, model_name, image_size, vae or OFFICIAL_DEFAULT_VAE, device)
    from pipeline.shards import text_encoder_of
    from pipeline.training import build_model, conditioning_for, num_classes_for

    cfg, manifest, state, description = (_exported(folder, use_ema) if folder is not None
                                         else _checkpoint(path, use_ema, warn))
    num_classes = num_classes_for(cfg, manifest)
    model = build_model(cfg, manifest, num_classes)
    model.load_state_dict(state, strict=True)
    codec = load_codec(vae or manifest["codec"]["name"], manifest["codec"]["dtype"], device)
    labels = manifest.get("labels")
    caption = conditioning_for(cfg, manifest) == "caption"
    return Sampleable(model.to(device).eval(), make_objective(cfg.diffusion.objective, model.learn_sigma),
                      tuple(manifest["latent"]["shape"][1:]), codec,
                      checkpoint_norm(cfg, manifest, codec if vae else None),
                      labels["names"] if labels and num_classes else None, description,
                      text_encoder_of(manifest) if caption else None)


def _checkpoint(path: Path, use_ema: bool, warn) -> tuple:
    """(config, manifest excerpt, state dict, description) of a checkpoint folder, or a run folder's newest."""
    import yaml

    if not (path / checkpoint.STATE).is_file() and path.is_dir():  # a run folder: its newest valid checkpoint
        path = checkpoint.find_resumable(path, warn)[0]
    state = checkpoint.validate(path)
    cfg = validate_tree(yaml.safe_load((path / "config.yaml").read_text()))
    manifest = json.loads((path / "manifest.json").read_text())
    weights = "ema.pt" if use_ema and (path / "ema.pt").is_file() else "model.pt"
    if weights == "ema.pt" and not cfg.training.ema_warmup and state["step"] < 1 / max(1e-12, 1 - cfg.training.ema_decay):
        warn(f"the EMA has seen only {state['step']} updates with decay {cfg.training.ema_decay} (it averages over "
             f"about {1 / (1 - cfg.training.ema_decay):,.0f}); its samples may look like the initial model. "
             "Use --no-ema for the raw weights")
    return cfg, manifest, checkpoint.load_tensors(path / weights), f"{path} ({weights}, step {state['step']})"


def _exported(folder: Path, use_ema: bool) -> tuple:
    """The same for an export folder, which holds one set of weights."""
    if not use_ema:
        raise DitpipeError(f"'{folder}' is an export that holds one set of weights; drop --no-ema")
    ex = exported.read(folder)
    return ex.cfg, ex.manifest, ex.state, f"{folder} ({ex.description})"


def checkpoint_norm(cfg, manifest: dict, other_codec=None) -> LatentNorm:
    """The latent normalisation a checkpoint was trained with: as recorded (`latent_norm` in its manifest.json),
    or, for checkpoints from before it was recorded, the codec's factors. With another decoder (`--vae`), `scale`
    takes that decoder's own factors; `channel` keeps the recorded statistics, which describe the model's space."""
    norm = (LatentNorm.from_record(manifest["latent_norm"]) if manifest.get("latent_norm")
            else LatentNorm.from_manifest(manifest, cfg.data.latent_norm))
    if other_codec is not None and norm.kind == "scale":
        norm = LatentNorm.from_manifest({**manifest, "codec": other_codec.identity()}, "scale")
    return norm


def _official(path: Path, model_name: str | None, image_size: int | None, vae: str, device) -> Sampleable:
    if not model_name or not image_size:
        raise DitpipeError(f"'{path}' is a bare state dict (an official DiT checkpoint?): pass --model (e.g. "
                           "DiT-XL/2) and --image-size (e.g. 256) so ditpipe knows its shape")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle that weights_only refuses, or not a torch file at all
        raise DitpipeError(f"cannot load '{path}' as a plain state dict with weights_only=True ({e})") from None
    if isinstance(state, dict) and "ema" in state and isinstance(state["ema"], dict):
        state = state["ema"]  # training checkpoints of the official code: {"model", "ema", "opt", "args"}
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


def class_list(classes: str | None, num: int | None, num_classes: int) -> list[int] | None:
    """The label of every sample: --classes cycled to --num, or every class in turn."""
    if num_classes == 0:
        if classes:
            raise DitpipeError("this model is unconditional; drop --classes")
        return None
    chosen = list(range(num_classes)) if not classes else [int(c) for c in classes.split(",") if c.strip()]
    bad = [c for c in chosen if not 0 <= c < num_classes]
    if bad:
        raise DitpipeError(f"--classes {bad} out of range: the model has classes 0..{num_classes - 1}")
    n = num or len(chosen)
    return [chosen[i % len(chosen)] for i in range(n)]


def prompt_list(prompts: list[str] | None, classes: str | None, num: int | None, text_encoder: dict | None):
    """The prompt of every sample (--prompt cycled to --num), or None for a label model; each flag only where it
    means something."""
    if text_encoder is None:
        if prompts:
            raise DitpipeError("this model is not caption-conditioned, so --prompt means nothing to it; use "
                               "--classes (class models), or train on shards encoded with --captions")
        return None
    if classes:
        raise DitpipeError("this is a caption model: describe what to draw with --prompt \"a red circle\" "
                           "(repeatable), not --classes")
    if not prompts:
        raise DitpipeError("this is a caption model: give at least one --prompt \"...\"")
    n = num or len(prompts)
    return [prompts[i % len(prompts)] for i in range(n)]


def sample(checkpoint_path: Path, *, use_ema: bool = True, classes: str | None = None, num: int | None = None,
           cfg_scale: float = 4.0, steps: int | None = None, sampler: str | None = None, seed: int = 0,
           cfg_interval: tuple[float, float] = (0.0, 1.0), out: Path | None = Path("grid.png"),
           out_dir: Path | None = None, batch_size: int = 64,
           vae: str | None = None, model_name: str | None = None, image_size: int | None = None,
           prompts: list[str] | None = None, text_encoder: str | None = None,
           console: Console | None = None) -> np.ndarray:
    """Generate, write the grid and/or the per-sample PNGs, and return the images (N, H, W, 3) uint8."""
    console = console or Console(stderr=True)
    warn = lambda m: console.print(f"[yellow]warning:[/] {m}", soft_wrap=True)  # noqa: E731
    s = load_sampleable(checkpoint_path, use_ema=use_ema, vae=vae, model_name=model_name, image_size=image_size,
                        warn=warn)
    per_sample = prompt_list(prompts, classes, num, s.text_encoder)
    if per_sample is not None:
        return _sample_prompts(s, per_sample, list(dict.fromkeys(prompts)), text_encoder, cfg_scale, steps, sampler,
                               seed, out, out_dir, batch_size, console, cfg_interval)
    num_classes = getattr(s.model, "num_classes", 0) if s.model.y_embedder is not None else 0
    labels = class_list(classes, num, num_classes)
    n = len(labels) if labels is not None else (num or 16)
    sampler, steps = _sampler(s, sampler, steps)
    images = generate_images(s, labels, n, sampler, steps, cfg_scale, seed, batch_size, console, cfg_interval)
    if out is not None:
        distinct = sorted(set(labels)) if labels is not None else []
        per_class = labels is not None and len(distinct) <= 16 and labels[: len(distinct)] == distinct
        ncols = len(distinct) if per_class else int(math.ceil(math.sqrt(n)))
        names = [(s.class_names or [str(c) for c in range(num_classes)])[c] for c in distinct] if per_class else None
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        make_grid(images, ncols, column_labels=names, min_cell=64).save(out)
        guided = "" if tuple(cfg_interval) == (0.0, 1.0) else f" at noise {cfg_interval[0]:g}–{cfg_interval[1]:g}"
        console.print(f"grid: {out}  ({n} samples, {sampler} × {steps} steps, cfg {cfg_scale:g}{guided}, seed {seed}; "
                      f"{s.description})", soft_wrap=True)
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        from PIL import Image

        for i, img in enumerate(images):
            name = f"{i:04d}_class{labels[i]}.png" if labels is not None else f"{i:04d}.png"
            Image.fromarray(img).save(out_dir / name)
        console.print(f"samples: {out_dir}/ ({n} PNGs)")
    return images


def _sampler(s: Sampleable, sampler: str | None, steps: int | None) -> tuple[str, int]:
    sampler = sampler or s.objective.default_sampler
    if sampler not in s.objective.samplers:
        raise DitpipeError(f"unknown sampler {sampler!r} for a {s.objective.name} model; valid samplers: "
                           f"{', '.join(s.objective.samplers)}")
    return sampler, steps or (250 if sampler in ("ddpm", "ddim") else 50)


def _sample_prompts(s: Sampleable, per_sample: list[str], distinct: list[str], text_encoder: str | None,
                    cfg_scale: float, steps: int | None, sampler: str | None, seed: int, out: Path | None,
                    out_dir: Path | None, batch_size: int, console: Console,
                    cfg_interval: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """A caption model's samples: one column per distinct prompt; files <index>_prompt<k>.png, k = the prompt's
    position among the distinct --prompt values."""
    from pipeline.text import encode_prompts, load_for_manifest

    device = next(s.model.parameters()).device
    enc = load_for_manifest(s.text_encoder, device, text_encoder)
    sampler, steps = _sampler(s, sampler, steps)
    images = generate_images(s, encode_prompts(enc, per_sample), len(per_sample), sampler, steps, cfg_scale, seed,
                             batch_size, console, cfg_interval)
    which = [distinct.index(p) for p in per_sample]
    if out is not None:
        per_column = len(distinct) <= 16 and which[: len(distinct)] == list(range(len(distinct)))
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        make_grid(images, len(distinct) if per_column else int(math.ceil(math.sqrt(len(images)))),
                  column_labels=[p[:24] for p in distinct] if per_column else None, min_cell=64).save(out)
        console.print(f"grid: {out}  ({len(images)} samples, {sampler} × {steps} steps, cfg {cfg_scale:g}, seed "
                      f"{seed}; {s.description})", soft_wrap=True)
    if out_dir is not None:
        from PIL import Image

        Path(out_dir).mkdir(parents=True, exist_ok=True)
        for i, (img, k) in enumerate(zip(images, which)):
            Image.fromarray(img).save(Path(out_dir) / f"{i:04d}_prompt{k}.png")
        console.print(f"samples: {out_dir}/ ({len(images)} PNGs; prompt k = the k-th distinct --prompt)")
    return images


def generate_images(s: Sampleable, labels, n: int, sampler: str, steps: int, cfg_scale: float,
                    seed: int, batch_size: int, console: Console,
                    cfg_interval: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """n images in batches; batch b uses seed `seed + b`, so a sample depends on the seed and batch size only."""
    device = next(s.model.parameters()).device
    chunks = []
    with Progress(TextColumn("sample"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console) as bar:
        task = bar.add_task("sample", total=math.ceil(n / batch_size) * steps)
        for b, start in enumerate(range(0, n, batch_size)):
            count = min(batch_size, n - start)
            y = None if labels is None else _take(labels, start, count)
            z = generate(s.model, s.objective, s.latent_shape, y, count, sampler, steps, cfg_scale, seed + b, device,
                         progress=lambda i, total: bar.advance(task), cfg_interval=cfg_interval)
            chunks.append(to_uint8(decode(z, s.codec, s.norm)))
    return np.concatenate(chunks)


def _take(labels, start: int, count: int):
    """Samples [start, start + count) of the conditioning: class ids (a list) or a Caption."""
    if isinstance(labels, list):
        return torch.tensor(labels[start : start + count])
    return type(labels)(*(f[start : start + count] for f in labels))
