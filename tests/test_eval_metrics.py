"""Issue 18's checks of the DiT paper's evaluation: official DiT's 3-channel guidance (its `forward_with_cfg`
copied verbatim), each metric (FID, KID and IS against torchmetrics on the same network; sFID and precision/recall
on cases with known answers), and the ADM `.npz` files (round trip; pickled or malformed files refused)."""

from __future__ import annotations

import copy
import warnings
import zipfile

import numpy as np
import pytest
import torch

import torchmetrics_reference
from conftest import photo
from ditpipe.pipeline import eval_metrics, fid, npz
from ditpipe.pipeline.diffusion import make_objective
from ditpipe.pipeline.errors import DataError
from ditpipe.pipeline.generate import SampleNoise, generate
from ditpipe.pipeline.model import build_dit

pytest.importorskip("torchmetrics", reason="the `eval` extra is not installed")

SIZE = 16


# ------------------------------------------------------------------------------------- official guidance


def official_forward_with_cfg(self, x, t, y, cfg_scale):
    """facebookresearch/DiT models.py `DiT.forward_with_cfg`, verbatim (comments dropped)."""
    half = x[: len(x) // 2]
    combined = torch.cat([half, half], dim=0)
    model_out = self.forward(combined, t, y)
    eps, rest = model_out[:, :3], model_out[:, 3:]
    cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
    half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
    eps = torch.cat([half_eps, half_eps], dim=0)
    return torch.cat([eps, rest], dim=1)


def official_layout_model():
    torch.manual_seed(0)
    m = build_dit("DiT-S/8", input_size=16, in_channels=4, num_classes=10, hidden_size=64, depth=2, num_heads=2)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # no zero-initialised layer hides a channel
    return m.eval()


def test_official_channels_reproduce_official_forward_with_cfg_and_its_samples():
    m = official_layout_model()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 16, 16, generator=g).repeat(2, 1, 1, 1)  # (6, 4, 16, 16): [cond, null] halves
    t = torch.full((6,), 500)
    y = torch.tensor([1, 2, 3, 10, 10, 10])
    with torch.no_grad():
        want = official_forward_with_cfg(m, x, t, y, 4.0)  # (6, 8, 16, 16)
        torch.testing.assert_close(m.forward_with_cfg(x, t, y, 4.0, cfg_channels=3), want, rtol=0, atol=0)
        assert not torch.allclose(m.forward_with_cfg(x, t, y, 4.0), want)  # all 4 channels: not official

    # the whole sampling path: ditpipe's model with official channels == the model running official's code
    official = copy.deepcopy(m)
    official.__class__ = type("OfficialDiT", (type(m),), {
        "forward_with_cfg": lambda self, x, t, y, s, **_: official_forward_with_cfg(self, x, t, y, s)})
    labels, obj, cpu = torch.tensor([1, 5, 9]), make_objective("ddpm", True), torch.device("cpu")
    ours, theirs = (generate(model, obj, (4, 16, 16), labels, 3, "ddpm", 4, 4.0, 0, cpu, cfg_channels=3,
                             noise=SampleNoise(0, range(3), cpu)) for model in (m, official))
    assert torch.equal(ours, theirs)


# ------------------------------------------------------------------------------------- metrics


def images(n: int, seed: int = 0, noise: float = 0.0) -> np.ndarray:
    """(n, SIZE, SIZE, 3) uint8 photo-like images, optionally with Gaussian pixel noise."""
    rng = np.random.default_rng(seed)
    out = np.stack([np.asarray(photo(SIZE, SIZE, seed * 1000 + i)) for i in range(n)]).astype(np.float64)
    return np.clip(np.rint(out + noise * rng.standard_normal(out.shape)), 0, 255).astype(np.uint8)


def nchw(x: np.ndarray) -> torch.Tensor:
    return fid.as_nchw_uint8(x)


@pytest.fixture(scope="module")
def feats():
    """The Inception's features of 10 real and 20 noisy images, and the reference as evaluate builds it."""
    ext = fid.InceptionFeatures("cpu")
    real, fake = images(10), images(20, seed=1, noise=40.0)
    ref = fid.reference_stats([real[:5], real[5:]], SIZE, extractor=ext, cache=False, keep_features=True)
    pool, spatial = ext.forward_all(nchw(fake))  # (20, 2048), (20, 2023)
    return ext, real, fake, ref, pool.numpy(), spatial.numpy()


