"""The training stage end to end on tiny shards: it learns, it is deterministic, accumulation splits a batch
exactly, precision is resolved per device, bad inputs are refused, and the VAE is never built for the step."""

import json
import math
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from ditpipe.pipeline.checkpoint import validate
from ditpipe.pipeline.config import ConfigError, load_config
from ditpipe.pipeline.ema import EMA, ema_decay
from ditpipe.pipeline.errors import DitpipeError, ShardError
from ditpipe.pipeline.metrics import read_metrics
from ditpipe.pipeline.model import DiT
from ditpipe.pipeline.schedule import lr_at
from ditpipe.stages.encode import encode
from ditpipe.pipeline.device import effective_precision
from ditpipe.stages.train import train

from conftest import reset_accelerate
from tiny import TINY_ARCH, TINY_MODEL

TINY = {**TINY_MODEL,
        "data.num_workers": 0, "training.mixed_precision": "no", "lr_scheduler.warmup_steps": 0,
        "training.learning_rate": 1e-3, "logging.steps": 5, "logging.tensorboard": False,
        "checkpointing.steps": 1000}


def shapes_data(n=256, size=16, vae="pixel"):
    return {"data.dataset_name": "shapes", "data.image_size": size, "data.num_samples": n, "vae.name": vae}


@pytest.fixture(scope="module")
def pixel_shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("px") / "shards"
    encode(load_config(None, {**shapes_data(), "data.num_workers": 0, "shards.samples_per_shard": 100,
                              "shards.path": str(folder)}))
    return folder


def cfg_for(tmp_path, shards, **over):
    base = {**shapes_data(), **TINY, "shards.path": str(shards), "logging.output_dir": str(tmp_path / "outputs"),
            "training.batch_size": 16, "training.gradient_accumulation_steps": 1, "training.num_epochs": 1}
    return load_config(None, {**base, **over})


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_loss_falls_on_shapes(tmp_path, pixel_shards, objective):
    cfg = cfg_for(tmp_path, pixel_shards, **{"diffusion.objective": objective, "training.num_epochs": 6,
                                             "model.hidden_size": 64, "model.depth": 2, "model.num_heads": 4,
                                             "training.use_ema": False, "lr_scheduler.type": "constant"})
    run = train(cfg, config_name="learn")
    losses = [m["loss"] for m in read_metrics(run)]
    assert len(losses) == 20  # 96 steps, logged every 5, plus the last
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:2]) / 2, losses


def final_weights(run):
    state = validate(run / "checkpoint-16")
    assert state["step"] == 16 and state["samples_consumed"] == 256
    return torch.load(run / "checkpoint-16" / "model.pt", weights_only=True)


def test_same_seed_same_weights_and_another_seed_differs(tmp_path, pixel_shards):
    a = final_weights(train(cfg_for(tmp_path, pixel_shards, **{"logging.run_name": "a"})))
    b = final_weights(train(cfg_for(tmp_path, pixel_shards, **{"logging.run_name": "b"})))
    c = final_weights(train(cfg_for(tmp_path, pixel_shards, **{"logging.run_name": "c", "training.seed": 1})))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_flow_timestep_keys_reach_the_training_step(tmp_path, pixel_shards):
    """diffusion.timestep_std changes the training draws (so the weights); its default is the draws from before."""
    flow = {"diffusion.objective": "flow"}
    plain = final_weights(train(cfg_for(tmp_path, pixel_shards, **flow, **{"logging.run_name": "plain"})))
    same = final_weights(train(cfg_for(tmp_path, pixel_shards, **flow, **{"logging.run_name": "same",
                                                                           "diffusion.timestep_std": 1.0,
                                                                           "diffusion.timestep_mean": 0.0})))
    narrow = final_weights(train(cfg_for(tmp_path, pixel_shards, **flow, **{"logging.run_name": "narrow",
                                                                             "diffusion.timestep_std": 0.6})))
    assert all(torch.equal(plain[k], same[k]) for k in plain)
    assert not all(torch.equal(plain[k], narrow[k]) for k in plain)


def test_accumulation_splits_a_batch_exactly(tmp_path, pixel_shards):
    """batch 16 × 1 and batch 8 × 2 see the same samples and draws; only float summation order differs."""
    whole = final_weights(train(cfg_for(tmp_path, pixel_shards, **{"logging.run_name": "whole"})))
    split = final_weights(train(cfg_for(tmp_path, pixel_shards, **{"logging.run_name": "split",
                                                                  "training.batch_size": 8,
                                                                  "training.gradient_accumulation_steps": 2})))
    for k in whole:
        assert torch.allclose(whole[k], split[k], atol=2e-5, rtol=1e-4), k


