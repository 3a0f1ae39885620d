"""A run's life after its first `train`: finished runs, extending them (with and without a restretched LR
schedule), the keys a resume may change, and what the preflight and progress bar say along the way."""

import json
import shlex
import shutil

import pytest

from ditpipe.pipeline import checkpoint
from ditpipe.pipeline.config import load_config
from ditpipe.pipeline.metrics import read_metrics
from ditpipe.pipeline.schedule import lr_at, restretched_length, schedule_warnings
from ditpipe.stages.encode import encode

from tiny import TINY_MODEL

SPE = 8  # steps per epoch: 128 samples / batch 16


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lifecycle") / "shards"
    encode(load_config(None, {"data.dataset_name": "shapes", "data.image_size": 16, "data.num_samples": 128,
                              "vae.name": "pixel", "data.num_workers": 0, "shards.path": str(folder)}))
    return folder


def args(shards, outputs, name, **over) -> list[str]:
    """`train` arguments for a 1-block DiT on the shards: 2 epochs of 8 steps, a checkpoint every 4."""
    cfg = {"data.dataset_name": "shapes", "data.image_size": 16, "data.num_samples": 128, "vae.name": "pixel",
           "shards.path": str(shards), **TINY_MODEL,
           "data.num_workers": 0, "training.mixed_precision": "no", "training.batch_size": 16,
           "training.gradient_accumulation_steps": 1, "training.num_epochs": 2, "training.learning_rate": 1e-3,
           "lr_scheduler.warmup_steps": 2, "logging.steps": 1, "logging.tensorboard": False,
           "checkpointing.steps": 4, "logging.output_dir": str(outputs), "logging.run_name": name, **over}
    return ["train", *[a for k, v in cfg.items() for a in (f"--{k}", json.dumps(v) if v is None else str(v))]]


def lrs(run) -> dict[int, float]:
    return {m["step"]: m["lr"] for m in read_metrics(run) if "lr" in m}


def test_a_finished_run_says_so_and_the_printed_extension_restretches_its_schedule(shards, tmp_path, cli):
    outputs = tmp_path / "outputs"
    code, _, err = cli(*args(shards, outputs, "done", **{"training.num_epochs": 3}))
    assert code == 0, err
    run, end = outputs / "done", 3 * SPE  # a cosine this long ends below 1 % of its peak
    # train ends with the next command, on one line at 80 columns, runnable as printed
    lines = err.splitlines()
    assert any(line.startswith(f"final model: {run}/checkpoint-{end}/model.pt") and "metrics.jsonl" in line
               for line in lines)
    sample_cmd = next(line for line in lines if line.startswith("next: ditpipe sample"))[len("next: "):]
    code, _, sample_err = cli(*shlex.split(sample_cmd)[1:], "--num", "2", "--steps", "2")
    assert code == 0, sample_err
    assert (run / "grid.png").is_file()

    shutil.copytree(run, tmp_path / "plain")  # the same finished run, to extend without restretching
    code, _, err = cli("resume", run)  # nothing left to run: no "0 to run … final loss nan"
    assert code == 0, err
    assert "finished" in err and f"at step {end}" in err and "nan" not in err and "0 to run" not in err
    assert (run / "latest").read_text().strip() == f"checkpoint-{end}"
    extend = next(line.strip() for line in err.splitlines() if line.strip().startswith("ditpipe resume"))
    assert shlex.split(extend)[1:] == ["resume", str(run), "--training.num_epochs", "6", "--restretch-schedule"]

    code, _, err = cli(*shlex.split(extend)[1:])
    assert code == 0, err
    assert f"restretched from {end}" in err and "near zero" not in err.lower()
    new_total = 6 * SPE
    state = checkpoint.validate(run / f"checkpoint-{new_total}")
    assert state["total_steps"] == new_total and state["restretched_at"] == [end]
    got = lrs(run)
    for s in range(end, new_total):  # metrics log the LR of step s at s + 1
        assert got[s + 1] == pytest.approx(lr_at(s, 1e-3, "cosine", 2, new_total)), s
    assert got[end + 1] > 20 * got[end]  # from the old schedule's near-zero end back to a useful LR

    plain = tmp_path / "plain"  # without the flag: the extra steps run at the final LR, and the preflight says so
    code, _, err = cli("resume", plain, "--training.num_epochs", "4")
    assert code == 0, err
    flat = " ".join(err.split())
    assert f"warning: LR near zero: at step {end}" in flat and "--restretch-schedule" in flat
    assert checkpoint.validate(plain / f"checkpoint-{4 * SPE}")["total_steps"] == end


