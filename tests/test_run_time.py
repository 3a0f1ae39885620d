"""A run's threads and time (issue 26, items 1, 2 and 8): `training.threads` and OMP_NUM_THREADS set torch's threads,
on a CPU the default leaves busy cores alone, and no thread count changes a result; the preflight estimates the
run's time before its first step (within a factor of 2 of a short CPU run), the log lines and the bar say the time
left, and a CPU run of hours is warned about, naming the small recipe; an epoch's end on a step checkpoint is one
copy on disk."""

import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from PIL import Image
from rich.console import Console

from ditpipe.pipeline import threads
from ditpipe.pipeline.checkpoint import validate
from ditpipe.pipeline.config import load_config
from ditpipe.pipeline.estimate import duration
from ditpipe.stages.encode import encode
from ditpipe.stages.train import train

from tiny import TINY_MODEL, tiny_dit

TINY = {**TINY_MODEL,
        "data.num_workers": 0, "training.mixed_precision": "no", "lr_scheduler.warmup_steps": 0,
        "training.learning_rate": 1e-3, "logging.steps": 4, "logging.tensorboard": False,
        "checkpointing.steps": 1000, "training.batch_size": 16, "training.gradient_accumulation_steps": 1,
        "training.num_epochs": 1, "data.dataset_name": "shapes", "data.image_size": 16, "data.num_samples": 128,
        "vae.name": "pixel"}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("px") / "shards"
    encode(load_config(None, {**{k: v for k, v in TINY.items() if k.startswith(("data.", "vae."))},
                              "shards.samples_per_shard": 64, "shards.path": str(folder)}))
    return folder


def run(tmp_path, shards, name, **over):
    """train() in this process; (run folder, everything it printed)."""
    console = Console(record=True, width=400, force_terminal=False)
    cfg = load_config(None, {**TINY, "shards.path": str(shards), "logging.output_dir": str(tmp_path / "outputs"),
                             "logging.run_name": name, **over})
    folder = train(cfg, console=console)
    return folder, console.export_text()


# ---------------------------------------------------------------------------------------------------- 1. threads