def test_checkpoint_layout_and_official_state_dict(tmp_path, pixel_shards):
    run = train(cfg_for(tmp_path, pixel_shards, **{"checkpointing.steps": 10, "logging.run_name": "layout"}),
                config_name="x.yaml")
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint")) == [
        "checkpoint-10", "checkpoint-16", "checkpoint-epoch-1"]
    assert (run / "latest").read_text().strip() == "checkpoint-16"
    ckpt = run / "checkpoint-16"
    names = {p.name for p in ckpt.iterdir()}
    assert {"model.pt", "ema.pt", "optimizer.pt", "training_state.json", "config.yaml", "manifest.json",
            "rng-rank0.pt"} <= names
    state = json.loads((ckpt / "training_state.json").read_text())
    assert set(state["files"]) == names - {"training_state.json"}
    assert state["epoch"] == 1 and state["world_size"] == 1 and state["config_hash"]
    model = DiT(input_size=16, patch_size=4, in_channels=3, **TINY_ARCH, num_classes=8, learn_sigma=True)
    model.load_state_dict(torch.load(ckpt / "model.pt", weights_only=True), strict=True)
    model.load_state_dict(torch.load(ckpt / "ema.pt", weights_only=True), strict=True)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["codec"]["kind"] == "pixel" and manifest["labels"]["num_classes"] == 8
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["step"] == 5 and {"loss", "lr", "grad_norm", "img_per_s"} <= set(json.loads(lines[0]))


def test_guide_step_lines_and_preflight(tmp_path, pixel_shards, capsys):
    train(cfg_for(tmp_path, pixel_shards, **{"training.mixed_precision": "fp16", "logging.run_name": "lines",
                                             "lr_scheduler.type": "constant"}))
    err = capsys.readouterr().err
    assert "Step 5, Loss: " in err and ", LR: 1.00e-03" in err
    assert "bf16" in err and "fp16 autocast does not exist on CPU" in err  # the precision actually used
    assert "16 × 1 accumulation × 1 = 16 per optimizer step" in err
    assert "16 optimizer steps per epoch" in err


def test_effective_precision():
    assert effective_precision("fp16", torch.device("cpu"))[0] == "bf16"
    assert effective_precision("bf16", torch.device("cpu")) == ("bf16", None)
    assert effective_precision("no", torch.device("cpu")) == ("no", None)


def test_bf16_on_cpu_trains_finite(tmp_path, pixel_shards):
    run = train(cfg_for(tmp_path, pixel_shards, **{"training.mixed_precision": "bf16", "logging.run_name": "bf"}))
    assert all(math.isfinite(m["loss"]) for m in read_metrics(run))
    assert all(v.dtype == torch.float32 for v in final_weights(run).values())  # fp32 master weights


def test_existing_run_folder_is_refused(tmp_path, pixel_shards):
    cfg = cfg_for(tmp_path, pixel_shards, **{"logging.run_name": "twice", "training.max_steps": 2})
    train(cfg)
    with pytest.raises(DitpipeError, match="ditpipe resume"):
        train(cfg)


def test_missing_shards_print_the_encode_command(tmp_path):
    cfg = cfg_for(tmp_path, tmp_path / "nowhere")
    with pytest.raises(ShardError) as info:
        train(cfg)
    assert "ditpipe encode --dataset shapes --image-size 16 --num-samples 256 --vae pixel" in str(info.value)


def test_mismatched_manifest_is_refused_naming_both_values(tmp_path, pixel_shards):
    cfg = cfg_for(tmp_path, pixel_shards, **{"data.image_size": 32, "vae.name": "/some/vae"})
    with pytest.raises(ConfigError) as info:
        train(cfg)
    problems = dict(info.value.problems)
    assert "config says 32, shards hold 16" in problems["data.image_size"]
    assert "'/some/vae'" in problems["vae.name"] and "'pixel'" in problems["vae.name"]


def test_nonfinite_losses_are_skipped_then_stop_the_run(tmp_path, pixel_shards):
    cfg = cfg_for(tmp_path, pixel_shards, **{"training.learning_rate": 1e12, "training.max_grad_norm": 0,
                                             "training.max_nonfinite_steps": 3, "logging.run_name": "nan",
                                             "training.num_epochs": 5})
    with pytest.raises(DitpipeError, match=r"(\d+) non-finite losses in a row by step (\d+)") as info:
        train(cfg)
    in_a_row, step = map(int, re.search(r"(\d+) non-finite losses in a row by step (\d+)", str(info.value)).groups())
    assert in_a_row >= 3 and step % 5 == 0  # counted on the device, read (and acted on) at the next log step
    assert read_metrics(cfg.logging.output_dir + "/nan")[-1]["nonfinite_total"] >= 3


def test_lr_schedule_values():
    assert lr_at(0, 1.0, "cosine", 10, 110) == pytest.approx(0.1)
    assert lr_at(9, 1.0, "cosine", 10, 110) == pytest.approx(1.0)
    assert lr_at(60, 1.0, "cosine", 10, 110) == pytest.approx(0.5)
    assert lr_at(109, 1.0, "cosine", 10, 110) == pytest.approx(0.5 * (1 + math.cos(math.pi * 99 / 100)))
    assert lr_at(500, 1.0, "cosine", 10, 110) == lr_at(109, 1.0, "cosine", 10, 110)  # extended runs hold the end
    assert lr_at(60, 1.0, "linear", 10, 110) == pytest.approx(0.5)
    assert lr_at(100, 2.0, "constant", 0, 110) == 2.0


