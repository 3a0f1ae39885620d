"""Restart at once after kill -9 with loader workers alive (issue 25, item 0 end to end): `encode` and `train` with
`data.num_workers: 2`, their main process killed with SIGKILL (its forked workers orphaned, still holding whatever
they inherited), then the same command started at once: it runs, and ends with the bytes of an uninterrupted run."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_resume import assert_same_run, env, start_resume, start_train

CLI = [sys.executable, "-c", "from ditpipe.stages.cli import entry; entry()"]


def children(pid: int) -> list[int]:
    """The live child processes of `pid` (its DataLoader workers)."""
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def kill_main_only(p: subprocess.Popen) -> list[int]:
    """SIGKILL to the main process alone; returns its workers, orphaned (they notice their parent is gone later)."""
    workers = children(p.pid)
    p.send_signal(signal.SIGKILL)
    assert p.wait(30) == -signal.SIGKILL, "the command ended before it could be killed"
    return workers


def end_orphans(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()
            if p.is_file() and p.name != ".lock"}


def encode_args(out: Path) -> list[str]:
    return ["encode", "--dataset", "shapes", "--set", "data.image_size=16", "--num-samples", "600", "--set",
            "vae.name=pixel", "--set", "data.num_workers=2", "--set", "shards.samples_per_shard=50", "--set",
            f"shards.path={out}", "--set", "vae.batch_size=10"]


def test_encode_killed_with_workers_alive_reruns_at_once_to_the_same_bytes(tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "out"
    done = subprocess.run([*CLI, *encode_args(ref)], env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    p = subprocess.Popen([*CLI, *encode_args(out)], env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (out / "shard-00001.meta.json").is_file():  # part way: some shards written, the rest to come
        assert p.poll() is None, f"encode ended before it could be killed: {p.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "encode wrote no shard in 120 s"
        time.sleep(0.005)
    orphans = kill_main_only(p)
    try:
        again = subprocess.run([*CLI, *encode_args(out)], env=env(), capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stderr[-3000:]  # not "in use by ditpipe encode (pid N)" with N dead
    finally:
        end_orphans(orphans)
    assert digests(out) == digests(ref)


@pytest.mark.slow  # two tiny trainings with worker processes: ~30 s on 2 shared cores
@pytest.mark.usefixtures("one_thread")
def test_train_killed_with_workers_alive_resumes_at_once_bitwise(tmp_path):
    from conftest import pixel_shards

    shards = pixel_shards(tmp_path / "shards", 256, **{"shards.samples_per_shard": 100})
    outputs = tmp_path / "outputs"
    ref = start_train(shards, outputs, "ref", **{"data.num_workers": 2, "training.num_epochs": 1})
    ref.ok()
    cut = start_train(shards, outputs, "cut", **{"data.num_workers": 2, "training.num_epochs": 1})
    run = outputs / "cut"
    cut.wait_for("checkpoint-8", lambda: (run / "checkpoint-8").is_dir())
    orphans = kill_main_only(cut.p)
    try:
        start_resume(run, tmp_path / "logs").ok()  # at once: the orphaned workers may still be alive
    finally:
        end_orphans(orphans)
    assert_same_run(run, outputs / "ref", end=16)
