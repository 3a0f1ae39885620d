"""Damaged files and full disks (issue 25, 4 and 5): a damaged checkpoint state, image name, caption, or an
out-of-range config value is skipped with a warning or refused in one line naming the file or key; a full disk while
exporting or sampling is one line naming the path, and never leaves an earlier file truncated."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import train_tiny

STEP_DAMAGE = {"infinite": float("inf"), "string": "2", "bool": True, "negative": -1, "float": 2.0}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny trained run with checkpoint-1 and checkpoint-2 (latest), inside its first epoch, and post-hoc EMA
    snapshots at both steps."""
    return train_tiny(tmp_path_factory.mktemp("damaged"), 64, **{"training.max_steps": 2, "checkpointing.steps": 1,
                                                                 "training.posthoc_ema": True,
                                                                 "checkpointing.phema_every": 1})


def damaged_copy(run: Path, tmp_path: Path, step) -> Path:
    """A copy of the run whose newest checkpoint's training_state.json holds `step` (its files still match)."""
    copy = tmp_path / "out" / "r"
    shutil.copytree(run, copy)
    state_file = copy / "checkpoint-2" / "training_state.json"
    state = json.loads(state_file.read_text())
    state["step"] = step
    state_file.write_text(json.dumps(state))  # Infinity is written as JSON's extension, as Python reads it
    return copy


def no_traceback(code: int, err: str) -> str:
    flat = " ".join(err.split())
    assert code == 0 and "Traceback" not in err, err
    return flat


@pytest.mark.parametrize("damage", ["infinite", "string"])
def test_a_damaged_training_state_is_skipped_by_every_verb_for_the_newest_valid(run, tmp_path, cli, damage):
    """H14: runs, inspect, sample, export and resume all warn about checkpoint-2 and use checkpoint-1."""
    copy = damaged_copy(run, tmp_path, STEP_DAMAGE[damage])
    code, out, err = cli("runs", copy.parent, "--json")
    no_traceback(code, err)
    assert json.loads(out)[0]["step"] == 2  # metrics.jsonl's last step; the damaged checkpoint is not one
    code, out, err = cli("runs", copy.parent)
    assert "skipping damaged checkpoint" in " ".join((out + err).split()) and "checkpoint-2" in out + err
    code, out, err = cli("inspect", copy)
    flat = no_traceback(code, out + err)
    assert "training_state.json' step" in flat and "non-negative whole number" in flat, flat
    code, out, err = cli("inspect", copy / "checkpoint-2")
    assert code == 0 and "Traceback" not in err and "non-negative whole number" in " ".join(out.split()), out + err
    code, _, err = cli("sample", "--checkpoint", copy, "--no-ema", "--num", "2", "--steps", "2", "--out",
                       tmp_path / "grid.png")
    flat = no_traceback(code, err)
    assert "skipping damaged checkpoint" in flat and (tmp_path / "grid.png").is_file(), flat
    code, _, err = cli("export", copy, "--format", "safetensors", "--out", tmp_path / "exported")
    flat = no_traceback(code, err)
    assert "skipping damaged checkpoint" in flat and "r/checkpoint-1(emaweights,step1)" in "".join(flat.split())
    code, _, err = cli("resume", copy)
    flat = no_traceback(code, err)
    assert "skipping damaged checkpoint" in flat, flat
    assert json.loads((copy / "checkpoint-2" / "training_state.json").read_text())["step"] == 2  # written anew


def test_every_field_of_a_training_state_is_checked(run, tmp_path):
    """The rule beyond the instance: every count is a non-negative whole number (not a bool, float or string),
    lr_scale a positive finite number, files a table of sizes and hashes; each problem names the file and key."""
    from ditpipe.pipeline import checkpoint

    good = checkpoint.validate(run / "checkpoint-1")
    for key, value in [("step", True), ("step", -1), ("step", 2.0), ("epoch", "0"), ("samples_consumed", None),
                       ("total_steps", float("nan")), ("world_size", 0), ("data_offset", 1e300),
                       ("lr_scale", float("inf")), ("lr_scale", "1"), ("restretched_at", ["3"]),
                       ("files", {"model.pt": {"bytes": "12", "sha256": "x"}}), ("files", []),
                       ("written_by", 3)]:
        with pytest.raises(checkpoint.CheckpointError, match=rf"training_state.json' {key}"):
            checkpoint.check_state({**good, key: value}, Path("c") / checkpoint.STATE)
    assert checkpoint.check_state(good, Path("c") / checkpoint.STATE) == good


