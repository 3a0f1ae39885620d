"""training.parallel fsdp (issue 29, part 3): FSDP2 `fully_shard` on CPU with gloo, 2 processes under torchrun,
through the real CLI.

- it trains as DDP does (fp32, so the two differ only by float summation order: the loss to 1e-5), a step with a
  NaN loss skipped on the device in both; the EMA and the post-hoc EMAs too;
- its checkpoints are every rank's shards as safetensors (torch.distributed.checkpoint's HF storage: no pickle),
  listed and hashed like every checkpoint file; a run killed with SIGKILL resumes bitwise on 2 processes, and
  continues on 1 with the global batch kept;
- `ditpipe export` and `ditpipe sample` read the shards as one state dict in the official DiT layout, equal to the
  DDP run's weights;
- the preflight's memory prediction divides what is sharded by the number of processes.

Why fp32 for the comparison with DDP: under bf16 FSDP computes in bf16 parameters (its MixedPrecisionPolicy) where
DDP's autocast keeps fp32 weights and casts per op, so the two round differently by ~1e-3, not 1e-5.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from ditpipe.pipeline import checkpoint, fsdp
from ditpipe.pipeline.checkpoint import open_weights, validate
from ditpipe.pipeline.hooks import INJECT_ENV, PAUSE_ENV
from ditpipe.pipeline.metrics import read_metrics

from conftest import pixel_shards
from test_distributed import Launch, _no_strays, cli_args  # noqa: F401 (the fixture kills stray launches)
from tiny import TINY_MODEL

N, BATCH, ACCUM, EPOCHS = 64, 4, 2, 3  # global batch 16 on 2 processes: 4 steps an epoch, 12 steps
END = 12
NAN_AT = "nan:2:3"  # data position 2's loss is NaN on every rank: step 2 is skipped on the device
LAYOUT = json.loads((Path(__file__).parent / "data" / "official_dit_state_dict_layout.json").read_text())


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return pixel_shards(tmp_path_factory.mktemp("fsdp-shards") / "shards", N, **{"shards.samples_per_shard": 16})


def config(shards: Path, outputs: Path, name: str, parallel: str = "fsdp", **over) -> dict:
    return {"data.dataset_name": "shapes", "data.image_size": 16, "data.num_samples": N, "vae.name": "pixel",
            "shards.path": str(shards), **TINY_MODEL, "model.depth": 2, "data.num_workers": 0,
            "training.mixed_precision": "no", "training.batch_size": BATCH,
            "training.gradient_accumulation_steps": ACCUM, "training.num_epochs": EPOCHS,
            "training.learning_rate": 1e-3, "lr_scheduler.warmup_steps": 1, "training.posthoc_ema": True,
            "training.parallel": parallel, "logging.steps": 1, "logging.tensorboard": False,
            "checkpointing.steps": 4, "checkpointing.phema_every": 4, "logging.output_dir": str(outputs),
            "logging.run_name": name, **over}


def train(shards: Path, root: Path, name: str, parallel: str = "fsdp", procs: int = 2, **env) -> Launch:
    return Launch(["train", *cli_args(config(shards, root / "outputs", name, parallel))], root / "logs", procs=procs,
                  **{INJECT_ENV: NAN_AT, **env})


@pytest.fixture(scope="module")
def runs(shards, tmp_path_factory) -> dict[str, Path]:
    """Uninterrupted 2-process runs of the same config: {"fsdp": run folder, "ddp": run folder}."""
    root = tmp_path_factory.mktemp("fsdp-runs")
    for parallel in ("fsdp", "ddp"):
        train(shards, root, parallel, parallel).ok()
    return {p: root / "outputs" / p for p in ("fsdp", "ddp")}


def losses(run: Path) -> list[float]:
    return [m["loss"] for m in read_metrics(run) if "loss" in m]


def gap(a: dict, b: dict) -> float:
    assert list(a) == list(b) and all(a[k].shape == b[k].shape for k in b)
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in b)


def test_fsdp_trains_as_ddp_and_checkpoints_shards_without_pickles(runs):
    fs, dd = runs["fsdp"], runs["ddp"]
    got, want = losses(fs), losses(dd)
    assert len(got) == END and got[2] != got[2]  # step 3 (data position 2) was non-finite: logged as NaN, skipped
    assert [x for x in got if x == x] == pytest.approx([x for x in want if x == x], rel=1e-5)
    norms = [[m["grad_norm"] for m in read_metrics(r) if "loss" in m] for r in (fs, dd)]  # the global norm, clipped
    assert norms[0] == pytest.approx(norms[1], rel=1e-5, nan_ok=True)  # by it as DDP's
    final = fs / checkpoint.step_name(END)
    state = validate(final)
    assert state["nonfinite_total"] == 1
    shard_names = [fsdp.shard_file(r) for r in range(2)]
    assert sorted(state["files"]) == sorted(["config.yaml", "manifest.json", "rng-rank0.pt", "rng-rank1.pt",
                                             *shard_names])
    assert sorted(p.name for p in final.iterdir()) == sorted([*state["files"], checkpoint.STATE])  # no .metadata
    for which in ("model", "ema"):  # the skipped step left the weights and the EMA finite, as DDP's
        a, b = open_weights(fs, which), open_weights(dd, which)
        assert a.which == which and a.kind == "checkpoint" and a.step == END
        assert gap(a.state, b.state) < 1e-5 and all(torch.isfinite(v).all() for v in a.state.values())
    snaps = sorted(p.name for p in (fs / "phema").iterdir())
    assert snaps == sorted(p.name for p in (dd / "phema").iterdir()) and len(snaps) == 2 * END // 4
    from safetensors.torch import load_file

    for name in snaps:
        assert gap(load_file(fs / "phema" / name), load_file(dd / "phema" / name)) < 1e-5
    # a damaged shard is refused by name before anything reads it
    broken = fs.parent / "broken"
    shutil.copytree(final, broken)
    (broken / shard_names[1]).write_bytes((broken / shard_names[1]).read_bytes()[:-8])
    with pytest.raises(checkpoint.CheckpointError, match=re.escape(f"{shard_names[1]}' does not match")):
        open_weights(broken)


@pytest.mark.slow
def test_a_killed_fsdp_run_resumes_bitwise_and_on_one_process(shards, runs, tmp_path):
    """kill -9 of a 2-process fsdp run after a checkpoint: resumed on 2 processes it ends bitwise equal to the
    uninterrupted run (every shard's sha256); resumed on 1 (accumulation 4 keeps the global batch) it ends at the
    same weights up to float summation order."""
    ref = runs["fsdp"]
    cut = tmp_path / "cut" / "outputs" / "cut"
    launch = train(shards, tmp_path / "cut", "cut", **{PAUSE_ENV: 0.05})
    launch.wait_for("checkpoint-4", lambda: (cut / "checkpoint-4").is_dir())
    launch.kill_all()
    assert not (cut / checkpoint.step_name(END)).exists()
    one = tmp_path / "one" / "cut"
    shutil.copytree(cut, one)
    resumed_from = checkpoint.find_resumable(cut, warn=pytest.fail)[1]["step"]
    assert 4 <= resumed_from < END

    Launch(["resume", cut], tmp_path / "logs", **{INJECT_ENV: NAN_AT}).ok()
    final, ref_final = (validate(r / checkpoint.step_name(END))["files"] for r in (cut, ref))
    for name in (*(fsdp.shard_file(r) for r in range(2)), "rng-rank0.pt", "rng-rank1.pt"):
        assert final[name] == ref_final[name], f"{name} differs"  # byte for byte (the config names the run)
    assert losses(cut) == pytest.approx(losses(ref), nan_ok=True, rel=0, abs=0)

    launch = Launch(["resume", one], tmp_path / "logs", procs=1, **{INJECT_ENV: NAN_AT}).ok()
    assert "this launch has 1: batch 4 × accumulation 4 keeps its global batch 16" in " ".join(launch.output().split())
    state = validate(one / checkpoint.step_name(END))
    assert (state["world_size"], sorted(fsdp.shard_files(state["files"]))) == (1, [fsdp.shard_file(0)])
    for which in ("model", "ema"):
        assert gap(open_weights(one, which).state, open_weights(ref, which).state) < 1e-5
    assert losses(one) == pytest.approx(losses(ref), nan_ok=True, rel=1e-5)


@pytest.mark.slow
def test_repa_under_fsdp_trains_as_ddp(tmp_path):
    """REPA's projector sharded beside the DiT (a root of its own): the loss, the alignment loss and the final
    weights of the DiT and the projector equal DDP's."""
    from ditpipe.pipeline.config import load_config
    from ditpipe.stages.encode import encode
    from test_repa import data, run_config, save_tiny_dino

    dino = save_tiny_dino(tmp_path / "dino")
    encode(load_config(None, data(tmp_path / "shards", dino)))
    runs = {}
    for parallel in ("fsdp", "ddp"):
        over = {**run_config(tmp_path / "shards", dino, tmp_path / "out", parallel), "training.parallel": parallel}
        Launch(["train", *cli_args(over)], tmp_path / "logs").ok()
        runs[parallel] = tmp_path / "out" / parallel
    got, want = ([x for m in read_metrics(runs[p]) if "loss" in m for x in (m["loss"], m["align_loss"])]
                 for p in runs)
    assert len(got) == 6 and got == pytest.approx(want, rel=1e-5)
    assert gap(open_weights(runs["fsdp"], "model").state, open_weights(runs["ddp"], "model").state) < 1e-5
    final = runs["fsdp"] / checkpoint.step_name(6)
    projector = fsdp.consolidate(final, fsdp.shard_files(validate(final)["files"]), fsdp.PROJECTOR)
    want_projector = torch.load(runs["ddp"] / checkpoint.step_name(6) / checkpoint.PROJECTOR, weights_only=True)
    assert gap(projector, want_projector) < 1e-5


def test_export_and_sample_read_the_shards_in_the_official_layout(runs, tmp_path, cli):
    from safetensors.torch import load_file

    code, _, err = cli("export", runs["fsdp"], "--format", "safetensors", "--out", tmp_path / "export")
    assert code == 0, err
    exported = load_file(tmp_path / "export" / "model.safetensors")
    ddp_ema = torch.load(runs["ddp"] / checkpoint.step_name(END) / checkpoint.EMA, weights_only=True)
    assert sorted(exported) == sorted(ddp_ema)
    assert gap({k: exported[k] for k in ddp_ema}, ddp_ema) < 1e-5
    # the official scheme: XL/2's keys with the block indices of this depth-2 model, in the official order
    official = list(LAYOUT["DiT-XL/2"])
    scheme = [k for k in official if not k.startswith("blocks.") or k.startswith(("blocks.0.", "blocks.1."))]
    assert list(open_weights(runs["fsdp"]).state) == scheme
    code, _, err = cli("sample", "--checkpoint", runs["fsdp"], "--num", "2", "--steps", "2", "--out",
                       tmp_path / "grid.png")
    assert code == 0 and (tmp_path / "grid.png").is_file(), err
    # `ditpipe runs` / `inspect` see the EMA inside the shards (there is no ema.pt to find)
    from ditpipe.stages.runs import run_info

    assert [c.ema for c in run_info(runs["fsdp"], check=True).checkpoints] == \
           [c.ema for c in run_info(runs["ddp"], check=True).checkpoints] != []
    assert all(c.ema for c in run_info(runs["fsdp"]).checkpoints)


def test_the_memory_prediction_shards_parameters_gradients_optimizer_and_emas():
    from ditpipe.pipeline.memory import predict
    from tiny import tiny_dit

    model = tiny_dit("DiT-S/2", depth=4, input_size=16, in_channels=4, num_classes=10)
    kw = dict(batch_size=8, tokens=64, precision="bf16", checkpointing=False, use_ema=True, posthoc_sigmas=2,
              bucket_view=True)
    ddp, one, four = (predict(model, world_size=w, fsdp=f, **kw) for w, f in ((4, False), (1, False), (4, True)))
    assert one == ddp  # DDP keeps everything whole on every GPU
    for part in ("gradients", "optimizer", "ema", "posthoc_ema"):
        assert getattr(four, part) == pytest.approx(getattr(ddp, part) / 4, rel=0.01), part
    assert four.activations == ddp.activations and four.workspace == ddp.workspace
    block = sum(p.numel() for p in model.blocks[0].parameters())
    root = sum(p.numel() for p in model.parameters()) - block * len(model.blocks)
    # the weights: a quarter of the fp32 shards, and the gathered bf16 copies of the root and one block's (two: the
    # next is prefetched) parameters
    assert four.weights == pytest.approx(ddp.weights / 4 + 2 * (root + 2 * block), rel=0.01)
    assert four.autocast == 0  # FSDP's bf16 parameters are the copies autocast would make


def test_what_fsdp_does_not_do_is_refused_in_one_line(shards, tmp_path, cli):
    with pytest.raises(fsdp.ConfigError, match="training.mixed_precision.*fp16 is not supported with training.parallel"
                                               " fsdp"):
        fsdp.check("fp16", False, torch.device("cuda"))
    with pytest.raises(fsdp.ConfigError, match="training.fsdp_cpu_offload.*needs a CUDA device"):
        fsdp.check("no", True, torch.device("cpu"))
    from ditpipe.pipeline.config import load_config

    remote = load_config(None, {**config(shards, tmp_path, "s3"), "logging.output_dir": "s3://bucket/runs"})
    with pytest.raises(fsdp.ConfigError, match="logging.output_dir.*s3://bucket/runs is in object storage, where fsdp"):
        fsdp.refuse_unbuilt(remote)
    over = {**config(shards, tmp_path, "v"), "validation.every_steps": 2, "training.max_steps": 2}
    code, _, err = cli("train", *cli_args(over))
    assert code != 0 and "validation.every_steps" in err and "not built for training.parallel fsdp" in err
    assert "Traceback" not in err


def test_an_fsdp_step_reads_nothing_back_between_log_steps(shards, tmp_path):
    """bf16 (FSDP's bf16 parameters, fp32 reduction), EMA and post-hoc EMAs, accumulation 2, 2 ranks: each runs the
    CLI under HostReads (tests/devices.py's main); only log and checkpoint steps (every 4) may read."""
    import os
    import subprocess
    import sys

    from test_distributed import env

    log, end = 4, 6
    over = {**config(shards, tmp_path / "out", "reads"), "training.mixed_precision": "bf16", "training.max_steps": end,
            "logging.steps": log, "checkpointing.every_epoch": False}
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).parent / "devices.py"), str(tmp_path / "reads"), "train", *cli_args(over)]
    done = subprocess.run(cmd, env=env(PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), *sys.path])),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert all(x == x for x in losses(tmp_path / "out" / "reads"))  # bf16 trains (no NaN was injected here)
    for rank in (0, 1):
        reads = json.loads((tmp_path / f"reads.{rank}.json").read_text())
        bad = [r for r in reads if (r["step"] is not None and r["step"] % log and r["step"] != end)
               or any(w.endswith(("step.py:__call__", "ema.py:update", "train.py:feed")) for w in r["within"])]
        assert bad == [], f"rank {rank}: " + "\n".join(f"{r['op']} at step {r['step']}:\n{r['stack']}"
                                                      for r in bad[:5])
        assert any(r["step"] in (log, end) for r in reads)  # the log steps' reads are seen


# ---------------------------------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("offload", [False, True])
def test_fsdp_on_cuda_trains_in_bf16_with_nccl_and_exports(shards, tmp_path, cli, offload):
    """One GPU (a one-rank NCCL group), bf16 parameters with fp32 reduction, optionally CPU offload; two GPUs when
    there are: every GPU's shard. The export reads the shards."""
    procs = min(torch.cuda.device_count(), 2)
    over = {**config(shards, tmp_path / "outputs", "cuda"), "training.mixed_precision": "bf16",
            "training.fsdp_cpu_offload": offload, "training.num_epochs": 1}
    if procs == 1:
        over["training.gradient_accumulation_steps"] = 2 * ACCUM
    Launch(["train", *cli_args(over)], tmp_path / "logs", procs=procs).ok(timeout=600)
    run = tmp_path / "outputs" / "cuda"
    assert "fsdp" in (run / "config.yaml").read_text()
    state = validate(run / checkpoint.step_name(4))
    assert state["precision"] == "bf16" and len(fsdp.shard_files(state["files"])) == procs
    assert all(x == x for x in losses(run))
    code, _, err = cli("export", run, "--format", "safetensors", "--out", tmp_path / "export")
    assert code == 0, err
