"""The DiT paper's metrics from one TF-ported InceptionV3 (pipeline/fid.py), computed as the ADM evaluator
(openai/guided-diffusion `evaluations/evaluator.py`) computes them:

- FID: the pool features (2048-d) of the samples against the reference's mean and covariance;
- sFID: the same distance on the spatial features (`mixed_6/conv`, first 7 channels, 17·17·7 = 2023-d);
- Inception Score: exp(E KL(p(y|x) ‖ p(y))) over 10 equal splits (improved-gan's; under `--protocol dit` one split
  every 5,000 samples in order, the last one shorter, as the evaluator's `compute_inception_score`: the same 10 at
  50,000, not at 12,000), mean and spread over the splits, with p(y|x) the
  softmax of the 2015-12-05 graph's classifier applied to the pool features without its bias (the evaluator's
  `softmax/logits/MatMul`, improved-gan's formula). The offline extractor file has no classifier layer, so IS needs
  that layer's weights from a file the user has (`InceptionHead.load`); without one it is not reported;
- precision and recall (Kynkäänniemi et al. 2019) with k = 3: a sample is precise when it lies within the k-th
  nearest-neighbour radius of some reference feature, a reference is recalled when it lies within that of some
  sample (squared Euclidean distances on the pool features, as the evaluator; computed in float32 by default; under
  `--protocol dit` as the evaluator's `DistanceBlock`: |u|² − 2u·v + |v|² in float16 from float16 features, per
  10,000 × 10,000 block, that block again in float32 where float16 overflows);
- KID (optional): torchmetrics' KernelInceptionDistance on the same pool features, with seeded subsets.
"""

from __future__ import annotations

import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from ditpipe.pipeline.errors import DitpipeError
from ditpipe.pipeline.fid import StatsAccumulator, frechet_distance

IS_SPLITS, PR_K = 10, 3
ADM_SPLIT_SIZE = 5000  # the ADM evaluator's compute_inception_score(split_size=5000)
ADM_BATCH = 10_000  # its ManifoldEstimator's row_batch_size and col_batch_size: the blocks float16 is tried on
# What the result JSON says about each way (`score`'s "inception_score_splits" and "distances")
IS_SPLITS_WAY = {False: f"{IS_SPLITS} equal splits (improved-gan)",
                 True: f"every {ADM_SPLIT_SIZE} samples (ADM evaluator)"}
DISTANCES_WAY = {False: "fp32", True: "fp16 (ADM evaluator; fp32 for a block where fp16 overflows)"}
NUM_LOGITS = 1008  # the 2015-12-05 graph's classes (1000 ImageNet classes and 8 unused)


