"""What int8 target storage costs REPA's alignment loss, against the same targets in fp16 (docs/repa.md).

Encodes the built-in shapes twice with `--targets inception` (the one pretrained vision network available offline:
the eval extra's TF-FID Inception, Mixed_6e, 768 channels), once `targets.dtype: fp16` and once `int8`, then for
projected tokens z at several distances from the targets (z = target + σ·noise, the alignment loss of a projector
early, midway and late in training) compares the loss against the fp16 targets with the loss against the int8
ones. Prints one JSON object.

    .venv/bin/python scripts/target_storage.py --work /tmp/target-storage
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from ditpipe.pipeline.config import load_config
from ditpipe.pipeline.manifest import load_manifest
from ditpipe.pipeline.repa import alignment_loss
from ditpipe.pipeline.store import open_shards
from ditpipe.stages.encode import encode


def targets_of(folder: Path, n: int) -> np.ndarray:
    store, _ = open_shards(folder)
    out = np.zeros((n, store.layouts[0].tokens, store.layouts[0].dim), np.float16)
    store.gather_targets(np.arange(n), np.zeros(n, np.int64), out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--num-samples", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=32)
    a = ap.parse_args()
    folders = {}
    for dtype in ("fp16", "int8"):
        folders[dtype] = a.work / dtype
        if not (folders[dtype] / "manifest.json").is_file():
            encode(load_config("cpu", {"data.dataset_name": "shapes", "data.num_samples": a.num_samples,
                                       "data.image_size": a.image_size, "shards.path": str(folders[dtype]),
                                       "targets.encoder": "inception", "targets.dtype": dtype}))
    full = torch.from_numpy(targets_of(folders["fp16"], a.num_samples)).float()  # (N, T, D)
    small = torch.from_numpy(targets_of(folders["int8"], a.num_samples)).float()
    cos = torch.nn.functional.cosine_similarity(full, small, dim=-1)  # (N, T)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for sigma in (0.25, 1.0, 3.0):  # the noise's size against each token's norm: late, midway, early alignment
        noise = torch.randn(full.shape, generator=gen) * full.norm(dim=-1, keepdim=True) / full.shape[-1] ** 0.5
        z = full + sigma * noise
        a_full, a_int8 = alignment_loss(z, full), alignment_loss(z, small)  # (N,)
        rows.append({"sigma": sigma, "loss_fp16": float(a_full.mean()), "loss_int8": float(a_int8.mean()),
                     "max_abs_change": float((a_full - a_int8).abs().max())})
    result = {"encoder": load_manifest(folders["fp16"]).targets["encoder"]["name"],
              "tokens": int(full.shape[1]), "dim": int(full.shape[2]),
              "bytes_per_sample": {d: load_manifest(f).targets["bytes_per_sample"] for d, f in folders.items()},
              "cosine_fp16_int8": {"min": float(cos.min()), "mean": float(cos.mean())}, "loss": rows}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
