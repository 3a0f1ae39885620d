"""Post-hoc EMA (issue 17, EDM2): the power-function math, the EMAs tracked in the step, their snapshots, exact
resume, the least-squares reconstruction (a tracked σ_rel to round-off, an untracked one within the tolerance
measured here), `ditpipe ema` end to end (its output loads in sample, export and --init-from), the sweep, and
one-line errors for bad input."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ditpipe.pipeline import phema
from ditpipe.pipeline.config import load_config
from ditpipe.pipeline.errors import ConfigError

from conftest import assert_common_checkpoints_equal, train_tiny
from tiny import TINY_MODEL, tiny_dit

SIGMAS = [0.05, 0.10, 0.08]  # EDM2's two, and a third tracked directly to check its reconstruction from the two
END, EVERY = 48, 4  # steps, and steps between snapshots: 12 snapshot steps
# ‖reconstructed − tracked‖ / ‖EMA(0.05) − EMA(0.10)‖ for σ_rel 0.08 from the other two's 24 snapshots: measured
# 0.08 % in this run (the profiles' own L2 fit error is 0.52 %); the bound is 12× that
UNTRACKED_TOLERANCE = 0.01


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """48 steps at a high LR (so the EMAs of different lengths differ), three tracked σ_rel, a snapshot every 4
    steps, only the newest step checkpoint kept, and a held-out quarter for the sweep."""
    return train_tiny(tmp_path_factory.mktemp("phema"), 128, **{
        "training.max_steps": END, "training.learning_rate": 1e-2, "lr_scheduler.warmup_steps": 0,
        "training.posthoc_ema": True, "training.posthoc_ema_sigmas": SIGMAS, "checkpointing.phema_every": EVERY,
        "checkpointing.steps": 8, "checkpointing.total_limit": 1, "data.val_fraction": 0.25,
        "validation.sampling_steps": 10})


def norm(state: dict, other: dict | None = None) -> float:
    """‖state − other‖ over every tensor (fp64)."""
    return float(sum(((v.double() - (other[k].double() if other else 0)) ** 2).sum() for k, v in state.items())) ** .5


def snapshot(run: Path, step: int, sigma: float) -> dict:
    return load_file(phema.snapshot_path(run / phema.SNAPSHOT_DIR, step, sigma))


# ---------------------------------------------------------------------------------------------------- the math


def test_sigma_rel_and_exponent_convert_both_ways_with_edm2s_values():
    assert np.allclose(phema.std_to_exp([0.05, 0.10]), [16.97, 6.94], atol=5e-3)  # EDM2 section 3.1's exponents
    sigmas = np.geomspace(0.003, phema.MAX_SIGMA_REL, 25)
    assert np.allclose(phema.exp_to_std(phema.std_to_exp(sigmas)), sigmas, rtol=1e-9, atol=0)
    assert phema.std_to_exp(phema.MAX_SIGMA_REL) == pytest.approx(0.0, abs=1e-9)  # the running mean


def test_correlation_is_the_integral_of_the_two_profiles():
    def profile(t, sigma, tau):
        g = float(phema.std_to_exp(sigma))
        return np.where(tau <= t, (g + 1) * tau ** g / t ** (g + 1), 0.0)

    tau = np.linspace(0, 300, 3_000_001)
    for (ta, sa, tb, sb) in [(100, 0.05, 100, 0.05), (60, 0.05, 200, 0.10), (250, 0.2, 90, 0.03), (7, 0.1, 7, 0.25)]:
        numeric = np.trapezoid(profile(ta, sa, tau) * profile(tb, sb, tau), tau)
        assert phema.power_function_correlation(ta, sa, tb, sb) == pytest.approx(numeric, rel=1e-4)


def test_the_step_update_gives_each_step_its_profile_weight_and_a_skipped_step_moves_nothing():
    """θ_τ set by hand before each update: after t updates the shadow is Σ_τ (τ^(γ+1) − (τ−1)^(γ+1)) / t^(γ+1) · θ_τ
    (the profile integrated over each step), and an update flagged not applied leaves the shadow bit for bit."""
    model = torch.nn.Linear(1, 1, bias=False)
    tracked = phema.PowerEMA(model, [0.05, 0.2])
    thetas = np.random.default_rng(0).normal(size=40)
    for step, theta in enumerate(thetas):
        model.weight.data.fill_(float(theta))
        tracked.update(step, torch.tensor(True))
    t = np.arange(1, len(thetas) + 1, dtype=np.float64)
    for ema, g in zip(tracked.emas, tracked.exps):
        weights = (t ** (g + 1) - (t - 1) ** (g + 1)) / len(thetas) ** (g + 1)
        assert float(ema.shadow["weight"]) == pytest.approx(float(weights @ thetas), rel=1e-5)
    before = [e.shadow["weight"].clone() for e in tracked.emas]
    model.weight.data.fill_(100.0)
    tracked.update(len(thetas), torch.tensor(False))
    assert all(torch.equal(b, e.shadow["weight"]) for b, e in zip(before, tracked.emas))


def test_sigma_rel_outside_the_power_functions_range_is_refused_by_the_config():
    for bad in ([0.5], [0.0], [], [0.05, 0.05]):
        with pytest.raises(ConfigError, match="training.posthoc_ema_sigmas"):
            load_config(None, {"training.posthoc_ema_sigmas": bad})


# ---------------------------------------------------------------------------------------------------- the run


def test_snapshots_hold_step_and_sigma_every_phema_every_steps_and_outlive_retention(run):
    folder = run / phema.SNAPSHOT_DIR
    snaps = phema.list_snapshots(folder)
    assert [(s.step, s.sigma_rel) for s in snaps] == [(st, sg) for st in range(EVERY, END + 1, EVERY)
                                                     for sg in sorted(SIGMAS)]
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporaries left
    assert sorted(p.name for p in run.glob("checkpoint-[0-9]*")) == [f"checkpoint-{END}"]  # total_limit 1 pruned
    params = sum(v.numel() for v in torch.load(run / f"checkpoint-{END}" / "model.pt", weights_only=True).values())
    for s in snaps:
        with safe_open(str(s.path), "pt") as f:
            meta = f.metadata()
        assert meta["step"] == str(s.step) and float(meta["sigma_rel"]) == s.sigma_rel and meta["format"] == "pt"
        assert s.path.stat().st_size < 4 * params + 4096  # fp32: 4 bytes a parameter, plus the header
    # the last snapshots are the shadows the final checkpoint carries on
    saved = torch.load(run / f"checkpoint-{END}" / "phema.pt", weights_only=True)
    assert saved["sigma_rels"] == SIGMAS
    for sigma, ema in zip(saved["sigma_rels"], saved["emas"]):
        snap = snapshot(run, END, sigma)
        assert set(snap) == set(ema) and all(torch.equal(snap[k], ema[k]) for k in ema)


def test_reconstructing_a_tracked_sigma_at_a_snapshot_step_gives_that_ema(run):
    two = [s for s in phema.list_snapshots(run / phema.SNAPSHOT_DIR) if s.sigma_rel != 0.08]
    for step in (EVERY * 3, END):
        for sigma in (0.05, 0.10):
            rec, fit = phema.reconstruct(two, step, sigma)
            exact = snapshot(run, step, sigma)
            worst = max(float((rec[k] - exact[k]).abs().max()) for k in exact)
            assert worst <= 1e-6, (step, sigma, worst)
            assert fit.profile_error < 1e-6 and np.abs(fit.coefficients).max() == pytest.approx(1.0, abs=1e-6)
            assert len(fit.coefficients) == 2 * step // EVERY  # every snapshot at or before the step


def test_an_untracked_sigma_matches_its_directly_tracked_ema_within_the_measured_tolerance(run):
    two = [s for s in phema.list_snapshots(run / phema.SNAPSHOT_DIR) if s.sigma_rel != 0.08]
    rec, fit = phema.reconstruct(two, END, 0.08)
    direct, e05, e10 = (snapshot(run, END, s) for s in (0.08, 0.05, 0.10))
    spread = norm(e05, e10)
    error = norm(rec, direct) / spread
    print(f"untracked σ_rel 0.08: ‖rec − tracked‖ / ‖EMA 0.05 − EMA 0.10‖ = {error:.2%}; {fit.summary()}")
    assert error < UNTRACKED_TOLERANCE
    # and far nearer than either input EMA, or than their average: the fit does real work
    assert norm(rec, direct) < 0.1 * min(norm(e05, direct), norm(e10, direct))
    average = {k: (e05[k] + e10[k]) / 2 for k in e05}
    assert norm(rec, direct) < 0.2 * norm(average, direct)


# ---------------------------------------------------------------------------------------------------- resume

CLI = [sys.executable, "-c", "from ditpipe.stages.cli import entry; entry()"]


def _train_args(shards: Path, outputs: Path, name: str) -> list[str]:
    over = {"data.dataset_name": "shapes", "data.image_size": 16, "data.num_samples": 128, "vae.name": "pixel",
            "shards.path": shards, "data.num_workers": 0, **TINY_MODEL, "training.mixed_precision": "no",
            "training.batch_size": 16, "training.gradient_accumulation_steps": 1, "training.max_steps": 24,
            "training.learning_rate": 1e-2, "logging.tensorboard": "false", "logging.output_dir": outputs,
            "logging.run_name": name, "training.posthoc_ema": "true", "checkpointing.phema_every": 2,
            "checkpointing.steps": 4}
    return ["train", *[a for k, v in over.items() for a in (f"--{k}", str(v))]]


def _env(pause: float = 0.0) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("DITPIPE_CHECKPOINT_PAUSE_S", None)
    if pause:
        env["DITPIPE_CHECKPOINT_PAUSE_S"] = str(pause)
    return env


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_kill_9_then_resume_continues_the_emas_and_rewrites_identical_snapshots(tmp_path):
    from ditpipe.stages.encode import encode

    shards, outputs = tmp_path / "shards", tmp_path / "outputs"
    encode(load_config(None, {"data.dataset_name": "shapes", "data.image_size": 16, "data.num_samples": 128,
                              "vae.name": "pixel", "shards.path": str(shards), "data.num_workers": 0}))
    ref = subprocess.Popen([*CLI, *_train_args(shards, outputs, "ref")], env=_env(), stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE)
    cut = outputs / "cut"
    proc = subprocess.Popen([*CLI, *_train_args(shards, outputs, "cut")], env=_env(0.05),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (cut / "checkpoint-8").is_dir():
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL
    assert not (cut / "checkpoint-24").exists()
    resumed = subprocess.run([*CLI, "resume", str(cut)], env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert ref.wait(300) == 0, ref.stderr.read().decode()[-3000:]
    reference = outputs / "ref"
    common = assert_common_checkpoints_equal(cut, reference)
    assert "checkpoint-24" in common
    for name in common:  # the post-hoc EMAs too, byte for byte (torch.save is deterministic)
        assert _sha(cut / name / "phema.pt") == _sha(reference / name / "phema.pt"), name
    names = sorted(p.name for p in (reference / phema.SNAPSHOT_DIR).iterdir())
    assert sorted(p.name for p in (cut / phema.SNAPSHOT_DIR).iterdir()) == names and len(names) == 24
    for name in names:  # the killed run's snapshots, the resumed run's rewrites and the reference's: equal bytes
        assert _sha(cut / phema.SNAPSHOT_DIR / name) == _sha(reference / phema.SNAPSHOT_DIR / name), name


def test_a_snapshot_that_cannot_be_written_stops_every_rank_with_the_same_message(tmp_path):
    """Two processes (torchrun, gloo) under a file-size limit (RLIMIT_FSIZE, a full disk to every writer): rank 0's
    first snapshot fails, and rank 1 stops at the same step with the same one-line error instead of running into the
    next step's all-reduce without its peer. No checkpoint is written, nothing is half-written."""
    import resource

    from ditpipe.stages.encode import encode

    shards, outputs = tmp_path / "shards", tmp_path / "outputs"
    encode(load_config(None, {"data.dataset_name": "shapes", "data.image_size": 16, "data.num_samples": 128,
                              "vae.name": "pixel", "shards.path": str(shards), "data.num_workers": 0}))
    # torchrun checks its workers every 3 s, not 0.1: time for each rank to stop on its own before a peer's exit
    # makes torchrun stop the rest
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2",
                "--monitor-interval", "3", str(Path(sys.executable).parent / "ditpipe")]
    limit = 48 << 10  # the run's small files fit; a snapshot of the 1-block model (~130 kB) does not

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # Python ignores SIGXFSZ: writes fail with EFBIG

    proc = subprocess.run([*torchrun, *_train_args(shards, outputs, "full")], env={**_env(), "COLUMNS": "250"},
                          capture_output=True, text=True, timeout=300, preexec_fn=small_files)
    said = proc.stdout + proc.stderr
    assert proc.returncode != 0, said[-3000:]
    lines = [line for line in said.splitlines() if "could not write the post-hoc EMA snapshot" in line]
    assert len(lines) == 2 and "step-0000002-sigma-0.05.safetensors" in lines[0], said[-3000:]
    assert lines[0].split("error: ", 1)[-1] == lines[1].split("error: ", 1)[-1], lines  # one message, both ranks
    # Each rank exited with the error's own code 1, not killed by torchrun for a peer's failure (a signal), and no
    # traceback ran through ditpipe (torchrun prints its own for any failed child).
    assert said.count("exitcode  : 1 (pid:") == 2 and "site-packages/accelerate" not in said, said[-3000:]
    assert "stages/train.py" not in said and "gloo" not in said.lower(), said[-3000:]
    run = outputs / "full"
    assert not any(p.name.startswith("checkpoint-") for p in run.iterdir())
    assert not list((run / phema.SNAPSHOT_DIR).iterdir())  # the temporary was removed, nothing half-written kept


