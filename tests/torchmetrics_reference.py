"""torchmetrics' own FID and KID on our extractor, and FID straight from image batches: what the tests check
pipeline/fid.py's and pipeline/eval_metrics.py's numbers against (the library scores through eval_metrics.score)."""

from __future__ import annotations

import warnings
from typing import Iterable

import numpy as np
import torch

from ditpipe.pipeline.errors import DitpipeError
from ditpipe.pipeline.fid import (InceptionFeatures, Progress, StatsAccumulator, as_nchw_uint8, frechet_distance,
                          import_torchmetrics)


def fid_metric(device: torch.device | str | None = None, extractor: torch.nn.Module | None = None):
    """torchmetrics' FrechetInceptionDistance on the TF-FID extractor; real features are kept across `reset()`.
    Feed uint8 (N, 3, H, W) images: `m.update(x, real=True/False)`. `set_reference` loads cached statistics."""
    fid_mod = import_torchmetrics("torchmetrics.image.fid")
    extractor = extractor if extractor is not None else InceptionFeatures(device)
    metric = fid_mod.FrechetInceptionDistance(feature=extractor, normalize=False, reset_real_features=False)
    return metric.to(device or "cpu")


def kid_metric(num_samples: int, device: torch.device | str | None = None, extractor: torch.nn.Module | None = None,
               subsets: int = 100, subset_size: int = 1000):
    """torchmetrics' KernelInceptionDistance on the same extractor. `num_samples` is the smaller of the real and
    generated counts; `subset_size` is capped to it (torchmetrics refuses subsets larger than the sample)."""
    if num_samples < 2:
        raise DitpipeError(f"KID needs at least 2 samples per side, got {num_samples}")
    kid_mod = import_torchmetrics("torchmetrics.image.kid")
    extractor = extractor if extractor is not None else InceptionFeatures(device)
    with warnings.catch_warnings():  # "will save all extracted features in buffer": known, and what KID needs
        warnings.simplefilter("ignore", UserWarning)
        metric = kid_mod.KernelInceptionDistance(feature=extractor, subsets=subsets,
                                                 subset_size=min(subset_size, num_samples), normalize=False,
                                                 reset_real_features=False)
    return metric.to(device or "cpu")


def set_reference(metric, mu: np.ndarray, sigma: np.ndarray, n: int) -> None:
    """Load reference statistics (e.g. from the cache) into a FrechetInceptionDistance as its real side."""
    dev = metric.real_features_sum.device
    mu_t = torch.as_tensor(np.asarray(mu, np.float64), device=dev)
    sigma_t = torch.as_tensor(np.asarray(sigma, np.float64), device=dev)
    metric.real_features_sum = mu_t * n
    metric.real_features_cov_sum = sigma_t * (n - 1) + n * torch.outer(mu_t, mu_t)
    metric.real_features_num_samples = torch.tensor(int(n), dtype=torch.long, device=dev)


def image_stats(batches: Iterable[torch.Tensor | np.ndarray], extractor: torch.nn.Module | None = None,
                device: torch.device | str | None = None,
                progress: Progress | None = None, total: int | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """(mu, sigma, n) of the features of uint8 image batches, (N, 3, H, W) (or (N, H, W, 3) numpy arrays)."""
    extractor = extractor if extractor is not None else InceptionFeatures(device)
    acc = StatsAccumulator()
    for batch in batches:
        x = as_nchw_uint8(batch)
        if len(x):
            acc.update(extractor(x))
        if progress:
            progress(acc.n, total)
    return acc.result()


def fid_from_images(gen_batches: Iterable[torch.Tensor | np.ndarray], ref_stats,
                    extractor: torch.nn.Module | None = None, device: torch.device | str | None = None,
                    progress: Progress | None = None, total: int | None = None) -> float:
    """FID between generated uint8 image batches and reference statistics `(mu, sigma, n, ...)` (e.g. the result
    of `reference_stats`), with the same extractor."""
    mu_r, sigma_r = ref_stats[0], ref_stats[1]
    mu_g, sigma_g, _ = image_stats(gen_batches, extractor, device, progress, total)
    return frechet_distance(mu_g, sigma_g, mu_r, sigma_r)
