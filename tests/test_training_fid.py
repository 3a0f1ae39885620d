"""FID during training (issue 18): validation.fid_every_steps / fid_samples, the EMA weights, reference statistics
from the training shards' images computed once at the start, logged to the console, metrics.jsonl and TensorBoard."""

from __future__ import annotations

import json
import math

import pytest

from conftest import train_tiny
from ditpipe.pipeline.config import load_config
from ditpipe.pipeline.errors import ConfigError
from tiny import TINY_MODEL

pytest.importorskip("torchmetrics", reason="the `eval` extra is not installed")


@pytest.mark.slow  # training, the reference and two FIDs (2048-d eigendecompositions): ~90 s on 2 shared cores
def test_fid_is_logged_during_a_tiny_training_run(tmp_path, capsys):
    run = train_tiny(tmp_path, 32, **{"training.max_steps": 3, "validation.fid_every_steps": 2,
                                      "validation.fid_samples": 8, "validation.sampling_steps": 2,
                                      "validation.fid_reference_samples": 24, "logging.tensorboard": True})
    err = capsys.readouterr().err
    assert "training FID" in err and "8 EMA samples" in err and "24 images from" in err  # the preflight's cost line
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    fids = {x["step"]: x["val_fid"] for x in lines if "val_fid" in x}
    assert sorted(fids) == [2, 3] and all(math.isfinite(v) and v > 0 for v in fids.values())  # every 2 and the end
    assert f"Step 2, FID: {fids[2]:.3f} (8 EMA samples vs 24 reference images" in err
    assert [step for step, _ in tensorboard_scalars(run / "tensorboard", "val/fid")] == [2, 3]


def tensorboard_scalars(folder, tag: str) -> list[tuple[int, float]]:
    """(step, value) of `tag` in the event files: TFRecords (u64 length, u32 crc, an Event, u32 crc)."""
    import struct

    from tensorboardX.proto import event_pb2

    out = []
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, at = path.read_bytes(), 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at : at + 8])
            event = event_pb2.Event.FromString(data[at + 12 : at + 12 + length])
            at += 16 + length
            out += [(event.step, v.simple_value) for v in event.summary.value if v.tag == tag]
    return out


def test_vae_shards_need_a_fid_reference_and_nothing_is_created(tmp_path, tiny_vae):
    from ditpipe.stages.encode import encode
    from ditpipe.stages.train import train

    data = {"data.dataset_name": "shapes", "data.image_size": 16, "data.num_samples": 16, "vae.name": str(tiny_vae),
            "shards.path": str(tmp_path / "vae"), "data.num_workers": 0}
    encode(load_config(None, data))
    cfg = {**data, **TINY_MODEL,
           "training.mixed_precision": "no", "training.batch_size": 8, "training.gradient_accumulation_steps": 1,
           "training.max_steps": 1,
           "logging.output_dir": str(tmp_path / "out"), "logging.run_name": "r", "logging.tensorboard": False,
           "validation.fid_every_steps": 1}
    with pytest.raises(ConfigError, match="validation.fid_reference") as e:
        train(load_config(None, cfg))
    assert "image folder" in str(e.value) and not (tmp_path / "out" / "r").exists()


@pytest.mark.slow  # a torchrun launch of 2 processes (gloo): about half a minute on 2 cores
def test_every_rank_takes_part_under_torchrun(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from ditpipe.stages.encode import encode

    data = {"data.dataset_name": "shapes", "data.image_size": 16, "data.num_samples": 32, "vae.name": "pixel",
            "shards.path": str(tmp_path / "shards"), "data.num_workers": 0}
    encode(load_config(None, data))
    over = {**data, **TINY_MODEL,
            "training.mixed_precision": "no", "training.batch_size": 4, "training.gradient_accumulation_steps": 1,
            "training.max_steps": 2, "logging.output_dir": str(tmp_path / "out"), "logging.run_name": "r",
            "logging.tensorboard": "false", "validation.fid_every_steps": 1, "validation.fid_samples": 7,
            "validation.sampling_steps": 2, "validation.fid_reference_samples": 16}
    bin_ = Path(sys.executable).parent
    p = subprocess.run([str(bin_ / "torchrun"), "--standalone", "--nproc_per_node", "2", str(bin_ / "ditpipe"),
                        "train", *[str(a) for k, v in over.items() for a in (f"--{k}", v)]],
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = [json.loads(x) for x in (tmp_path / "out" / "r" / "metrics.jsonl").read_text().splitlines()]
    fids = {x["step"]: x["val_fid"] for x in lines if "val_fid" in x}
    assert sorted(fids) == [1, 2] and all(math.isfinite(v) for v in fids.values())
    assert "Step 1, FID:" in p.stderr and "(7 EMA samples vs 16 reference images" in p.stderr  # 4 + 3 gathered