# ---------------------------------------------------------------------------------------------------- the verb


def test_ema_writes_weights_that_sample_export_and_init_from_load(run, tmp_path, cli, capsys):
    from ditpipe.pipeline.finetune import load_init
    from ditpipe.pipeline.sampleable import load_sampleable

    out = tmp_path / "ema008"
    code, _, err = cli("ema", run, "--sigma-rel", "0.08", "--out", out)
    assert code == 0, err
    assert f"σ_rel 0.08 at step {END}: {len(SIGMAS) * (END // EVERY)} snapshots" in err
    written = load_file(out / "model.safetensors")
    direct = snapshot(run, END, 0.08)  # tracked in this run, so the reconstruction is that EMA
    assert set(written) == set(direct) and max(float((written[k] - direct[k]).abs().max()) for k in direct) <= 1e-6

    s = load_sampleable(out)  # what `sample` and `evaluate` load
    assert all(torch.equal(v, written[k]) for k, v in s.model.state_dict().items())
    assert "post-hoc EMA σ_rel 0.08 weights, step 48" in s.description
    code, _, err = cli("sample", "--checkpoint", out, "--num", "8", "--steps", "4", "--out", tmp_path / "grid.png")
    assert code == 0 and (tmp_path / "grid.png").is_file(), err

    code, _, err = cli("export", out, "--format", "safetensors", "--out", tmp_path / "exported")
    assert code == 0, err
    again = load_file(tmp_path / "exported" / "model.safetensors")
    assert all(torch.equal(again[k], written[k]) for k in written)

    source = load_init(out)  # what --init-from reads
    assert all(torch.equal(source.state[k], written[k]) for k in written)
    assert source.class_names and "post-hoc EMA σ_rel 0.08" in source.description
    train_tiny(tmp_path / "tune", 128, **{"model.init_from": str(out), "training.max_steps": 1})
    assert f"weights from {out / 'model.safetensors'}" in capsys.readouterr().err


