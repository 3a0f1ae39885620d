"""The CUDA paths, on a GPU (`pytest -m cuda`, or scripts/gpu_check.sh): every test here skips without one.

What the CPU cannot show: fp16 with GradScaler and bf16, each with the EMA, torch.compile and gradient
checkpointing; the step without a single host sync (torch.cuda.set_sync_debug_mode); every part on the GPU;
bitwise resume with training.deterministic; a CPU-written checkpoint resumed on the GPU in fp16; sampling and
validation grids under bf16; the evaluation copies parked off the GPU; and, with two GPUs, a 2-process DDP run.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from ditpipe.pipeline.config import load_config
from ditpipe.pipeline.metrics import read_metrics

from conftest import reset_accelerate

pytestmark = pytest.mark.cuda

CLI = [sys.executable, "-c", "from ditpipe.stages.cli import entry; entry()"]
TINY = {"model.name": "DiT-S/2", "model.hidden_size": 64, "model.depth": 2, "model.num_heads": 4,
        "data.num_workers": 2, "lr_scheduler.warmup_steps": 5, "training.learning_rate": 1e-3,
        "logging.steps": 10, "logging.tensorboard": False, "checkpointing.every_epoch": False,
        "data.dataset_name": "shapes", "data.image_size": 16, "data.num_samples": 512, "vae.name": "pixel",
        "training.batch_size": 16, "training.gradient_accumulation_steps": 2}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from ditpipe.stages.encode import encode

    folder = tmp_path_factory.mktemp("px") / "shards"
    encode(load_config(None, {**TINY, "shards.samples_per_shard": 128, "shards.path": str(folder)}))
    return folder


def flags(settings: dict) -> list[str]:
    """The same settings as `--section.key value` command-line overrides."""
    return [a for k, v in settings.items() for a in (f"--{k}", str(v).lower() if isinstance(v, bool) else str(v))]


def config(tmp_path, shards, **over):
    return load_config(None, {**TINY, "shards.path": str(shards), "logging.output_dir": str(tmp_path / "out"),
                              **over})


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("variant", ["plain", "compile", "checkpointing"])
def test_30_steps_train_and_their_checkpoint_loads_strictly(tmp_path, shards, precision, variant):
    from ditpipe.pipeline.checkpoint import validate
    from ditpipe.stages.train import train

    over = {"plain": {}, "compile": {"model.compile": True}, "checkpointing": {"model.gradient_checkpointing": True}}
    run = train(config(tmp_path, shards, **{"training.mixed_precision": precision, "training.max_steps": 30,
                                            "checkpointing.steps": 10, "logging.run_name": "r", **over[variant]}))
    losses = [m["loss"] for m in read_metrics(run) if "loss" in m]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses))), losses
    ckpt = run / "checkpoint-30"
    state = validate(ckpt)
    assert state["nonfinite_total"] == 0
    for name in ("model.pt", "ema.pt"):
        keys = torch.load(ckpt / name, weights_only=True).keys()
        assert not any(k.startswith(("_orig_mod.", "module.")) for k in keys), name
    assert (ckpt / "scaler.pt").is_file() == (precision == "fp16")
    code = subprocess.run([*CLI, "sample", "--checkpoint", str(ckpt), "--num", "8", "--steps", "4", "--out",
                           str(tmp_path / "samples")], capture_output=True, text=True, timeout=600)
    assert code.returncode == 0, code.stderr[-3000:]


def _step(precision):
    from ditpipe.pipeline.device import make_accelerator
    from ditpipe.pipeline.diffusion import make_objective
    from ditpipe.pipeline.latent_norm import LatentNorm
    from ditpipe.pipeline.order import Plan
    from ditpipe.pipeline.model import build_dit
    from ditpipe.pipeline.step import Micro, build_step

    cfg = load_config(None, {**TINY, "training.mixed_precision": precision})
    acc, _, _ = make_accelerator(precision)
    model = build_dit("DiT-S/2", input_size=16, in_channels=3, num_classes=8, learn_sigma=True, hidden_size=64,
                      depth=2, num_heads=4, class_dropout_prob=0.1)
    step = build_step(acc, model, make_objective("ddpm", True), Plan(512, 16, 2, 1), (3, 16, 16),
                      norm=LatentNorm("scale", (0.0,) * 3, (1.0,) * 3), posterior=False, training=cfg.training,
                      drop_prob=0.1, conditional=True, compile=False, rank=0)
    g = torch.Generator(device=acc.device).manual_seed(0)
    micro = Micro(torch.randn((16, 3, 16, 16), generator=g, device=acc.device), None,
                  torch.randint(0, 8, (16,), generator=g, device=acc.device))
    return step, micro


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_the_step_never_syncs_with_the_host(precision):
    step, micro = _step(precision)
    for i in range(2):  # the first steps upload schedule tables and initialise the loss scale
        step(i, 1e-3, lambda: micro)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host sync inside now raises
    try:
        for i in range(2, 12):
            step(i, 1e-3, lambda: micro)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert int(step.stats.nonfinite_total) == 0 and torch.isfinite(step.stats.grad_norm)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_every_part_of_the_step_is_on_the_gpu_and_a_nan_skips_it(precision):
    step, micro = _step(precision)
    step(0, 1e-3, lambda: micro)
    tensors = list(step.raw.parameters()) + list(step.ema.state_dict().values())
    tensors += [v for s in step.opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    assert {t.device.type for t in tensors} == {"cuda"}
    before = {k: v.clone() for k, v in step.ema.state_dict().items()}
    weights = {k: v.clone() for k, v in step.raw.state_dict().items()}
    bad = micro._replace(mean=micro.mean.clone().fill_(float("nan")))
    step(1, 1e-3, lambda: bad)  # a skipped step (under fp16 GradScaler finds the NaN): nothing moves
    assert all(torch.equal(before[k], v) for k, v in step.ema.state_dict().items())
    assert all(torch.equal(weights[k], v) for k, v in step.raw.state_dict().items())
    assert int(step.stats.nonfinite_total) == 1


def test_resume_is_bitwise_with_training_deterministic(tmp_path, shards):
    from ditpipe.pipeline.checkpoint import validate
    from ditpipe.stages.train import train

    common = {"training.mixed_precision": "bf16", "training.deterministic": True, "checkpointing.steps": 10}
    whole = train(config(tmp_path, shards, **common, **{"training.max_steps": 20, "logging.run_name": "whole"}))
    part = train(config(tmp_path, shards, **common, **{"training.max_steps": 10, "logging.run_name": "part"}))
    reset_accelerate()
    proc = subprocess.run([*CLI, "resume", str(part), "--training.max_steps", "20"], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = validate(whole / "checkpoint-20")["files"], validate(part / "checkpoint-20")["files"]
    for name in ("model.pt", "ema.pt", "optimizer.pt"):
        assert a[name]["sha256"] == b[name]["sha256"], name


def test_a_cpu_written_checkpoint_resumes_on_the_gpu_in_fp16(tmp_path, shards):
    """fp16 runs as bf16 on the CPU (unfused-era checkpoints, a CPU step count); on the GPU the same config is fp16
    with GradScaler and the fused AdamW, which must take that optimizer state."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    args = flags({**TINY, "shards.path": shards, "logging.output_dir": tmp_path / "out", "logging.run_name": "cpu",
                  "training.mixed_precision": "fp16", "training.max_steps": 6, "checkpointing.steps": 3})
    proc = subprocess.run([*CLI, "train", *args], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.run([*CLI, "resume", str(tmp_path / "out" / "cpu"), "--training.max_steps", "12"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "cuda" in proc.stderr and "fp16" in proc.stderr
    losses = [m["loss"] for m in read_metrics(tmp_path / "out" / "cpu") if "loss" in m]
    assert losses and all(torch.isfinite(torch.tensor(losses)))


def test_validation_grids_sample_in_bf16_and_the_copies_leave_the_gpu(tmp_path, shards):
    from ditpipe.stages.train import _park, eval_model, train

    run = train(config(tmp_path, shards, **{"training.mixed_precision": "bf16", "training.max_steps": 10,
                                            "validation.every_steps": 5, "validation.num_samples": 8,
                                            "validation.sampling_steps": 5, "logging.run_name": "grids"}))
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step-0000005.png", "step-0000010.png"]
    cfg = config(tmp_path, shards)
    manifest = {"latent": {"shape": [1, 3, 16, 16]}, "labels": {"num_classes": 8}}
    cache: dict = {}
    weights = torch.load(run / "checkpoint-10" / "ema.pt", weights_only=True)
    model = eval_model(cfg, manifest, 8, weights, torch.device("cuda"), cache)
    assert next(model.parameters()).device.type == "cuda"
    _park(cache)
    assert next(model.parameters()).device.type == "cpu"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_process_ddp_run(tmp_path, shards):
    args = ["--standalone", "--nproc_per_node", "2", "-m", "ditpipe.stages.cli", "train",
            *flags({**TINY, "shards.path": shards, "logging.output_dir": tmp_path / "out", "logging.run_name": "ddp",
                    "training.max_steps": 20, "training.mixed_precision": "bf16"})]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", *args], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "× 2 process(es)" in proc.stderr
    assert (tmp_path / "out" / "ddp" / "checkpoint-20" / "rng-rank1.pt").is_file()


# ---------------------------------------------------------------------------------------------------- issue 24
# What no test covered together before: compile with checkpointing and buckets, post-hoc EMA and recovery under the
# sync check, the caption model's masked attention in bf16, sampling in bf16, DDP's bucket views on 2 processes,
# and the preflight's memory prediction against the allocator.


def _built_step(precision: str, model, latent_shape: tuple[int, int, int], batch: int, **training):
    """The training step of `model` as train builds it, with the config's training section plus `training`
    overrides (dotted keys without the `training.` prefix), and one fixed micro-batch of class labels."""
    from ditpipe.pipeline.device import make_accelerator
    from ditpipe.pipeline.diffusion import make_objective
    from ditpipe.pipeline.latent_norm import LatentNorm
    from ditpipe.pipeline.order import Plan
    from ditpipe.pipeline.step import Micro, build_step

    cfg = load_config(None, {**TINY, "training.mixed_precision": precision, "training.batch_size": batch,
                             **{f"training.{k}": v for k, v in training.items()}})
    acc, _, _ = make_accelerator(precision)
    c = latent_shape[0]
    step = build_step(acc, model, make_objective("ddpm", True), Plan(512, batch, 1, acc.num_processes),
                      latent_shape, norm=LatentNorm("scale", (0.0,) * c, (1.0,) * c), posterior=False,
                      training=cfg.training, drop_prob=0.1, conditional=True, compile=False,
                      rank=acc.process_index)
    g = torch.Generator(device=acc.device).manual_seed(0)
    micro = Micro(torch.randn((batch, *latent_shape), generator=g, device=acc.device), None,
                  torch.randint(0, 8, (batch,), generator=g, device=acc.device))
    return step, micro


def _tiny_dit(**over):
    from ditpipe.pipeline.model import build_dit

    return build_dit("DiT-S/2", input_size=16, in_channels=3, num_classes=8, learn_sigma=True, hidden_size=64,
                     depth=2, num_heads=4, class_dropout_prob=0.1, **over)


def test_compile_with_gradient_checkpointing_and_buckets_trains_without_hitting_the_recompile_limit(tmp_path):
    """5 aspect-ratio buckets (16 px, patch 4), compiled, every block checkpointed, in bf16: a recompile per bucket
    past torch's limit would fall back to eager silently; here it fails the run instead."""
    import torch._dynamo

    from ditpipe.pipeline.checkpoint import validate
    from ditpipe.stages.encode import encode
    from ditpipe.stages.train import train
    from test_buckets import data_for, mixed_folder, run_config

    data = data_for("custom", mixed_folder(tmp_path / "photos"), tmp_path / "shards")
    encode(load_config(None, data))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        run = train(load_config(None, run_config(data, tmp_path / "out", "compiled", **{
            "model.compile": True, "model.gradient_checkpointing": True, "training.mixed_precision": "bf16",
            "training.max_steps": 12})))
    losses = [m["loss"] for m in read_metrics(run) if "loss" in m]
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses))), losses
    assert validate(run / "checkpoint-12")["nonfinite_total"] == 0
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # it did compile


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_post_hoc_ema_and_the_spike_watch_never_sync_with_the_host(precision):
    from ditpipe.pipeline.recovery import SpikeWatch

    step, micro = _built_step(precision, _tiny_dit(), (3, 16, 16), 16, posthoc_ema=True, recover=True)
    watch = SpikeWatch(step.acc.device, 3.0, 20)
    for i in range(2):  # the first steps upload schedule tables and initialise the loss scale
        watch.update(i, *step(i, 1e-3, lambda: micro))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host sync inside now raises
    try:
        for i in range(2, 12):
            loss, bad = step(i, 1e-3, lambda: micro)
            watch.update(i, loss, bad)  # the training loop's recover path, once a step
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert int(step.stats.nonfinite_total) == 0 and step.phema is not None
    shadows = [v for v in step.phema.state_dict().values() if isinstance(v, torch.Tensor)]
    assert shadows and {v.device.type for v in shadows} == {"cuda"}
    assert watch.take() == (0, 0)  # a steady loss: no spike


