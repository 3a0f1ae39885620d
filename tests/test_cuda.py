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

from pipeline.config import load_config
from pipeline.metrics import read_metrics

from conftest import reset_accelerate

pytestmark = pytest.mark.cuda

CLI = [sys.executable, "-c", "from stages.cli import entry; entry()"]
TINY = {"model.name": "DiT-S/2", "model.hidden_size": 64, "model.depth": 2, "model.num_heads": 4,
        "data.num_workers": 2, "lr_scheduler.warmup_steps": 5, "training.learning_rate": 1e-3,
        "logging.steps": 10, "logging.tensorboard": False, "checkpointing.every_epoch": False,
        "data.dataset_name": "shapes", "data.image_size": 16, "data.num_samples": 512, "vae.name": "pixel",
        "training.batch_size": 16, "training.gradient_accumulation_steps": 2}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from stages.encode import encode

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
    from pipeline.checkpoint import validate
    from stages.train import train

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
    from pipeline.device import make_accelerator
    from pipeline.diffusion import make_objective
    from pipeline.latent_norm import LatentNorm
    from pipeline.loader import Plan
    from pipeline.model import build_dit
    from pipeline.step import Micro, build_step

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
    from pipeline.checkpoint import validate
    from stages.train import train

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
    from stages.train import _park, eval_model, train

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
    args = ["--standalone", "--nproc_per_node", "2", "-m", "stages.cli", "train",
            *flags({**TINY, "shards.path": shards, "logging.output_dir": tmp_path / "out", "logging.run_name": "ddp",
                    "training.max_steps": 20, "training.mixed_precision": "bf16"})]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", *args], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "× 2 process(es)" in proc.stderr
    assert (tmp_path / "out" / "ddp" / "checkpoint-20" / "rng-rank1.pt").is_file()