def test_ema_math():
    assert ema_decay(0, 0.9999, True) == pytest.approx(0.1)
    assert ema_decay(90, 0.9999, True) == pytest.approx(0.91)
    assert ema_decay(10**7, 0.9999, True) == 0.9999 and ema_decay(0, 0.9999, False) == 0.9999
    lin = torch.nn.Linear(2, 1)
    ema = EMA(lin)
    start = {k: v.clone() for k, v in lin.state_dict().items()}
    with torch.no_grad():
        lin.weight.add_(1.0)
    ema.update(0.9)
    assert torch.allclose(ema.state_dict()["weight"], start["weight"] + 0.1)
    assert torch.equal(ema.state_dict()["bias"], start["bias"])


def run_py(code, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=600)


def test_training_from_shards_never_builds_the_vae_unless_validation_decodes(tmp_path, tiny_vae):
    """With VAE shards: no diffusers import at all for the steps; with validation grids on, exactly one
    from_pretrained, to decode them."""
    code = f"""
        import sys
        from ditpipe.pipeline.config import load_config
        from ditpipe.stages.encode import encode
        from ditpipe.stages.train import train
        data = {{"data.dataset_name": "shapes", "data.image_size": 16, "data.num_samples": 64,
                "vae.name": {str(tiny_vae)!r}, "shards.path": "shards", "data.num_workers": 0}}
        encode(load_config(None, data))
        calls = []
        from diffusers import AutoencoderKL
        original = AutoencoderKL.from_pretrained.__func__
        AutoencoderKL.from_pretrained = classmethod(lambda cls, *a, **k: calls.append(a) or original(cls, *a, **k))
        common = {{**data, **{TINY!r}, "training.batch_size": 8, "training.gradient_accumulation_steps": 1,
                  "training.max_steps": 4, "logging.output_dir": "out"}}
        train(load_config(None, {{**common, "logging.run_name": "plain"}}))
        print("plain", len(calls))
        from accelerate.state import AcceleratorState
        AcceleratorState._reset_state(True)
        train(load_config(None, {{**common, "logging.run_name": "grids", "validation.every_steps": 2,
                                 "validation.num_samples": 8, "validation.sampling_steps": 3}}))
        print("grids", len(calls))
    """
    proc = run_py(code, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "plain 0" in proc.stdout and "grids 1" in proc.stdout
    assert sorted(p.name for p in (tmp_path / "out" / "grids" / "samples").iterdir()) == ["step-0000002.png",
                                                                                        "step-0000004.png"]
    # and no diffusers module at all in a shards-only run
    code = """
        import sys
        from ditpipe.pipeline.config import load_config
        from ditpipe.stages.train import train
        train(load_config(None, {"data.dataset_name": "shapes", "data.image_size": 16, "data.num_samples": 64,
              "vae.name": %r, "shards.path": "shards", "data.num_workers": 0, "training.max_steps": 2,
              "training.batch_size": 8, "training.gradient_accumulation_steps": 1, "logging.output_dir": "out",
              "logging.run_name": "bare", "logging.tensorboard": False, **%r}))
        print("diffusers" in sys.modules)
    """ % (str(tiny_vae), TINY_MODEL)
    proc = run_py(code, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "False"


def test_online_vae_mode_draws_what_the_shards_draw(tmp_path, tiny_vae):
    """data.source: images encodes every step but draws the same flips and ε, so its losses match the
    precomputed run's up to fp16 storage of the posterior."""
    data = {**shapes_data(64, 16, str(tiny_vae)), "shards.path": str(tmp_path / "shards"), "data.num_workers": 0}
    encode(load_config(None, data))
    common = {**data, **TINY, "training.batch_size": 8, "training.gradient_accumulation_steps": 1,
              "training.max_steps": 3, "logging.steps": 1, "logging.output_dir": str(tmp_path / "out")}
    pre = train(load_config(None, {**common, "logging.run_name": "pre"}))
    reset_accelerate()
    online = train(load_config(None, {**common, "logging.run_name": "online", "data.source": "images"}))
    a, b = [m["loss"] for m in read_metrics(pre)], [m["loss"] for m in read_metrics(online)]
    assert a == pytest.approx(b, rel=2e-3)
    wa = torch.load(pre / "checkpoint-3" / "model.pt", weights_only=True)
    wb = torch.load(online / "checkpoint-3" / "model.pt", weights_only=True)
    assert all(torch.allclose(wa[k], wb[k], atol=1e-3) for k in wa)  # Adam magnifies tiny gradient differences
    assert not all(torch.equal(wa[k], wb[k]) for k in wa)  # really two paths: fp16 storage vs fresh encodes
