"""On a GPU (issue 24): the VAE tuning every VAE path shares, the precision notice, and DDP under NCCL with
gradients as bucket views and the long process-group timeout. Skipped without CUDA (tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch

from ditpipe.pipeline.spread import TIMEOUT

from conftest import reset_accelerate
from test_device_settings import the_three_vaes
from test_ranks import torchrun_script


@pytest.mark.cuda
def test_every_vae_path_runs_the_vae_channels_last_with_cudnn_benchmark(tiny_vae):
    for name, codec in the_three_vaes(tiny_vae, "cuda").items():
        assert codec.tuning == {"channels_last": True, "cudnn_benchmark": True}, name
        conv = next(m for m in codec.vae.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1))
        assert conv.weight.is_contiguous(memory_format=torch.channels_last), name
    assert torch.backends.cudnn.benchmark


@pytest.mark.cuda
def test_the_preflight_says_what_bf16_saves_where_the_gpu_has_it():
    from ditpipe.pipeline.device import bf16_native, make_accelerator

    reset_accelerate()
    _, precision, notice = make_accelerator("fp16")
    assert precision == "fp16"
    if bf16_native(torch.device("cuda")):
        assert "native bf16" in notice and "no GradScaler" in notice
    else:
        assert notice is None


NCCL = """
    import json, torch
    from ditpipe.pipeline.device import make_accelerator

    acc, _, _ = make_accelerator("bf16")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, opt = acc.prepare(model, opt)
    storages = []
    for step in range(3):
        with acc.accumulate(model):
            acc.backward(model(torch.randn(8, 64, device=acc.device)).square().mean())
            storages.append(len({p.grad.untyped_storage().data_ptr() for p in model.parameters()}))
            opt.step()
            opt.zero_grad(set_to_none=True)
    group = torch.distributed.distributed_c10d._get_default_group()
    print(json.dumps({"rank": acc.process_index, "storages": storages, "view": model.gradient_as_bucket_view,
                      "backend": torch.distributed.get_backend(),
                      "timeout": group._get_backend(acc.device).options._timeout.total_seconds(),
                      "weights": float(sum(p.double().sum() for p in model.parameters()))}))
"""


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL refuses two ranks on one GPU (duplicate GPU)")
def test_nccl_ddp_grads_are_bucket_views_and_the_group_waits_long(tmp_path):
    rows = torchrun_script(tmp_path, NCCL, 2)
    for r in rows:
        assert r["backend"] == "nccl" and r["view"] and r["storages"] == [1, 1, 1]
        assert r["timeout"] == TIMEOUT.total_seconds()
    assert rows[0]["weights"] == rows[1]["weights"]  # the replicas stayed in step
