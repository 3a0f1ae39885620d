"""Issue 25, H8/H19: every post-hoc EMA snapshot is checked against the run's model (keys and shapes) before it is
summed, in one line naming the file and the first differing key, never broadcast; H21: a run folder whose start
failed before its first checkpoint is started again by the same `train`, or by `resume` from its config.yaml;
and COCO captions follow the metadata.jsonl rule (a string, a list of strings or null)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ditpipe.pipeline import phema, safe_yaml
from ditpipe.pipeline.config import load_config
from ditpipe.pipeline.errors import DitpipeError
from ditpipe.pipeline.metrics import read_metrics
from ditpipe.pipeline.sources import make_source

from conftest import pixel_shards, train_tiny, write_coco
from tiny import TINY_MODEL

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest


# ---------------------------------------------------------------------------------------------------- H8, H19


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """4 steps of a tiny DiT with two tracked σ_rel and a snapshot every 2 steps: 4 snapshots."""
    return train_tiny(tmp_path_factory.mktemp("snaps"), 32, **{
        "training.max_steps": 4, "training.posthoc_ema": True, "training.posthoc_ema_sigmas": [0.05, 0.1],
        "checkpointing.phema_every": 2, "checkpointing.steps": 4})


def _copy(run, tmp_path):
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def _rewrite(path, change) -> None:
    """Save the snapshot at `path` again with `change(state)` applied, keeping its metadata (step, σ_rel)."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    state = load_file(path)
    change(state)
    save_file(state, str(path), metadata=meta)


def _bias(state: dict) -> str:
    return next(k for k, v in state.items() if k.endswith("bias") and v.numel() > 1)


@pytest.mark.parametrize("verb", [("--sigma-rel", "0.08", "--out"), ("--sweep", "0.05,0.1")])
def test_a_snapshot_whose_shape_differs_is_refused_naming_file_and_key_never_broadcast(run, tmp_path, cli, verb):
    run = _copy(run, tmp_path)
    last = phema.list_snapshots(run / phema.SNAPSHOT_DIR)[-1].path  # summed after a good one: it would broadcast
    key = _bias(load_file(last))
    _rewrite(last, lambda s: s.__setitem__(key, torch.zeros(1)))
    out = tmp_path / "out"
    code, _, err = cli("ema", run, *verb, *([out] if verb[-1] == "--out" else []))
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert last.name in err and key in err and "(1,)" in err, err
    assert not out.exists()


@pytest.mark.parametrize("change", ["extra", "missing"])
def test_a_snapshot_with_other_keys_is_one_line_naming_the_key(run, tmp_path, cli, change):
    run = _copy(run, tmp_path)
    first = phema.list_snapshots(run / phema.SNAPSHOT_DIR)[0].path
    key = _bias(load_file(first))
    _rewrite(first, (lambda s: s.__setitem__("extra.weight", torch.zeros(3))) if change == "extra"
             else (lambda s: s.pop(key)))
    code, _, err = cli("ema", run, "--sigma-rel", "0.08", "--out", tmp_path / "out")
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert first.name in err and ("extra.weight" if change == "extra" else key) in err, err


def test_reconstruct_never_sums_snapshots_that_disagree_even_without_a_model(run, tmp_path):
    """The rule beyond the verb: phema.reconstruct itself checks every snapshot against the first (or the model)."""
    run = _copy(run, tmp_path)
    snaps = phema.list_snapshots(run / phema.SNAPSHOT_DIR)
    key = _bias(load_file(snaps[0].path))
    _rewrite(snaps[-1].path, lambda s: s.__setitem__(key, torch.zeros(1)))
    with pytest.raises(DitpipeError, match=snaps[-1].path.name):
        phema.reconstruct(snaps, snaps[-1].step, 0.08)
    good = {k: tuple(v.shape) for k, v in load_file(snaps[0].path).items()}
    phema.reconstruct(snaps[:2], snaps[1].step, 0.08, shapes=good)  # agreeing snapshots still reconstruct


# ---------------------------------------------------------------------------------------------------- H21


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return pixel_shards(tmp_path_factory.mktemp("restart") / "shards", 32)


def _args(shards, outputs, **over) -> list[str]:
    """`train` for a tiny DiT: 2 epochs of 2 steps, a checkpoint only at the end, a grid and snapshots each step."""
    cfg = {"data.dataset_name": "shapes", "data.image_size": 16, "data.num_samples": 32, "vae.name": "pixel",
           "shards.path": str(shards), **TINY_MODEL,
           "data.num_workers": 0, "training.mixed_precision": "no", "training.batch_size": 16,
           "training.gradient_accumulation_steps": 1, "training.num_epochs": 2, "logging.steps": 1,
           "checkpointing.steps": 100, "validation.every_steps": 1, "validation.num_samples": 4,
           "validation.sampling_steps": 2, "training.posthoc_ema": True, "checkpointing.phema_every": 1,
           "logging.output_dir": str(outputs), "logging.run_name": "r", **over}
    return ["train", *[a for k, v in cfg.items() for a in (f"--{k}", str(v))]]