def test_the_caption_models_masked_cross_attention_in_bf16_ignores_padding():
    """bf16 SDPA with a boolean mask on the GPU (the kernel differs from the CPU's): padded caption tokens change
    nothing, an empty mask (no caption) is finite, and bf16 stays close to fp32."""
    from ditpipe.pipeline.model_text import build_caption_dit
    from ditpipe.pipeline.text import Caption

    torch.manual_seed(0)
    model = build_caption_dit("DiT-T-S/2", input_size=16, in_channels=4, text_dim=32, hidden_size=64, depth=2,
                              num_heads=4).cuda().eval()
    for block in model.blocks:  # zero-initialised projections would hide the attention: give them weights
        torch.nn.init.normal_(block.cross_attn.proj.weight, std=0.05)
        torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.05)
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.05)
    x, t = torch.randn(2, 4, 16, 16, device="cuda"), torch.full((2,), 500, device="cuda")
    tokens, mask = torch.randn(2, 8, 32, device="cuda"), torch.zeros(2, 8, dtype=torch.bool, device="cuda")
    mask[0, :3] = mask[1, :6] = True
    pooled = torch.randn(2, 32, device="cuda")
    padded = tokens.masked_fill(mask[..., None], 0.0) * 1e3 + tokens  # only the padding moves, and far
    with torch.no_grad():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x, t, Caption(tokens, mask, pooled))
            moved = model(x, t, Caption(padded, mask, pooled))
            empty = model(x, t, Caption(tokens, torch.zeros_like(mask), pooled))
        reference = model(x, t, Caption(tokens, mask, pooled))
    assert torch.isfinite(out).all() and torch.isfinite(empty).all()
    assert torch.allclose(out.float(), moved.float(), atol=1e-2, rtol=0)
    assert torch.allclose(out.float(), reference, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("bf16", [True, False])
def test_sampling_runs_the_model_in_bf16_and_the_sampler_in_fp32(bf16):
    from ditpipe.pipeline.diffusion import make_objective
    from ditpipe.pipeline.generate import generate

    model = _tiny_dit().cuda().eval()
    seen = set()
    hooks = [m.register_forward_hook(lambda mod, args, out: seen.add(out.dtype))
             for m in model.modules() if isinstance(m, torch.nn.Linear)]
    labels = torch.arange(4) % 8
    z = generate(model, make_objective("ddpm", True), (3, 16, 16), labels, 4, "ddim", 4, 1.5, 0,
                 torch.device("cuda"), bf16=bf16)
    for h in hooks:
        h.remove()
    assert seen == ({torch.bfloat16} if bf16 else {torch.float32})
    assert z.dtype == torch.float32 and z.shape == (4, 3, 16, 16) and torch.isfinite(z).all()


_BUCKET_VIEW_RANK = """
import os, sys, torch, torch.distributed as dist
rank = int(sys.argv[1])
# Both ranks on cuda:0 (accelerate reads LOCAL_RANK); gloo, since NCCL refuses two ranks on one GPU.
os.environ.update(RANK=str(rank), LOCAL_RANK="0", WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=rank, world_size=2)
sys.path.insert(0, "tests")
from test_cuda import _built_step, _tiny_dit
torch.manual_seed(0)
step, micro = _built_step("bf16", _tiny_dit(), (3, 16, 16), 8)
storages = []  # at each optimizer step: "distinct gradient storages/gradients"
step.opt.optimizer.register_step_pre_hook(lambda opt, args, kwargs: storages.append("{}/{}".format(
    len({p.grad.untyped_storage().data_ptr() for g in opt.param_groups for p in g["params"] if p.grad is not None}),
    sum(p.grad is not None for g in opt.param_groups for p in g["params"]))))
for i in range(4):
    step(i, 1e-3, lambda: micro)
weights = torch.cat([p.detach().flatten().float() for p in step.raw.parameters()])
others = [torch.zeros_like(weights) for _ in range(2)]
dist.all_gather(others, weights)
print("RESULT", type(step.model).__name__, step.model.gradient_as_bucket_view, storages[-1],
      bool(torch.equal(others[0], others[1])), flush=True)
dist.destroy_process_group()
"""


def test_two_processes_on_one_gpu_train_with_gradients_as_views_into_ddps_buckets(tmp_path):
    """2 ranks of DDP on one GPU. NCCL refuses two ranks on one device ("Duplicate GPU detected", since NCCL 2.5:
    its topology search assumes one rank a GPU; NVIDIA/nccl#418), so the ranks use gloo, which all-reduces CUDA
    tensors through the host: DDP, its buckets and the step on CUDA tensors, not NCCL (test_two_process_ddp_run
    covers that with 2 GPUs)."""
    procs = [subprocess.Popen([sys.executable, "-c", _BUCKET_VIEW_RANK, str(r), str(tmp_path / "group")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    for out, _ in outs:
        name, bucket_view, grads, equal = out.split("RESULT ", 1)[1].split()
        assert name == "DistributedDataParallel" and bucket_view == "True"
        distinct, count = map(int, grads.split("/"))  # views share the few buckets' storages
        assert count > 10 and distinct < count / 4, grads
        assert equal == "True"  # the ranks' weights stay identical


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_preflights_memory_prediction_matches_the_allocators_peak(checkpointing):
    """DiT-B/2 at 256 px (256 tokens), batch 32, bf16, EMA: the step's peak as torch's caching allocator counts it
    (max_memory_allocated, after the optimizer state exists) against pipeline.memory.predict."""
    from ditpipe.pipeline.memory import predict
    from ditpipe.pipeline.model import build_dit

    torch.manual_seed(0)
    model = build_dit("DiT-B/2", input_size=32, in_channels=4, num_classes=8, gradient_checkpointing=checkpointing)
    predicted = predict(model, batch_size=32, tokens=256, precision="bf16", checkpointing=checkpointing,
                        use_ema=True, posthoc_sigmas=0, world_size=1, bucket_view=False).step
    step, micro = _built_step("bf16", model, (4, 32, 32), 32)
    measured = second_step_peak(step, micro)
    assert abs(predicted - measured) / measured < 0.15, (predicted / 2**30, measured / 2**30)


def second_step_peak(step, micro) -> int:
    """The peak CUDA memory of a step's second call on `micro` (the first makes AdamW's state)."""
    step(0, 1e-4, lambda: micro)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step(1, 1e-4, lambda: micro)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_the_preflights_probe_changes_nothing_of_the_run_on_the_gpu(precision):
    """The time estimate's probe on CUDA (it synchronises the device around its timing): no RNG, weight or gradient
    of the run changes, and the next real step is bitwise the one without a probe."""
    from test_run_time import probe_leaves_no_trace

    assert probe_leaves_no_trace(precision) < 60
