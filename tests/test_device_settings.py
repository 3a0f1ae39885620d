"""pipeline/device.py's decisions as pure functions, and the one VAE tuning every VAE path shares (issue 24)."""

from __future__ import annotations

from pathlib import Path

import torch

from ditpipe.pipeline.config import load_config
from ditpipe.pipeline.device import precision_advice
from ditpipe.pipeline.training import open_data
from ditpipe.stages.bench import BenchOptions, bare_codec
from ditpipe.pipeline.encode import encode_codec


def test_fp16_on_a_gpu_with_native_bf16_says_what_bf16_saves():
    advice = precision_advice("fp16", "cuda", native_bf16=True)
    assert "native bf16" in advice and "no GradScaler" in advice and "skipped" in advice and "fp16 kept" in advice
    assert precision_advice("fp16", "cuda", native_bf16=False) is None  # pre-Ampere: fp16 is the fast choice
    assert precision_advice("bf16", "cuda", native_bf16=True) is None
    assert precision_advice("no", "cuda", native_bf16=True) is None
    assert precision_advice("fp16", "cpu", native_bf16=True) is None  # a CPU runs fp16 as bf16 anyway


def the_three_vaes(vae: Path, device: str) -> dict:
    """The VAE as encode, the bench's bare-VAE timing and the online-VAE baseline (data.source: images) load it."""
    data = {"data.dataset_name": "shapes", "data.image_size": 16, "data.num_samples": 8, "vae.name": str(vae),
            "data.num_workers": 0}
    online = open_data(load_config(None, {**data, "data.source": "images"}), torch.device(device))[3][1]
    return {"encode": encode_codec(load_config(None, data)),
            "bench bare VAE": bare_codec(BenchOptions(device=device).resolved(), str(vae)), "online": online}


def test_encode_the_bench_and_the_online_baseline_tune_the_vae_alike(tiny_vae):
    """One tuning (pipeline.codec.tune_for_device) for all three, so the bench's speed-up of precomputed latents is
    measured against the VAE as encode runs it. On a CPU it changes nothing; tests/test_cuda_ddp.py checks CUDA."""
    vaes = the_three_vaes(tiny_vae, "cpu")
    assert [c.tuning for c in vaes.values()] == [{"channels_last": False, "cudnn_benchmark": False}] * 3
    for name, codec in vaes.items():
        conv = next(m for m in codec.vae.modules() if isinstance(m, torch.nn.Conv2d))
        assert conv.weight.is_contiguous(), name
