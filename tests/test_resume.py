"""Checkpoints and exact resume (issue 4): kill -9 at checkpoints, mid-write and at random steps, then `ditpipe resume`
ends bitwise equal to an uninterrupted run (fp32 and bf16); damaged newest checkpoints fall back; retention; config
changes on resume; SIGTERM/SIGINT; `ditpipe resume` without an argument; what a checkpoint holds; low disk space.

Training that is compared bitwise always runs in subprocesses through the real CLI, with one thread each, so the
reference and the interrupted runs execute the same code in the same kind of process. Kills are real signals.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
import yaml

from ditpipe.pipeline import checkpoint
from ditpipe.pipeline.checkpoint import CheckpointError, validate
from ditpipe.pipeline.config import load_config, validate_tree
from ditpipe.pipeline.hooks import PAUSE_ENV
from ditpipe.pipeline.metrics import read_metrics
from ditpipe.pipeline.schedule import lr_at
from ditpipe.stages.encode import encode
from ditpipe.pipeline.run import find_checkpoint, resume_config
from ditpipe.stages.train import train

from conftest import assert_common_checkpoints_equal, resign
from tiny import TINY_MODEL

CLI = [sys.executable, "-c", "from ditpipe.stages.cli import entry; entry()"]
STEPS_PER_EPOCH, EPOCHS = 16, 3  # 256 samples / batch 16
END = STEPS_PER_EPOCH * EPOCHS
PAUSE_S = 0.03  # DITPIPE_CHECKPOINT_PAUSE_S: per file, so a kill can land inside a checkpoint write
SEED = int(os.environ.get("DITPIPE_TEST_SEED") or random.SystemRandom().randrange(1 << 30))


def run_config(shards: Path, outputs: Path, precision: str = "no", **over) -> dict:
    """A tiny DiT on 16 px pixel-codec shapes: 3 epochs × 16 steps, a checkpoint every 4 steps, a log line each."""
    return {"data.dataset_name": "shapes", "data.image_size": 16, "data.num_samples": 256, "vae.name": "pixel",
            "shards.path": str(shards), **TINY_MODEL,
            "data.num_workers": 0, "training.mixed_precision": precision,
            "training.batch_size": 16, "training.gradient_accumulation_steps": 1, "training.num_epochs": EPOCHS,
            "training.learning_rate": 1e-3, "lr_scheduler.warmup_steps": 4, "logging.steps": 1,
            "logging.tensorboard": False, "checkpointing.steps": 4, "logging.output_dir": str(outputs), **over}


def cli_args(over: dict) -> list[str]:
    text = {True: "true", False: "false", None: "null"}
    return [a for k, v in over.items() for a in (f"--{k}", text.get(v, v) if isinstance(v, (bool, type(None)))
                                                 else str(v))]


def env(pause: float = 0.0) -> dict:
    e = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "COLUMNS": "250"}
    e.pop(PAUSE_ENV, None)
    if pause:
        e[PAUSE_ENV] = str(pause)
    return e


class Proc:
    """A `ditpipe ...` subprocess with its output in files (no pipe to fill up and block it)."""

    count = 0

    def __init__(self, args: list[str], logs: Path, pause: float = 0.0, cwd: Path | None = None):
        Proc.count += 1
        logs.mkdir(parents=True, exist_ok=True)
        self.out, self.err = logs / f"{Proc.count}.out", logs / f"{Proc.count}.err"
        self.args = args
        with open(self.out, "wb") as o, open(self.err, "wb") as e:
            self.p = subprocess.Popen([*CLI, *args], stdout=o, stderr=e, env=env(pause), cwd=cwd)

    def stderr(self) -> str:
        return self.err.read_text()

    def wait(self, timeout: float = 120) -> int:
        return self.p.wait(timeout)

    def ok(self) -> "Proc":
        rc = self.wait()
        assert rc == 0, f"`ditpipe {' '.join(self.args)}` exited {rc}:\n{self.stderr()[-3000:]}"
        return self

    def kill(self) -> None:
        self.p.send_signal(signal.SIGKILL)
        assert self.p.wait(30) == -signal.SIGKILL, "the run ended before it could be killed"

    def wait_for(self, what: str, predicate, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.p.poll() is not None:
                pytest.fail(f"the run exited ({self.p.returncode}) before {what} (seed {SEED}):\n"
                            f"{self.stderr()[-3000:]}")
            if time.monotonic() > deadline:
                self.p.kill()
                pytest.fail(f"timed out waiting for {what}")
            time.sleep(0.002)


def last_step(run: Path) -> int:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0
    except (OSError, ValueError):
        return 0


def logged(run: Path) -> int:
    """Lines in metrics.jsonl: a new line shows that the newest process has run a step."""
    try:
        return len((run / "metrics.jsonl").read_text().splitlines())
    except OSError:
        return 0


def temporaries(run: Path) -> list[Path]:
    return sorted(run.glob(".checkpoint-*.tmp"))


def half_written(run: Path) -> list[Path]:
    return [p for p in temporaries(run) if p.is_dir() and any(p.iterdir())]


def start_train(shards, outputs, name, precision="no", pause=0.0, **over) -> Proc:
    cfg = run_config(shards, outputs, precision, **{"logging.run_name": name, **over})
    return Proc(["train", *cli_args(cfg)], outputs.parent / "logs", pause)


def start_resume(target, logs, pause=0.0, *extra) -> Proc:
    return Proc(["resume", str(target), *extra], logs, pause)


# ---------------------------------------------------------------------------------------------------- fixtures


pytestmark = pytest.mark.usefixtures("one_thread")  # in-process runs too (conftest)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("resume-shards") / "shards"
    encode(load_config(None, {"data.dataset_name": "shapes", "data.image_size": 16, "data.num_samples": 256,
                              "vae.name": "pixel", "data.num_workers": 0, "shards.samples_per_shard": 100,
                              "shards.path": str(folder)}))
    return folder


@pytest.fixture(scope="module")
def references(shards, tmp_path_factory):
    """Uninterrupted runs, fp32 and bf16, started at once in the background; `references(precision)` waits."""
    outputs = tmp_path_factory.mktemp("reference") / "outputs"
    procs = {p: start_train(shards, outputs, f"ref-{p}", p) for p in ("no", "bf16")}

    def get(precision: str) -> Path:
        procs[precision].ok()
        return outputs / f"ref-{precision}"

    yield get
    for proc in procs.values():
        if proc.p.poll() is None:
            proc.p.kill()


# ---------------------------------------------------------------------------------------------------- comparisons


def assert_equal_state(a, b, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where} differs (seed {SEED})"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), where
        for k in a:
            assert_equal_state(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_same_run(run: Path, ref: Path, end: int = END) -> None:
    """`run` (interrupted and resumed) ends exactly where `ref` (uninterrupted) does: weights, EMA, optimizer, RNG,
    every checkpoint both have, and every logged step."""
    final = checkpoint.step_name(end)
    assert (run / "latest").read_text().strip() == final
    assert not temporaries(run), temporaries(run)
    state, ref_state = validate(run / final), validate(ref / final)
    for key in ("step", "epoch", "samples_consumed", "total_steps"):  # config_hash: logging.run_name differs
        assert state[key] == ref_state[key], key
    for name in ("model.pt", "ema.pt", "optimizer.pt", "rng-rank0.pt"):
        assert_equal_state(torch.load(run / final / name, weights_only=True),
                           torch.load(ref / final / name, weights_only=True), f"{final}/{name}")
    # every checkpoint both runs hold has the same weights, byte for byte (torch.save is deterministic)
    common = assert_common_checkpoints_equal(run, ref, f" (seed {SEED})")
    assert final in common and len(common) >= 4
    # metrics: every step is logged exactly once (a resume drops what was logged after its checkpoint), with the
    # numbers of the uninterrupted run
    expected = {m["step"]: m for m in read_metrics(ref)}
    got = read_metrics(run)
    assert sorted(expected) == list(range(1, end + 1))
    assert [m["step"] for m in got] == sorted(expected)
    for m in got:
        for key in ("loss", "lr", "grad_norm", "epoch"):
            assert m[key] == expected[m["step"]][key], f"step {m['step']} {key}: {m[key]} != " \
                                                       f"{expected[m['step']][key]} (seed {SEED})"


# ---------------------------------------------------------------------------------------------------- 1. kill -9


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_kill_9_at_checkpoints_mid_write_and_random_steps_then_resume_is_bitwise(tmp_path, shards, references,
                                                                                  precision):
    rng = random.Random(f"{SEED}-{precision}")
    outputs, logs = tmp_path / "outputs", tmp_path / "logs"
    run = outputs / "cut"

    # 1: kill right after checkpoint-8 appears
    proc = start_train(shards, outputs, "cut", precision, pause=PAUSE_S)
    proc.wait_for("checkpoint-8", lambda: (run / "checkpoint-8").is_dir())
    proc.kill()

    # 2: resume, kill while a checkpoint folder is half written
    lines = logged(run)
    proc = start_resume(run, logs, 0.2)  # a long pause: the folder stays half written well past the kill
    proc.wait_for("a half-written checkpoint", lambda: logged(run) > lines and half_written(run))
    proc.kill()
    partial = half_written(run)
    assert partial, "the kill was meant to land inside a checkpoint write"
    name = partial[0].name[1:-len(".tmp")]
    assert not (run / name).exists() and not (partial[0] / checkpoint.STATE).exists()
    newest = checkpoint.find_resumable(run, warn=pytest.fail)[0]  # the partial folder is no candidate
    assert newest.name != name and not newest.name.startswith(".")
    orphan = run / ".checkpoint-9999.tmp"  # a leftover no later save would overwrite
    orphan.mkdir()
    (orphan / "model.pt").write_bytes(b"half")

    # 3 and 4: resume, kill -9 at a random step (anywhere: in a step or inside a checkpoint write), twice
    for latest_target in (30, END - 4):
        resumed_from, lines = newest_valid_step(run), logged(run)
        proc = start_resume(run, logs, PAUSE_S)
        target = rng.randint(min(resumed_from + 1, latest_target), latest_target)
        proc.wait_for(f"step {target}", lambda: logged(run) > lines and last_step(run) >= target)
        proc.kill()
        assert not orphan.exists()  # resume cleaned the killed run's temporaries before its first step
        assert not (run / checkpoint.step_name(END)).exists()

    # 5: resume to the end, no pause
    proc = start_resume(run, logs).ok()
    assert "resuming from" in proc.stderr()
    assert_same_run(run, references(precision))


def newest_valid_step(run: Path) -> int:
    return checkpoint.find_resumable(run, warn=lambda m: None)[1]["step"]


# ---------------------------------------------------------------------------------------------------- 2. damage


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_damaged_newest_checkpoints_fall_back_with_warnings_and_finish_bitwise(tmp_path, shards, references, cli):
    outputs = tmp_path / "outputs"
    run = outputs / "dmg"
    start_train(shards, outputs, "dmg", **{"training.max_steps": 24}).ok()
    assert (run / "latest").read_text().strip() == "checkpoint-24"
    flip_byte(run / "checkpoint-24" / "model.pt")
    (run / "checkpoint-20" / "optimizer.pt").unlink()
    state_file = run / "checkpoint-16" / checkpoint.STATE
    state_file.write_bytes(state_file.read_bytes()[:40])
    # checkpoint-epoch-1 is step 16 too, its files hard links to checkpoint-16's (one copy on disk): both holders
    # of step 16 are damaged by that one truncation
    assert (run / "checkpoint-epoch-1" / checkpoint.STATE).read_bytes() == state_file.read_bytes()
    with pytest.raises(CheckpointError):
        validate(run / "checkpoint-epoch-1")

    # named explicitly, a damaged checkpoint is refused (both spellings), with the file that is wrong
    code, _, err = cli("resume", run / "checkpoint-24")
    assert code == 1 and "checkpoint-24/model.pt" in err and "damaged" in err
    config_file = tmp_path / "train.yaml"
    config_file.write_text((run / "config.yaml").read_text())
    code, _, err = cli("train", "--config", config_file, "--resume", run / "checkpoint-20")
    assert code == 1 and "checkpoint-20" in err and "missing optimizer.pt" in err
    code, _, err = cli("resume", run / "checkpoint-16")
    assert code == 1 and "no readable training_state.json" in err

    # the run folder falls back to checkpoint-12, naming every damaged one it skipped
    proc = start_resume(run, tmp_path / "logs", 0.0, "--training.max_steps", "null").ok()
    err = proc.stderr()
    warnings = [line for line in err.splitlines() if "warning" in line and "damaged" in line]
    for name in ("checkpoint-24", "checkpoint-20", "checkpoint-16"):  # the epoch one has no step to sort it by
        assert any(f"{name}'" in w or f"{name}/" in w for w in warnings), (name, err)
    assert f"resuming from {run / 'checkpoint-12'}" in err.replace("\n", "")
    assert_same_run(run, references("no"))
    # the re-run steps wrote the damaged checkpoints anew; the damaged folders were moved aside, not deleted
    for name in ("checkpoint-24", "checkpoint-20", "checkpoint-16", "checkpoint-epoch-1"):
        validate(run / name)
        assert (run / f"{name}.damaged").is_dir()


# ---------------------------------------------------------------------------------------------------- 3. retention


def fake_checkpoint(run: Path, name: str, step: int, written_by: str | None = "ditpipe 0.1.0") -> Path:
    path = run / name
    path.mkdir(parents=True)
    (path / "model.pt").write_bytes(b"x")
    state = {"step": step, **({"written_by": written_by} if written_by else {})}
    (path / checkpoint.STATE).write_text(json.dumps(state))
    return path


def names(run: Path) -> set[str]:
    return {p.name for p in run.iterdir() if p.name.startswith("checkpoint")}


def test_prune_keeps_newest_latest_and_foreign_folders(tmp_path):
    run = tmp_path / "run"
    for s in (4, 8, 12, 16):
        fake_checkpoint(run, f"checkpoint-{s}", s)
    for e in (1, 2, 3):
        fake_checkpoint(run, f"checkpoint-epoch-{e}", 16 * e)
    fake_checkpoint(run, "checkpoint-2", 2, written_by=None)  # a folder that is not ours: no `written_by`
    fake_checkpoint(run, "checkpoint-1", 1, written_by="someone else")
    (run / "checkpoint-3").mkdir()  # no training_state.json at all
    (run / "checkpoint-3" / "notes.txt").write_text("mine")
    (run / "latest").write_text("checkpoint-4\n")  # an older one is `latest` (e.g. after a fallback)
    everything = names(run)

    assert checkpoint.prune(run, None, None) == [] and names(run) == everything
    checkpoint.prune(run, 2, None)
    assert names(run) == everything - {"checkpoint-8"}
    checkpoint.prune(run, 1, 1)
    assert names(run) == {"checkpoint-16", "checkpoint-4", "checkpoint-epoch-3", "checkpoint-3", "checkpoint-2",
                          "checkpoint-1"}
    assert (run / "checkpoint-3" / "notes.txt").read_text() == "mine"
    assert not temporaries(run)


def test_retention_in_a_real_run(tmp_path, shards):
    outputs = tmp_path / "outputs"
    cfg = load_config(None, run_config(shards, outputs, **{"logging.run_name": "keep", "training.max_steps": 8,
                                                           "checkpointing.total_limit": 2,
                                                           "checkpointing.keep_epochs": 1}))
    run = train(cfg)
    assert names(run) == {"checkpoint-4", "checkpoint-8"}
    # folders that look like checkpoints but are not ours, added while the run is stopped
    fake_checkpoint(run, "checkpoint-3", 3, written_by=None)
    (run / "checkpoint-epoch-9").mkdir()
    ckpt = find_checkpoint(run, outputs, warn=pytest.fail)
    assert ckpt.name == "checkpoint-8"
    train(resume_config(ckpt, overrides={"training.max_steps": None}), resume=ckpt)
    assert names(run) == {"checkpoint-44", "checkpoint-48", "checkpoint-epoch-3", "checkpoint-3",
                          "checkpoint-epoch-9"}
    assert (run / "latest").read_text().strip() == "checkpoint-48"


def test_without_limits_every_checkpoint_is_kept(references):
    ref = references("no")
    assert names(ref) == {f"checkpoint-{s}" for s in range(4, END + 1, 4)} | {
        f"checkpoint-epoch-{e}" for e in range(1, EPOCHS + 1)}


# ---------------------------------------------------------------------------------------------------- 4. config


@pytest.fixture
def short_run(tmp_path, shards):
    """An in-process run stopped by max_steps 8 (checkpoints 4 and 8)."""
    cfg = load_config(None, run_config(shards, tmp_path / "outputs", **{"logging.run_name": "short",
                                                                        "training.max_steps": 8}))
    return train(cfg)


@pytest.mark.parametrize("key, value", [("training.batch_size", "8"), ("training.seed", "1"), ("model.depth", "2"),
                                        ("training.learning_rate", "2e-3"), ("data.num_samples", "128")])
def test_changed_config_is_refused_naming_the_key(short_run, cli, key, value):
    code, _, err = cli("resume", short_run, f"--{key}", value)
    assert code == 2, err
    assert key in err and "cannot resume" in err
    assert not (short_run / "checkpoint-12").exists()


def test_resume_cannot_end_before_its_checkpoint(short_run, cli):
    code, _, err = cli("resume", short_run, "--training.max_steps", "4")
    assert code == 2 and "training.max_steps" in err and "already at step 8" in err
    assert (short_run / "latest").read_text().strip() == "checkpoint-8"


def test_extended_num_epochs_continues_at_the_final_lr(tmp_path, shards, cli):
    cfg = load_config(None, run_config(shards, tmp_path / "outputs", **{"logging.run_name": "ext",
                                                                        "checkpointing.steps": 16}))
    run = train(cfg)
    code, _, err = cli("resume", run, "--training.num_epochs", "4", "--checkpointing.steps", "8")
    assert code == 0, err
    assert f"steps beyond {END} continue at the schedule's final LR" in err
    assert "from step 48" in err
    state = validate(run / "checkpoint-64")
    assert state["step"] == 64 and state["total_steps"] == END and state["epoch"] == 4
    assert {"checkpoint-56", "checkpoint-epoch-4"} <= names(run)  # the changed checkpointing.steps applies
    lrs = {m["step"]: m["lr"] for m in read_metrics(run)}
    final_lr = lr_at(END - 1, 1e-3, "cosine", 4, END)
    assert lrs[END] == pytest.approx(final_lr) and final_lr > 0
    assert all(lrs[s] == lrs[END] for s in range(END + 1, 65))
    assert lrs[END - 1] > lrs[END]  # the schedule really decays up to its end


def test_guide_spelling_and_changed_max_steps_resume_bitwise(tmp_path, shards, references):
    outputs, logs = tmp_path / "outputs", tmp_path / "logs"
    run = outputs / "guide"
    start_train(shards, outputs, "guide", **{"training.max_steps": 12}).ok()
    config_file = tmp_path / "train_config.yaml"
    config_file.write_text((run / "config.yaml").read_text())  # says max_steps: 12
    # the training guide's spelling, from an older checkpoint than the newest, with a new max_steps
    Proc(["train", "--config", str(config_file), "--resume", str(run / "checkpoint-8"), "--training.max_steps",
          "20"], logs).ok()
    assert (run / "latest").read_text().strip() == "checkpoint-20"
    start_resume(run, logs, 0.0, "--training.max_steps", "null").ok()
    assert_same_run(run, references("no"))


# ---------------------------------------------------------------------------------------------------- 5. signals


@pytest.mark.parametrize("sig, precision", [(signal.SIGTERM, "no"), (signal.SIGINT, "bf16")],
                         ids=["SIGTERM-fp32", "SIGINT-bf16"])
def test_signal_finishes_the_step_checkpoints_and_resumes_bitwise(tmp_path, shards, references, sig, precision):
    outputs = tmp_path / "outputs"
    run = outputs / "sig"
    proc = start_train(shards, outputs, "sig", precision, pause=PAUSE_S)
    target = random.Random(f"{SEED}-{sig}").randint(5, 30)
    proc.wait_for(f"step {target}", lambda: last_step(run) >= target)
    proc.p.send_signal(sig)
    assert proc.wait() == 130
    err = proc.stderr()
    assert "stopped by signal" in err and f"ditpipe resume {run}" in err.replace("\n", "")
    stopped = last_step(run)  # the step in progress was finished and logged, and no other started
    assert target <= stopped < END
    assert (run / "latest").read_text().strip() == checkpoint.step_name(stopped)
    assert validate(run / checkpoint.step_name(stopped))["step"] == stopped
    assert not temporaries(run)
    assert newest_valid_step(run) == stopped
    start_resume(run, tmp_path / "logs").ok()
    assert_same_run(run, references(precision))


# ---------------------------------------------------------------------------------------------------- 6. no argument


def test_resume_without_argument_takes_the_most_recently_updated_run(tmp_path, shards, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("a", "b"):  # b is written last
        train(load_config(None, run_config(shards, Path("outputs"), **{"logging.run_name": name,
                                                                       "training.max_steps": 4})))
    for name in ("a", "b"):
        code, _, err = cli("resume", f"outputs/{name}", "--training.max_steps", "8")  # now its `latest` is newest
        assert code == 0 and f"resuming from outputs/{name}/checkpoint-4" in err, err
        code, _, err = cli("resume")  # the saved config ends at 8: nothing left to run
        assert code == 0 and f"resuming from outputs/{name}/checkpoint-8" in err, err
    assert (tmp_path / "outputs/a/latest").read_text().strip() == "checkpoint-8"


def test_resume_without_argument_accepts_overrides(tmp_path, shards, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train(load_config(None, run_config(shards, Path("outputs"), **{"logging.run_name": "a",
                                                                   "training.max_steps": 4})))
    code, _, err = cli("resume", "--training.max_steps", "8")
    assert code == 0, err
    assert "resuming from outputs/a/checkpoint-4" in err
    assert (tmp_path / "outputs/a/latest").read_text().strip() == "checkpoint-8"


def test_resume_without_argument_and_no_runs_says_so(tmp_path, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = cli("resume")
    assert code == 1 and "no run to resume" in err


# ---------------------------------------------------------------------------------------------------- 7. contents


def test_every_file_loads_weights_only_and_is_listed_with_size_and_sha256(references):
    run = references("no")
    versions = {name: version(name) for name in ("torch", "accelerate", "numpy", "ditpipe")}
    ckpts = sorted(run.glob("checkpoint-*"))
    assert len(ckpts) == END // 4 + EPOCHS
    for ckpt in ckpts:
        state = json.loads((ckpt / checkpoint.STATE).read_text())
        on_disk = {p.name for p in ckpt.iterdir()} - {checkpoint.STATE}
        assert set(state["files"]) == on_disk and {"model.pt", "ema.pt", "optimizer.pt", "rng-rank0.pt",
                                                   "config.yaml", "manifest.json"} <= on_disk
        for name, rec in state["files"].items():
            data = (ckpt / name).read_bytes()
            assert rec == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}, f"{ckpt.name}/{name}"
        for pt in ckpt.glob("*.pt"):
            loaded = torch.load(pt, map_location="cpu", weights_only=True)  # raises on anything pickled
            assert isinstance(loaded, dict) and loaded, pt
        n = int(ckpt.name.rsplit("-", 1)[1])
        step = n * STEPS_PER_EPOCH if "epoch" in ckpt.name else n
        assert state["step"] == step and state["epoch"] == step // STEPS_PER_EPOCH
        assert state["samples_consumed"] == step * 16 and state["total_steps"] == END
        assert state["config_hash"] == validate_tree(yaml.safe_load((ckpt / "config.yaml").read_text())).hash()
        assert state["versions"] == versions and state["written_by"].startswith("ditpipe")
        assert validate(ckpt)["step"] == step
    model = torch.load(run / "checkpoint-48" / "model.pt", weights_only=True)
    assert "x_embedder.proj.weight" in model and "final_layer.linear.weight" in model  # the official layout


# ---------------------------------------------------------------------------------------------------- 8. disk space


def writers_for(tensor: torch.Tensor, fail: Exception | None = None) -> dict:
    """The files every checkpoint must hold (checkpoint.REQUIRED_FILES), `optimizer.pt` failing with `fail`."""
    def broken(path: Path) -> None:
        path.write_bytes(b"partial")
        raise fail

    return {"model.pt": lambda p: torch.save({"w": tensor}, p),
            "optimizer.pt": broken if fail is not None else lambda p: torch.save({"state": {}}, p),
            "rng-rank0.pt": lambda p: torch.save({"torch": torch.zeros(2)}, p),
            "config.yaml": lambda p: p.write_text("training:\n  use_ema: false\n")}


SAVED_STATE = {"written_by": "ditpipe test", "step": 4, "epoch": 0, "samples_consumed": 64, "total_steps": 8,
               "world_size": 1}


def test_low_space_and_enospc_keep_the_previous_checkpoint(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    state = SAVED_STATE
    checkpoint.save(run, "checkpoint-4", writers_for(torch.ones(3)), state)
    before = validate(run / "checkpoint-4")

    with pytest.raises(CheckpointError, match="previous checkpoints are intact") as info:
        checkpoint.save(run, "checkpoint-8", writers_for(torch.zeros(3)), {**state, "step": 8}, needed_bytes=1 << 60)
    assert "free" in str(info.value) and f"ditpipe resume {run}" in str(info.value)
    with pytest.raises(CheckpointError, match=r"is full \(OSError: .*No space left; [\d.]+ GiB free\).*previous "
                                              "checkpoints are intact"):
        checkpoint.save(run, "checkpoint-8", writers_for(torch.zeros(3), OSError(errno.ENOSPC, "No space left")),
                        {**state, "step": 8})
    # any other failure is one clear error too (never a traceback), and cleans up the same way
    with pytest.raises(CheckpointError, match=r"writing failed \(OSError: .*I/O error"):
        checkpoint.save(run, "checkpoint-8", writers_for(torch.zeros(3), OSError(errno.EIO, "I/O error")),
                        {**state, "step": 8})
    with pytest.raises(CheckpointError, match=r"writing failed \(RuntimeError: torch says no"):
        checkpoint.save(run, "checkpoint-8", writers_for(torch.zeros(3), RuntimeError("torch says no")),
                        {**state, "step": 8})
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-4", "latest"]
    assert validate(run / "checkpoint-4") == before
    assert (run / "latest").read_text().strip() == "checkpoint-4"
    assert checkpoint.find_resumable(run, warn=pytest.fail)[0].name == "checkpoint-4"


def test_a_full_disk_during_torch_save_keeps_the_previous_checkpoint(tmp_path):
    """A real full disk, as a file-size limit (RLIMIT_FSIZE): torch.save raises RuntimeError ("file write failed"),
    not OSError. The save reports the full disk with the free space, removes its temporary folder, and leaves the
    previous checkpoint and `latest` as they were."""
    run = tmp_path / "run"
    run.mkdir()
    checkpoint.save(run, "checkpoint-4", writers_for(torch.ones(3)), SAVED_STATE)  # a whole checkpoint first
    code = textwrap.dedent(f"""
        import resource, torch
        from pathlib import Path
        from ditpipe.pipeline import checkpoint
        run = Path({str(run)!r})
        state = {SAVED_STATE!r}
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))  # 1 MiB files at most; Python ignores SIGXFSZ
        try:
            checkpoint.save(run, "checkpoint-8", {{"model.pt": lambda p: torch.save({{"w": torch.ones(1 << 20)}}, p)}},
                            {{**state, "step": 8}})
        except checkpoint.CheckpointError as e:
            print("ERROR", e)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ERROR could not write checkpoint checkpoint-8" in proc.stdout, proc.stdout
    assert "is full (RuntimeError" in proc.stdout and "GiB free" in proc.stdout
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-4", "latest"]  # no .checkpoint-8.tmp left
    assert validate(run / "checkpoint-4")["step"] == 4 and (run / "latest").read_text().strip() == "checkpoint-4"


