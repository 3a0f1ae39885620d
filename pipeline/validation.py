"""The held-out validation loss: the training objective on samples the run never trains on, at fixed timesteps
with fixed noise, so that its curve has low variance and shows overfitting, which the training loss cannot.

The held-out set is either a separately encoded shard folder (`validation.shards`, e.g. COCO `--split val`) or a
deterministic fraction of the training shards (`data.val_fraction`), which the training order then excludes.
Every random choice is keyed on (data.seed, held-out sample index): its flip, its posterior ε and the diffusion
noise at each of the `validation.loss_timesteps` fixed timesteps. So the value depends on the weights alone: not on
the step, the training seed or the number of processes (each rank evaluates a share; the sums are all-reduced).
The loss goes through `pipeline.diffusion.micro_loss`, as the training step does, with no label dropout.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ditpipe.pipeline.diffusion import micro_loss
from ditpipe.pipeline.errors import ConfigError
from ditpipe.pipeline.latent_norm import LatentNorm
from ditpipe.pipeline.loader import LatentView
from ditpipe.pipeline.order import keyed_rng, sample_key
from ditpipe.pipeline.store import open_shards
from ditpipe.pipeline.manifest import Manifest
from ditpipe.pipeline.training import build_model

# Tags that keep the held-out set's keyed streams apart from the training ones (order.py uses 0-5).
_SPLIT, _NOISE = 100, 102
_HELD_OUT_EPOCH = 1 << 40  # in the epoch slot of sample_key: no training epoch reaches it
# A no-grad forward keeps no activations for backward, so the held-out loss takes this many times the micro-batch.
EVAL_BATCH_FACTOR = 4


def held_out_indices(num_samples: int, fraction: float, seed: int) -> np.ndarray:
    """The global sample indices held out by `data.val_fraction` (sorted): round(fraction · N) of them, at least one,
    drawn by a permutation keyed on `data.seed`, so spread over every shard, the same every time, and disjoint from
    what training reads (the loader's EpochOrder excludes them)."""
    if fraction <= 0:
        return np.zeros(0, dtype=np.int64)
    n = max(1, int(round(fraction * num_samples)))
    if n >= num_samples:
        raise ConfigError([("data.val_fraction", f"{fraction:g} of {num_samples} samples leaves none to train on")])
    return np.sort(keyed_rng(seed, _SPLIT).permutation(num_samples)[:n]).astype(np.int64)


class HeldOut:
    """This rank's share of the held-out samples, read once: model-space latents (fixed flip and ε) and labels."""

    def __init__(self, store, indices: np.ndarray, norm: LatentNorm, seed: int, rank: int, world: int):
        self.seed, self.total = seed, len(indices)
        self.indices = np.asarray(indices[rank::world], dtype=np.int64)  # this rank's share
        view = LatentView(store.manifest, norm)
        latents, labels = [], []
        for g in self.indices:
            stored, label = store.read(int(g))
            latents.append(view(stored, sample_key(seed, _HELD_OUT_EPOCH, int(g))))  # (C, H, W) float32
            labels.append(label)
        shape = Manifest.of(store.manifest).latent_shape()[1:]
        self.latents = torch.from_numpy(np.stack(latents)) if latents else torch.zeros((0, *shape))  # (n, C, H, W)
        self.labels = torch.tensor(labels, dtype=torch.long)  # (n,); -1 without labels

    def noise(self, start: int, stop: int, k: int) -> torch.Tensor:
        """The fixed diffusion noise of samples [start, stop) of this share at the k timesteps: (n, k, C, H, W)."""
        shape = (k, *self.latents.shape[1:])
        return torch.from_numpy(np.stack([keyed_rng(self.seed, _NOISE, g).standard_normal(shape, dtype=np.float32)
                                          for g in self.indices[start:stop]]))


@torch.no_grad()
def loss_sums(model, objective, held: HeldOut, num_classes: int, timesteps: int, batch_size: int,
              device: torch.device) -> torch.Tensor:
    """Per-timestep loss sums over this rank's share: (timesteps,) float64. Divide by `held.total` after summing
    over ranks for the mean loss at each fixed timestep. A forward takes up to `batch_size` (sample, timestep)
    pairs: every timestep of max(1, batch_size // timesteps) samples."""
    ts = objective.fixed_timesteps(timesteps, device)  # (k,)
    sums = torch.zeros(timesteps, dtype=torch.float64, device=device)
    per = max(1, batch_size // timesteps)
    for start in range(0, len(held.indices), per):
        stop = min(start + per, len(held.indices))
        b = stop - start
        x0 = held.latents[start:stop].to(device).repeat_interleave(timesteps, 0)  # (b·k, C, H, W)
        labels = held.labels[start:stop].to(device).repeat_interleave(timesteps, 0)  # (b·k,)
        noise = held.noise(start, stop, timesteps).to(device).flatten(0, 1)  # (b·k, C, H, W)
        t = ts.repeat(b)  # (b·k,) sample-major, like x0
        keep = torch.zeros(b * timesteps, dtype=torch.bool, device=device)  # (b·k,) no label dropout
        loss = micro_loss(model, objective, x0, labels, num_classes > 0, t, noise, keep)  # (b·k,)
        sums += loss.double().view(b, timesteps).sum(0)  # (k,)
    return sums


def eval_model(cfg, manifest: dict, num_classes: int, weights: dict, device: torch.device,
               cache: dict) -> torch.nn.Module:
    """A model in eval mode holding `weights` (EMA, raw or a reconstructed EMA), built once and kept in `cache`.
    Building initialises weights, so it runs under a forked RNG: validation never moves the global RNG the saved
    states record."""
    if "model" not in cache:
        with torch.random.fork_rng(devices=[]):
            cache["model"] = build_model(cfg, manifest, num_classes).eval()
    cache["model"].to(device).load_state_dict(weights)
    return cache["model"]


def held_out_losses(acc, cfg, manifest: dict, held: HeldOut, weights: dict[str, dict], objective, num_classes: int,
                    cache: dict) -> dict:
    """The held-out loss of each of `weights` ({name: state dict}, e.g. "ema" and "raw"): `loss_<name>`, the mean
    over the fixed timesteps, and `loss_<name>_by_t`, the mean at each, summed over every rank's share. `acc` is the
    run's Accelerator (its device, autocast and reduce)."""
    out = {}
    for name, state in weights.items():
        model = eval_model(cfg, manifest, num_classes, state, acc.device, cache)
        with acc.autocast():
            sums = loss_sums(model, objective, held, num_classes, cfg.validation.loss_timesteps,
                             EVAL_BATCH_FACTOR * cfg.training.batch_size, acc.device)  # (k,)
        by_t = (acc.reduce(sums, "sum") if acc.num_processes > 1 else sums) / held.total  # (k,)
        out[f"loss_{name}"], out[f"loss_{name}_by_t"] = float(by_t.mean()), [round(float(x), 6) for x in by_t]
    return out


@dataclass
class HeldOutSpec:
    store: object  # a ShardStore
    evaluate: np.ndarray  # the held-out indices the loss is computed on (validation.loss_max_samples of them)
    exclude: np.ndarray  # the indices of the training shards that training must never read
    description: str


def open_held_out(cfg, train_manifest: dict, train_store) -> HeldOutSpec | None:
    """The run's validation set, or None when it has none. A separate folder must hold latents of the same codec,
    shape and label space as the training shards."""
    if not (cfg.validation.shards or cfg.data.val_fraction > 0):
        return None
    key = "validation.shards" if cfg.validation.shards else "data.val_fraction"
    if train_store is None:
        raise ConfigError([(key, "the held-out loss needs encoded shards; the online images mode "
                                 "(data.source: images) has none. Encode with `ditpipe encode`, or drop the key")])
    cap = cfg.validation.loss_max_samples
    if cfg.validation.shards:
        store, manifest = open_shards(cfg.validation.shards)
        check_compatible(train_manifest, manifest, cfg.validation.shards)
        idx = np.arange(manifest.num_samples, dtype=np.int64)
        return HeldOutSpec(store, idx[:cap], np.zeros(0, dtype=np.int64),
                           f"{cfg.validation.shards}: {len(idx[:cap]):,} of its {len(idx):,} samples")
    idx = held_out_indices(Manifest.of(train_manifest).num_samples, cfg.data.val_fraction, cfg.data.seed)
    return HeldOutSpec(train_store, idx[:cap], idx, f"{len(idx[:cap]):,} of the {len(idx):,} samples held out of the "
                                                    f"training shards (data.val_fraction {cfg.data.val_fraction:g})")


def check_compatible(train: Manifest | dict, val: Manifest | dict, folder: str | Path) -> None:
    """Refuse a held-out folder whose latents the model could not take, or whose labels mean other classes."""
    problems, train, val = [], Manifest.of(train), Manifest.of(val)
    if val.codec["hash"] != train.codec["hash"]:
        problems.append(("validation.shards", f"encoded with codec {val.codec['name']!r} (hash "
                                              f"{val.codec['hash'][:12]}), the training shards with "
                                              f"{train.codec['name']!r} ({train.codec['hash'][:12]})"))
    if val.latent["shape"][1:] != train.latent["shape"][1:]:
        problems.append(("validation.shards", f"latents of shape {val.latent['shape'][1:]}, the training shards "
                                              f"{train.latent['shape'][1:]} (another image size?)"))
    if train.class_names and val.class_names != train.class_names:
        problems.append(("validation.shards", f"class names {(val.class_names or [])[:4]}... differ from the "
                                              f"training shards' {train.class_names[:4]}...; labels would mean other "
                                              "classes"))
    if problems:
        raise ConfigError(problems, header=f"the held-out shards in '{folder}' do not fit the training shards. "
                                           "Encode them with the same --vae, --image-size and classes")
