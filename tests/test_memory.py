"""The memory prediction (pipeline/memory.py) against what torch really holds: the activation count against the
tensors autograd saves in a real DiT's forward under bf16 autocast, the persistent parts against the real step's
model, EMA, post-hoc EMAs and optimizer state, and the preflight's warning when the prediction does not fit."""

from __future__ import annotations

import re

import pytest
import torch

from ditpipe.pipeline import memory
from ditpipe.pipeline.config import load_config
from ditpipe.pipeline.device import make_accelerator
from ditpipe.pipeline.diffusion import make_objective
from ditpipe.pipeline.latent_norm import LatentNorm
from ditpipe.pipeline.order import Plan
from ditpipe.pipeline.model import build_dit
from ditpipe.pipeline.model_text import build_caption_dit
from ditpipe.pipeline.step import Micro, build_step
from ditpipe.pipeline.text import Caption

from tiny import tiny_dit

TOLERANCE = 0.15


def _from_parameter(t: torch.Tensor) -> bool:
    """Whether `t` is a parameter's cast or view (autocast's half weight copy, a transposed weight): its grad_fn
    chain leads through one-input nodes to the parameter's AccumulateGrad."""
    fn = t.grad_fn
    while fn is not None:
        if type(fn).__name__ == "AccumulateGrad":
            return True
        inputs = [f for f, _ in fn.next_functions if f is not None]
        if len(inputs) != 1:
            return False
        fn = inputs[0]
    return False


