"""No host sync between two log steps, counted at the dispatcher (tests/devices.py HostReads), in every kind of run:
bf16 with the EMA and accumulation, post-hoc EMAs, training.recover, aspect-ratio buckets, captions, two processes;
and none inside a sampler's loop, guided or not (validation grids, `sample`, `evaluate` and FID during training all
sample through it). Each run logs and checkpoints every LOG steps: those steps may read, no other may."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import pixel_shards
from devices import HostReads
from ditpipe.pipeline.config import load_config
from ditpipe.pipeline.metrics import read_metrics
from ditpipe.stages.train import train
from tiny import TINY_MODEL, tiny_dit

LOG, END = 4, 10  # log and checkpoint every 4 steps, end at 10 (not a multiple: the end is a log step too)
TINY = {**TINY_MODEL,
        "data.num_workers": 0, "training.mixed_precision": "bf16", "lr_scheduler.warmup_steps": 2,
        "training.learning_rate": 1e-3, "logging.tensorboard": False, "checkpointing.every_epoch": False,
        "training.batch_size": 4, "training.gradient_accumulation_steps": 2, "training.max_steps": END,
        "logging.steps": LOG, "checkpointing.steps": LOG, "checkpointing.phema_every": LOG,
        "model.class_dropout_prob": 0.1}
VARIANTS = {
    "bf16, EMA, accumulation 2": {},
    "fp16 (bf16 on a CPU), no EMA": {"training.mixed_precision": "fp16", "training.use_ema": False},
    "post-hoc EMA": {"training.posthoc_ema": True},
    "recover": {"training.recover": True, "training.recover_spike_factor": 3.0},
}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return pixel_shards(tmp_path_factory.mktemp("px") / "shards", 128, **{"shards.samples_per_shard": 64})


def checked_run(cfg: dict, out: Path) -> HostReads:
    """`train()` under HostReads; fails with the offending reads' stacks."""
    mode = HostReads()
    with mode:
        run = train(load_config(None, {**cfg, "logging.output_dir": str(out)}), config_name="sync")
    bad = mode.between_log_steps(LOG, END)
    assert bad == [], f"{len(bad)} host read(s) between log steps:\n" + "\n".join(map(str, bad[:5]))
    assert read_metrics(run)[-1]["step"] == END
    assert any(r.step in (LOG, END) for r in mode.reads)  # the log steps do read: the recorder sees them
    return mode


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_run_reads_nothing_back_between_log_steps(tmp_path, shards, variant):
    checked_run({**TINY, "data.dataset_name": "shapes", "data.image_size": 16, "data.num_samples": 128,
                 "vae.name": "pixel", "shards.path": str(shards), **VARIANTS[variant]}, tmp_path)


def test_a_bucketed_run_reads_nothing_back_between_log_steps(tmp_path):
    from test_buckets import data_for, mixed_folder
    from ditpipe.stages.encode import encode

    data = data_for("custom", mixed_folder(tmp_path / "photos"), tmp_path / "shards")
    encode(load_config(None, data))
    checked_run({**TINY, **data, "training.mixed_precision": "bf16", "training.batch_size": 2}, tmp_path / "out")


def test_a_caption_run_reads_nothing_back_between_log_steps(tmp_path):
    from test_captions import shapes_data
    from ditpipe.stages.encode import encode

    encode(load_config(None, shapes_data(tmp_path / "shards", 64)))
    checked_run({**shapes_data(tmp_path / "shards", 64), **TINY, "model.name": "DiT-T-S/4"}, tmp_path / "out")


def test_two_processes_read_nothing_back_between_log_steps(tmp_path, shards):
    """`torchrun --nproc_per_node 2` with gloo: each rank runs the CLI under HostReads (tests/devices.py's main)."""
    from test_distributed import cli_args, env

    bin_dir = Path(sys.executable).parent
    over = {**TINY, "data.dataset_name": "shapes", "data.image_size": 16, "data.num_samples": 128,
            "vae.name": "pixel", "shards.path": str(shards), "logging.output_dir": str(tmp_path / "out"),
            "logging.run_name": "two", "training.posthoc_ema": True}
    cmd = [str(bin_dir / "torchrun"), "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).parent / "devices.py"), str(tmp_path / "reads"), "train", *cli_args(over)]
    done = subprocess.run(cmd, env=env(PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), *sys.path])),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        reads = json.loads((tmp_path / f"reads.{rank}.json").read_text())
        bad = [r for r in reads if (r["step"] is not None and r["step"] % LOG and r["step"] != END)
               or any(w.endswith(("step.py:__call__", "ema.py:update", "train.py:feed")) for w in r["within"])]
        assert bad == [], f"rank {rank}: " + "\n".join(f"{r['op']} at step {r['step']}:\n{r['stack']}"
                                                      for r in bad[:5])
        assert any(r["step"] in (LOG, END) for r in reads)  # the log steps' all-reduces and reads are seen


