"""The encode stage on a GPU (issue 14): an sd-shaped VAE in bf16 through `stages.encode.encode`, the out-of-memory
back-off forced for real, and with two or more GPUs a two-process encode (each rank on its own device). Every test here
is marked `cuda` and skips without a CUDA device (`pytest -m cuda`, or scripts/gpu_check.sh)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ditpipe.pipeline import shards
from ditpipe.pipeline.codec import encode_with_backoff, load_codec
from ditpipe.pipeline.config import load_config
from ditpipe.pipeline.sources import make_source
from ditpipe.stages.encode import encode

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda", 0)


@pytest.fixture(scope="module")
def sd_vae(tmp_path_factory) -> Path:
    """sd-vae-ft-ema's architecture (stages/bench.py's VAE_SHAPES["sd"]) with random weights: the same cost."""
    from diffusers import AutoencoderKL

    from ditpipe.stages.bench import VAE_SHAPES

    torch.manual_seed(0)
    shape = VAE_SHAPES["sd"]
    levels = len(shape["block_out_channels"])
    path = tmp_path_factory.mktemp("sd-vae") / "sd"
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
                  up_block_types=("UpDecoderBlock2D",) * levels, latent_channels=4, sample_size=256,
                  **shape).save_pretrained(path)
    return path


def sd_config(vae: Path, out: Path, **over) -> dict:
    return {"data.dataset_name": "shapes", "data.image_size": 256, "data.num_samples": 48, "vae.name": str(vae),
            "vae.dtype": "bf16", "vae.batch_size": 16, "shards.samples_per_shard": 24, "data.num_workers": 2,
            "shards.path": str(out), **over}


def test_sd_vae_bf16_encode_on_cuda_verifies_and_matches_the_codec(sd_vae, tmp_path):
    manifest = encode(load_config(None, sd_config(sd_vae, tmp_path / "s")))
    assert manifest["codec"]["dtype"] == "bf16" and manifest["latent"]["shape"] == [4, 4, 32, 32]
    assert manifest["num_samples"] == 48 and manifest["skipped"] == []
    problems, checked = shards.verify(tmp_path / "s")
    assert problems == [] and checked == 48
    # the stored means are the codec's own, from the pinned uint8 → device → float path
    cfg = load_config(None, sd_config(sd_vae, tmp_path / "s"))
    source = make_source(cfg.data)
    pixels = torch.from_numpy(np.stack([source.load(i).pixels for i in range(4)]))  # (4, 256, 256, 3) uint8
    codec = load_codec(str(sd_vae), "bf16", device=CUDA)
    mean, _ = codec.encode(pixels)
    stored = torch.from_numpy(np.stack([s.latent[0] for s in list(shards.iter_samples(tmp_path / "s"))[:4]]))
    torch.testing.assert_close(stored.float(), mean.cpu().half().float(), atol=0.05, rtol=0.05)  # bf16, other batches


def test_without_cudnn_benchmark_the_same_command_writes_the_same_bytes(sd_vae, tmp_path):
    over = {"vae.cudnn_benchmark": False, "data.num_samples": 24}
    a = encode(load_config(None, sd_config(sd_vae, tmp_path / "a", **over)))
    b = encode(load_config(None, sd_config(sd_vae, tmp_path / "b", **over)))
    assert a == b
    for name in sorted(p.name for p in (tmp_path / "a").iterdir()):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_out_of_memory_back_off_forced_with_a_memory_fraction(sd_vae):
    codec = load_codec(str(sd_vae), "fp32", device=CUDA)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (16, 256, 256, 3), dtype=torch.uint8, generator=g)
    torch.backends.cudnn.benchmark = False
    ref_mean, ref_std = encode_with_backoff(codec, x, {"batch": 2})  # unforced, at a batch that fits anywhere
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    codec.encode(x[:2])
    per_two = torch.cuda.max_memory_allocated() - base  # what a batch of 2 needs at its peak
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(CUDA).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, (base + 2.5 * per_two) / total), CUDA)  # room for 2, not 8
    try:
        state = {"batch": 16}
        mean, std = encode_with_backoff(codec, x, state)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, CUDA)
    assert state["halvings"] >= 2 and state["batch"] <= 4, state  # 16 → 8 → 4 (→ 2)
    torch.testing.assert_close(mean, ref_mean, atol=1e-3, rtol=1e-3)  # cuDNN may pick other kernels under the cap
    torch.testing.assert_close(std, ref_std, atol=1e-3, rtol=1e-3)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_two_gpu_encode_equals_one_gpu(sd_vae, tmp_path):
    """Each rank sets its own device before the process group: NCCL refuses two ranks on one GPU, and a barrier on a
    guessed device hangs, so a clean two-process run is the check; its bytes equal one process's."""
    bin_dir = Path(sys.executable).parent
    over = {"vae.cudnn_benchmark": False}
    args = [f"--{k}={v}" for k, v in sd_config(sd_vae, tmp_path / "PLACE", **over).items()]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for out, launcher in (("one", [str(bin_dir / "ditpipe")]),
                          ("two", [str(bin_dir / "torchrun"), "--standalone", "--nproc_per_node", "2",
                                   str(bin_dir / "ditpipe")])):
        cmd = [*launcher, "encode", *[a.replace("PLACE", out) for a in args]]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = tmp_path / "one", tmp_path / "two"
    assert json.loads((one / "manifest.json").read_text()) == json.loads((two / "manifest.json").read_text())
