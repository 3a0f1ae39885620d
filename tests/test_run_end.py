"""How a run ended (issue 26, item 5): the holder of a run folder's lock records it (`<run>/ended.json`,
pipeline/lock.py), and `ditpipe runs` / `inspect` show it: finished, stopped (a signal), failed (with its message's
first line), killed (the lock file left by a holder that recorded nothing: kill -9), unknown (no record, or one that
does not read). In-process through the real lock, then end to end: real `ditpipe train` subprocesses stopped with
SIGINT, failed, killed with -9 and resumed to their end."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ditpipe.pipeline import atomic, lock
from ditpipe.pipeline.errors import DitpipeError
from ditpipe.stages.runs import run_info
from test_resume import CLI, END as END_STEP, env, last_step, start_resume, start_train

END = "ended.json"  # spelled out: the name is what other tools (and the listings that skip it) see


class Stopped(DitpipeError):
    """What stages/train.py raises after a signal's checkpoint (its _Stopped): exit code 130."""

    exit_code = 130


def write_run(run: Path, steps: int) -> None:
    """What a training writes before it can end: its config and a log line per step (enough for `runs`)."""
    (run / "config.yaml").write_text("training: {}\n")
    with open(run / "metrics.jsonl", "a") as f:
        for s in range(1, steps + 1):
            f.write(json.dumps({"step": s, "loss": 1.0 / s}) + "\n")