# an LR that sends the weights to inf: the run stops on non-finite losses after its first grids and snapshots
DIVERGE = {"training.learning_rate": 1e30, "training.max_grad_norm": 0, "training.max_nonfinite_steps": 1}


def _failed_start(shards, outputs, cli):
    code, _, err = cli(*_args(shards, outputs, **DIVERGE))
    run = outputs / "r"
    assert code == 1 and "non-finite" in err, err
    assert not list(run.glob("checkpoint-*")) and (run / "config.yaml").is_file(), sorted(os.listdir(run))
    assert list((run / "samples").iterdir()) and list((run / phema.SNAPSHOT_DIR).iterdir())  # what it left
    return run


def test_a_start_that_failed_before_its_first_checkpoint_is_started_again_by_the_same_train(shards, tmp_path, cli):
    outputs = tmp_path / "outputs"
    run = _failed_start(shards, outputs, cli)
    (run / ".checkpoint-2.tmp").mkdir()  # a first checkpoint half written when the start was killed
    (run / ".checkpoint-2.tmp" / "model.pt").write_bytes(b"half")
    code, _, err = cli(*_args(shards, outputs))
    assert code == 0, err
    assert "no checkpoint" in err and "starting it again" in err, err
    steps = [m["step"] for m in read_metrics(run) if "loss" in m]
    assert steps == [1, 2, 3, 4]  # the failed start's lines are gone, not appended to
    assert safe_yaml.safe_load((run / "config.yaml").read_text())["training"]["learning_rate"] != 1e30  # the new one
    assert sorted(s.step for s in phema.list_snapshots(run / phema.SNAPSHOT_DIR)) == [1, 1, 2, 2, 3, 3, 4, 4]
    assert (run / "checkpoint-4").is_dir() and not (run / ".checkpoint-2.tmp").exists()


def test_resume_of_a_run_without_a_checkpoint_starts_it_fresh_from_its_config(shards, tmp_path, cli):
    outputs = tmp_path / "outputs"
    run = _failed_start(shards, outputs, cli)
    code, _, err = cli("resume", run, "--training.learning_rate", "0.001")
    assert code == 0, err
    assert "starting it again" in err and (run / "checkpoint-4").is_dir(), err
    assert [m["step"] for m in read_metrics(run) if "loss" in m] == [1, 2, 3, 4]


@pytest.mark.parametrize("planted", ["notes.txt", "samples/favourite.png", "samples/step-0000009.png"])
def test_a_run_folder_holding_a_file_ditpipe_did_not_write_is_refused_and_kept(shards, tmp_path, cli, planted):
    """A file of the user's, in the run or in one of our sub-folders, or a link under one of our names."""
    outputs = tmp_path / "outputs"
    run = _failed_start(shards, outputs, cli)
    mine = tmp_path / "mine.txt"
    mine.write_text("mine")
    if planted.endswith("step-0000009.png"):
        (run / planted).symlink_to(mine)
    else:
        (run / planted).write_text("mine")
    for argv in (_args(shards, outputs), ("resume", run)):
        code, _, err = cli(*argv)
        assert code == 1 and len(err.strip().splitlines()) == 1, err
        assert planted.split("/")[-1] in err and "--logging.run_name" in err, err
    assert (run / planted).read_text() == "mine" and mine.read_text() == "mine"
    assert (run / "config.yaml").is_file() and (run / "metrics.jsonl").is_file()  # nothing of ours removed either


# ---------------------------------------------------------------------------------------------------- COCO


def test_coco_captions_that_are_not_text_skip_their_image_naming_the_annotation_file(tmp_path):
    names = write_coco(tmp_path, n=4, captions_per_image=1)
    ann = tmp_path / "annotations" / "captions_val2017.json"
    doc = json.loads(ann.read_text())
    doc["annotations"][1]["caption"] = {"a": 1}
    doc["annotations"][2]["caption"] = 7
    doc["annotations"][3]["caption"] = None  # null: no caption, as in metadata.jsonl
    ann.write_text(json.dumps(doc))
    src = make_source(load_config(None, {"data.dataset_name": "coco", "data.dataset_path": str(tmp_path),
                                         "data.split": "val", "data.image_size": 16}).data)
    by_file = {item.file.split("/")[-1]: item for item in src.items}
    assert by_file[names[0]].captions == ("image 0 caption 0",) and by_file[names[0]].problem is None
    for name in names[1:3]:
        assert by_file[name].captions == () and "captions_val2017.json" in by_file[name].problem
    assert "not a string" in by_file[names[1]].problem
    assert by_file[names[3]].captions == () and by_file[names[3]].problem is None
