"""One process per run, shard or export folder (pipeline/lock.py): a second `ditpipe` on the same folder exits at
once naming the holder's pid; a holder killed with -9 blocks nothing; the `.lock` file is never taken for data.

Every process here is real: the CLI in subprocesses, kills are real signals."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ditpipe.pipeline import checkpoint, lock
from ditpipe.pipeline.hooks import PAUSE_ENV
from ditpipe.pipeline.manifest import load_manifest
from ditpipe.pipeline.config import load_config
from ditpipe.stages.encode import encode

from tiny import TINY_MODEL

CLI = [sys.executable, "-c", "from ditpipe.stages.cli import entry; entry()"]
# Holds a folder's lock as encode/export/train would, until killed (stands in for a long encode or export).
HOLDER = [sys.executable, "-c", "import sys, time; from ditpipe.pipeline import lock\n"
          "with lock.hold(sys.argv[1], sys.argv[2]):\n    print('locked', flush=True); time.sleep(600)"]
DATA = {"data.dataset_name": "shapes", "data.image_size": 16, "data.num_samples": 64, "vae.name": "pixel",
        "data.num_workers": 0}
TRAIN = {**TINY_MODEL,
         "training.mixed_precision": "no", "training.batch_size": 16, "training.gradient_accumulation_steps": 1,
         "logging.tensorboard": False, "logging.steps": 1, "checkpointing.steps": 2}


def env(**extra) -> dict:
    e = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "250", **extra}
    e.pop("RANK", None)
    e.pop(PAUSE_ENV, None)
    return {**e, **extra}


def args(over: dict) -> list[str]:
    return [a for k, v in over.items() for a in (f"--{k}", "null" if v is None else str(v))]


def start(cmd: list[str], logs: Path, **extra) -> tuple[subprocess.Popen, Path]:
    logs.mkdir(parents=True, exist_ok=True)
    err = logs / f"{time.monotonic_ns()}.err"
    with open(err, "wb") as e:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=e, env=env(**extra)), err


def hold_in_subprocess(folder: Path, verb: str, logs: Path) -> subprocess.Popen:
    proc, err = start([*HOLDER, str(folder), verb], logs)
    assert proc.stdout.readline().strip() == b"locked", err.read_text()[-3000:]
    return proc


def refused(cmd: list[str], logs: Path, holder: int, verb: str) -> str:
    """Run `cmd` to its end; it must exit 75 with one error line naming the holder's verb and pid."""
    proc, err = start(cmd, logs)
    assert proc.wait(120) == lock.LockHeld.exit_code, err.read_text()[-3000:]
    lines = [line for line in err.read_text().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err.read_text(), err.read_text()
    assert f"ditpipe {verb} (pid {holder} on " in lines[0] and "in use" in lines[0], lines[0]
    return lines[0]


def refused_here(cli, argv: list, holder: int, verb: str) -> None:
    """`ditpipe ARGV` in this process, against a holder in another: exit 75, one line naming the holder."""
    code, _, err = cli(*argv)
    assert code == lock.LockHeld.exit_code and f"ditpipe {verb} (pid {holder} on " in err, err
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1, err


def kill_9(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL


@pytest.fixture(scope="module")
def shard_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("lock") / "shards"
    encode(load_config(None, {**DATA, "shards.path": str(folder)}))
    return folder


def test_second_train_or_resume_is_refused_with_the_pid_and_kill_9_frees_the_run(tmp_path, shard_folder, cli):
    outputs, logs = tmp_path / "outputs", tmp_path / "logs"
    run = outputs / "r"
    over = {**DATA, **TRAIN, "shards.path": shard_folder, "logging.output_dir": outputs, "logging.run_name": "r",
            "training.max_steps": 400}
    slow = {PAUSE_ENV: "0.05"}  # 0.05 s after each file of a checkpoint: a run that lasts
    first, first_err = start([*CLI, "train", *args(over)], logs, **slow)
    deadline = time.monotonic() + 120
    while not (run / "checkpoint-2" / checkpoint.STATE).is_file():
        assert first.poll() is None and time.monotonic() < deadline, first_err.read_text()[-3000:]
        time.sleep(0.05)
    holder = json.loads((run / lock.NAME).read_text())
    assert holder["pid"] == first.pid and holder["verb"] == "train"

    refused([*CLI, "resume", str(run)], logs, first.pid, "train")
    refused_here(cli, ["train", *args(over)], first.pid, "train")  # not "the run folder exists": the lock first
    assert first.poll() is None  # the refusals did not wait for the holder to finish

    kill_9(first)
    assert (run / lock.NAME).is_file()  # the dead holder's file is left behind, and blocks nothing
    newest = checkpoint.find_resumable(run, warn=pytest.fail)[1]["step"]
    code, _, err = cli("resume", run, "--training.max_steps", newest + 2)
    assert code == 0, err
    assert checkpoint.validate(run / checkpoint.step_name(newest + 2))["step"] == newest + 2
    assert not (run / lock.NAME).exists()  # released with the run


def test_second_encode_and_export_are_refused_and_a_stale_lock_blocks_nothing(tmp_path, shard_folder, cli):
    logs = tmp_path / "logs"
    folder = tmp_path / "shards"
    holder = hold_in_subprocess(folder, "encode", logs)
    argv = ["encode", *args({**DATA, "shards.path": folder})]
    refused_here(cli, argv, holder.pid, "encode")
    assert sorted(p.name for p in folder.iterdir()) == [lock.NAME]  # the refused encode wrote nothing
    kill_9(holder)
    code, _, err = cli(*argv)  # the folder holds only the dead holder's .lock: not "not a ditpipe shard folder"
    assert code == 0, err
    assert load_manifest(folder)["num_samples"] == 64

    out = tmp_path / "exports" / "x"
    holder = hold_in_subprocess(out, "export", logs)
    code, _, err = cli("train", *args({**DATA, **TRAIN, "shards.path": folder, "training.max_steps": 2,
                                       "logging.output_dir": tmp_path / "outputs", "logging.run_name": "e"}))
    assert code == 0, err
    run = tmp_path / "outputs" / "e"
    refused_here(cli, ["export", run, "--format", "safetensors", "--out", out, "--overwrite"], holder.pid, "export")
    kill_9(holder)
    code, _, err = cli("export", run, "--format", "safetensors", "--out", out)
    assert code == 0, err
    assert (out / "model.safetensors").is_file() and not (out / lock.NAME).exists()


def test_lock_files_are_never_data(tmp_path, shard_folder, cli):
    """verify, inspect, checkpoint discovery and retention skip `.lock`, held or stale."""
    logs = tmp_path / "logs"
    holder = hold_in_subprocess(shard_folder, "encode", logs)
    try:
        code, _, err = cli("verify", shard_folder)
        assert code == 0 and "64 samples, every sha256 and sample checked" in " ".join(err.split()), err
        code, out, _ = cli("inspect", shard_folder)
        assert code == 0 and "64 of 64 inputs" in out
    finally:
        kill_9(holder)
    run = tmp_path / "run"
    holder = hold_in_subprocess(run, "train", logs)
    kill_9(holder)  # a stale .lock, alone in the folder: a new run may start there
    from ditpipe.stages.train import train

    cfg = load_config(None, {**DATA, **TRAIN, "shards.path": str(shard_folder), "logging.output_dir": str(tmp_path),
                             "logging.run_name": "run", "training.max_steps": 4, "checkpointing.total_limit": 1})
    assert train(cfg) == run
    kept = ["checkpoint-4", "checkpoint-epoch-1"]
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(("checkpoint", "."))) == kept
    assert [p.name for _, _, p in checkpoint.list_checkpoints(run)] == kept


def test_only_global_rank_0_takes_the_lock(tmp_path, monkeypatch):
    folder = tmp_path / "f"
    holder = hold_in_subprocess(folder, "train", tmp_path / "logs")
    try:
        with pytest.raises(lock.LockHeld, match=f"pid {holder.pid}"):
            with lock.hold(folder, "train"):
                pass
        monkeypatch.setenv("RANK", "1")  # torchrun's other ranks work under rank 0's lock
        with lock.hold(folder, "train"):
            pass
        monkeypatch.setenv("RANK", "0")
        with pytest.raises(lock.LockHeld):
            with lock.hold(folder, "train"):
                pass
    finally:
        kill_9(holder)
    with lock.hold(folder, "train"):  # the holder is dead: its lock went with it
        assert json.loads((folder / lock.NAME).read_text())["pid"] == os.getpid()
    assert not folder.exists() or not any(folder.iterdir())


# Takes a folder's lock through the real `lock.holding` API, as encode and train do, then iterates a DataLoader with
# two forked workers; each item takes a minute, so once the first batch is out both workers are busy for a long time.
WORKERS = [sys.executable, "-c", """
import os, sys, time, torch
from ditpipe.pipeline import lock

class Slow(torch.utils.data.Dataset):
    def __len__(self):
        return 64
    def __getitem__(self, i):
        if i >= 2:
            time.sleep(60)  # an orphaned worker deep in a long read: it notices its parent's death only after
        return os.getpid()

@lock.holding(lambda folder: (folder, "encode"))
def work(folder):
    loader = torch.utils.data.DataLoader(Slow(), batch_size=1, num_workers=2, multiprocessing_context="fork")
    batches = iter(loader)
    pids = {int(next(batches)), int(next(batches))}
    print(*sorted(pids), flush=True)
    time.sleep(600)

work(sys.argv[1])
"""]


def test_the_lock_dies_with_the_process_that_took_it_whatever_its_dataloader_workers_do(tmp_path):
    """Item 0 of issue 25: a rerun one second after a kill -9 of the main process runs, while its forked DataLoader
    workers are still alive (they inherit its descriptors); a second live holder is still refused."""
    folder, logs = tmp_path / "shards", tmp_path / "logs"
    main, err = start([*WORKERS, str(folder)], logs)
    line = main.stdout.readline().split()
    assert len(line) == 2, err.read_text()[-3000:]
    workers = [int(p) for p in line]
    try:
        with pytest.raises(lock.LockHeld, match=f"pid {main.pid} on "):  # the live main process holds it
            with lock.hold(folder, "encode"):
                pass
        kill_9(main)
        time.sleep(1)
        assert all(_alive(p) for p in workers)  # orphaned, and busy: they would keep an inherited lock
        again = hold_in_subprocess(folder, "encode", logs)  # a rerun, in a process of its own
        try:
            assert json.loads((folder / lock.NAME).read_text())["pid"] == again.pid
            with pytest.raises(lock.LockHeld, match=f"pid {again.pid} on "):  # a live holder still refuses
                with lock.hold(folder, "encode"):
                    pass
        finally:
            kill_9(again)
    finally:
        for pid in workers:  # the orphans we caused: end them by pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def test_never_write_through_a_link_nor_delete_a_file_we_did_not_make(tmp_path, shard_folder, cli):
    """Issue 25, H2: a `.lock` that is a link (to a file, or to nothing yet) or a plain file ditpipe did not write is
    refused by encode, train and export, neither written through nor deleted; a grid planted as a link is replaced,
    its target untouched."""
    precious, nowhere = tmp_path / "precious", tmp_path / "nowhere"
    precious.write_text("the user's\n")
    shards_here = tmp_path / "shards"
    shards_here.mkdir()
    (shards_here / lock.NAME).symlink_to(precious)
    code, _, err = cli("encode", *args({**DATA, "shards.path": shards_here}))
    assert code != 0 and "symbolic link" in err and str(shards_here / lock.NAME) in " ".join(err.split()), err
    assert (shards_here / lock.NAME).is_symlink() and precious.read_text() == "the user's\n"

    over = {**DATA, **TRAIN, "shards.path": shard_folder, "logging.output_dir": tmp_path / "outputs",
            "logging.run_name": "r", "training.max_steps": 2, "validation.every_steps": 2,
            "validation.num_samples": 4, "validation.sampling_steps": 2}
    run = tmp_path / "outputs" / "r"
    run.mkdir(parents=True)
    (run / lock.NAME).symlink_to(nowhere)  # a dangling link: opening it to create would make its target
    code, _, err = cli("train", *args(over))
    assert code != 0 and "symbolic link" in err and not nowhere.exists(), err
    (run / lock.NAME).unlink()
    code, _, err = cli("train", *args(over))
    assert code == 0, err

    grid = run / "samples" / "step-0000004.png"
    grid.symlink_to(precious)
    code, _, err = cli("resume", run, "--training.max_steps", 4)
    assert code == 0, err
    assert precious.read_text() == "the user's\n" and not grid.is_symlink()
    assert grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    out = tmp_path / "exports" / "x"
    out.mkdir(parents=True)
    (out / lock.NAME).write_text("the user's\n")
    code, _, err = cli("export", run, "--format", "safetensors", "--out", out)
    assert code != 0 and str(out / lock.NAME) in " ".join(err.split()), err
    assert (out / lock.NAME).read_text() == "the user's\n"