def test_same_name_save_keeps_a_valid_checkpoint_and_replaces_a_damaged_one(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    state = SAVED_STATE
    checkpoint.save(run, "checkpoint-4", writers_for(torch.ones(3)), state)
    sha = validate(run / "checkpoint-4")["files"]["model.pt"]["sha256"]
    checkpoint.save(run, "checkpoint-4", writers_for(torch.zeros(3)), state)  # valid: kept as it is
    assert validate(run / "checkpoint-4")["files"]["model.pt"]["sha256"] == sha
    flip_byte(run / "checkpoint-4" / "model.pt")
    checkpoint.save(run, "checkpoint-4", writers_for(torch.ones(3)), state)  # damaged: moved aside, written anew
    assert validate(run / "checkpoint-4")["files"]["model.pt"]["sha256"] == sha
    with pytest.raises(CheckpointError, match="damaged"):
        validate(run / "checkpoint-4.damaged")
    assert [p.name for _, _, p in checkpoint.list_checkpoints(run)] == ["checkpoint-4"]


def test_clean_temporaries_removes_only_our_hidden_folders(tmp_path):
    run = tmp_path / "run"
    for name in (".checkpoint-8.tmp", ".checkpoint-epoch-1.tmp", ".checkpoint-4.deleting.tmp"):
        (run / name).mkdir(parents=True)
        (run / name / "model.pt").write_bytes(b"half")
    (run / "keep.tmp").mkdir()
    (run / ".other.tmp").mkdir()
    checkpoint.clean_temporaries(run)
    assert sorted(p.name for p in run.iterdir()) == [".other.tmp", "keep.tmp"]


# ---------------------------------------------------------------------------------------------------- 9. issue 15


def test_symlinked_checkpoints_are_never_pruned_and_still_resume(tmp_path, shards, cli):
    run = train(load_config(None, run_config(shards, tmp_path / "outputs", **{
        "logging.run_name": "ln", "training.max_steps": 8, "checkpointing.every_epoch": False})))
    storage = tmp_path / "storage"  # checkpoints moved to other storage and linked back
    storage.mkdir()
    for name in ("checkpoint-4", "checkpoint-8"):
        shutil.move(run / name, storage / name)
        (run / name).symlink_to(storage / name)
    stored = {p.name: sorted(q.name for q in p.iterdir()) for p in storage.iterdir()}
    assert checkpoint.prune(run, 1, 1) == []  # links are neither followed, deleted nor counted
    (run / "checkpoint-99").symlink_to(tmp_path / "unmounted" / "checkpoint-99")  # storage that is gone
    warnings = []
    assert checkpoint.find_resumable(run, warnings.append)[0] == run / "checkpoint-8"  # through the link
    assert len(warnings) == 1 and "checkpoint-99' is a link to" in warnings[0] and "does not exist" in warnings[0]
    # the resumed run prunes after every save (total_limit 1): its own checkpoints go, the links stay
    code, _, err = cli("resume", run, "--training.max_steps", "16", "--checkpointing.total_limit", "1")
    assert code == 0, err
    assert names(run) == {"checkpoint-4", "checkpoint-8", "checkpoint-99", "checkpoint-16"}
    assert all((run / n).is_symlink() for n in ("checkpoint-4", "checkpoint-8", "checkpoint-99"))
    assert {p.name: sorted(q.name for q in p.iterdir()) for p in storage.iterdir()} == stored
    validate(run / "checkpoint-8")


def canonical_sha256(manifest: dict) -> str:
    """The shard manifest's sha256 as checkpoints record it: its content sections, canonical JSON."""
    body = {k: manifest[k] for k in checkpoint.SHARD_KEYS if k in manifest}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
                          ).hexdigest()


