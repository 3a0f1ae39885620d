"""`--protocol dit` computes the Inception Score and precision/recall exactly as the ADM evaluator
(openai/guided-diffusion `evaluations/evaluator.py`) does, and the result says which way each was computed
(issue 25). The evaluator's formulas are transcribed below in numpy from its source, on synthetic features."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from ditpipe.pipeline import eval_metrics


# ------------------------------------------------------------- the evaluator, transcribed in numpy


def adm_inception_score(logits: np.ndarray, split_size: int = 5000) -> float:
    """Evaluator.compute_inception_score: softmax, then one split every `split_size` rows (float64 here)."""
    z = logits - logits.max(1, keepdims=True)
    preds = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i : i + split_size]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        kl = np.mean(np.sum(kl, 1))
        scores.append(np.exp(kl))
    return float(np.mean(scores))


def _batch_pairwise_distances(U, V):
    """evaluator._batch_pairwise_distances, in whatever dtype U and V have (numpy rounds each float16 operation to
    float16; the sums and the matrix product accumulate in float32, as TF's half reductions and cuBLAS do)."""
    acc = np.float32 if U.dtype == np.float16 else U.dtype
    with np.errstate(invalid="ignore", over="ignore"):  # a float16 block that overflows: the fallback's case
        norm_u = np.sum(np.square(U).astype(acc), 1).astype(U.dtype).reshape([-1, 1])
        norm_v = np.sum(np.square(V).astype(acc), 1).astype(U.dtype).reshape([1, -1])
        return np.maximum(norm_u - 2 * (U.astype(acc) @ V.astype(acc).T).astype(U.dtype) + norm_v, U.dtype.type(0))


def pairwise_distances(U, V):
    """DistanceBlock.distance_block: float16 first, float32 where the float16 block is not all finite."""
    d16 = _batch_pairwise_distances(U.astype(np.float16), V.astype(np.float16))
    if np.isfinite(d16).all():
        return d16.astype(np.float32)
    return _batch_pairwise_distances(U.astype(np.float32), V.astype(np.float32))


def manifold_radii(features, batch, nhood_sizes=(3,)):
    num_images = len(features)
    radii = np.zeros([num_images, len(nhood_sizes)], dtype=np.float32)
    distance_batch = np.zeros([batch, num_images], dtype=np.float32)
    seq = np.arange(max(nhood_sizes) + 1, dtype=np.int32)
    for begin1 in range(0, num_images, batch):
        end1 = min(begin1 + batch, num_images)
        row_batch = features[begin1:end1]
        for begin2 in range(0, num_images, batch):
            end2 = min(begin2 + batch, num_images)
            distance_batch[0 : end1 - begin1, begin2:end2] = pairwise_distances(row_batch, features[begin2:end2])
        radii[begin1:end1, :] = np.partition(distance_batch[0 : end1 - begin1, :], seq, axis=1)[:, list(nhood_sizes)]
    return radii  # clamp_to_percentile is None in the Evaluator's ManifoldEstimator


def adm_precision_recall(ref, sample, batch=10000):
    """Evaluator.compute_prec_recall: ManifoldEstimator.manifold_radii of each, then evaluate_pr."""
    radii_1, radii_2 = manifold_radii(ref, batch), manifold_radii(sample, batch)
    features_1_status = np.zeros([len(ref), 1], dtype=bool)
    features_2_status = np.zeros([len(sample), 1], dtype=bool)
    for begin_1 in range(0, len(ref), batch):
        batch_1 = ref[begin_1 : begin_1 + batch]
        for begin_2 in range(0, len(sample), batch):
            batch_2 = sample[begin_2 : begin_2 + batch]
            dist32 = pairwise_distances(batch_1, batch_2).astype(np.float32)[..., None]  # DistanceBlock.less_thans
            features_1_status[begin_1 : begin_1 + batch] |= np.any(dist32 <= radii_2[begin_2 : begin_2 + batch], 1)
            features_2_status[begin_2 : begin_2 + batch] |= np.any(
                dist32 <= radii_1[begin_1 : begin_1 + batch][:, None], 0)
    return float(np.mean(features_2_status)), float(np.mean(features_1_status))


# ------------------------------------------------------------------------------------------ tests


def test_protocol_dit_inception_score_splits_every_5000_samples_as_the_evaluator():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((12_000, 64)) * 2.0 + rng.standard_normal(64) * 1.5
    logits[:5000] *= 1.3  # splits that differ, so where they fall matters
    want = adm_inception_score(logits)
    mean, std = eval_metrics.inception_score(logits, split_size=eval_metrics.ADM_SPLIT_SIZE)
    assert mean == pytest.approx(want, rel=1e-12) and std > 0
    ten = eval_metrics.inception_score(logits)[0]  # improved-gan's 10 equal splits: another number at 12,000
    assert abs(ten - want) > 1e-3
    # at 50,000 the two ways are the same 10 splits
    big = np.tile(logits[:5000], (10, 1))[:, :16]
    assert eval_metrics.inception_score(big, split_size=5000) == pytest.approx(eval_metrics.inception_score(big))
    # fewer than 5,000 samples: one split, as the evaluator
    assert eval_metrics.inception_score(logits[:7], split_size=5000)[0] == pytest.approx(
        adm_inception_score(logits[:7]), rel=1e-12)


def _features(rng, n, d, offset):
    """Pool-feature-like rows (non-negative, a common offset, small spread), on a 1/8 grid: exact in float16, and
    every float32 sum exact in any order, so both sides are deterministic to the bit."""
    return (offset + rng.integers(0, 16, size=(n, d)) / 8).astype(np.float32)


def test_protocol_dit_precision_recall_distances_in_fp16_as_the_evaluator():
    rng = np.random.default_rng(1)
    ref = _features(rng, 1200, 512, 3.0)
    sample = _features(rng, 1000, 512, 3.0)  # half new draws, half near reference rows
    sample[:500] = ref[:500] + (rng.integers(-3, 4, size=(500, 512)) / 8).astype(np.float32)
    want = adm_precision_recall(ref, sample)
    got = eval_metrics.precision_recall(ref, sample, fp16=True)
    assert got == want and 0 < got[0] < 1 and 0 < got[1] < 1, (got, want)
    fp32 = eval_metrics.precision_recall(ref, sample)
    assert fp32 != got, fp32  # float16 cancellation moves the k-NN radii


def test_protocol_dit_falls_back_to_fp32_for_a_block_that_overflows_fp16():
    rng = np.random.default_rng(2)
    ref = _features(rng, 400, 256, 2.0)
    ref[:12] += 14.0  # |u|² > 65504: the blocks holding these rows overflow float16, the evaluator's fallback
    sample = _features(rng, 300, 256, 2.0)
    sample[:5] += 14.0
    want = adm_precision_recall(ref, sample, batch=150)
    got = eval_metrics.precision_recall(ref, sample, fp16=True, adm_batch=150)
    assert got == want and 0 < got[0] < 1 and 0 < got[1] < 1, (got, want)


def test_the_result_says_which_way_each_was_computed(monkeypatch):
    monkeypatch.setattr(eval_metrics, "frechet_distance", lambda *a: 0.0)  # 2048-d sqrtm: not what is tested here
    rng = np.random.default_rng(3)
    pool = _features(rng, 60, 2048, 0.0)
    ref = SimpleNamespace(features=_features(rng, 80, 2048, 0.0), mu_s=None, sigma_s=None)
    ref.mu, ref.sigma, _ = eval_metrics.stats(ref.features.astype(np.float64))
    head = eval_metrics.InceptionHead(__import__("torch").randn(1008, 2048) * 0.01, "synthetic")
    dit = eval_metrics.score(pool, None, ref, head=head, adm=True)
    default = eval_metrics.score(pool, None, ref, head=head)
    assert dit["inception_score_splits"] == "every 5000 samples (ADM evaluator)"
    assert dit["distances"].startswith("fp16 (ADM evaluator")
    assert default["inception_score_splits"] == "10 equal splits (improved-gan)" and default["distances"] == "fp32"
    assert (dit["precision"], dit["recall"]) == adm_precision_recall(ref.features, pool)