def under_run_lock(verb: str):
    """The decorator `train()` carries, applied at each call (so that this file collects with any lock.py)."""

    def wrap(fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            return lock.holding(lambda run, **_: (run, verb), records_end=True)(fn)(*args, **kwargs)

        return call

    return wrap


@under_run_lock("train")
def trains(run: Path, steps: int, error: BaseException | None = None) -> Path:
    """A stand-in for `train()`, under the same decorator: writes `steps` log lines, then returns or raises."""
    write_run(run, steps)
    if error is not None:
        raise error
    return run


@under_run_lock("resume")
def refused(run: Path) -> None:
    """A resume refused at set-up, before it wrote anything."""
    raise DitpipeError("training.learning_rate changed since the checkpoint")


def state(run: Path) -> tuple[str, str]:
    info = run_info(run)
    return info.state, info.message


def test_each_ending_is_recorded_and_listed(tmp_path, cli):
    out = tmp_path / "outputs"
    trains(out / "done", 4)
    with pytest.raises(Stopped):
        trains(out / "stopped", 3, Stopped("stopped by signal after step 3; checkpoint written. Continue with "
                                           "`ditpipe resume outputs/stopped`"))
    with pytest.raises(KeyboardInterrupt):
        trains(out / "interrupted", 2, KeyboardInterrupt())
    with pytest.raises(DitpipeError):
        trains(out / "nan", 5, DitpipeError("10 non-finite losses in a row by step 5; stopping. Lower the LR\n"
                                            "a second line that is not kept"))
    with pytest.raises(RuntimeError):
        trains(out / "bug", 1, RuntimeError("x" * 5000))
    assert state(out / "done") == ("finished", "")
    assert state(out / "stopped") == ("stopped", "stopped by signal after step 3; checkpoint written. Continue with "
                                                 "`ditpipe resume outputs/stopped`")
    assert state(out / "interrupted") == ("stopped", "KeyboardInterrupt")
    assert state(out / "nan") == ("failed", "10 non-finite losses in a row by step 5; stopping. Lower the LR")
    what, message = state(out / "bug")
    assert what == "failed" and message.startswith("RuntimeError: xxx") and len(message) <= lock.MESSAGE_CHARS
    assert not (out / "done" / lock.NAME).exists()  # a clean end leaves no lock file, only the record
    rec = json.loads((out / "done" / END).read_text())
    assert rec["pid"] == os.getpid() and rec["verb"] == "train" and rec["outcome"] == "finished"
    assert lock.is_lock(out / "done" / END) and lock.is_lock(out / "done" / f".{END}.123{atomic.TMP_SUFFIX}")

    code, text, err = cli("runs", out, "--json")
    rows = {Path(r["path"]).name: (r["state"], r["message"]) for r in json.loads(text)}
    assert code == 0 and rows["done"] == ("finished", "") and rows["nan"][0] == "failed", err
    code, text, err = cli("runs", out)
    assert code == 0 and "finished" in text and "stopped" in text and "failed" in text, err
    assert "nan failed: 10 non-finite losses in a row by step 5; stopping. Lower the LR" in text
    code, text, err = cli("inspect", out / "nan")
    assert code == 0 and "failed (10 non-finite losses in a row by step 5" in text, text + err


def test_a_holder_that_changed_nothing_records_nothing(tmp_path):
    """A refused resume leaves the run as it was (finished stays finished), and a refused new run leaves no folder."""
    run = tmp_path / "outputs" / "done"
    trains(run, 4)
    before = (run / END).read_bytes()
    with pytest.raises(DitpipeError, match="learning_rate"):
        refused(run)
    assert (run / END).read_bytes() == before and state(run) == ("finished", "")
    with pytest.raises(DitpipeError):
        refused(tmp_path / "outputs" / "new")
    assert not (tmp_path / "outputs" / "new").exists()
    with pytest.raises(Stopped):  # a later process that did run records its own end over the earlier one
        trains(run, 6, Stopped("stopped by signal after step 6"))
    assert state(run) == ("stopped", "stopped by signal after step 6")


# Holds a run's lock as `train` does (records_end), writes a log line, then waits to be killed.
HOLDER = [sys.executable, "-c", "import sys, time\nfrom pathlib import Path\nfrom pipeline import lock\n"
          "with lock.hold(sys.argv[1], 'resume', records_end=True):\n"
          "    open(Path(sys.argv[1]) / 'metrics.jsonl', 'a').write('{\"step\": 9, \"loss\": 0.5}\\n')\n"
          "    print('locked', flush=True); time.sleep(600)"]


def test_a_holder_killed_with_9_is_killed_whatever_an_earlier_process_recorded(tmp_path, cli):
    run = tmp_path / "outputs" / "run"
    trains(run, 4)  # an earlier process finished it
    proc = subprocess.Popen([*HOLDER, str(run)], stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"locked"
    assert state(run)[0] == "running"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL
    assert (run / lock.NAME).exists() and state(run) == ("killed", "")
    code, text, err = cli("runs", run.parent)
    assert code == 0 and "killed" in text, err
    # a holder killed after recording its end, before removing its lock file, ended as it recorded
    rec = json.loads((run / END).read_text())
    (run / lock.NAME).write_text(json.dumps({k: rec[k] for k in ("pid", "verb", "host", "since")}) + "\n")
    assert state(run) == ("finished", "")


@pytest.mark.parametrize("content", [b"{\"outcome\": \"finish", b"[" * 100000, b"\xff\xfe", b"{}",
                                     b"{\"outcome\": \"exploded\", \"message\": \"\", \"pid\": 1, \"since\": 1}",
                                     b"{\"outcome\": \"finished\", \"message\": 3, \"pid\": 1, \"since\": 1}"],
                         ids=["cut", "deep", "binary", "empty-object", "unknown-outcome", "bad-message"])
def test_a_damaged_record_is_unknown_never_a_crash(tmp_path, cli, content):
    run = tmp_path / "outputs" / "run"
    run.mkdir(parents=True)
    write_run(run, 2)
    (run / END).write_bytes(content)
    assert state(run) == ("unknown", "")
    code, text, err = cli("runs", run.parent)
    assert code == 0 and "unknown" in text, err
    trains(run, 1)  # a record that does not read is not ours to replace: left as it is
    assert (run / END).read_bytes() == content


def test_the_record_is_never_written_through_a_link(tmp_path):
    run = tmp_path / "outputs" / "run"
    run.mkdir(parents=True)
    target = tmp_path / "elsewhere.json"
    target.write_text("mine\n")
    (run / END).symlink_to(target)
    assert lock.ended(run) is None and state(run)[0] == "unknown"  # not followed
    trains(run, 2)
    assert (run / END).is_symlink() and target.read_text() == "mine\n"


# ---------------------------------------------------------------------------------------------------- end to end


def runs_json(outputs: Path) -> dict[str, dict]:
    done = subprocess.run([*CLI, "runs", str(outputs), "--json"], capture_output=True, text=True, timeout=120,
                          env=env())
    assert done.returncode == 0, done.stderr
    return {Path(r["path"]).name: r for r in json.loads(done.stdout)}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from conftest import pixel_shards

    return pixel_shards(tmp_path_factory.mktemp("run-end") / "shards", 256, **{"shards.samples_per_shard": 100})


@pytest.mark.usefixtures("one_thread")
def test_real_train_stopped_with_sigint_failed_killed_and_finished(tmp_path, shards, monkeypatch):
    outputs, logs = tmp_path / "outputs", tmp_path / "logs"
    stop = start_train(shards, outputs, "stop")  # 48 steps, a checkpoint every 4, a log line each
    monkeypatch.setenv("DITPIPE_TEST_INJECT", "nan:2:1000")  # every step's loss non-finite from data position 2
    fail = start_train(shards, outputs, "nan", **{"training.num_epochs": 1, "training.max_nonfinite_steps": 2})
    monkeypatch.delenv("DITPIPE_TEST_INJECT")
    stop.wait_for("step 3", lambda: last_step(outputs / "stop") >= 3)
    stop.p.send_signal(signal.SIGINT)
    assert stop.wait() == 130, stop.stderr()[-3000:]
    assert fail.wait() == 1, fail.stderr()[-3000:]
    rows = runs_json(outputs)
    assert rows["stop"]["state"] == "stopped" and "stopped by signal" in rows["stop"]["message"]
    assert rows["nan"]["state"] == "failed" and "non-finite losses in a row" in rows["nan"]["message"]
    text = subprocess.run([*CLI, "runs", str(outputs)], capture_output=True, text=True, env=env(), timeout=120).stdout
    assert "nan failed: 2 non-finite losses in a row" in text, text

    stopped = last_step(outputs / "stop")
    again = start_resume(outputs / "stop", logs)
    again.wait_for("a step of the resumed run", lambda: last_step(outputs / "stop") > stopped)
    again.kill()
    assert runs_json(outputs)["stop"]["state"] == "killed"
    start_resume(outputs / "stop", logs).ok()
    row = runs_json(outputs)["stop"]
    assert (row["state"], row["step"], row["end_step"], row["message"]) == ("finished", END_STEP, END_STEP, "")
