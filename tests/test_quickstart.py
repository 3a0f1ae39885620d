"""`ditpipe quickstart`: every artefact, the printed commands, determinism, and (slow) that the samples are
recognisable: a simple colour-and-shape classifier must find each class's colour and shape in ≥ 90 % of them."""

import json
import shlex
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from ditpipe.pipeline.sources import SHAPES_CLASS_NAMES, classify_shape, render_shape, shape_params

SHORT = {"training.num_epochs": 1, "data.num_samples": 512, "validation.every_steps": 4,
         "validation.sampling_steps": 4}


def class_accuracy(folder: Path) -> float:
    """From the PNG files alone: the label is in the name, the class is judged from the pixels."""
    files = sorted(folder.glob("*_class*.png"))
    hits = [classify_shape(np.asarray(Image.open(f).convert("RGB"))) == int(f.stem.split("_class")[1]) for f in files]
    return float(np.mean(hits))


def test_the_classifier_is_right_on_real_shapes():
    for size in (16, 32):
        truth = [2 * shape_params(11, i, size)[0] + shape_params(11, i, size)[1] for i in range(400)]
        guess = [classify_shape(render_shape(11, i, size).pixels) for i in range(400)]
        assert np.mean(np.array(truth) == np.array(guess)) >= 0.97
    assert classify_shape(np.zeros((16, 16, 3), np.uint8)) == -1  # an empty image is no class


def test_short_quickstart_writes_every_artefact_and_repeats_exactly(tmp_path, monkeypatch, cli):
    monkeypatch.chdir(tmp_path)
    args = ["quickstart", "--out", "outputs/qs"] + [a for k, v in SHORT.items() for a in (f"--{k}", str(v))]
    code, _, err = cli(*args)
    assert code == 0, err[-3000:]
    out = tmp_path / "outputs" / "qs"
    grid = Image.open(out / "grid.png")
    grid.verify()
    assert Image.open(out / "grid.png").size[0] > 8 * 64  # eight labelled class columns of enlarged cells
    pngs = sorted(p.name for p in (out / "samples").glob("*_class*.png"))
    assert len(pngs) == 64
    for k in range(8):
        assert sum(name.endswith(f"_class{k}.png") for name in pngs) == 8
    assert Image.open(out / "loss.png").size[0] > 300
    assert (out / "samples" / "step-0000004.png").is_file()  # validation grids during training
    report = json.loads((out / "quickstart.json").read_text())
    assert 0.0 <= report["accuracy"] <= 1.0 and report["accuracy"] == pytest.approx(class_accuracy(out / "samples"))
    assert (out / "checkpoint-8" / "model.pt").is_file() and (out / "metrics.jsonl").is_file()
    first = (out / "samples" / "0009_class1.png").read_bytes()
    # The step-by-step commands, unwrapped (one line each at 80 columns) and runnable exactly as printed.
    printed = [line.strip() for line in err.split("The same, step by step")[1].splitlines()[1:]]
    assert [shlex.split(c)[1] for c in printed] == ["encode", "train", "sample"], err[-2000:]
    for command in printed:
        code, _, step_err = cli(*shlex.split(command)[1:])
        assert code == 0, (command, step_err[-3000:])
    by_hand = tmp_path / "outputs" / "qs-by-hand"  # a run folder of its own, next to the quickstart's
    assert len(list((by_hand / "samples").glob("*_class*.png"))) == 64 and (by_hand / "grid.png").is_file()
    assert (by_hand / "samples" / "0009_class1.png").read_bytes() == first  # the same run, the same samples
    code, _, err = cli(*args)  # again: the earlier quickstart is replaced, and the result is the same
    assert code == 0, err[-3000:]
    assert (out / "samples" / "0009_class1.png").read_bytes() == first


def test_quickstart_never_replaces_a_folder_it_did_not_make(tmp_path, monkeypatch, cli):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    code, _, err = cli("quickstart", "--out", "mine")
    assert code == 1 and "not a finished quickstart" in err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


@pytest.mark.slow
def test_full_quickstart_samples_are_recognisable(tmp_path, monkeypatch, cli):
    """The learned result, not the code path: the quickstart's own 64 PNGs, then 512 more from its checkpoint with
    the same sampler settings, judged by the classifier from pixels alone."""
    from ditpipe.pipeline.sample_options import SampleOptions
    from ditpipe.stages.sample import sample

    monkeypatch.chdir(tmp_path)
    code, _, err = cli("quickstart")
    assert code == 0, err[-3000:]
    out = tmp_path / "outputs" / "quickstart"
    accuracy = class_accuracy(out / "samples")
    assert accuracy >= 0.90, f"only {accuracy:.1%} of the samples show their class ({SHAPES_CLASS_NAMES})"
    v = yaml.safe_load((out / "config.yaml").read_text())["validation"]  # the sampler settings the run used
    more = tmp_path / "more"  # the PNGs: `sample` returns the grid's first 256 only
    sample(out, SampleOptions(num=512, cfg_scale=v["cfg_scale"], steps=v["sampling_steps"], sampler=v["sampler"],
                              seed=7, cfg_interval=tuple(v["cfg_interval"])), out=None, out_dir=more)
    files = sorted(more.glob("*_class*.png"))
    labels = np.array([int(f.stem.split("_class")[1]) for f in files])
    assert len(files) == 512 and np.array_equal(labels, np.arange(512) % len(SHAPES_CLASS_NAMES))
    hits = np.array([classify_shape(np.asarray(Image.open(f).convert("RGB"))) for f in files]) == labels
    per_class = {SHAPES_CLASS_NAMES[k]: float(hits[labels == k].mean()) for k in range(len(SHAPES_CLASS_NAMES))}
    # Over sampling seeds 0, 1, 2, 3, 7 and 8 of this same checkpoint (the training is deterministic): 95.3-98.0 %, the
    # weakest class 84-95 % (blue or green squares). The bars are issue 16's aims: 90 % overall, 70 % for every class.
    assert hits.mean() >= 0.90 and min(per_class.values()) >= 0.70, per_class