@pytest.mark.parametrize("objective,sampler", [("flow", "heun"), ("ddpm", "ddpm"), ("ddpm", "ddim")])
@pytest.mark.parametrize("cfg_scale", [1.0, 4.0])
def test_sampling_reads_nothing_back_inside_its_loop(objective, sampler, cfg_scale):
    """Guided (within a noise interval, so both the guided and the plain branch run) and unguided, with keyed
    per-sample noise as `sample`, `evaluate` and FID during training draw it."""
    from ditpipe.pipeline.diffusion import make_objective
    from ditpipe.pipeline.generate import SampleNoise, generate

    torch.manual_seed(0)
    model = tiny_dit("DiT-S/4", input_size=16, in_channels=3, num_classes=4, learn_sigma=objective == "ddpm").eval()
    mode = HostReads()
    with mode:
        z = generate(model, make_objective(objective, objective == "ddpm"), (3, 16, 16), torch.arange(4), 4, sampler,
                     6, cfg_scale, 0, torch.device("cpu"), cfg_interval=(0.3, 0.8), noise=SampleNoise(0, range(4),
                                                                                                     "cpu"))
    assert z.shape == (4, 3, 16, 16) and torch.isfinite(z).all()
    assert mode.in_sampling_steps() == [], "\n".join(map(str, mode.in_sampling_steps()[:3]))


def test_the_recorder_sees_reads_made_inside_cpp():
    """What the Python-level spies of the earlier test missed: `_foreach_lerp_` turns a 0-dim tensor weight into a
    number inside its argument parser; CUDA's nanmedian reads a count back inside its kernel."""
    mode = HostReads()
    with mode:
        torch._foreach_lerp_([torch.zeros(3)], [torch.ones(3)], torch.tensor(0.5))
        torch.nanmedian(torch.tensor([1.0, float("nan"), 3.0]))
        torch.arange(4)[torch.arange(4) > 1]
    assert [r.op for r in mode.reads] == ["aten._local_scalar_dense.default", "aten.nanmedian.default",
                                          "aten.index.Tensor"]


def test_fid_during_training_reads_nothing_back_inside_its_sampling_loops(shards):
    """TrainingFID.score (every rank's share of keyed, guided samples, decoded and put through Inception): its
    sampling steps read nothing back; what it reads is per batch of features and the gather at the end."""
    pytest.importorskip("torchmetrics", reason="the `eval` extra is not installed")
    from ditpipe.pipeline.manifest import load_manifest
    from ditpipe.pipeline.diffusion import make_objective
    from ditpipe.pipeline.latent_norm import LatentNorm
    from ditpipe.pipeline.training_fid import TrainingFID

    cfg = load_config(None, {**TINY, "data.dataset_name": "shapes", "data.image_size": 16, "data.num_samples": 128,
                             "vae.name": "pixel", "shards.path": str(shards), "validation.fid_every_steps": 2,
                             "validation.fid_samples": 4, "validation.fid_reference_samples": 8,
                             "validation.sampling_steps": 3, "validation.cfg_scale": 4.0,
                             "validation.cfg_interval": [0.3, 0.8]})
    manifest = load_manifest(shards)
    manifest = {**manifest, "latent_norm": LatentNorm.from_manifest(manifest, cfg.data.latent_norm).record()}
    watch = TrainingFID.start(cfg, manifest, shards, 0, 1, torch.device("cpu"), 8, "class")
    torch.manual_seed(0)
    model = tiny_dit("DiT-S/4", input_size=16, in_channels=3, num_classes=8, learn_sigma=True).eval()
    mode = HostReads()
    with mode:
        value, n, _ = watch.score(model, make_objective("ddpm", True), torch.device("cpu"), {})
    assert n == 4 and value > 0
    assert mode.in_sampling_steps() == [], "\n".join(map(str, mode.in_sampling_steps()[:3]))