def test_undecodable_names_and_captions_skip_their_input_with_a_reason(tmp_path, cli):
    """H15: a file name that is not UTF-8, and metadata.jsonl captions that are not strings, or not UTF-8, skip that
    input with its reason (as a broken image does); the other inputs are encoded. A caption object is never read
    as its keys."""
    from conftest import photo
    from ditpipe.pipeline import shards
    from ditpipe.pipeline.manifest import load_manifest

    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in ("good", "keys", "numbers", "latin1"):
        photo(20, 20).save(folder / f"{name}.png")
    photo(20, 20).save(os.fsencode(folder) + b"/caf\xe9.png")  # Latin-1 bytes: not a UTF-8 name
    lines = [b'{"file_name": "good.png", "text": "a good caption"}', b'{"file_name": "keys.png", "text": {"a": 1}}',
             b'{"file_name": "numbers.png", "captions": ["one", 2]}',
             b'{"file_name": "latin1.png", "text": "caf\xe9"}']  # not UTF-8
    (folder / "metadata.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    code, _, err = cli("encode", "--dataset", "custom", "--data-path", folder, "--vae", "pixel", "--image-size", "16",
                       "--num-workers", "0", "--captions", "--out", tmp_path / "s")
    assert code == 0 and "Traceback" not in err, err
    manifest = load_manifest(tmp_path / "s")
    skipped = {s["file"]: s["reason"] for s in manifest["skipped"]}
    assert sorted(skipped) == ["caf\\xe9.png", "keys.png", "latin1.png", "numbers.png"], skipped
    assert "not valid UTF-8" in skipped["caf\\xe9.png"] and "rename" in skipped["caf\\xe9.png"]
    assert "metadata.jsonl:2" in skipped["keys.png"] and "not a string" in skipped["keys.png"]
    assert "metadata.jsonl:3" in skipped["numbers.png"] and "not a string" in skipped["numbers.png"]
    assert "metadata.jsonl:4" in skipped["latin1.png"] and "not valid UTF-8" in skipped["latin1.png"]
    assert [len(s.text) for s in shards.iter_samples(tmp_path / "s")] == [1]  # good.png, with its one caption


def _problems(over: dict) -> str:
    from ditpipe.pipeline.config import ConfigError, load_config

    with pytest.raises(ConfigError) as info:
        load_config(None, over)
    return str(info.value)


def test_a_seed_every_rng_cannot_take_is_refused_by_validation():
    """H17: training.seed seeds torch, python and numpy's legacy RNG (at most 2³² − 1); data.seed is hashed into
    64-bit keys. A larger one is a config error naming the key, not a crash in training."""
    from ditpipe.pipeline.config import load_config

    assert load_config(None, {"training.seed": 2**32 - 1, "data.seed": 2**64 - 1}).training.seed == 2**32 - 1
    said = _problems({"training.seed": 2**64, "data.seed": 2**64})
    assert "training.seed" in said and "data.seed" in said, said


def test_every_number_in_the_config_is_finite_every_count_a_number_and_grids_bounded():
    """H25, and the rule beyond it: no float key takes .inf or .nan, no int key takes a bool, and the validation
    grid's size is bounded."""
    from ditpipe.pipeline.config import Config, known_keys, load_config

    said = _problems({"training.learning_rate": float("inf"), "training.weight_decay": float("inf"),
                      "training.max_grad_norm": float("inf"), "validation.cfg_scale": float("inf"),
                      "training.batch_size": True, "vae.batch_size": False, "validation.num_samples": 10**9})
    for key in ("training.learning_rate", "training.weight_decay", "training.max_grad_norm", "validation.cfg_scale",
                "training.batch_size", "vae.batch_size", "validation.num_samples"):
        assert key in said, (key, said)
    defaults = Config().to_dict()
    for key in known_keys():  # the rule, key by key: every float refuses NaN, every int refuses a bool
        section, name = key.split(".", 1)
        value = defaults.get(section, {}).get(name) if isinstance(defaults.get(section), dict) else None
        if isinstance(value, float):
            assert key in _problems({key: float("nan")}), key
        elif isinstance(value, int) and not isinstance(value, bool):
            assert key in _problems({key: True}), key
    assert load_config(None, {"training.batch_size": 8, "training.learning_rate": 1}).training.batch_size == 8