def test_sweep_scores_each_sigma_beside_the_classic_ema_and_names_the_best(run, capsys):
    from ditpipe.stages.ema import ema

    rows = ema(run, sweep="0.05,0.1,0.2", held_out=True, num=16)  # what `ditpipe ema RUN --sweep ... --held-out` runs
    err = capsys.readouterr().err
    sigmas = [r["sigma_rel"] for r in rows]
    assert sigmas == [0.05, 0.1, 0.2, None, None] and [r["label"] for r in rows[3:]] == ["classic EMA (0.9999)",
                                                                                         "raw"]
    assert all("held_out_loss" in r and 0.0 <= r["accuracy"] <= 1.0 for r in rows)
    losses = [r["held_out_loss"] for r in rows]
    assert len(set(losses)) == len(losses)  # each row scored its own weights

    best = min(rows[:3], key=lambda r: r["held_out_loss"])
    assert f"best: σ_rel {best['sigma_rel']:g} (held-out loss {best['held_out_loss']:.4f})" in err
    assert "class accuracy" in err and "classic EMA" in err


def test_bad_input_is_one_line_naming_the_fix(run, tmp_path, cli):
    bare = tmp_path / "bare"
    shutil.copytree(run, bare, ignore=shutil.ignore_patterns(phema.SNAPSHOT_DIR))
    damaged = tmp_path / "damaged"
    shutil.copytree(run, damaged)
    (damaged / phema.SNAPSHOT_DIR / "step-0000012-sigma-0.05.safetensors").write_bytes(b"not a safetensors file")
    out = tmp_path / "x"
    cases = [
        ((bare, "--sigma-rel", "0.08", "--out", out), "no post-hoc EMA snapshots"),
        ((run, "--sigma-rel", "0.5", "--out", out), "--sigma-rel 0.5 is out of range"),
        ((run, "--sigma-rel", "0", "--out", out), "--sigma-rel 0 is out of range"),
        ((run, "--sweep", "0.05,0.3"), "--sweep 0.3 is out of range"),
        ((run, "--sweep", "0.05,abc"), "expected comma-separated"),
        ((run, "--sigma-rel", "0.08", "--step", "2", "--out", out), "before the first post-hoc EMA snapshot (step 4)"),
        ((run, "--sigma-rel", "0.08", "--step", "6", "--out", out), "--step 6 has no snapshots"),
        ((run, "--sigma-rel", "0.08"), "needs --out"),
        ((run,), "give one of --sigma-rel"),
        ((run, "--sweep", "0.05,0.1", "--out", out), "--out writes one EMA"),
        ((tmp_path / "nowhere", "--sigma-rel", "0.08", "--out", out), "is not a run folder"),
        ((damaged, "--sigma-rel", "0.08", "--out", out), "cannot read post-hoc EMA snapshot"),
    ]
    for args, message in cases:
        code, _, err = cli("ema", *args)
        assert code == 1 and message in err and len(err.strip().splitlines()) == 1, (args, err)
    assert not out.exists()


def test_the_ema_update_in_chunks_equals_one_update_of_the_whole_model(monkeypatch):
    """The tensor-weighted update works through chunks of parameters (no model-sized temporary): the same bits as
    one update over all of them."""
    import ditpipe.pipeline.ema as ema_module

    torch.manual_seed(0)
    model = tiny_dit("DiT-S/4", input_size=16, in_channels=3, num_classes=4, depth=2)
    whole, chunked = ema_module.EMA(model), ema_module.EMA(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    applied = torch.ones((), dtype=torch.bool)
    whole.update(0.9, applied)
    monkeypatch.setattr(ema_module, "CHUNK_ELEMENTS", 1000)  # many chunks, some tensors larger than one
    assert len(ema_module._chunks([s.numel() for s, _ in chunked._pairs])) > 5
    chunked.update(0.9, applied)
    assert all(torch.equal(whole.shadow[k], chunked.shadow[k]) for k in whole.shadow)
    assert not all(torch.equal(whole.shadow[k], v.float()) for k, v in model.state_dict().items())