def test_resume_refuses_other_shards_naming_what_changed(tmp_path, shards, cli):
    own = tmp_path / "shards"
    shutil.copytree(shards, own)
    run = train(load_config(None, run_config(own, tmp_path / "outputs", **{"logging.run_name": "sh",
                                                                           "training.max_steps": 8})))
    manifest = json.loads((own / "manifest.json").read_text())
    for name in ("checkpoint-4", "checkpoint-8"):
        assert validate(run / name)["shards"]["manifest_sha256"] == canonical_sha256(manifest)
    # the same dataset, image size and codec (what resume compared until now), other samples
    encode(load_config(None, {"data.dataset_name": "shapes", "data.image_size": 16, "data.num_samples": 192,
                              "data.seed": 1, "vae.name": "pixel", "data.num_workers": 0,
                              "shards.samples_per_shard": 100, "shards.path": str(own)}), overwrite=True)
    code, _, err = cli("resume", run, "--training.max_steps", "12")
    err = " ".join(err.split())
    assert code == 1 and "was trained on other shards" in err, err
    assert "num_samples 256 in the checkpoint, 192 now" in err and "shards (the shard files' sha256)" in err
    assert "source" in err and not (run / "checkpoint-12").exists()
    # the same shards, copied elsewhere and re-verified, are the same shards
    shutil.rmtree(own)
    shutil.copytree(shards, own)
    code, _, err = cli("resume", run, "--training.max_steps", "12")
    assert code == 0 and "written before" not in err, err
    # a checkpoint from before the shards were recorded resumes, and says it could not check them
    state_file = run / "checkpoint-12" / checkpoint.STATE
    state = json.loads(state_file.read_text())
    del state["shards"]
    state_file.write_text(json.dumps(state))
    code, _, err = cli("resume", run, "--training.max_steps", "16")
    assert code == 0 and "written before checkpoints recorded their shards" in " ".join(err.split()), err


