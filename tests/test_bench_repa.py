"""REPA's cost, measured and predicted: `ditpipe bench train --repa` times the precomputed step with and without
the alignment on the same shards (random targets of REPA's shape) and reports both, their ratios and the bytes a
sample; pipeline/memory.py counts the projector (weights, gradients, AdamW's moments, half copies), its saved
activations (against the tensors autograd saves, as tests/test_memory.py does) and the targets on the device."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ditpipe.pipeline import memory
from ditpipe.pipeline.config import load_config
from ditpipe.pipeline.device import make_accelerator
from ditpipe.pipeline.diffusion import make_objective
from ditpipe.pipeline.latent_norm import LatentNorm
from ditpipe.pipeline.model import build_dit
from ditpipe.pipeline.order import Plan
from ditpipe.pipeline.repa import Aligned, alignment_loss
from ditpipe.pipeline.step import Micro, build_step
from ditpipe.stages import bench

from conftest import reset_accelerate
from test_memory import saved_activation_bytes

# ---------------------------------------------------------------------------------------------------- bench


def _in_process(task: str, o, **args) -> dict:
    """bench's `_child` without the subprocess (the same task functions, the same JSON round trip): the test pays
    torch's import once instead of six times."""
    reset_accelerate()  # each task makes its own Accelerator, as in its own process
    return json.loads(json.dumps(bench.TASKS[task](o, **args)))


def test_bench_train_reports_the_step_with_and_without_repa(tmp_path, monkeypatch, capsys, one_thread):
    """Tiny sizes (DiT-S/2 at 32 px: a 2×2 token grid): the JSON's train.repa has both steps' costs, ratios that
    are their quotients, and the bytes a sample of latents (4 slices × 4 × 4 × 4 fp16) and of targets (768-d, one a
    token, with the mirror's: 2 × 4 × 768 fp16). The step without REPA is the precomputed one, on the same shards."""
    monkeypatch.setattr(bench, "_child", _in_process)
    o = bench.BenchOptions(vae_shape="tiny", image_size=32, steps=1, warmup=1, min_seconds=0.01, num_workers=0,
                           threads=1, repa=True, repa_projector_dim=64, workdir=str(tmp_path))
    result = bench.run(["train"], o)
    assert json.loads(capsys.readouterr().out) == result
    assert "--repa --repa-projector-dim 64" in result["command"]
    t = result["train"]
    r = t["repa"]
    assert (r["weight"], r["depth"], r["projector_dim"], r["target_dim"]) == (0.5, 8, 64, 768)
    assert (r["target_tokens"], r["target_slices"]) == (4, 2)
    assert r["latent_bytes_per_sample"] == 4 * 4 * 4 * 4 * 2
    assert r["target_bytes_per_sample"] == 2 * 4 * 768 * 2
    assert r["target_over_latent"] == 24.0
    assert r["shard_bytes_per_sample"] > r["latent_bytes_per_sample"] + r["target_bytes_per_sample"]  # tar headers
    assert r["projector_params"] == memory.projector_params(384, 64, 768)
    assert r["without"]["steps_per_s"] == t["precomputed"]["steps_per_s"]  # the baseline is the precomputed run
    for side in ("with", "without"):
        s = r[side]
        assert s["steps"] >= 1 and all(math.isfinite(s[k]) and s[k] > 0 for k in
                                       ("seconds", "steps_per_s", "images_per_s", "step_seconds", "t_step_s"))
        assert math.isclose(s["step_seconds"], 1 / s["steps_per_s"], rel_tol=1e-3)
        assert math.isclose(s["images_per_s"], s["steps_per_s"] * 4, rel_tol=1e-3)
    assert math.isclose(r["step_seconds_ratio"], r["with"]["step_seconds"] / r["without"]["step_seconds"],
                        rel_tol=2e-3)
    assert math.isclose(r["t_step_ratio"], r["with"]["t_step_s"] / r["without"]["t_step_s"], rel_tol=2e-3)
    assert math.isclose(r["images_per_s_ratio"], r["with"]["images_per_s"] / r["without"]["images_per_s"],
                        rel_tol=2e-3)


def test_without_repa_the_train_part_has_no_repa_section_and_its_shards_no_targets(tmp_path):
    """The option is off by default: the command line leaves it out, and the synthetic shards are as before."""
    from ditpipe.pipeline.manifest import load_manifest

    assert bench.command_line(["train"], bench.BenchOptions()) == "ditpipe bench train"
    bench._write_synthetic({"wds": str(tmp_path / "plain")}, 8, 32, "vae", "v", "shapes", 8, 0)
    bench._write_synthetic({"wds": str(tmp_path / "t")}, 8, 32, "vae", "v", "shapes", 8, 0, target_dim=24,
                           model_patch=2)
    assert load_manifest(tmp_path / "plain").targets is None
    layout = load_manifest(tmp_path / "t").target_layout()
    assert (layout.slices, layout.tokens, layout.dim, layout.dtype) == (2, 4, 24, "fp16")