def test_training_threads_sets_torchs_threads_and_the_preflight_says_so(tmp_path, shards, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    before = torch.get_num_threads()
    try:
        _, out = run(tmp_path, shards, "key", **{"training.threads": 1, "training.max_steps": 2})
        assert torch.get_num_threads() == 1  # the key wins over the environment
        assert re.search(r"threads\s+│?\s*1 per process \(training\.threads\)", out), out
        _, out = run(tmp_path, shards, "env", **{"training.max_steps": 2})
        assert torch.get_num_threads() == 2 and "2 per process (OMP_NUM_THREADS)" in out
    finally:
        torch.set_num_threads(before)


def test_on_a_cpu_the_default_leaves_the_cores_other_processes_keep_busy():
    """With every core this process may use kept busy by other processes, the default is 1 thread (torch's own
    default, one per core, is what made a busy machine's quickstart 27× slower); shared by two processes of this
    machine, still at least 1 each; the environment and the key win over it."""
    cores = len(os.sched_getaffinity(0))
    spin = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores + 1)]
    try:
        time.sleep(1.0)
        chosen = threads.choose(None, "cpu", 1, env={})
        assert chosen.count <= max(1, cores // 2), chosen  # the spinners hold the cores: few threads, not `cores`
        assert "busy with other work" in chosen.why
        assert threads.choose(None, "cpu", 2, env={}).count >= 1
    finally:
        for p in spin:
            p.kill()
            p.wait()
    assert threads.choose(None, "cpu", 1, env={"OMP_NUM_THREADS": "3"}) == threads.Threads(3, "OMP_NUM_THREADS")
    assert threads.choose(4, "cpu", 1, env={"OMP_NUM_THREADS": "3"}) == threads.Threads(4, "training.threads")
    assert threads.choose(None, "cpu", 1, env={"OMP_NUM_THREADS": "junk"}).why != "OMP_NUM_THREADS"


def test_the_thread_count_changes_no_result(tmp_path, shards):
    """Threads are chosen afresh at every start (from the load), so a resume may run with another count: it must
    not change the weights, or resume would not be bitwise."""
    before = torch.get_num_threads()
    try:
        a, _ = run(tmp_path, shards, "one", **{"training.threads": 1, "model.hidden_size": 64, "model.depth": 2,
                                               "model.num_heads": 4})
        b, _ = run(tmp_path, shards, "two", **{"training.threads": 2, "model.hidden_size": 64, "model.depth": 2,
                                               "model.num_heads": 4})
    finally:
        torch.set_num_threads(before)
    for name in ("model.pt", "ema.pt", "optimizer.pt"):
        x = torch.load(a / "checkpoint-8" / name, weights_only=True)
        y = torch.load(b / "checkpoint-8" / name, weights_only=True)
        flat = lambda d: {k: v for k, v in d.items()} if "state" not in d else {  # noqa: E731
            f"{i}.{k}": v for i, s in d["state"].items() for k, v in s.items()}
        assert all(torch.equal(flat(x)[k], flat(y)[k]) for k in flat(x)), name


def test_threads_may_change_on_resume():
    from ditpipe.pipeline.config import RESUMABLE_CHANGES

    assert "training.threads" in RESUMABLE_CHANGES


# ---------------------------------------------------------------------------------------------------- 2. time


def _estimate(out: str) -> float:
    """The preflight's estimate in seconds: its `(S s a step, …)` times the steps it names."""
    m = re.search(r"about .+? for ([\d,]+) steps \(([\d.e+-]+) s a step", out)
    assert m, out
    return int(m.group(1).replace(",", "")) * float(m.group(2))


def test_the_preflight_estimate_is_within_a_factor_of_2_and_the_log_lines_say_the_time_left(tmp_path, shards):
    """A short CPU run of a model whose compute is not negligible: the estimate (timed before the first step)
    against the run's own time, from the first step to the last (its closing line's seconds include the final
    checkpoint)."""
    over = {"training.threads": 1, "model.hidden_size": 64, "model.depth": 2, "model.num_heads": 4,
            "model.name": "DiT-S/2", "training.num_epochs": 4, "training.batch_size": 8}  # 64 steps
    folder, out = run(tmp_path, shards, "time", **over)
    estimate = _estimate(out)
    actual = float(re.search(r"done: [\d,]+ steps, final loss [\d.]+, ([\d.]+) s", out).group(1))
    assert 0.5 <= estimate / actual <= 2.0, (estimate, actual, out)
    lefts = re.findall(r"Step (\d+), Loss: [\d.]+, LR: [\d.e+-]+, (.+?) left", out)
    assert [int(s) for s, _ in lefts] == list(range(4, 64, 4)), out  # every log line but the last
    assert all(re.fullmatch(r"\d+ s|\d+ min \d+ s", left) for _, left in lefts), lefts
    assert re.search(r"Step 64, Loss: [\d.]+, LR: [\d.e+-]+$", out, re.M), out  # nothing left to say at the end


def test_duration_reads_as_a_person_plans():
    assert [duration(s) for s in (0.4, 38, 250, 7980, 183600)] == ["0 s", "38 s", "4 min 10 s", "2 h 13 min",
                                                                    "2 d 3 h"]


def test_a_cpu_run_of_hours_is_warned_about_before_its_first_step_and_names_the_small_recipe(tmp_path, shards):
    """Ten million epochs of a tiny model: days on this CPU. The warning comes before the first step; Ctrl-C then
    stops the run as usual."""
    photos = tmp_path / "my photos"  # the user's own folder: two classes of PNGs
    for i in range(32):
        (photos / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 16), (i * 8, 255 - i * 8, 128 * (i % 2))).save(photos / f"class{i % 2}" / f"{i}.png")
    own = {**TINY, "data.dataset_name": "custom", "data.dataset_path": str(photos), "data.num_samples": None}
    encode(load_config(None, {**{k: v for k, v in own.items() if k.startswith(("data.", "vae."))},
                              "shards.path": str(tmp_path / "own")}))
    cmd = [sys.executable, "-m", "ditpipe.stages.cli", "train", "--shards.path", str(tmp_path / "own"),
           "--logging.output_dir", str(tmp_path / "outputs"), "--logging.run_name", "long",
           *[a for k, v in own.items() for a in (f"--{k}", "null" if v is None else str(v))],
           "--training.num_epochs", "10000000"]
    env = {**os.environ, "COLUMNS": "300", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    seen, deadline = [], threading.Timer(180, proc.kill)  # a run that never warns must not hang the suite
    deadline.start()
    try:
        for line in proc.stderr:
            seen.append(line)
            if "warning:" in line and "on this CPU" in line:
                break
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=120)
    finally:
        proc.kill()
        deadline.cancel()
    out = "".join(seen)
    warning = [ln for ln in seen if "on this CPU" in ln]
    assert warning, out
    assert re.search(r"would take about \d+ (d \d+ h|h \d+ min) on this CPU", warning[0]), warning[0]
    assert (f"ditpipe encode --config cpu --dataset custom --data-path '{photos}' then ditpipe train --config cpu "
            f"--data.dataset_name custom --data.dataset_path '{photos}'") in warning[0]
    assert not re.search(r"^Step \d+", out, re.M)  # before the first step was logged


