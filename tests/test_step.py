"""The shared optimizer step (pipeline/step.py), through the real set-up: a non-finite step changes nothing
(parameters, EMA, optimizer state) and is counted on the device, every part shares the model's device, and a state
saved by an unfused optimizer loads into the fused one. Its host reads: tests/test_host_syncs.py; its devices on a
device that refuses CPU tensors: tests/test_devices.py."""

from __future__ import annotations

import pytest
import torch

from ditpipe.pipeline.config import load_config
from ditpipe.pipeline.device import make_accelerator
from ditpipe.pipeline.diffusion import make_objective
from ditpipe.pipeline.latent_norm import LatentNorm
from ditpipe.pipeline.order import Plan
from ditpipe.pipeline.checkpoint import load_state
from ditpipe.pipeline.step import Micro, build_step
from ditpipe.stages.encode import encode

from tiny import TINY_MODEL, tiny_dit

TINY = {**TINY_MODEL,
        "data.num_workers": 0, "training.mixed_precision": "bf16", "lr_scheduler.warmup_steps": 2,
        "training.learning_rate": 1e-3, "logging.tensorboard": False, "checkpointing.every_epoch": False,
        "data.dataset_name": "shapes", "data.image_size": 16, "data.num_samples": 128, "vae.name": "pixel"}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("px") / "shards"
    encode(load_config(None, {**TINY, "shards.samples_per_shard": 64, "shards.path": str(folder)}))
    return folder


def built(tmp_path, shards, **over):
    """A Step made by build_step from the real config, accelerator and model, and one micro-batch of real shapes."""
    cfg = load_config(None, {**TINY, "shards.path": str(shards), "training.batch_size": 4,
                             "training.gradient_accumulation_steps": 1, **over})
    acc, _, _ = make_accelerator(cfg.training.mixed_precision)
    torch.manual_seed(0)
    model = tiny_dit("DiT-S/4", input_size=16, in_channels=3, num_classes=8, learn_sigma=False,
                     class_dropout_prob=0.1)
    step = build_step(acc, model, make_objective("flow", False), Plan(128, 4, 1, 1), (3, 16, 16),
                      norm=LatentNorm("scale", (0.0,) * 3, (1.0,) * 3), posterior=False, training=cfg.training,
                      drop_prob=0.1, conditional=True, compile=False, rank=0)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn((4, 3, 16, 16), generator=g).to(acc.device)
    return step, Micro(x0, None, torch.arange(4).to(acc.device))


def snapshot(step):
    opt_state = [{k: v.clone() for k, v in s.items()} for s in step.opt.state.values()]
    return ({k: v.clone() for k, v in step.raw.state_dict().items()},
            {k: v.clone() for k, v in step.ema.state_dict().items()}, opt_state)


def test_a_nonfinite_step_changes_nothing_and_is_counted_on_the_device(tmp_path, shards):
    step, good = built(tmp_path, shards)
    step(0, 1e-3, lambda: good)
    before = snapshot(step)
    bad = good._replace(mean=good.mean.clone().index_fill_(0, torch.tensor([2], device=good.mean.device), float("nan")))
    step(1, 1e-3, lambda: bad)  # one NaN sample: the whole step is skipped, on the device
    after = snapshot(step)
    for a, b in zip(before[:2], after[:2]):
        assert all(torch.equal(a[k], b[k]) for k in a)  # weights and EMA untouched
    for a, b in zip(before[2], after[2]):
        assert all(torch.equal(a[k], b[k]) for k in a)  # AdamW's moments and step count untouched
    s = step.stats
    assert (int(s.nonfinite_total), int(s.nonfinite_run), int(s.finite_steps)) == (1, 1, 1)
    assert not torch.isfinite(s.grad_norm)
    step(2, 1e-3, lambda: good)  # and the next finite step trains again
    assert not all(torch.equal(after[0][k], v) for k, v in step.raw.state_dict().items())
    assert (int(s.nonfinite_total), int(s.nonfinite_run), int(s.take_worst_run()[0])) == (1, 0, 1)


def test_model_ema_and_optimizer_state_share_the_accelerators_device(tmp_path, shards):
    """On CPU this holds trivially; the same check runs on CUDA in test_cuda.py, where it is the defect it guards."""
    step, good = built(tmp_path, shards)
    step(0, 1e-3, lambda: good)
    device = step.acc.device
    tensors = list(step.raw.parameters()) + list(step.ema.state_dict().values())
    tensors += [v for s in step.opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    assert {t.device.type for t in tensors} == {device.type}
    assert all(g["fused"] for g in step.opt.param_groups)  # the device-side skip needs the fused kernel


def test_an_unfused_optimizer_state_loads_into_the_fused_step(tmp_path, shards):
    """A checkpoint written by an unfused AdamW (an older ditpipe on a CPU) brings `fused: False` and a CPU step
    count back; load_state keeps the fused flags of this build and moves the count to the parameters' device."""
    step, good = built(tmp_path, shards)
    unfused = torch.optim.AdamW(step.raw.parameters(), lr=1e-3, foreach=False, fused=False)
    step.raw(good.mean, torch.zeros(4, device=good.mean.device), good.y).float().mean().backward()
    unfused.step()
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    torch.save(step.raw.state_dict(), ckpt / "model.pt")
    torch.save(unfused.state_dict(), ckpt / "optimizer.pt")
    inner = step.opt.optimizer
    load_state(ckpt, step.raw, None, inner, None)
    assert all(g["fused"] and not g["foreach"] for g in inner.param_groups)
    assert all(s["step"].device == p.device and s["step"].dtype == torch.float32 for p, s in inner.state.items())
    step(1, 1e-3, lambda: good)  # the fused kernel runs on the loaded state
    assert int(step.stats.finite_steps) == 1


def test_the_online_codec_is_made_on_the_device_it_is_given(tmp_path, tiny_vae):
    """data.source: images loads the VAE on the run's device (the Accelerator's, passed in), never on a device of
    its own choosing: given the meta device, every VAE weight is on it."""
    from ditpipe.pipeline.training import open_data

    cfg = load_config(None, {**TINY, "vae.name": str(tiny_vae), "data.source": "images", "data.num_samples": 8})
    manifest, _, store, (source, codec) = open_data(cfg, torch.device("meta"))
    assert store is None and codec.device == torch.device("meta")
    assert {p.device.type for p in codec.vae.parameters()} == {"meta"}