# ---------------------------------------------------------------------------------------------------- memory


def _saved_by_repa(batch: int, size: int, projector_dim: int, z_dim: int, dtype) -> tuple[int, int]:
    """(saved bytes of the DiT with REPA's projector and alignment loss, of the DiT alone), one forward each."""
    torch.manual_seed(0)
    dit = build_dit("DiT-S/2", input_size=size, in_channels=4, num_classes=10, hidden_size=64, depth=2,
                    num_heads=2).train()
    aligned = Aligned(dit, 1, projector_dim, z_dim)
    x, t, y = torch.randn(batch, 4, size, size), torch.rand(batch) * 999, torch.randint(0, 10, (batch,))
    target = torch.randn(batch, (size // 2) ** 2, z_dim).half()  # (B, T, D) as the loader hands it over

    class Loss(torch.nn.Module):  # the step's forward: the model, then the alignment with the targets
        def __init__(self):
            super().__init__()
            self.aligned = aligned  # its parameters are left out of the count, as the DiT's

        def forward(self, x, t, y):
            out, z = self.aligned(x, t, y)
            return alignment_loss(z, target).mean()

    return saved_activation_bytes(Loss(), x, t, y, dtype), saved_activation_bytes(dit, x, t, y, dtype)


@pytest.mark.parametrize("size,batch,projector_dim,z_dim", [(8, 4, 48, 40), (32, 2, 96, 768)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_projectors_activation_count_matches_the_tensors_autograd_saves(size, batch, projector_dim, z_dim,
                                                                            dtype):
    """What REPA adds to the saved tensors of a forward (the projector over the block's tokens, −cos with the
    targets) is memory.projector_saved_bytes, to within 2 % (it is exact on torch 2.x's CPU)."""
    with_repa, alone = _saved_by_repa(batch, size, projector_dim, z_dim, dtype)
    predicted = memory.projector_saved_bytes(batch, (size // 2) ** 2, 64, projector_dim, z_dim,
                                             2 if dtype == torch.bfloat16 else 4)
    assert abs(predicted - (with_repa - alone)) <= 0.02 * (with_repa - alone), (predicted, with_repa - alone)


def test_the_projectors_persistent_parts_equal_the_real_objects():
    """A step built with training.repa (projector 16 wide, 24-d targets): weights, gradients, AdamW's state and the
    EMA each equal the real objects' nbytes, and each grows over the DiT alone by the projector's P parameters × its
    factor: 4 (weights), 4 (gradients), 8 + the fused step's 4 a tensor (AdamW), 2 (bf16 copies), 0 (EMA)."""
    reset_accelerate()
    cfg = load_config(None, {"training.mixed_precision": "bf16", "training.batch_size": 4,
                             "training.gradient_accumulation_steps": 1, "training.repa.weight": 0.5,
                             "training.repa.depth": 1, "training.repa.projector_dim": 16})
    acc, _, _ = make_accelerator(cfg.training.mixed_precision)
    torch.manual_seed(0)
    model = build_dit("DiT-S/4", input_size=16, in_channels=3, num_classes=8, learn_sigma=False, hidden_size=32,
                      depth=2, num_heads=2, class_dropout_prob=0.1)
    step = build_step(acc, model, make_objective("flow", False), Plan(128, 4, 1, 1), (3, 16, 16),
                      norm=LatentNorm("scale", (0.0,) * 3, (1.0,) * 3), posterior=False, training=cfg.training,
                      drop_prob=0.1, conditional=True, compile=False, rank=0, target_dim=24)
    x0 = torch.randn((4, 3, 16, 16), generator=torch.Generator().manual_seed(1))  # (B, C, H, W)
    target = torch.randn((4, 16, 24), generator=torch.Generator().manual_seed(2)).half()  # (B, T, D)
    step(0, 1e-3, lambda: Micro(x0, None, torch.arange(4), None, target))
    raw, projector = step.raw, step.projector
    out, z = step.model(x0, torch.zeros(4), torch.arange(4))  # the step frees its gradients; remake them
    (out.float().mean() + alignment_loss(z, target).mean()).backward()
    nbytes = lambda tensors: sum(t.nbytes for t in tensors)  # noqa: E731
    kw = dict(batch_size=4, tokens=16, precision="bf16", checkpointing=False, use_ema=True, posthoc_sigmas=0,
              world_size=2, bucket_view=False)
    on = memory.predict(raw, **kw, projector_dim=16, target_dim=24)
    off = memory.predict(raw, **kw)
    p = sum(t.numel() for t in projector.parameters())
    assert p == memory.projector_params(32, 16, 24)
    both = list(raw.parameters()) + list(projector.parameters())
    assert on.weights == nbytes(both)
    assert on.gradients == nbytes(t.grad for t in both if t.grad is not None)
    assert on.optimizer == nbytes(v for s in step.opt.state.values() for v in s.values())
    assert on.ema == nbytes(step.ema.state_dict().values()) == off.ema  # the EMA tracks the DiT alone
    assert (on.weights - off.weights, on.gradients - off.gradients) == (4 * p, 4 * p)
    assert on.optimizer - off.optimizer == 8 * p + 4 * 6  # two moments; the fused step count of its 6 tensors
    assert on.ddp_buckets - off.ddp_buckets == 4 * p
    assert on.autocast - off.autocast == 2 * p  # every projector parameter is a Linear's
    assert on.targets == target.nbytes and off.targets == 0
    assert on.activations - off.activations == memory.projector_saved_bytes(4, 16, 32, 16, 24, 2)
    assert on.step > off.step and on.evaluation == off.evaluation


MANIFEST = {"latent": {"shape": [1000, 4, 32, 32]}, "codec": {"kind": "vae", "dtype": "fp32"},
            "targets": {"encoder": {"dim": 768}, "model_patch": 2, "class_token": True, "dtype": "fp16",
                        "slices": ["target", "target_flip"]}}


def test_the_preflight_counts_repa_from_the_config_and_the_manifests_targets():
    """predict_run with training.repa.weight > 0 takes the target width from the manifest's targets section (and
    its class token, stored and on the device, not aligned); with weight 0 the same shards predict as before."""
    kw = {"model.name": "DiT-XL/2", "training.batch_size": 32, "training.mixed_precision": "bf16"}
    with torch.device("meta"):
        model = build_dit("DiT-XL/2", input_size=32, in_channels=4, num_classes=1000)
    off = memory.predict_run(load_config(None, kw), MANIFEST, model, 1)
    on = memory.predict_run(load_config(None, {**kw, "training.repa.weight": 0.5}), MANIFEST, model, 1)
    p = memory.projector_params(1152, 2048, 768)  # REPA's XL projector: 8.0 M parameters
    assert on.weights - off.weights == 4 * p and on.optimizer - off.optimizer == 8 * p + 24
    assert on.targets == 2 * 32 * (256 + 1) * 768  # the class token rides along
    assert on.activations - off.activations == memory.projector_saved_bytes(32, 256, 1152, 2048, 768, 2)
    assert off.targets == 0 and on.total > off.total


@pytest.mark.cuda
def test_the_prediction_with_repa_matches_the_allocators_peak_on_a_gpu():
    """DiT-B/2 at 256 px (256 tokens), batch 32, bf16, EMA, REPA at depth 4 with the official projector (2048 wide,
    768-d targets): the step's peak (max_memory_allocated, after the optimizer state exists) within 15 % of the
    prediction, as tests/test_cuda.py holds the DiT alone."""
    reset_accelerate()
    cfg = load_config(None, {"training.mixed_precision": "bf16", "training.batch_size": 32,
                             "training.gradient_accumulation_steps": 1, "training.repa.weight": 0.5,
                             "training.repa.depth": 4})
    acc, _, _ = make_accelerator("bf16")
    torch.manual_seed(0)
    model = build_dit("DiT-B/2", input_size=32, in_channels=4, num_classes=8)
    predicted = memory.predict(model, batch_size=32, tokens=256, precision="bf16", checkpointing=False,
                               use_ema=True, posthoc_sigmas=0, world_size=1, bucket_view=False, projector_dim=2048,
                               target_dim=768).step
    step = build_step(acc, model, make_objective("ddpm", True), Plan(512, 32, 1, 1), (4, 32, 32),
                      norm=LatentNorm("scale", (0.0,) * 4, (1.0,) * 4), posterior=False, training=cfg.training,
                      drop_prob=0.1, conditional=True, compile=False, rank=0, target_dim=768)
    g = torch.Generator(device=acc.device).manual_seed(0)
    micro = Micro(torch.randn((32, 4, 32, 32), generator=g, device=acc.device), None,
                  torch.randint(0, 8, (32,), generator=g, device=acc.device), None,
                  torch.randn((32, 256, 768), generator=g, device=acc.device).half())
    from test_cuda import second_step_peak

    measured = second_step_peak(step, micro)
    assert abs(predicted - measured) / measured < 0.15, (predicted / 2**30, measured / 2**30)