def test_the_spatial_pass_gives_the_networks_own_pool_features(feats):
    ext, real, _, ref, _, _ = feats
    pool, spatial = ext.forward_all(nchw(real[:4]))
    assert pool.shape == (4, 2048) and spatial.shape == (4, fid.NUM_SPATIAL) == (4, 17 * 17 * 7)
    torch.testing.assert_close(pool, ext(nchw(real[:4])), rtol=1e-5, atol=1e-5)  # the layer walk is the network
    assert ref.features.shape == (10, 2048) and ref.mu_s.shape == (2023,)


@pytest.mark.slow  # 2048-d eigendecompositions: minutes on 2 shared cores
def test_fid_and_kid_match_torchmetrics_on_the_same_network(feats):
    ext, real, fake, ref, pool, spatial = feats
    ours = eval_metrics.score(pool, spatial, ref, with_kid=True)
    metric = torchmetrics_reference.fid_metric("cpu", extractor=ext)
    kid = torchmetrics_reference.kid_metric(10, "cpu", extractor=ext, subsets=100,
                                            subset_size=10)  # as eval_metrics.kid's
    for m in (metric, kid):
        m.update(nchw(real), real=True)
        m.update(nchw(fake), real=False)
    assert ours["fid"] > 1 and ours["fid"] == pytest.approx(float(metric.compute()), rel=1e-4)
    torch.manual_seed(0)  # the subsets' draws, as eval_metrics.kid seeds them
    want = kid.compute()
    assert (ours["kid"], ours["kid_std"]) == pytest.approx((float(want[0]), float(want[1])), rel=1e-5, abs=1e-9)


def test_inception_score_matches_torchmetrics_with_the_same_classifier(feats):
    from torchmetrics.image.inception import InceptionScore

    ext, real, fake, _, pool, _ = feats
    # the TF graph's real classifier weights are not in the offline extractor (docs/evaluation.md says where to get
    # them); the formula is checked with a random classifier layer of the same shape on the same features
    head = eval_metrics.InceptionHead(torch.randn(1008, 2048, generator=torch.Generator().manual_seed(0)) * 0.05,
                                      "synthetic")
    logits = lambda x: torch.from_numpy(head.logits(ext(x)))  # noqa: E731
    with warnings.catch_warnings():  # "will save all extracted features in buffer": 20 rows
        warnings.simplefilter("ignore", UserWarning)
        metric = InceptionScore(feature=type("Head", (torch.nn.Module,), {"forward": lambda self, x: logits(x)})())
    metric.update(nchw(fake))
    torch.manual_seed(0)
    want_mean, want_std = metric.compute()  # permutes the rows with torch.randperm, then 10 splits
    torch.manual_seed(0)
    order = torch.randperm(20).numpy()
    mean, std = eval_metrics.inception_score(head.logits(pool)[order])
    assert mean > 1 and mean == pytest.approx(float(want_mean), rel=1e-6)
    assert std * np.sqrt(10 / 9) == pytest.approx(float(want_std), rel=1e-5)  # improved-gan's np.std vs unbiased
    same = np.zeros((30, 1008))  # every sample the same prediction: IS is exactly 1
    assert eval_metrics.inception_score(same) == pytest.approx((1.0, 0.0))


@pytest.mark.slow  # 2048-d eigendecompositions: minutes on 2 shared cores
def test_sfid_is_zero_for_the_same_images_and_positive_for_others(feats):
    ext, real, _, ref, pool, spatial = feats
    same_pool, same_spatial = ext.forward_all(nchw(real[::-1].copy()))  # the reference's images, another order
    same = eval_metrics.score(same_pool.numpy(), same_spatial.numpy(), ref)
    assert abs(same["sfid"]) < 1e-3 and abs(same["fid"]) < 1e-3
    other = eval_metrics.score(pool, spatial, ref)
    assert other["sfid"] > 1 and other["sfid"] != pytest.approx(other["fid"])  # its own features, not the pool's


def adm_precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """The ADM evaluator's ManifoldEstimator logic, spelled out with full distance matrices in float64."""
    def d2(a, b):
        return ((a[:, None, :] - b[None]) ** 2).sum(-1)

    radii_r = np.sort(d2(real, real), axis=1)[:, k]
    radii_f = np.sort(d2(fake, fake), axis=1)[:, k]
    return float((d2(fake, real) <= radii_r[None]).any(1).mean()), float((d2(real, fake) <= radii_f[None]).any(1).mean())


