"""training.recover: the spike watch (device-side, no host reads), and a run that survives an injected stretch of
non-finite or spiking data by going back to its last good checkpoint, skipping that data, and finishing near an
undisturbed run."""

from __future__ import annotations

import torch

from ditpipe.pipeline.recovery import SPIKE_WARMUP, RecoveryState, SpikeWatch


def feed(watch: SpikeWatch, losses: list[float], start: int = 0) -> None:
    for i, x in enumerate(losses):
        loss = torch.tensor(x)
        watch.update(start + i, loss, ~torch.isfinite(loss))


def test_the_spike_watch_counts_runs_above_k_times_the_running_median():
    watch = SpikeWatch(torch.device("cpu"), factor=3.0, window=50)
    feed(watch, [1.0 + 0.01 * (i % 7) for i in range(SPIKE_WARMUP + 10)])  # a steady loss: no spike
    assert watch.take() == (0, 0)
    n = SPIKE_WARMUP + 10
    feed(watch, [10.0] * 5 + [float("nan")] + [10.0] * 3 + [1.0], start=n)  # 8 spike steps; a NaN step in between
    assert watch.take() == (8, n)  # the longest run, and the step it began at
    feed(watch, [1.0] * 3, start=n + 10)
    assert watch.take() == (0, n)  # a finite step under the bar ends a run


def test_no_spike_is_called_before_the_warm_up():
    watch = SpikeWatch(torch.device("cpu"), factor=3.0, window=50)
    feed(watch, [1.0] * (SPIKE_WARMUP - 1) + [100.0])
    assert watch.take()[0] == 0


def test_recovery_state_round_trips_through_a_training_state():
    state = RecoveryState(data_offset=12, lr_scale=0.5, recoveries=1)
    assert RecoveryState.from_state({"step": 3, **state.record()}) == state
    assert RecoveryState.from_state({"step": 3}) == RecoveryState()  # a checkpoint from before recoveries


# ---------------------------------------------------------------------------------------------------- end to end


import pytest  # noqa: E402

from ditpipe.pipeline.checkpoint import validate  # noqa: E402
from ditpipe.pipeline.config import load_config  # noqa: E402
from ditpipe.pipeline.errors import DitpipeError  # noqa: E402
from ditpipe.pipeline.metrics import read_metrics  # noqa: E402
from ditpipe.pipeline.hooks import INJECT_ENV  # noqa: E402
from ditpipe.stages.encode import encode  # noqa: E402
from ditpipe.stages.train import train  # noqa: E402
from tiny import TINY_MODEL  # noqa: E402

RUN = {"data.dataset_name": "shapes", "data.image_size": 16, "data.num_samples": 256, "vae.name": "pixel",
       "data.num_workers": 0, **TINY_MODEL,
       "diffusion.objective": "flow", "model.learn_sigma": False,
       "training.mixed_precision": "no", "training.batch_size": 16, "training.gradient_accumulation_steps": 1,
       "training.max_steps": 60, "training.num_epochs": 4, "training.learning_rate": 3e-3,
       "lr_scheduler.warmup_steps": 5, "logging.steps": 5, "logging.tensorboard": False, "checkpointing.steps": 10,
       "checkpointing.every_epoch": False, "training.recover": True, "training.max_nonfinite_steps": 6,
       "training.recover_spike_steps": 5}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("px") / "shards"
    encode(load_config(None, {**RUN, "shards.samples_per_shard": 64, "shards.path": str(folder)}))
    return folder


@pytest.fixture(scope="module")
def undisturbed(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("calm")
    return train(load_config(None, {**RUN, "shards.path": str(shards), "logging.output_dir": str(out),
                                    "logging.run_name": "calm"}))


def losses(run):
    return [m["loss"] for m in read_metrics(run) if "loss" in m]


@pytest.mark.parametrize("kind", ["nan", "spike"])
def test_a_run_recovers_from_a_corrupt_stretch_of_data_and_finishes_near_an_undisturbed_run(
        shards, undisturbed, tmp_path, monkeypatch, kind):
    """Data positions 38-45 are corrupt (non-finite, or 30× too large). The failure shows at log step 45 (7 bad steps
    in a row from step 38); the run goes back to checkpoint-30 (checkpoint-40 was written during the failure and is
    moved aside), skips the 15 steps of data the failed stretch consumed, and finishes 60 steps."""
    monkeypatch.setenv(INJECT_ENV, f"{kind}:38:46")
    run = train(load_config(None, {**RUN, "shards.path": str(shards), "logging.output_dir": str(tmp_path),
                                   "logging.run_name": kind, "training.recover_lr_factor": 0.5}))
    events = [m for m in read_metrics(run) if "recovered_from" in m]
    assert len(events) == 1, events
    e = events[0]
    assert (e["step"], e["recovered_from"], e["checkpoint"], e["data_offset"], e["recoveries"]) == \
        (30, 45, "checkpoint-30", 15, 1)
    assert e["lr_scale"] == 0.5 and ("non-finite" in e["reason"]) == (kind == "nan")
    assert (run / "checkpoint-40.abandoned").is_dir() and validate(run / "checkpoint-40")["data_offset"] == 15
    final = validate(run / "checkpoint-60")
    assert (final["data_offset"], final["recoveries"], final["lr_scale"]) == (15, 1, 0.5)
    steps = [m["step"] for m in read_metrics(run) if "loss" in m]
    assert steps == sorted(set(steps)) and steps[-1] == 60  # the abandoned stretch's lines were dropped
    calm, got = losses(undisturbed)[-3:], losses(run)[-3:]
    assert sum(got) / 3 < 1.3 * sum(calm) / 3, (got, calm)  # near the undisturbed run's final loss


def test_without_recover_the_same_failure_stops_the_run(shards, tmp_path, monkeypatch):
    monkeypatch.setenv(INJECT_ENV, "nan:38:46")
    with pytest.raises(DitpipeError, match="7 non-finite losses in a row by step 45"):
        train(load_config(None, {**RUN, "shards.path": str(shards), "logging.output_dir": str(tmp_path),
                                 "logging.run_name": "stop", "training.recover": False}))


def test_recoveries_are_bounded_by_recover_max(shards, tmp_path, monkeypatch):
    monkeypatch.setenv(INJECT_ENV, "nan:20:60")  # longer than any recovery can skip past
    with pytest.raises(DitpipeError, match="non-finite losses in a row"):
        train(load_config(None, {**RUN, "shards.path": str(shards), "logging.output_dir": str(tmp_path),
                                 "logging.run_name": "many", "training.recover_max": 2}))
    events = [m for m in read_metrics(tmp_path / "many") if "recovered_from" in m]
    assert [e["recoveries"] for e in events] == [1, 2]
