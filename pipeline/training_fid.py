"""FID during training: every `validation.fid_every_steps`, `validation.fid_samples` samples of the EMA weights
against reference statistics computed once, at the run's start.

Every rank takes part: each generates its block of the sample indices (noise and labels keyed on (seed, index),
as `ditpipe evaluate` does, so the curve is the same whatever the number of processes) and extracts their
Inception features; the features are gathered to rank 0, which computes the distance. No collective runs on rank 0
alone, so no rank waits on one that the others never enter. The reference is `validation.fid_reference` (an image
folder, pixel-codec shards or an ADM .npz) or else the first `validation.fid_reference_samples` images of the
training shards (pixel codec); its statistics are cached by content (pipeline/fid.py), so a resumed run reads them.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ditpipe.pipeline.errors import ConfigError
from ditpipe.pipeline.manifest import Manifest
from ditpipe.pipeline.ranks import torch_group
from ditpipe.pipeline.spread import Spread


class TrainingFID:
    """Scores the model at the steps `due` says; built by `start` (None when validation.fid_every_steps is 0)."""

    def __init__(self, cfg, manifest: dict, spread: Spread, ref, reference: str, num_classes: int):
        self.cfg, self.manifest, self.spread, self.ref, self.reference = cfg, manifest, spread, ref, reference
        self.num_classes = num_classes
        self.extractor = None

    @classmethod
    def start(cls, cfg, manifest: dict, shards_folder: Path, rank: int, world: int, device: torch.device,
              num_classes: int, conditioning: str) -> "TrainingFID | None":
        """Rank 0 computes (or reads from the cache) the reference statistics; a bad reference stops every rank."""
        v = cfg.validation
        if not v.fid_every_steps:
            return None
        reference = v.fid_reference or _shard_reference(manifest, shards_folder, v.fid_reference_samples)
        spread = Spread(rank, world, device)

        def reference_stats():
            from ditpipe.pipeline import fid

            shards = Manifest.of(manifest)
            size = shards.latent_shape()[-1] * shards.codec.get("downsample", 1)
            return fid.reference_stats(reference, size, None, device, cfg.training.batch_size)

        ref = torch_group(rank, world).on_rank0(reference_stats, share=False)  # a bad reference stops every rank
        return cls(cfg, manifest, spread, ref, str(reference.folder if hasattr(reference, "folder") else reference),
                   num_classes)

    def describe(self, global_batch: int, steps_to_run: int) -> str:
        """The preflight's line: what is scored and what it costs, in training steps' worth of model passes (a
        training step is about 3 forwards per sample: forward and backward)."""
        v = self.cfg.validation
        guided = self.num_classes and v.cfg_scale != 1.0
        forwards = v.fid_samples * v.sampling_steps * (2 if guided else 1)
        each = forwards / (3 * global_batch)
        count = steps_to_run // v.fid_every_steps + 1
        ref = f"{self.ref.n:,} images from {self.reference}" if self.ref is not None else self.reference
        return (f"every {v.fid_every_steps:,} steps and at the end: {v.fid_samples:,} EMA samples "
                f"({v.sampler or 'objective sampler'} × {v.sampling_steps}, cfg {v.cfg_scale:g}) vs {ref}; "
                f"≈ {each:,.0f} training steps' worth of model passes each, {count} times "
                f"(≈ {100 * each * count / max(steps_to_run, 1):.0f}% of this run's steps)")

    def due(self, step: int, start_step: int, end_step: int) -> bool:
        every = self.cfg.validation.fid_every_steps
        return step > start_step and (step % every == 0 or step == end_step)

    def __call__(self, step: int, weights: dict, objective, device: torch.device, cache: dict, log, console) -> None:
        """Score `weights` (the EMA's state dict) at `step`: to the console, metrics.jsonl (`val_fid`) and
        TensorBoard (`val/fid`). Every rank must call it; `cache` is the validation's (eval model, decoder)."""
        from ditpipe.pipeline.validation import eval_model

        model = eval_model(self.cfg, self.manifest, self.num_classes, weights, device, cache)
        scored = self.score(model, objective, device, cache)
        if scored is not None:
            value, n, seconds = scored
            log.scalars(step, prefix="val", fid=value)
            console.print(f"Step {step}, FID: {value:.3f} ({n:,} EMA samples vs {self.ref.n:,} reference images, "
                          f"{seconds:.1f} s)", highlight=False)

    def score(self, model, objective, device: torch.device, cache: dict) -> tuple[float, int, float] | None:
        """(FID, samples, seconds) on rank 0, None on the others; every rank must call it. `model` holds the EMA
        weights in eval mode; `cache` keeps the decoder between calls."""
        from ditpipe.pipeline import fid
        from ditpipe.pipeline.codec import load_codec
        from ditpipe.pipeline.generate import Settings, sample_batches
        from ditpipe.pipeline.latent_norm import LatentNorm

        t0, v, m = time.time(), self.cfg.validation, Manifest.of(self.manifest)
        if self.extractor is None:
            self.extractor = fid.InceptionFeatures(device)
        self.extractor.to(device)
        codec = m.codec
        if "codec" not in cache:
            cache["codec"] = load_codec(codec["name"], codec["dtype"], device)
        cache["codec"].to(device)
        _, channels, size, _ = m.latent["shape"]
        k, seed = self.num_classes, self.cfg.training.seed
        condition = (lambda idx: torch.tensor(list(idx)) % k) if k else (lambda idx: None)  # classes cycled
        settings = Settings(v.sampler, v.sampling_steps, v.cfg_scale if k else 1.0, v.cfg_interval)
        pools = [np.zeros((0, fid.NUM_FEATURES), np.float32)]
        for _, images in sample_batches(model, objective, (channels, size, size), cache["codec"],
                                        LatentNorm.from_record(m.latent_norm), self.spread.share(v.fid_samples),
                                        self.cfg.training.batch_size, settings, seed, device, condition, bf16=v.bf16):
            pools.append(self.extractor(fid.as_nchw_uint8(images)).cpu().numpy())  # (B, 2048)
        self.extractor.to("cpu")  # off the GPU until the next FID: the training step needs the memory
        pool = self.spread.gather(np.concatenate(pools))
        if not self.spread.main:
            return None
        acc = fid.StatsAccumulator()
        acc.update(pool)
        mu, sigma, n = acc.result()
        return fid.frechet_distance(mu, sigma, self.ref.mu, self.ref.sigma), n, time.time() - t0


def _shard_reference(manifest: dict, folder: Path, count: int):
    from ditpipe.pipeline.fid import ShardImages

    manifest = Manifest.of(manifest)
    if "shards" not in manifest.raw:  # the online baseline's manifest lists no shards
        raise ConfigError([("validation.fid_reference", "data.source: images has no shards to take reference images "
                            "from; set it to the image folder (or an ADM reference batch .npz)")])
    if manifest.codec.get("kind") != "pixel":
        raise ConfigError([("validation.fid_reference", "FID during training needs real images: these training "
                            "data hold VAE latents (decoded, they are reconstructions); set it to an image folder, "
                            "pixel-codec shards or an ADM reference batch .npz")])
    return ShardImages(folder, min(count, int(manifest.num_samples)))