def test_precision_and_recall_known_answers():
    rng = np.random.default_rng(0)
    real = rng.standard_normal((60, 16))
    assert eval_metrics.precision_recall(real, real.copy()) == (1.0, 1.0)  # identical sets
    assert eval_metrics.precision_recall(real, real + 100.0) == (0.0, 0.0)  # disjoint supports
    # the samples are one of the reference's two modes: all precise, half the reference recalled
    two = np.concatenate([real[:30] - 50.0, real[30:] + 50.0])
    assert eval_metrics.precision_recall(two, two[30:].copy()) == (1.0, 0.5)
    # and the blocked float32 computation agrees with the evaluator's logic on overlapping sets
    fake = rng.standard_normal((50, 16)) * 1.5 + 0.5
    got = eval_metrics.precision_recall(real, fake, block=7)
    assert got == pytest.approx(adm_precision_recall(real, fake)) and 0 < got[0] < 1 and 0 < got[1] < 1


# ------------------------------------------------------------------------------------- .npz files


def test_npz_round_trip_from_rank_parts(tmp_path):
    data = images(7)
    out = tmp_path / "samples.npz"
    for rank, block in enumerate((data[:3], data[3:])):  # two ranks' blocks
        part = npz.PartWriter(out, rank)
        part.write(block)
        part.close()
    npz.join(out, 2, 7, (SIZE, SIZE, 3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples.npz"]  # the parts are gone
    with np.load(out, allow_pickle=False) as z:  # what the ADM evaluator reads
        assert z.files == ["arr_0"] and np.array_equal(z["arr_0"], data)
    assert npz.image_shape(out) == (7, SIZE, SIZE, 3)
    assert np.array_equal(np.concatenate(list(npz.read_images(out, 3))), data)
    with pytest.raises(DataError, match="not 7 images"):
        part = npz.PartWriter(tmp_path / "short.npz", 0)
        part.write(data[:2])
        part.close()
        npz.join(tmp_path / "short.npz", 1, 7, (SIZE, SIZE, 3))


def test_a_reference_batch_s_stored_statistics_are_used_as_they_are(tmp_path):
    mu, sigma = np.arange(4.0), np.eye(4) * 2
    np.savez(tmp_path / "ref.npz", mu=mu, sigma=sigma)
    r = fid.reference_stats(tmp_path / "ref.npz", SIZE, cache=False)
    assert r.stored and np.array_equal(r.mu, mu) and np.array_equal(r.sigma, sigma) and r.features is None


def write_npy_member(path, header: dict, payload: bytes) -> None:
    with zipfile.ZipFile(path, "w") as z, z.open("arr_0.npy", "w") as f:
        np.lib.format.write_array_header_1_0(f, header)
        f.write(payload)


@pytest.mark.parametrize("case", ["pickled images", "pickled statistics", "not a zip", "float images",
                                  "truncated", "bad covariance"])
def test_pickled_or_malformed_npz_is_refused(tmp_path, case):
    path = tmp_path / "ref.npz"
    if case == "pickled images":
        np.savez(path, arr_0=np.array([{"x": 1}], dtype=object))
    elif case == "pickled statistics":
        np.savez(path, mu=np.array([object()], dtype=object), sigma=np.eye(1))
    elif case == "not a zip":
        path.write_bytes(b"this is not an npz")
    elif case == "float images":
        np.savez(path, arr_0=np.zeros((2, SIZE, SIZE, 3), np.float32))
    elif case == "truncated":
        write_npy_member(path, {"descr": "|u1", "fortran_order": False, "shape": (5, SIZE, SIZE, 3)},
                         bytes(2 * SIZE * SIZE * 3))
    else:
        np.savez(path, mu=np.zeros(3), sigma=np.eye(2))
    with pytest.raises(DataError, match=r"ref\.npz' is not an ADM reference batch") as e:
        fid.reference_stats(path, SIZE, cache=False, extractor=fid.InceptionFeatures("cpu") if case == "truncated"
                            else None)
    assert {"pickled images": "Python objects", "pickled statistics": "Python objects", "not a zip": "readable",
            "float images": "not uint8", "truncated": "truncated", "bad covariance": "covariance"}[case] in str(e.value)
