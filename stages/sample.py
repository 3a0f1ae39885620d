"""`ditpipe sample`: image grids and per-sample PNGs from our checkpoints or official DiT checkpoints.

What a checkpoint holds and the settings it samples with are pipeline/sampleable.py's; this verb picks the labels or
prompts, writes the grid, the PNGs and the `.npz`. A caption model samples from `--prompt`s, encoded by the text
encoder its manifest names (offline for minilm), checked against the recorded weights hash.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
from rich.console import Console

from ditpipe.pipeline import checkpoint, npz
from ditpipe.pipeline.atomic import atomic_path
from ditpipe.pipeline.errors import DitpipeError
from ditpipe.pipeline.images import make_grid
from ditpipe.pipeline.protocol import conditioner, make_plan, protocol_defaults
from ditpipe.pipeline.sample_options import SAMPLE_BATCH, SampleOptions
from ditpipe.pipeline.sampleable import Sampleable, describe_settings, generated, load_sampleable, settings_with
from ditpipe.pipeline.spread import Spread


def sized_latent(s: Sampleable, size: str, warn) -> tuple[int, int, int]:
    """The latent shape (C, H/f, W/f) of `--size WxH`: any size whose latent the model's patches tile; a size the
    run never trained on (not one of its buckets) is allowed, with a warning."""
    from ditpipe.pipeline.buckets import parse_size

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


def sample(checkpoint_path: Path, o: SampleOptions = SampleOptions(), *, classes: str | None = None,
           prompts: list[str] | None = None, out: Path | None = Path("grid.png"), out_dir: Path | None = None,
           size: str | None = None, decoder: str | None = None, console: Console | None = None) -> np.ndarray | None:
    """Generate; write the grid (the first GRID_MAX samples), the per-sample PNGs and/or the ADM `.npz`; return
    the grid's images (N, H, W, 3) uint8 (on rank 0 of a torchrun launch; None on the others). Sampling settings
    left None come from the protocol, else the checkpoint (its validation.*), else official DiT's for an official .pt.
    Sample i's noise (and random label) is keyed on (seed, i): the same images for any batch size or process count.
    `size` "WxH": another image size than the run's (most common) bucket; `decoder`: another autoencoder to decode
    with (TAESD for an SD-VAE run), checked against the run's codec."""
    spread = Spread.start()
    console = console or Console(stderr=True)
    if not spread.main:
        console = Console(stderr=True, quiet=True)  # rank 0 speaks for the launch
    warn = lambda m: console.print(f"[yellow]warning:[/] {m}", soft_wrap=True)  # noqa: E731
    if o.num is not None and o.num < 1:
        raise DitpipeError(f"--num {o.num}: needs at least 1 sample")
    batch_size = SAMPLE_BATCH if o.batch_size is None else o.batch_size
    if batch_size < 1:
        raise DitpipeError(f"--batch-size {batch_size}: needs at least 1")
    _check_out(out)
    s = load_sampleable(checkpoint_path, use_ema=o.use_ema, vae=o.vae, model_name=o.model_name,
                        image_size=o.image_size, warn=warn, device=spread.device, decoder=decoder)
    if size is not None:
        s.latent_shape = sized_latent(s, size, warn)
    base = protocol_defaults(o.protocol, s)
    settings, given = settings_with(s, "sample", base, o.sampler, o.steps, o.cfg_scale, o.cfg_interval)
    per_sample = prompt_list(prompts, classes, o.num, s.text_encoder)
    num_classes = getattr(s.model, "num_classes", 0) if s.model.y_embedder is not None else 0
    chosen = None
    if per_sample is not None:
        labels, n = "prompts", len(per_sample)
    elif num_classes and classes is None and o.protocol:
        labels, n = "random", o.num or base["num"]
    else:
        chosen = class_list(classes, o.num, num_classes, s.class_names)
        labels = "none" if chosen is None else "given" if classes else "cycled"
        n = len(chosen) if chosen is not None else (o.num or 16)
    plan = make_plan(s, official=s.settings is None, protocol=o.protocol, labels=labels,
                     cfg_channels=o.cfg_channels, precision=o.precision, device=spread.device)
    console.print(f"sampling {n} from {s.description}: {describe_settings(s, settings, o.seed, given)}",
                  highlight=False, soft_wrap=True)
    console.print(f"  {plan.describe(s.guidable and settings.cfg_scale != 1.0, s.latent_shape[0], spread.device)}"
                  + (f"; {spread.world} processes" if spread.world > 1 else ""), highlight=False, soft_wrap=True)
    condition = conditioner(s, labels, o.seed, chosen, per_sample, o.text_encoder)
    distinct = list(dict.fromkeys(prompts)) if per_sample is not None else None
    width = max(4, len(str(n - 1)))

    def name(i: int, y) -> str:
        if per_sample is not None:
            return f"{i:0{width}d}_prompt{distinct.index(per_sample[i])}.png"
        return f"{i:0{width}d}_class{int(y)}.png" if y is not None else f"{i:0{width}d}.png"

    keep, kept, part = min(n, GRID_MAX), [], npz.PartWriter(o.npz_out, spread.rank) if o.npz_out else None
    t0 = time.time()
    for idx, images in generated(s, spread, n, settings, o.seed, batch_size, condition, plan, console):
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
            npz.join(o.npz_out, spread.world, n, (h, w, 3))
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
    if o.npz_out is not None:
        console.print(f"npz: {o.npz_out} (arr_0: uint8 {n}×{h}×{w}×3, the ADM evaluator's sample batch)",
                      highlight=False, soft_wrap=True)
    return kept


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