def saved_activation_bytes(model, x, t, y, dtype) -> int:
    """Bytes of the unique storages autograd saves in one forward of `model` under CPU autocast to `dtype` (fp32:
    none), parameters and their copies left out (memory.py counts those as weights and autocast copies)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor):
        ptr = tensor.untyped_storage().data_ptr()
        if ptr not in params and not (tensor.requires_grad and _from_parameter(tensor)):
            storages[ptr] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            model(x, t, y)
    return sum(storages.values())


@pytest.mark.parametrize("size,batch,dtype", [(8, 4, torch.bfloat16), (32, 2, torch.bfloat16),
                                              (16, 2, torch.float32)])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_activation_count_matches_the_tensors_autograd_saves(size, batch, dtype, checkpointing):
    """16 and 256 tokens (latent 8² and 32² at patch 2), bf16 autocast and fp32, with and without gradient
    checkpointing: the count of memory.saved_bytes is within 15 % of the saved storages. With checkpointing the
    forward saves only each block's input; the one block the backward recomputes is the block count checked
    without it."""
    torch.manual_seed(0)
    model = build_dit("DiT-S/2", input_size=size, in_channels=4, num_classes=10, hidden_size=64, depth=2,
                      num_heads=2, gradient_checkpointing=checkpointing).train()
    x = torch.randn(batch, 4, size, size)  # (N, C, H, W)
    measured = saved_activation_bytes(model, x, torch.rand(batch) * 999, torch.randint(0, 10, (batch,)), dtype)
    predicted = memory.saved_bytes(batch, (size // 2) ** 2, 64, 2, 2, 4.0, 2 if dtype == torch.bfloat16 else 4,
                                   4 * 4, checkpointing)
    assert abs(predicted - measured) <= TOLERANCE * measured, (predicted, measured)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_caption_models_count_matches_too(checkpointing):
    """The caption DiT (model_text.py): its cross-attention (masked SDPA over half-padded captions) and caption
    projections, at 256 tokens and 16 caption tokens, within 15 % of the saved storages."""
    torch.manual_seed(0)
    model = build_caption_dit("DiT-T-S/2", input_size=32, in_channels=4, text_dim=32, hidden_size=64, depth=2,
                              num_heads=2, gradient_checkpointing=checkpointing).train()
    mask = torch.arange(16).expand(2, 16) < 8  # (N, L): half of each caption is padding
    y = Caption(torch.randn(2, 16, 32), mask, torch.randn(2, 32))  # tokens (N, L, E), mask, pooled (N, E)
    measured = saved_activation_bytes(model, torch.randn(2, 4, 32, 32), torch.rand(2) * 999, y, torch.bfloat16)
    predicted = memory.saved_bytes(2, 256, 64, 2, 2, 4.0, 2, 4 * 4, checkpointing, context=16, text_dim=32)
    assert abs(predicted - measured) <= TOLERANCE * measured, (predicted, measured)


def test_the_sanity_figure_of_the_review_holds():
    """DiT-XL/2 at micro-batch 256 (256 tokens, bf16): about 95 GiB of activations without checkpointing and about
    11 GiB with it (the review's own count). Ours: 95.5 and 12.0 GiB. The review's 11 is 28 block inputs (fp32)
    plus one recomputed block; ours adds the final layer's saved tensors (0.7 GiB) and the per-block adaLN,
    LayerNorm-statistics and logsumexp terms."""
    with torch.device("meta"):
        model = build_dit("DiT-XL/2", input_size=32, in_channels=4, num_classes=1000)
    gib = {ckpt: memory.predict(model, batch_size=256, tokens=256, precision="bf16", checkpointing=ckpt,
                                use_ema=True, posthoc_sigmas=0, world_size=1, bucket_view=True).activations / 2**30
           for ckpt in (False, True)}
    assert gib[False] == pytest.approx(95, rel=0.05)
    assert gib[True] == pytest.approx(11, rel=0.10)


def test_the_persistent_parts_equal_the_real_objects(tmp_path):
    """Weights 4·params, gradients 4·params, AdamW 8·params (+ the fused step counts), EMA and each post-hoc EMA 4·
    (state dict): each equals the nbytes of the real objects of build_step after one step."""
    cfg = load_config(None, {"training.mixed_precision": "bf16", "training.posthoc_ema": True,
                             "training.batch_size": 4, "training.gradient_accumulation_steps": 1})
    acc, _, _ = make_accelerator(cfg.training.mixed_precision)
    torch.manual_seed(0)
    model = tiny_dit("DiT-S/4", input_size=16, in_channels=3, num_classes=8, learn_sigma=False, depth=2,
                     class_dropout_prob=0.1)
    step = build_step(acc, model, make_objective("flow", False), Plan(128, 4, 1, 1), (3, 16, 16),
                      norm=LatentNorm("scale", (0.0,) * 3, (1.0,) * 3), posterior=False, training=cfg.training,
                      drop_prob=0.1, conditional=True, compile=False, rank=0)
    x0 = torch.randn((4, 3, 16, 16), generator=torch.Generator().manual_seed(1))  # (B, C, H, W)
    step(0, 1e-3, lambda: Micro(x0, None, torch.arange(4)))
    raw = step.raw
    raw(x0, torch.zeros(4), torch.arange(4)).float().mean().backward()  # the step frees its gradients; remake them
    nbytes = lambda tensors: sum(t.nbytes for t in tensors)  # noqa: E731
    m = memory.predict(raw, batch_size=4, tokens=16, precision="bf16", checkpointing=False, use_ema=True,
                       posthoc_sigmas=2, world_size=2, bucket_view=False)
    params = sum(p.numel() for p in raw.parameters())
    trainable = sum(p.numel() for p in raw.parameters() if p.requires_grad)
    assert m.weights == nbytes(raw.parameters()) == 4 * params
    assert m.gradients == nbytes(p.grad for p in raw.parameters() if p.grad is not None) == 4 * trainable
    assert m.optimizer == nbytes(v for s in step.opt.state.values() for v in s.values())
    assert m.optimizer - 4 * len(step.opt.state) == 8 * trainable  # two moments; the fused step is one float each
    assert m.ema == nbytes(step.ema.state_dict().values())
    assert m.posthoc_ema == sum(nbytes(e.state_dict().values()) for e in step.phema.emas)
    assert m.ddp_buckets == m.gradients  # without gradient_as_bucket_view: a second copy of the gradients
    with_view = memory.predict(raw, batch_size=4, tokens=16, precision="bf16", checkpointing=False, use_ema=True,
                               posthoc_sigmas=2, world_size=2, bucket_view=True)
    assert with_view.ddp_buckets == 0  # the gradients are the buckets
    matmuls = [mod for mod in raw.modules() if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d))]
    assert m.autocast == 2 * sum(p.numel() for mod in matmuls for p in mod.parameters())


MANIFEST = {"latent": {"shape": [1000, 4, 32, 32]}, "codec": {"kind": "vae", "dtype": "fp32"}}


def test_the_preflight_warns_before_any_step_and_names_a_fix_that_fits():
    """DiT-S/2 at micro-batch 64 × 2 accumulation (4.3 GiB predicted) on a 2 GiB device: the warning names gradient
    checkpointing and a smaller batch with more accumulation at the same global batch, each predicted to fit. On a
    CPU there is no memory to compare: the row says it is a GPU's prediction, and no warning."""
    cfg = load_config(None, {"model.name": "DiT-S/2", "training.batch_size": 64, "training.mixed_precision": "bf16",
                             "training.gradient_accumulation_steps": 2})
    with torch.device("meta"):
        model = build_dit("DiT-S/2", input_size=32, in_channels=4, num_classes=1000)
    cpu, device = torch.device("cpu"), 2 * 2**30
    row, warning = memory.preflight(cfg, MANIFEST, model, 1, cpu, device_bytes=device)
    assert warning and "more than the device's 2.0 GiB" in warning
    assert "model.gradient_checkpointing: true (predicted" in warning
    assert memory.predict_run(cfg, MANIFEST, model, 1, checkpointing=True).total <= device
    b, accum = map(int, re.search(r"training.batch_size: (\d+) and training.gradient_accumulation_steps: (\d+)",
                                  warning).groups())
    assert b < 64 and b * accum == 64 * 2
    assert memory.predict_run(cfg, MANIFEST, model, 1, batch_size=b).total <= device
    assert memory.predict_run(cfg, MANIFEST, model, 1, batch_size=2 * b).total > device  # the largest that fits
    assert memory.preflight(cfg, MANIFEST, model, 1, cpu, device_bytes=80 * 2**30)[1] is None
    row, warning = memory.preflight(cfg, MANIFEST, model, 1, cpu)
    assert row.startswith("predicted for a GPU") and warning is None
