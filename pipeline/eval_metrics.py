"""The DiT paper's metrics from one TF-ported InceptionV3 (pipeline/fid.py), computed as the ADM evaluator
(openai/guided-diffusion `evaluations/evaluator.py`) computes them:

- FID: the pool features (2048-d) of the samples against the reference's mean and covariance;
- sFID: the same distance on the spatial features (`mixed_6/conv`, first 7 channels, 17·17·7 = 2023-d);
- Inception Score: exp(E KL(p(y|x) ‖ p(y))) over 10 equal splits, mean and spread over the splits, with p(y|x) the
  softmax of the 2015-12-05 graph's classifier applied to the pool features without its bias (the evaluator's
  `softmax/logits/MatMul`, improved-gan's formula). The offline extractor file has no classifier layer, so IS needs
  that layer's weights from a file the user has (`InceptionHead.load`); without one it is not reported;
- precision and recall (Kynkäänniemi et al. 2019) with k = 3: a sample is precise when it lies within the k-th
  nearest-neighbour radius of some reference feature, a reference is recalled when it lies within that of some
  sample (squared Euclidean distances on the pool features, as the evaluator; computed in float32 here, where the
  evaluator tries float16 first);
- KID (optional): torchmetrics' KernelInceptionDistance on the same pool features, with seeded subsets.
"""

from __future__ import annotations

import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from pipeline.errors import DitpipeError
from pipeline.fid import StatsAccumulator, frechet_distance

IS_SPLITS, PR_K = 10, 3
NUM_LOGITS = 1008  # the 2015-12-05 graph's classes (1000 ImageNet classes and 8 unused)


def stats(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    acc = StatsAccumulator()
    acc.update(rows)
    return acc.result()


def inception_score(logits, splits: int = IS_SPLITS) -> tuple[float, float]:
    """(mean, standard deviation over the splits) of exp(mean KL(p(y|x) ‖ p(y))), per split of equal size in the
    given order (improved-gan's splits; the ADM evaluator's 5,000-image splits are the same 10 at 50,000), float64."""
    x = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    if len(x) < splits:
        raise DitpipeError(f"the Inception Score needs at least {splits} samples (one per split), got {len(x)}")
    scores = []
    for part in np.array_split(np.arange(len(x)), splits):
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
                     block: int = 1024) -> tuple[float, float]:
    """(precision, recall) of the fake features against the real ones, k-NN manifolds as the ADM evaluator."""
    r = torch.as_tensor(np.asarray(real), dtype=torch.float32, device=device)
    f = torch.as_tensor(np.asarray(fake), dtype=torch.float32, device=device)
    radii_r, radii_f = knn_radii(r, k, block), knn_radii(f, k, block)
    precision = _covered(f, r, radii_r, block).double().mean()
    recall = _covered(r, f, radii_f, block).double().mean()
    return float(precision), float(recall)


class _Rows(torch.nn.Module):
    """Precomputed feature rows pass through: torchmetrics' KID then works on features rather than images."""

    num_features = 2048

    def forward(self, rows):
        return rows


def kid(real, fake, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """(mean, std) of torchmetrics' KID on the pool features, its subsets drawn under a fixed seed."""
    from pipeline.fid import _torchmetrics

    n = min(len(real), len(fake))
    if n < 2:
        raise DitpipeError(f"KID needs at least 2 samples per side, got {n}")
    mod = _torchmetrics("torchmetrics.image.kid")
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
          with_kid: bool = False, device: torch.device | str = "cpu") -> dict:
    """Every metric the inputs allow, for samples' gathered features `pool` (N, 2048) and `spatial` (N, 2023)
    against `ref` (pipeline.fid.ReferenceStats); a metric the reference cannot give is None, with `notes` saying
    why."""
    notes = []
    mu, sigma, _ = stats(pool)
    out = {"fid": frechet_distance(mu, sigma, ref.mu, ref.sigma), "sfid": None, "inception_score": None,
           "inception_score_std": None, "precision": None, "recall": None}
    if spatial is not None and ref.mu_s is not None:
        mu_s, sigma_s, _ = stats(spatial)
        out["sfid"] = frechet_distance(mu_s, sigma_s, ref.mu_s, ref.sigma_s)
    else:
        notes.append("sFID: the reference has no spatial statistics")
    if head is not None:
        out["inception_score"], out["inception_score_std"] = inception_score(head.logits(pool))
    else:
        notes.append("Inception Score: needs the Inception's classifier layer (--inception-head)")
    if ref.features is not None:
        out["precision"], out["recall"] = precision_recall(ref.features, pool, device=device)
        if with_kid:
            out["kid"], out["kid_std"] = kid(ref.features, pool)
    else:
        notes.append("precision/recall" + ("/KID" if with_kid else "") + ": the reference has statistics only, "
                     "no images")
    out["notes"] = notes
    return out