def test_a_restretched_run_resumes_on_the_same_schedule_bitwise(shards, tmp_path, cli):
    outputs = tmp_path / "outputs"
    for name in ("whole", "parts"):
        assert cli(*args(shards, outputs, name))[0] == 0
    code, _, err = cli("resume", outputs / "whole", "--training.num_epochs", "4", "--restretch-schedule")
    assert code == 0, err
    # the same extension, stopped half-way, then resumed without the flag: the checkpoint carries the schedule
    code, _, err = cli("resume", outputs / "parts", "--training.num_epochs", "4", "--restretch-schedule",
                       "--training.max_steps", "24")
    assert code == 0, err
    code, _, err = cli("resume", outputs / "parts", "--training.num_epochs", "4", "--training.max_steps", "null")
    assert code == 0, err
    assert "near zero" not in err.lower()
    a, b = (checkpoint.validate(outputs / n / "checkpoint-32") for n in ("whole", "parts"))
    assert a["restretched_at"] == b["restretched_at"] == [16] and a["total_steps"] == b["total_steps"] == 32
    for f in ("model.pt", "ema.pt", "optimizer.pt"):
        assert a["files"][f]["sha256"] == b["files"][f]["sha256"], f
    assert lrs(outputs / "whole") == lrs(outputs / "parts")


def test_restretch_needs_steps_to_stretch_over(shards, tmp_path, cli):
    outputs = tmp_path / "outputs"
    assert cli(*args(shards, outputs, "r", **{"training.max_steps": 8}))[0] == 0
    code, _, err = cli("resume", outputs / "r", "--training.num_epochs", "1", "--restretch-schedule")
    assert code == 2 and "nothing to restretch over" in err
    code, _, err = cli(*args(shards, outputs, "new"), "--restretch-schedule")
    assert code == 1 and "--resume" in err
    with pytest.raises(ValueError):
        restretched_length(16, 16)
    assert restretched_length(16, 40) == 40


def test_keys_that_cannot_change_the_weights_may_change_on_resume(shards, tmp_path, cli):
    outputs = tmp_path / "outputs"
    assert cli(*args(shards, outputs, "ref"))[0] == 0
    assert cli(*args(shards, outputs, "cut", **{"training.max_steps": 8}))[0] == 0
    code, _, err = cli("resume", outputs / "cut", "--training.max_steps", "null", "--data.num_workers", "2",
                       "--vae.batch_size", "7", "--text.batch_size", "3", "--targets.batch_size", "5",
                       "--training.max_nonfinite_steps", "4",
                       "--data.download_url", "http://127.0.0.1:9", "--logging.steps", "3")
    assert code == 0, err
    a, b = (checkpoint.validate(outputs / n / "checkpoint-16") for n in ("ref", "cut"))
    for f in ("model.pt", "ema.pt", "optimizer.pt"):
        assert a["files"][f]["sha256"] == b["files"][f]["sha256"], f
    code, _, err = cli("resume", outputs / "cut", "--training.seed", "3", "--shards.flip", "false")
    assert code == 2 and "training.seed: was 0 in the run, now 3" in err and "shards.flip" in err
    flat = " ".join(err.split())
    assert ("only training.num_epochs, training.max_steps, training.max_nonfinite_steps, training.recover*, training.threads, "
            "training.batch_size, training.gradient_accumulation_steps, data.num_workers, data.download*, storage.*, "
            "vae.batch_size, text.batch_size, targets.batch_size, logging.*, checkpointing.* and validation.* may "
            "change on resume") in flat


def test_preflight_warns_before_a_run_goes_wrong(shards, tmp_path, cli):
    outputs = tmp_path / "outputs"
    short = {"training.batch_size": 64, "training.num_epochs": 12}  # 2 steps an epoch, 24 in all
    code, _, err = cli(*args(shards, outputs, "noisy", **short, **{"lr_scheduler.warmup_steps": 5}),
                       "--training.max_steps", "1")
    assert code == 0, err
    flat = " ".join(err.split())
    assert "warning: lr_scheduler.warmup_steps 5 is 21% of the schedule's 24 steps" in flat
    assert "warning: the cosine schedule falls from 1.00e-03 to" in flat
    assert "warning: this run keeps" not in flat  # max_steps 1: one checkpoint
    # a checkpoint every 2 steps and at every epoch's end, all kept
    code, _, err = cli(*args(shards, outputs, "many", **short, **{"checkpointing.steps": 2,
                                                                  "checkpointing.keep_epochs": None}))
    assert code == 0, err
    flat = " ".join(err.split())
    assert "warning: this run keeps 24 checkpoint folders (12 per-epoch, 12 per-step)" in flat
    assert "warmup_steps" not in flat  # 2 of 24 steps
    code, _, err = cli(*args(shards, outputs, "few", **short))
    assert code == 0 and "checkpoint folders" not in err  # keep_epochs 3 by default, a checkpoint every 4 steps
    assert sorted(p.name for p in (outputs / "few").glob("checkpoint-epoch-*")) == [
        "checkpoint-epoch-10", "checkpoint-epoch-11", "checkpoint-epoch-12"]
    assert schedule_warnings(1e-3, "cosine", 100, 10_000, 0, 10_000) == []  # a sensible schedule: silence


def test_the_progress_bar_shows_dashes_until_the_first_log_step():
    from rich.console import Console

    from ditpipe.stages.train import _epoch_task, _progress

    bar = _progress(Console(file=open("/dev/null", "w")), True)
    task = _epoch_task(bar, 0, 1, 10, 0)
    column = bar.columns[-1]
    assert str(column.render(bar.tasks[0])) == "loss=– – img/s"
    bar.update(task, loss=0.1234, ips=1440.4)
    assert str(column.render(bar.tasks[0])) == "loss=0.1234 1,440 img/s"
