"""`ditpipe runs` and `ditpipe inspect` of runs and checkpoints: states, steps, losses, validity, `latest`."""

import json
import shutil
import signal
import subprocess
import sys

import pytest

from conftest import train_tiny
from ditpipe.pipeline import lock
from ditpipe.stages.runs import LOCK, lock_holder, run_info

# Holds a run's lock through the real pipeline/lock.py, as `ditpipe train` does, until killed.
HOLDER = [sys.executable, "-c", "import sys, time; from ditpipe.pipeline import lock\n"
          "with lock.hold(sys.argv[1], 'train'):\n    print('locked', flush=True); time.sleep(600)"]


def hold(run) -> subprocess.Popen:
    proc = subprocess.Popen([*HOLDER, str(run)], stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"locked"
    return proc


def kill_9(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """One finished run (16 steps, checkpoints every 4) and copies of it in other states."""
    tmp = tmp_path_factory.mktemp("runs")
    done = train_tiny(tmp, 64, **{"training.num_epochs": 4, "checkpointing.steps": 4, "logging.steps": 2,
                                  "logging.run_name": "done"})
    out = done.parent
    stopped = out / "stopped"  # as a run interrupted after step 8 leaves its folder (and lock.py its lock file)
    shutil.copytree(done, stopped)
    for name in ("checkpoint-12", "checkpoint-16", "checkpoint-epoch-4", "checkpoint-epoch-3"):
        shutil.rmtree(stopped / name)
    (stopped / "latest").write_text("checkpoint-8\n")
    kill_9(hold(stopped))  # a train killed with -9 leaves its lock file, held by nobody
    old = out / "old"  # the same, from before runs were locked and recorded their end: no lock file, no record
    shutil.copytree(stopped, old)
    (old / LOCK).unlink()
    (old / lock.END).unlink(missing_ok=True)
    return out


def test_runs_lists_each_run_with_state_step_loss_and_age(outputs, cli):
    code, out, err = cli("runs", outputs, "--json")
    assert code == 0, err
    rows = {r["path"].rsplit("/", 1)[1]: r for r in json.loads(out)}
    assert {k: (r["state"], r["step"], r["end_step"], r["latest"]) for k, r in rows.items()} == {
        "done": ("finished", 16, 16, "checkpoint-16"), "stopped": ("killed", 16, 16, "checkpoint-8"),
        "old": ("unknown", 16, 16, "checkpoint-8")}
    logged = [json.loads(x) for x in (outputs / "done" / "metrics.jsonl").read_text().splitlines()]
    assert rows["done"]["loss"] == pytest.approx([x["loss"] for x in logged if "loss" in x][-1])
    assert all(r["age_s"] >= 0 for r in rows.values())
    code, out, _ = cli("runs", outputs)
    assert code == 0 and "finished" in out and "killed" in out and "16/16" in out
    code, _, err = cli("runs", outputs / "nowhere")
    assert code == 1 and "does not exist" in err


def test_a_held_lock_is_a_running_run_with_its_pid(outputs, cli):
    """Issue 25, H22: the real lock (a JSON record), held by a live process, shows as running with that pid."""
    run = outputs / "stopped"
    assert lock_holder(run) == (False, None) and lock_holder(outputs / "old") == (None, None)
    holder = hold(run)
    try:
        info = run_info(run)
        assert (info.state, info.pid) == ("running", holder.pid)
        code, out, err = cli("runs", outputs, "--json")
        row = next(r for r in json.loads(out) if r["path"] == str(run))
        assert code == 0 and (row["state"], row["pid"]) == ("running", holder.pid), err
        code, out, err = cli("runs", outputs)  # the table: "running (pid N)", folded in a narrow column
        assert code == 0 and "(pid" in out and str(holder.pid) in out, out + err
        code, out, err = cli("inspect", run)
        assert code == 0 and f"running (pid {holder.pid})" in out, out + err
    finally:
        kill_9(holder)
    assert run_info(run).state == "killed" and lock_holder(run) == (False, None)
    assert not (outputs / "old" / LOCK).exists()  # asking never creates a lock file


def test_inspect_recognises_a_run_a_checkpoint_and_a_shard_folder(outputs, tmp_path, cli):
    run = tmp_path / "damaged"
    shutil.copytree(outputs / "done", run)
    ema = run / "checkpoint-12" / "ema.pt"
    data = bytearray(ema.read_bytes())
    data[100] ^= 0xFF
    ema.write_bytes(bytes(data))
    code, out, err = cli("inspect", run, "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["state"] == "finished" and info["latest"] == "checkpoint-16"
    ckpts = {c["name"]: c for c in info["checkpoints"]}
    assert set(ckpts) == {"checkpoint-4", "checkpoint-8", "checkpoint-12", "checkpoint-16", "checkpoint-epoch-2",
                          "checkpoint-epoch-3", "checkpoint-epoch-4"}  # epoch 1 pruned: keep_epochs 3
    assert ckpts["checkpoint-12"]["valid"] is False and "damaged" in ckpts["checkpoint-12"]["problem"]
    assert ckpts["checkpoint-8"] == {**ckpts["checkpoint-8"], "step": 8, "epoch": 2, "ema": True, "valid": True}
    assert ckpts["checkpoint-8"]["loss"] is not None
    code, out, _ = cli("inspect", run)
    assert code == 0 and "finished" in out and "checkpoint-epoch-2" in out and "←" in out
    code, out, err = cli("inspect", outputs / "done" / "checkpoint-8")
    assert code == 0, err
    flat = " ".join(out.split())
    assert "every file's size and sha256 match" in flat and "DiT-S/4" in flat and "8 classes: red_circle" in flat
    assert "pixel" in flat and "8 of the schedule's 16" in flat
    code, out, _ = cli("inspect", outputs / "done" / "checkpoint-8", "--json")
    assert code == 0 and json.loads(out)["state"]["step"] == 8
    code, out, _ = cli("inspect", outputs.parent / "shards")
    assert code == 0 and "pixel" in out and "8 classes" in out  # a shard folder, as before
    code, _, err = cli("inspect", tmp_path / "nowhere")
    assert code == 1 and "not a shard folder, a run or a checkpoint" in err and "does not exist" in err