def stats(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    acc = StatsAccumulator()
    acc.update(rows)
    return acc.result()


def inception_score(logits, splits: int = IS_SPLITS, split_size: int | None = None) -> tuple[float, float]:
    """(mean, standard deviation over the splits) of exp(mean KL(p(y|x) ‖ p(y))), per split in the given order,
    float64: `splits` of equal size (improved-gan's), or with `split_size` one every `split_size` samples, the last
    one shorter (the ADM evaluator's `compute_inception_score`; the same 10 splits at 50,000 with 5,000)."""
    x = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    if split_size is not None:
        if len(x) < 1:
            raise DitpipeError("the Inception Score needs at least 1 sample, got 0")
        parts = [np.arange(i, min(i + split_size, len(x))) for i in range(0, len(x), split_size)]
    else:
        if len(x) < splits:
            raise DitpipeError(f"the Inception Score needs at least {splits} samples (one per split), got {len(x)}")
        parts = np.array_split(np.arange(len(x)), splits)
    scores = []
    for part in parts:
        log_p = torch.log_softmax(x[part], dim=1)  # (n, K)
        log_mean = torch.logsumexp(log_p, dim=0) - np.log(len(part))  # log p(y) over the split, (K,)
        kl = (log_p.exp() * (log_p - log_mean)).sum(1).mean()
        scores.append(float(kl.exp()))
    return float(np.mean(scores)), float(np.std(scores))


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (A, B) as the evaluator computes them: |a|² − 2a·b + |b|², clipped at 0."""
    return ((a * a).sum(1, keepdim=True) - 2 * a @ b.T + (b * b).sum(1)[None]).clamp_(min=0)


def knn_radii(feats: torch.Tensor, k: int = PR_K, block: int = 1024) -> torch.Tensor:
    """(N,) squared distance of each row to its k-th nearest other row (the (k+1)-th smallest, itself included)."""
    if len(feats) <= k:
        raise DitpipeError(f"precision/recall with k = {k} needs more than {k} feature vectors, got {len(feats)}")
    return torch.cat([torch.kthvalue(_sq_dists(feats[i : i + block], feats), k + 1, dim=1).values
                      for i in range(0, len(feats), block)])


def _covered(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, block: int) -> torch.Tensor:
    """(P,) bool: a point lies within some centre's radius (distance² ≤ radius²)."""
    return torch.cat([(_sq_dists(points[i : i + block], centres) <= radii[None]).any(1)
                      for i in range(0, len(points), block)])


def precision_recall(real, fake, k: int = PR_K, device: torch.device | str = "cpu",
                     block: int = 1024, fp16: bool = False, adm_batch: int = ADM_BATCH) -> tuple[float, float]:
    """(precision, recall) of the fake features against the real ones, k-NN manifolds as the ADM evaluator; with
    `fp16`, every distance as its DistanceBlock computes it (`_adm_precision_recall`). Never TF32."""
    r = torch.as_tensor(np.asarray(real), dtype=torch.float32, device=device)
    f = torch.as_tensor(np.asarray(fake), dtype=torch.float32, device=device)
    with _no_tf32():
        if fp16:
            return _adm_precision_recall(r, f, k, adm_batch)
        radii_r, radii_f = knn_radii(r, k, block), knn_radii(f, k, block)
        precision = _covered(f, r, radii_r, block).double().mean()
        recall = _covered(r, f, radii_f, block).double().mean()
    return float(precision), float(recall)


class _no_tf32:
    """fp32 matrix products in true fp32 (TF32 may be on for sampling: `--precision bf16`)."""

    def __enter__(self):
        self.saved = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32 = self.saved


def _adm_dists(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(U, V) float32 squared distances as the ADM evaluator's DistanceBlock: the features cast to float16,
    `max(|u|² − 2·u·v + |v|², 0)` with each operation's result in float16 (TF's float16 square, its sums and matrix
    product accumulating in float32, as TF's half reductions and cuBLAS do: products of float16 values are exact
    in float32), then float32; where any of the block's distances is not finite in float16, the block again in
    float32."""
    u16, v16 = u.half(), v.half()
    norm_u = (u16 * u16).float().sum(1).half()
    norm_v = (v16 * v16).float().sum(1).half()
    mm = (u16.float() @ v16.float().T).half()
    d16 = torch.clamp_min(norm_u[:, None] - 2 * mm + norm_v[None], 0)
    if bool(torch.isfinite(d16).all()):
        return d16.float()
    return torch.clamp_min((u * u).sum(1)[:, None] - 2 * (u @ v.T) + (v * v).sum(1)[None], 0)


def _adm_radii(x: torch.Tensor, k: int, batch: int) -> torch.Tensor:
    """(N,) float32: each row's (k+1)-th smallest distance (itself included) over the evaluator's blocks: the k+1
    smallest of each column block, then of those (the same value as its partition of the whole row)."""
    out = []
    for i in range(0, len(x), batch):
        blocks = (_adm_dists(x[i : i + batch], x[j : j + batch]) for j in range(0, len(x), batch))
        best = torch.cat([torch.topk(d, min(k + 1, d.shape[1]), dim=1, largest=False).values for d in blocks], dim=1)
        out.append(torch.kthvalue(best, k + 1, dim=1).values)
    return torch.cat(out)


def _adm_precision_recall(r: torch.Tensor, f: torch.Tensor, k: int, batch: int) -> tuple[float, float]:
    """The evaluator's ManifoldEstimator: radii from each set's own blocks, then `evaluate_pr`'s blocks of
    (reference rows, sample columns), one distance block deciding both directions."""
    for name, x in (("reference", r), ("sample", f)):
        if len(x) <= k:
            raise DitpipeError(f"precision/recall with k = {k} needs more than {k} {name} feature vectors, got "
                               f"{len(x)}")
    radii_r, radii_f = _adm_radii(r, k, batch), _adm_radii(f, k, batch)
    recalled = torch.zeros(len(r), dtype=torch.bool, device=r.device)
    precise = torch.zeros(len(f), dtype=torch.bool, device=r.device)
    for i in range(0, len(r), batch):
        for j in range(0, len(f), batch):
            d = _adm_dists(r[i : i + batch], f[j : j + batch])
            recalled[i : i + batch] |= (d <= radii_f[j : j + batch][None]).any(1)
            precise[j : j + batch] |= (d <= radii_r[i : i + batch][:, None]).any(0)
    return float(precise.double().mean()), float(recalled.double().mean())


class _Rows(torch.nn.Module):
    """Precomputed feature rows pass through: torchmetrics' KID then works on features rather than images."""

    num_features = 2048

    def forward(self, rows):
        return rows


def kid(real, fake, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """(mean, std) of torchmetrics' KID on the pool features, its subsets drawn under a fixed seed."""
    from ditpipe.pipeline.fid import import_torchmetrics

    n = min(len(real), len(fake))
    if n < 2:
        raise DitpipeError(f"KID needs at least 2 samples per side, got {n}")
    mod = import_torchmetrics("torchmetrics.image.kid")
    with warnings.catch_warnings():  # "will save all extracted features in buffer": that is what KID needs
        warnings.simplefilter("ignore", UserWarning)
        # sync_on_compute=False: rank 0 alone computes it under torchrun; torchmetrics' default all_gather there
        # would wait for ranks that never enter it
        metric = mod.KernelInceptionDistance(feature=_Rows(), subsets=subsets, subset_size=min(subset_size, n),
                                             sync_on_compute=False)
    metric.update(torch.as_tensor(np.asarray(real), dtype=torch.float64), real=True)
    metric.update(torch.as_tensor(np.asarray(fake), dtype=torch.float64), real=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


class InceptionHead:
    """The 2015-12-05 graph's classifier layer (2048 → 1008), for the Inception Score. `load` takes a file that
    holds it together with the same network: NVlabs' TorchScript `inception-2015-12-05.pt` (its `output` layer; what
    clean-fid and StyleGAN use) or the pytorch-fid / torch-fidelity state dict `pt_inception-2015-12-05-*.pth`
    (`fc`). Its first convolution must equal the extractor's, so the head belongs to the same network."""

    def __init__(self, weight: torch.Tensor, source: str):
        if tuple(weight.shape) != (NUM_LOGITS, 2048):
            raise DitpipeError(f"{source}: the classifier weight is {tuple(weight.shape)}, not ({NUM_LOGITS}, 2048)")
        self.weight, self.source = weight.detach().to(torch.float64), source

    def logits(self, pool) -> np.ndarray:
        """Unbiased logits (N, 1008) in float64: pool features times the weight, without the bias (as the ADM
        evaluator's `softmax/logits/MatMul` and torchmetrics' `logits_unbiased`)."""
        return (torch.as_tensor(np.asarray(pool), dtype=torch.float64) @ self.weight.T).numpy()

    @classmethod
    def load(cls, path: Path, extractor) -> "InceptionHead":
        path = Path(path)
        if not path.is_file():
            raise DitpipeError(f"--inception-head '{path}' does not exist")
        state = _head_state(path)
        weight = state.get("output.weight", state.get("fc.weight"))
        first = state.get("layers.conv.weight", state.get("Conv2d_1a_3x3.conv.weight"))
        if weight is None or first is None:
            raise DitpipeError(f"--inception-head '{path}' holds no Inception classifier (`output.weight` or "
                               "`fc.weight`) and first convolution; pass inception-2015-12-05.pt or "
                               "pt_inception-2015-12-05-*.pth")
        ours = extractor.net.net.layers.conv.weight.detach().cpu()
        if tuple(first.shape) != tuple(ours.shape) or not torch.allclose(first.float().cpu(), ours.float(),
                                                                        atol=1e-6, rtol=1e-4):
            raise DitpipeError(f"--inception-head '{path}' is another network: its first convolution differs from "
                               "the TF-FID Inception's; pass the 2015-12-05 graph's weights")
        return cls(weight.float(), str(path))


def _head_state(path: Path) -> dict:
    """The tensors of a TorchScript archive (loaded by TorchScript's own restricted reader) or of a plain state dict
    (torch.load weights_only: never unpickled)."""
    try:
        with zipfile.ZipFile(path) as z:
            scripted = any(n.split("/", 1)[-1].startswith("code/") for n in z.namelist())
    except zipfile.BadZipFile:
        scripted = False
    try:
        if scripted:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                m = torch.jit.load(str(path), map_location="cpu")
            return {**dict(m.named_parameters()), **dict(m.named_buffers())}
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for anything but tensors, RuntimeError for damaged archives
        raise DitpipeError(f"--inception-head '{path}' cannot be read as weights ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:160]})") from None
    if not isinstance(state, dict):
        raise DitpipeError(f"--inception-head '{path}' is not a state dict")
    return state


def score(pool: np.ndarray, spatial: np.ndarray | None, ref, *, head: InceptionHead | None = None,
          with_kid: bool = False, device: torch.device | str = "cpu", adm: bool = False) -> dict:
    """Every metric the inputs allow, for samples' gathered features `pool` (N, 2048) and `spatial` (N, 2023)
    against `ref` (pipeline.fid.ReferenceStats); a metric the reference cannot give is None, with `notes` saying
    why. `adm` (`--protocol dit`): the Inception Score's splits and the precision/recall distances as the ADM
    evaluator computes them; "inception_score_splits" and "distances" say which way each was computed."""
    notes = []
    mu, sigma, _ = stats(pool)
    out = {"fid": frechet_distance(mu, sigma, ref.mu, ref.sigma), "sfid": None, "inception_score": None,
           "inception_score_std": None, "inception_score_splits": None, "precision": None, "recall": None,
           "distances": None}
    if spatial is not None and ref.mu_s is not None:
        mu_s, sigma_s, _ = stats(spatial)
        out["sfid"] = frechet_distance(mu_s, sigma_s, ref.mu_s, ref.sigma_s)
    else:
        notes.append("sFID: the reference has no spatial statistics")
    if head is not None:
        out["inception_score"], out["inception_score_std"] = inception_score(
            head.logits(pool), split_size=ADM_SPLIT_SIZE if adm else None)
        out["inception_score_splits"] = IS_SPLITS_WAY[adm]
    else:
        notes.append("Inception Score: needs the Inception's classifier layer (--inception-head)")
    if ref.features is not None:
        out["precision"], out["recall"] = precision_recall(ref.features, pool, device=device, fp16=adm)
        out["distances"] = DISTANCES_WAY[adm]
        if with_kid:
            out["kid"], out["kid_std"] = kid(ref.features, pool)
    else:
        notes.append("precision/recall" + ("/KID" if with_kid else "") + ": the reference has statistics only, "
                     "no images")
    out["notes"] = notes
    return out