def ditpipe_with_small_files(limit: int, *argv) -> tuple[int, str]:
    """`ditpipe ARGV` in a process whose files may not grow past `limit` bytes (RLIMIT_FSIZE: a full disk to every
    writer; Python ignores SIGXFSZ, so writes fail with EFBIG). Returns (exit code, stderr)."""
    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run([sys.executable, "-c", "from ditpipe.stages.cli import entry; entry()", *map(str, argv)],
                          capture_output=True, text=True, timeout=120, preexec_fn=small_files,
                          env={**os.environ, "COLUMNS": "250", "HF_HUB_OFFLINE": "1"})
    return proc.returncode, proc.stderr


def one_line_naming(code: int, err: str, path: Path) -> str:
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert code == 1 and "Traceback" not in err and len(lines) == 1, err[-3000:]
    line = lines[0]
    assert f"'{path}'" in line and "is full" in line and "GiB free" in line, line
    return line


def test_export_and_ema_on_a_full_disk_are_one_line_naming_the_folder(run, tmp_path):
    """H18: the weights (about 140 kB) do not fit under a 48 kB file-size limit: one line naming --out, nothing
    written, no temporary left."""
    for argv in (["export", run, "--format", "safetensors", "--out", tmp_path / "exported"],
                 ["ema", run, "--sigma-rel", "0.08", "--out", tmp_path / "exported"]):
        code, err = ditpipe_with_small_files(48 << 10, *argv)
        one_line_naming(code, err, tmp_path / "exported")
        assert not [p.name for p in tmp_path.iterdir() if "export" in p.name and p.name != "exported"]
        assert not any(p.is_file() for p in (tmp_path / "exported").rglob("*") if p.name != ".lock")


def test_sample_on_a_full_disk_keeps_the_earlier_grid_whole(run, tmp_path, cli):
    """H23: the grid is written to a temporary name and renamed, so a full disk leaves the earlier one as it was,
    and the message names the grid's path."""
    grid = tmp_path / "grid.png"
    argv = ["sample", "--checkpoint", run, "--no-ema", "--num", "4", "--steps", "2", "--out", grid]
    code, _, err = cli(*argv)
    assert code == 0, err
    before = grid.read_bytes()
    code, err = ditpipe_with_small_files(len(before) // 4, *argv[:-1], grid, "--seed", "1")
    one_line_naming(code, err, grid)
    assert grid.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["grid.png"]


def test_two_exports_of_the_same_weights_are_the_same_bytes(run, tmp_path, cli):
    """H24: safetensors writes its metadata in hash-map order; ditpipe sorts it, so exports (and `ema --out`) of the
    same weights are byte for byte the same, whatever process writes them."""
    import hashlib

    digests = set()
    for i in range(6):
        code, _, err = cli("export", run / "checkpoint-2", "--format", "safetensors", "--out", tmp_path / f"e{i}")
        assert code == 0, err
        digests.add(tuple(hashlib.sha256((tmp_path / f"e{i}" / name).read_bytes()).hexdigest()
                          for name in ("model.safetensors", "config.json", "ditpipe-export.json")))
    assert len(digests) == 1
    data = (tmp_path / "e0" / "model.safetensors").read_bytes()
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    assert list(header["__metadata__"]) == sorted(header["__metadata__"])


def test_the_encode_rate_means_something_at_any_speed():
    """Encode's bar and summary printed 0 img/s below 0.5 img/s (a large VAE on a CPU runs at 0.1 img/s)."""
    from ditpipe.stages.progress import rate_text

    assert [rate_text(r) for r in (0.0, 0.0123, 0.1, 0.49, 5.5, 42.17, 99.94, 100.4, 12345.6)] == [
        "0", "0.0123", "0.1", "0.49", "5.5", "42.2", "99.9", "100", "12,346"]
