"""`ditpipe sample`: image grids and per-sample PNGs from our checkpoints or official DiT checkpoints.

Our checkpoint folders carry their config and the shard manifest's codec section, so the model, objective, latent
shape, label names and decoder all come from the checkpoint alone. An official DiT `.pt` (a raw state dict, e.g.
DiT-XL-2-256x256.pt) carries none of that: `--model` and `--image-size` give the shape, `--vae` the decoder, and the
VAE's own config the scaling factor. A caption model samples from `--prompt`s, encoded by the text encoder its
manifest names (offline for minilm), checked against the recorded weights hash.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from pipeline import checkpoint, exported, npz
from pipeline.atomic import atomic_path
from pipeline.codec import default_device, load_codec, load_decoder
from pipeline.diffusion import make_objective
from pipeline.errors import DitpipeError
from pipeline.generate import Settings, sample_batches
from pipeline.images import make_grid
from pipeline.latent_norm import LatentNorm
from pipeline.model import build_dit
from pipeline.protocol import conditioner, make_plan, protocol_defaults
from pipeline.spread import Spread

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
    from pipeline.buckets import sizes_of
    from pipeline.shards import text_encoder_of
    from pipeline.training import build_model, conditioning_for, grid_shape, num_classes_for

    cfg, manifest, state, description = (_exported(folder, use_ema) if folder is not None
                                         else _checkpoint(path, use_ema, warn))
    num_classes = num_classes_for(cfg, manifest)
    model = build_model(cfg, manifest, num_classes)
    model.load_state_dict(state, strict=True)
    codec = load_decoder(vae or manifest["codec"]["name"], manifest["codec"], manifest["codec"]["dtype"], device)
    labels = manifest.get("labels")
    caption = conditioning_for(cfg, manifest) == "caption"
    objective, v = make_objective(cfg.diffusion.objective, model.learn_sigma, cfg.diffusion), cfg.validation
    return Sampleable(model.to(device).eval(), objective, grid_shape(manifest), codec, checkpoint_norm(cfg, manifest),
                      labels["names"] if labels and num_classes else None, description,
                      text_encoder_of(manifest) if caption else None,
                      Settings(v.sampler or objective.default_sampler, v.sampling_steps, v.cfg_scale,
                               tuple(v.cfg_interval)), "the run's validation settings", sizes_of(manifest))


def _checkpoint(path: Path, use_ema: bool, warn) -> tuple:
    """(config, manifest excerpt, state dict, description) of a checkpoint folder, or a run folder's newest."""
    if not (path / checkpoint.STATE).is_file() and path.is_dir():  # a run folder: its newest valid checkpoint
        path = checkpoint.find_resumable(path, warn)[0]
    state = checkpoint.validate(path)
    cfg, manifest = checkpoint.read_config(path), checkpoint.read_manifest(path)
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


def checkpoint_norm(cfg, manifest: dict) -> LatentNorm:
    """The latent normalisation a checkpoint was trained with: as recorded (`latent_norm` in its manifest.json),
    or, for checkpoints from before it was recorded, the codec's factors. Another decoder (`--decoder`) takes the
    run codec's raw latents and maps them into its own space itself (pipeline/codec.py, CrossDecoder)."""
    return (LatentNorm.from_record(manifest["latent_norm"]) if manifest.get("latent_norm")
            else LatentNorm.from_manifest(manifest, cfg.data.latent_norm))


def _official(path: Path, model_name: str | None, image_size: int | None, vae: str, device) -> Sampleable:
    if not model_name or not image_size:
        raise DitpipeError(f"'{path}' is a bare state dict (an official DiT checkpoint?): pass --model (e.g. "
                           "DiT-XL/2) and --image-size (e.g. 256) so ditpipe knows its shape")
    from pipeline.finetune import describe, load_init

    state = load_init(path, "ema").state  # weights_only; an official training checkpoint's "ema" entry
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