# ---------------------------------------------------------------------------------------------------- 8. one copy


def test_an_epoch_end_on_a_step_checkpoint_is_one_copy_on_disk(tmp_path, shards):
    folder, _ = run(tmp_path, shards, "links", **{"training.num_epochs": 2, "checkpointing.steps": 8,
                                                  "checkpointing.every_epoch": True})  # 8 steps an epoch
    assert (folder / "latest").read_text().strip() == "checkpoint-16"  # the step checkpoint is `latest`
    for step, epoch in ((8, 1), (16, 2)):
        a, b = folder / f"checkpoint-{step}", folder / f"checkpoint-epoch-{epoch}"
        assert validate(a)["step"] == validate(b)["step"] == step
        assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
        for f in a.iterdir():  # the same bytes, stored once
            assert f.stat().st_ino == (b / f.name).stat().st_ino, f
    # each name stands alone: removing one leaves the other whole
    import shutil

    shutil.rmtree(folder / "checkpoint-8")
    validate(folder / "checkpoint-epoch-1")


def probe_leaves_no_trace(precision: str) -> float:
    """Two identical steps on the Accelerator's device (CPU here, CUDA in test_cuda.py); the preflight's probe runs
    on one: afterwards every RNG, the weights and the gradients (none) are as they were, and one real step on each
    gives bitwise the same weights. Returns the probe's seconds."""
    from conftest import reset_accelerate
    from ditpipe.pipeline.device import make_accelerator
    from ditpipe.pipeline.diffusion import make_objective
    from ditpipe.pipeline.estimate import step_seconds
    from ditpipe.pipeline.latent_norm import LatentNorm
    from ditpipe.pipeline.order import Plan
    from ditpipe.pipeline.step import Micro, build_step

    cfg = load_config(None, {**TINY, "training.mixed_precision": precision, "training.gradient_accumulation_steps": 2})
    steps = []
    for _ in range(2):
        reset_accelerate()
        acc, _, _ = make_accelerator(precision)
        torch.manual_seed(0)
        model = tiny_dit("DiT-S/2", input_size=16, in_channels=3, num_classes=8, class_dropout_prob=0.1)
        steps.append(build_step(acc, model, make_objective("ddpm", True), Plan(64, 8, 2, 1), (3, 16, 16),
                                norm=LatentNorm("scale", (0.0,) * 3, (1.0,) * 3), posterior=False,
                                training=cfg.training, drop_prob=0.1, conditional=True, compile=False, rank=0))
    device = steps[0].acc.device
    g = torch.Generator(device=device).manual_seed(0)
    micro = Micro(torch.randn((8, 3, 16, 16), generator=g, device=device), None,
                  torch.randint(0, 8, (8,), generator=g, device=device))
    probed, plain = steps
    weights = {k: v.clone() for k, v in probed.raw.state_dict().items()}
    rngs = torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
    seconds = step_seconds(probed.raw, probed.objective, micro, probed.norm, True, 2, probed.acc.autocast, device)
    assert seconds > 0
    assert torch.equal(torch.get_rng_state(), rngs[0])  # label dropout drew under a forked RNG
    if device.type == "cuda":
        assert torch.equal(torch.cuda.get_rng_state(device), rngs[1])
    assert all(p.grad is None for p in probed.raw.parameters())
    assert all(torch.equal(weights[k], v) for k, v in probed.raw.state_dict().items())
    for step in (probed, plain):
        step(0, 1e-3, lambda: micro)
    a, b = probed.raw.state_dict(), plain.raw.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    return seconds


def test_the_preflights_probe_changes_nothing_of_the_run():
    probe_leaves_no_trace("no")
