"""Every tensor of a run on the run's device, checked on a CPU: the Accelerator's device becomes `meta`
(tests/devices.py on_meta), which refuses a non-scalar CPU tensor in any op with its tensors, as CUDA does. A whole
`train()` (EMA, post-hoc EMA, the spike watch, held-out loss and sample grids, checkpoints), a resume and a
recovery run there, and so do the samplers; `HostReads(serve=True)` answers the loop's reads at log steps and
records every copy back to the host, which a CPU run cannot see."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import pixel_shards
from devices import HostReads, on_meta
from ditpipe.pipeline.config import load_config
from ditpipe.pipeline.ema import EMA
from ditpipe.pipeline.run import find_checkpoint
from ditpipe.stages.train import train
from tiny import TINY_MODEL, tiny_dit

LOG, END = 3, 6
RUN = {**TINY_MODEL,
       "data.num_workers": 0, "training.mixed_precision": "no", "lr_scheduler.warmup_steps": 2,
       "logging.tensorboard": False, "checkpointing.every_epoch": False, "data.dataset_name": "shapes",
       "data.image_size": 16, "data.num_samples": 64, "vae.name": "pixel", "training.batch_size": 4,
       "training.gradient_accumulation_steps": 2, "training.max_steps": END, "logging.steps": LOG,
       "checkpointing.steps": LOG, "checkpointing.phema_every": LOG, "training.posthoc_ema": True,
       "training.recover": True, "training.recover_spike_factor": 3.0, "data.val_fraction": 0.25,
       "validation.every_steps": LOG, "validation.num_samples": 4, "validation.sampling_steps": 2}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return pixel_shards(tmp_path_factory.mktemp("px") / "shards", 64)


def test_a_run_and_its_resume_keep_every_tensor_on_the_device(tmp_path, shards):
    cfg = {**RUN, "shards.path": str(shards), "logging.output_dir": str(tmp_path / "out"), "logging.run_name": "m"}
    mode = HostReads(serve=True)
    with on_meta(), mode:
        run = train(load_config(None, cfg))
    assert (run / f"checkpoint-{END}").is_dir() and (run / "samples" / f"step-{LOG:07d}.png").is_file()
    assert mode.between_log_steps(LOG, END) == [], "\n".join(map(str, mode.between_log_steps(LOG, END)[:3]))
    assert any("_to_copy" in r.op for r in mode.reads)  # the checkpoints' copies to the host are seen on meta
    ckpt = find_checkpoint(run / f"checkpoint-{LOG}", tmp_path, print)
    resumed = HostReads(serve=True)
    with on_meta(), resumed:  # the checkpoint's state is loaded onto the device, and the steps after it run there
        train(load_config(None, {**cfg, "training.max_steps": END + LOG}), resume=run / f"checkpoint-{END}")
    assert ckpt.is_dir() and resumed.between_log_steps(LOG, END + LOG) == []


def test_a_recovery_reloads_its_checkpoint_onto_the_device(tmp_path, shards):
    """training.recover on meta: the loop is told (by the served reads) of non-finite steps from step 5 on, goes back
    to checkpoint-3, loads it onto the device and trains on, and stops when it is told again (recover_max 1)."""
    from ditpipe.pipeline.errors import DitpipeError

    cfg = {**RUN, "shards.path": str(shards), "logging.output_dir": str(tmp_path / "out"), "logging.run_name": "r",
           "training.max_nonfinite_steps": 1, "training.recover_max": 1, "training.max_steps": 9}
    told = lambda t, step: step - 1 if t.dtype == torch.long and step is not None and step >= 6 else 0  # noqa: E731
    mode = HostReads(serve=told)
    with on_meta(), mode, pytest.raises(DitpipeError, match="non-finite losses in a row by step 6"):
        train(load_config(None, cfg))
    lines = [json.loads(x) for x in (tmp_path / "out" / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [(x["recovered_from"], x["checkpoint"]) for x in lines if "recovered_from" in x] == [(6, "checkpoint-3")]
    assert mode.between_log_steps(LOG, 9) == []


def device_types(step) -> set[str]:
    """The device types of everything the step keeps: weights, EMA and post-hoc EMA shadows, optimizer state and
    the device-side counters."""
    tensors = [*step.raw.parameters(), *step.raw.buffers(), *step.ema.shadow.values(),
               *(v for ema in step.phema.emas for v in ema.shadow.values()),
               *(v for s in step.opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)),
               *(v for v in vars(step.stats).values() if isinstance(v, torch.Tensor))]
    return {t.device.type for t in tensors}


@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter")
def test_the_steps_parts_and_a_loaded_checkpoint_live_on_the_device(tmp_path, shards):
    """build_step on meta, two steps, then a checkpoint written on the CPU loaded into a second step made there:
    every part is on the device. (meta's `module.to` makes new parameters where CUDA's keeps them, so a part made
    from the model before it moved keeps stale CPU tensors here instead of failing: this test catches that.)"""
    from ditpipe.pipeline.device import make_accelerator
    from ditpipe.pipeline.diffusion import make_objective
    from ditpipe.pipeline.latent_norm import LatentNorm
    from ditpipe.pipeline.order import Plan
    from ditpipe.pipeline.recovery import SpikeWatch
    from ditpipe.pipeline.checkpoint import load_state
    from ditpipe.pipeline.step import Micro, build_step

    cfg = load_config(None, {**RUN, "shards.path": str(shards)})

    def built(acc):
        model = tiny_dit("DiT-S/4", input_size=16, in_channels=3, num_classes=8, learn_sigma=False)
        return build_step(acc, model, make_objective("flow", False), Plan(64, 4, 2, 1), (3, 16, 16),
                          norm=LatentNorm("scale", (0.0,) * 3, (1.0,) * 3), posterior=False,
                          training=cfg.training, drop_prob=0.1, conditional=True, compile=False, rank=0)

    cpu_step = built(make_accelerator("no")[0])  # a checkpoint's files, written from a CPU step
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    cpu_step(0, 1e-3, lambda: Micro(torch.randn(4, 3, 16, 16), None, torch.arange(4)))
    states = {"model.pt": cpu_step.raw.state_dict(), "ema.pt": cpu_step.ema.state_dict(),
              "optimizer.pt": cpu_step.opt.optimizer.state_dict(), "phema.pt": cpu_step.phema.state_dict()}
    for name, state in states.items():
        torch.save(state, ckpt / name)
    with on_meta() as meta:
        acc = make_accelerator("no")[0]
        step = built(acc)
        micro = Micro(torch.randn(4, 3, 16, 16, device=meta), None, torch.arange(4, device=meta))
        watch = SpikeWatch(meta, 3.0, 8)
        for i in range(2):
            loss, bad = step(i, 1e-3, lambda: micro)
            watch.update(i, loss, bad)
        assert device_types(step) == {"meta"}
        resumed = built(acc)
        load_state(ckpt, resumed.raw, resumed.ema, resumed.opt.optimizer, None, resumed.phema)
        resumed(1, 1e-3, lambda: micro)
        assert device_types(resumed) == {"meta"}


@pytest.mark.parametrize("objective,cfg_scale", [("flow", 4.0), ("ddpm", 4.0), ("flow", 1.0)])
def test_sampling_keeps_every_tensor_on_the_device(objective, cfg_scale):
    """Labels made on the host (as `sample` makes them) and keyed noise; guided within an interval and not."""
    from ditpipe.pipeline.diffusion import make_objective
    from ditpipe.pipeline.generate import SampleNoise, generate

    with on_meta() as meta:
        model = tiny_dit("DiT-S/4", input_size=16, in_channels=3, num_classes=4, learn_sigma=False).to(meta).eval()
        z = generate(model, make_objective(objective, False), (3, 16, 16), torch.arange(4), 4, None, 3, cfg_scale,
                     0, meta, cfg_interval=(0.3, 0.8), noise=SampleNoise(0, range(4), meta))
    assert z.device == meta and z.shape == (4, 3, 16, 16)


def test_meta_refuses_what_cuda_refuses():
    """The rule the tests above rely on: an EMA made from the model before it moved to the device (the first GPU
    issue's defect) fails its first update on meta, as it did on CUDA; a 0-dim CPU scalar passes, as on CUDA."""
    model = tiny_dit("DiT-S/4", input_size=16, in_channels=3, num_classes=4)
    ema = EMA(model)  # shadows on the CPU
    model.to("meta")
    ema._pairs = [(ema.shadow[n], p) for n, p in model.named_parameters()]
    with pytest.raises((RuntimeError, NotImplementedError), match="device|meta"):
        ema.update(0.99, torch.ones((), dtype=torch.bool, device="meta"))
    assert (torch.ones(3, device="meta") * torch.tensor(2.0)).device.type == "meta"
    with pytest.raises(RuntimeError, match="device"):
        torch.ones(3, device="meta") + torch.ones(3)