def test_validate_requires_the_files_and_keys_every_checkpoint_holds(short_run, tmp_path):
    ckpt = short_run / "checkpoint-8"
    validate(ckpt)
    for drop in ("model.pt", "optimizer.pt", "rng-rank0.pt", "ema.pt", "config.yaml", "step", "world_size", "files"):
        copy = tmp_path / f"without-{drop}"
        shutil.copytree(ckpt, copy)
        state = json.loads((copy / checkpoint.STATE).read_text())
        if drop in state["files"]:  # gone from the list and the folder, as a mixed or hand-made checkpoint may be
            del state["files"][drop]
            (copy / drop).unlink()
        else:
            del state[drop]
        (copy / checkpoint.STATE).write_text(json.dumps(state))
        with pytest.raises(CheckpointError, match=f"{drop.replace('.', '[.]')}"):
            validate(copy)
    copy = tmp_path / "escape"
    shutil.copytree(ckpt, copy)
    state = json.loads((copy / checkpoint.STATE).read_text())
    state["files"]["../escape/model.pt"] = state["files"]["model.pt"]
    (copy / checkpoint.STATE).write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match="not a file name in the checkpoint"):
        validate(copy)
    # without an EMA in the saved config, ema.pt is not required
    copy = tmp_path / "no-ema"
    shutil.copytree(ckpt, copy)
    config = yaml.safe_load((copy / "config.yaml").read_text())
    config["training"]["use_ema"] = False
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    (copy / "ema.pt").unlink()
    state = json.loads((copy / checkpoint.STATE).read_text())
    del state["files"]["ema.pt"]
    (copy / checkpoint.STATE).write_text(json.dumps(state))
    resign(copy)
    assert validate(copy)["step"] == 8
