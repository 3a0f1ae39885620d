"""The rule beyond its instances (issue 25, H2): no write of ours goes through a symbolic link we did not make, and
no clean-up deletes a file we did not make — the atomic writer every folder's files go through, and the run's
metrics log, which is appended to."""

from __future__ import annotations

import os

import pytest

from ditpipe.pipeline import atomic
from ditpipe.pipeline.errors import DitpipeError
from ditpipe.pipeline.metrics import MetricsLog


def test_a_link_planted_at_the_temporary_name_is_neither_written_through_nor_deleted(tmp_path):
    precious = tmp_path / "precious"
    precious.write_text("the user's\n")
    path = tmp_path / "manifest.json"
    planted = tmp_path / f".{path.name}.{os.getpid()}{atomic.TMP_SUFFIX}"  # the predictable temporary name
    planted.symlink_to(precious)
    atomic.write_json(path, {"a": 1})
    assert path.read_text() == '{\n "a": 1\n}\n' and not path.is_symlink()
    assert precious.read_text() == "the user's\n" and planted.is_symlink()  # kept as it was
    with pytest.raises(RuntimeError, match="boom"), atomic.atomic_path(tmp_path / "other") as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("boom")
    assert not tmp.exists() and planted.is_symlink()  # our temporary removed, the planted link not


def test_the_metrics_log_refuses_a_link_at_its_name_and_leaves_its_target(tmp_path):
    precious = tmp_path / "precious"
    precious.write_text("the user's\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").symlink_to(precious)
    with pytest.raises(DitpipeError, match="metrics.jsonl.*not a link"):
        MetricsLog(run, tensorboard=False)
    assert precious.read_text() == "the user's\n"
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    log = MetricsLog(fresh, tensorboard=False)
    log.scalars(1, loss=0.5)
    log.close()
    assert (fresh / "metrics.jsonl").read_text() == '{"step": 1, "loss": 0.5}\n'