def sized_latent(s: Sampleable, size: str, warn) -> tuple[int, int, int]:
    """The latent shape (C, H/f, W/f) of `--size WxH`: any size whose latent the model's patches tile; a size the
    run never trained on (not one of its buckets) is allowed, with a warning."""
    from pipeline.buckets import parse_size

    try:
        w, h = parse_size(size)
    except ValueError as e:
        raise DitpipeError(f"--size {size!r}: {e}") from None
    step = s.codec.downsample * s.model.patch_size
    if w % step or h % step:
        raise DitpipeError(f"--size {w}x{h}: both sides must be multiples of {step} (the codec's downsample "
                           f"{s.codec.downsample} × the model's patch {s.model.patch_size})")
    shape = (s.latent_shape[0], h // s.codec.downsample, w // s.codec.downsample)
    if s.buckets and [w, h] not in s.buckets:
        warn(f"--size {w}x{h} is none of the run's buckets ({', '.join(f'{a}x{b}' for a, b in s.buckets)}); the "
             "model has not seen this shape")
    s.model.any_grid = True  # an official checkpoint's model too: its pos_embed is computed for this grid
    return shape


def class_list(classes: str | None, num: int | None, num_classes: int,
               names: list[str] | None = None) -> list[int] | None:
    """The label of every sample: --classes (ids or the manifest's class names, comma-separated) cycled to --num,
    or every class in turn."""
    if num_classes == 0:
        if classes:
            raise DitpipeError("this model is unconditional; drop --classes")
        return None
    if classes is None:
        chosen = list(range(num_classes))
    else:
        chosen = [_class_id(c.strip(), num_classes, names) for c in classes.split(",") if c.strip()]
        if not chosen:
            raise DitpipeError(f"--classes {classes!r} names no class; {_known_classes(num_classes, names)}")
    n = num or len(chosen)
    return [chosen[i % len(chosen)] for i in range(n)]


def _class_id(text: str, num_classes: int, names: list[str] | None) -> int:
    if names and text in names[:num_classes]:
        return names.index(text)
    try:
        k = int(text)
    except ValueError:
        k = None
    if k is None or not 0 <= k < num_classes:
        what = "out of range" if k is not None else "not a class id or name"
        raise DitpipeError(f"--classes {text!r}: {what}; {_known_classes(num_classes, names)}")
    return k


def _known_classes(num_classes: int, names: list[str] | None) -> str:
    if not names:
        return f"the model has classes 0..{num_classes - 1}"
    shown = ", ".join(f"{i} {n}" for i, n in enumerate(names[:num_classes][:20]))
    return f"the model's classes are {shown}" + (f", … ({num_classes} in all)" if num_classes > 20 else "")


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


GRID_MAX = 256  # the grid shows (and `sample` returns) the first samples, at most this many


def sample(checkpoint_path: Path, *, use_ema: bool = True, classes: str | None = None, num: int | None = None,
           cfg_scale: float | None = None, steps: int | None = None, sampler: str | None = None, seed: int = 0,
           cfg_interval: tuple[float, float] | None = None, out: Path | None = Path("grid.png"),
           out_dir: Path | None = None, batch_size: int = 64,
           vae: str | None = None, model_name: str | None = None, image_size: int | None = None,
           prompts: list[str] | None = None, text_encoder: str | None = None, protocol: str | None = None,
           cfg_channels: str | None = None, precision: str | None = None, npz_out: Path | None = None,
           console: Console | None = None, size: str | None = None,
           decoder: str | None = None) -> np.ndarray | None:
    """Generate; write the grid (the first GRID_MAX samples), the per-sample PNGs and/or the ADM `.npz`; return
    the grid's images (N, H, W, 3) uint8 (on rank 0 of a torchrun launch; None on the others). Sampling settings
    left None come from `protocol`, else the checkpoint (its validation.*), else official DiT's for an official .pt.
    Sample i's noise (and random label) is keyed on (seed, i): the same images for any batch size or process count.
    `size` "WxH": another image size than the run's (most common) bucket; `decoder`: another autoencoder to decode
    with (TAESD for an SD-VAE run), checked against the run's codec."""
    spread = Spread.start()
    console = console or Console(stderr=True)
    if not spread.main:
        console = Console(stderr=True, quiet=True)  # rank 0 speaks for the launch
    warn = lambda m: console.print(f"[yellow]warning:[/] {m}", soft_wrap=True)  # noqa: E731
    if num is not None and num < 1:
        raise DitpipeError(f"--num {num}: needs at least 1 sample")
    if batch_size < 1:
        raise DitpipeError(f"--batch-size {batch_size}: needs at least 1")
    _check_out(out)
    s = load_sampleable(checkpoint_path, use_ema=use_ema, vae=vae, model_name=model_name, image_size=image_size,
                        warn=warn, device=spread.device, decoder=decoder)
    if size is not None:
        s.latent_shape = sized_latent(s, size, warn)
    base = protocol_defaults(protocol, s)
    settings, given = settings_with(s, "sample", base, sampler, steps, cfg_scale, cfg_interval)
    per_sample = prompt_list(prompts, classes, num, s.text_encoder)
    num_classes = getattr(s.model, "num_classes", 0) if s.model.y_embedder is not None else 0
    chosen = None
    if per_sample is not None:
        labels, n = "prompts", len(per_sample)
    elif num_classes and classes is None and protocol:
        labels, n = "random", num or base["num"]
    else:
        chosen = class_list(classes, num, num_classes, s.class_names)
        labels = "none" if chosen is None else "given" if classes else "cycled"
        n = len(chosen) if chosen is not None else (num or 16)
    plan = make_plan(s, official=s.settings is None, protocol=protocol, labels=labels, cfg_channels=cfg_channels,
                     precision=precision, device=spread.device)
    console.print(f"sampling {n} from {s.description}: {describe_settings(s, settings, seed, given)}",
                  highlight=False, soft_wrap=True)
    console.print(f"  {plan.describe(s.guidable and settings.cfg_scale != 1.0, s.latent_shape[0], spread.device)}"
                  + (f"; {spread.world} processes" if spread.world > 1 else ""), highlight=False, soft_wrap=True)
    condition = conditioner(s, labels, seed, chosen, per_sample, text_encoder)
    distinct = list(dict.fromkeys(prompts)) if per_sample is not None else None
    width = max(4, len(str(n - 1)))

    def name(i: int, y) -> str:
        if per_sample is not None:
            return f"{i:0{width}d}_prompt{distinct.index(per_sample[i])}.png"
        return f"{i:0{width}d}_class{int(y)}.png" if y is not None else f"{i:0{width}d}.png"

    keep, kept, part = min(n, GRID_MAX), [], npz.PartWriter(npz_out, spread.rank) if npz_out else None
    t0 = time.time()
    for idx, images in generated(s, spread, n, settings, seed, batch_size, condition, plan, console):
        if out_dir is not None:
            ys = condition(idx) if labels not in ("prompts", "none") else [None] * len(idx)
            _write_each(images, out_dir, [name(i, y) for i, y in zip(idx, ys)])
        if part is not None:
            part.write(images)
        kept += [img for i, img in zip(idx, images) if i < keep]
    h, w = s.latent_shape[1] * s.codec.downsample, s.latent_shape[2] * s.codec.downsample
    kept = spread.gather(np.stack(kept) if kept else np.zeros((0, h, w, 3), np.uint8))
    if part is not None:
        part.close()
        spread.barrier()
        if spread.main:
            npz.join(npz_out, spread.world, n, (h, w, 3))
    seconds = time.time() - t0
    spread.barrier()
    if not spread.main:
        return None
    console.print(f"{n:,} samples in {seconds:.1f} s: {n / seconds:.2f} samples/s"
                  + (f" over {spread.world} processes" if spread.world > 1 else ""), highlight=False)
    if out is not None:
        _grid(s, kept, out, condition, labels, num_classes, distinct, per_sample, n, console)
    if out_dir is not None:
        console.print(f"samples: {out_dir}/ ({n} PNGs" + ("; prompt k = the k-th distinct --prompt)"
                                                          if per_sample is not None else ")"),
                      highlight=False, soft_wrap=True)
    if npz_out is not None:
        console.print(f"npz: {npz_out} (arr_0: uint8 {n}×{h}×{w}×3, the ADM evaluator's sample batch)",
                      highlight=False, soft_wrap=True)
    return kept


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


def _grid(s: Sampleable, images: np.ndarray, out: Path, condition, labels: str, num_classes: int, distinct,
          per_sample, n: int, console: Console) -> None:
    """One class (or prompt) per column when the first samples go through them in order, else a square."""
    names, ncols = None, int(math.ceil(math.sqrt(len(images))))
    if per_sample is not None:
        which = [distinct.index(p) for p in per_sample[: len(images)]]
        if len(distinct) <= 16 and which[: len(distinct)] == list(range(len(distinct))):
            names, ncols = [p[:24] for p in distinct], len(distinct)
    elif labels not in ("none",):
        ys = [int(y) for y in condition(range(len(images)))]
        first = sorted(set(ys))
        if len(first) <= 16 and ys[: len(first)] == first:
            names, ncols = [(s.class_names or [str(c) for c in range(num_classes)])[c] for c in first], len(first)
    _save(make_grid(images, ncols, column_labels=names, min_cell=64), out)
    console.print(f"grid: {out}  ({len(images)} samples" + (f", the first of {n:,}" if len(images) < n else "") + ")",
                  highlight=False, soft_wrap=True)


def _check_out(out: Path | None) -> None:
    """Before any sampling: the grid's format comes from its suffix, so an unknown one would fail only at the end."""
    from PIL import Image

    if out is not None and Path(out).suffix.lower() not in Image.registered_extensions():
        raise DitpipeError(f"--out {out}: the grid is an image; give it a suffix PIL writes, e.g. {Path(out).stem}.png")


def _save(image, out: Path) -> None:
    """A PIL image to `out` under a temporary name, then renamed: a failed write (a full disk) leaves an earlier file
    there whole, and is one line naming `out`."""
    from PIL import Image

    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out) as tmp:  # the temporary's suffix is .tmp: the format comes from out's
            image.save(tmp, format=Image.registered_extensions()[out.suffix.lower()])
    except OSError as e:
        full, what = checkpoint.write_trouble(out.parent, e)
        raise DitpipeError(f"could not write '{out}': {what}; an earlier file there is as it was. "
                           f"{'Free some space' if full else 'Fix the cause'} and run the command again") from None


def _write_each(images: np.ndarray, out_dir: Path, names: list[str]) -> None:
    from PIL import Image

    for img, name in zip(images, names):
        _save(Image.fromarray(img), Path(out_dir) / name)
