"""Never destroy what is not ours (issue 25, H1, H3, H4, H7): each verb that replaces or clears a folder deletes only
the files it wrote itself, checked again just before it deletes; anything else stays, or the verb refuses in one line
naming the folder and what to do. Abandoned post-hoc EMA snapshots go aside with their checkpoints, never deleted
and never used."""

from __future__ import annotations

from pathlib import Path

import pytest

from ditpipe.pipeline import exported, phema
from ditpipe.pipeline.checkpoint import validate
from ditpipe.pipeline.config import load_config
from ditpipe.pipeline.errors import DitpipeError
from ditpipe.pipeline.manifest import load_manifest
from ditpipe.pipeline.hooks import INJECT_ENV

from conftest import pixel_shards
from tiny import TINY_MODEL


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def flat(text: str) -> str:
    return " ".join(text.split())


# ---------------------------------------------------------------------------------------------------- H3: encode


def test_encode_overwrite_deletes_only_its_own_shard_names(tmp_path, cli):
    """Files that merely end like ours (`notes.meta.json`, `run.stat.json`, `shard-1.tar`) are the user's."""
    out = pixel_shards(tmp_path / "s", 64)
    theirs = {"notes.meta.json": b"{}", "backup.stat.json": b"{}", "shard-1.meta.json": b"{}", "keep.tar": b"x",
              "shard-000001.meta.json": b"{}"}
    for name, data in theirs.items():
        (out / name).write_bytes(data)
    code, _, err = cli("encode", "--data.dataset_name", "shapes", "--data.image_size", "32", "--data.num_samples",
                       "64", "--vae.name", "pixel", "--data.num_workers", "0", "--shards.path", out, "--overwrite")
    assert code == 0, err[-2000:]
    assert load_manifest(out)["source"]["image_size"] == 32  # replaced: the old shards are gone ...
    assert {name: (out / name).read_bytes() for name in theirs} == theirs  # ... and only they


# ---------------------------------------------------------------------------------------------------- H4: export


META = {"written_by": "ditpipe test", "checkpoint": "nowhere"}


def export_into(out: Path, files: dict[str, bytes], *, overwrite: bool, meanwhile=None) -> None:
    """What `export` and `ema --out` do: write `files` inside `exported.replacing`; `meanwhile` runs in the middle,
    while the new export is being written (a user saving into the old one)."""
    with exported.replacing(out, overwrite, protect=out.parent / "run" / "checkpoint-1", fmt="safetensors",
                            meta=META, verb="export") as tmp:
        for name, data in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(data)
        if meanwhile:
            meanwhile()


def test_a_file_saved_into_the_old_export_during_an_overwrite_is_kept(tmp_path, capsys):
    out = tmp_path / "exports" / "e"
    export_into(out, {"model.safetensors": b"old", "config.json": b"{}"}, overwrite=False)
    saved = {"notes.txt": b"mine", "eval/fid.json": b"{\"fid\": 3}"}

    def save():
        for name, data in saved.items():
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_bytes(data)

    export_into(out, {"model.safetensors": b"new", "config.json": b"{}"}, overwrite=True, meanwhile=save)
    files = tree(out)
    assert files["model.safetensors"] == b"new"  # the new export is in place ...
    assert {name: files.get(name) for name in saved} == saved  # ... and what the user saved meanwhile is still there
    assert "notes.txt" in flat(capsys.readouterr().err)  # and the message says it was kept
    assert sorted(p.name for p in out.parent.iterdir()) == ["e"]  # nothing hidden left behind


def test_a_file_saved_meanwhile_under_a_name_the_new_export_takes_is_kept_beside_it(tmp_path, capsys):
    """The rule beyond the instance: an old diffusers export, replaced by a safetensors one, while the user saves
    their own `config.json` into it; neither copy is lost."""
    out = tmp_path / "e"
    export_into(out, {"transformer/config.json": b"{}", "transformer/model.safetensors": b"old"}, overwrite=False)
    export_into(out, {"model.safetensors": b"new", "config.json": b"{\"new\": 1}"}, overwrite=True,
                meanwhile=lambda: (out / "config.json").write_bytes(b"my own"))
    assert tree(out)["config.json"] == b"{\"new\": 1}" and "transformer/model.safetensors" not in tree(out)
    kept = tmp_path / "e.kept" / "config.json"  # in sight, beside the export, and named in the message
    assert kept.is_file() and kept.read_bytes() == b"my own", sorted(tmp_path.rglob("*"))
    assert "e.kept" in flat(capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e", "e.kept"]  # nothing hidden left behind


def test_a_killed_exports_moved_aside_folder_is_cleared_by_the_same_rule(tmp_path):
    """Killed after the swap, before the clear: the old export sits under our hidden name with a file the user
    saved meanwhile. The next export deletes the old export's own files only, and puts the user's file back, which
    then stops --overwrite like any file the export did not write."""
    out = tmp_path / "e"
    export_into(out, {"model.safetensors": b"old"}, overwrite=False)
    (out / "notes.txt").write_bytes(b"mine")
    aside = tmp_path / ".e.export-old.tmp"
    out.rename(aside)  # what a kill between the swap and the clear leaves: the old aside, the new in place
    export_into(tmp_path / "n", {"model.safetensors": b"newer"}, overwrite=False)
    (tmp_path / "n").rename(out)
    with pytest.raises(DitpipeError, match="notes.txt"):
        export_into(out, {"model.safetensors": b"newest"}, overwrite=True)
    assert tree(out) == {"model.safetensors": b"newer", "ditpipe-export.json": tree(out)["ditpipe-export.json"],
                         "notes.txt": b"mine"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e"]


def test_an_export_killed_between_its_renames_is_put_back(tmp_path, capsys):
    out = tmp_path / "e"
    export_into(out, {"model.safetensors": b"old"}, overwrite=False)
    before = tree(out)
    out.rename(tmp_path / ".e.export-old.tmp")  # a kill between moving the old aside and the new into place
    with pytest.raises(DitpipeError, match="already exists"):  # back, and no longer replaced without --overwrite
        export_into(out, {"model.safetensors": b"new"}, overwrite=False)
    assert tree(out) == before and "put back the earlier export" in flat(capsys.readouterr().err)


# ---------------------------------------------------------------------------------------------------- H7: phema


RUN = {"data.dataset_name": "shapes", "data.image_size": 16, "data.num_samples": 128, "vae.name": "pixel",
       "data.num_workers": 0, **TINY_MODEL, "diffusion.objective": "flow", "model.learn_sigma": False,
       "training.mixed_precision": "no", "training.batch_size": 16, "training.gradient_accumulation_steps": 1,
       "training.max_steps": 30, "training.num_epochs": 8, "training.learning_rate": 3e-3,
       "lr_scheduler.warmup_steps": 5, "logging.steps": 5, "logging.tensorboard": False, "checkpointing.steps": 10,
       "checkpointing.every_epoch": False, "training.recover": True, "training.max_nonfinite_steps": 6,
       "training.recover_max": 1, "training.posthoc_ema": True, "training.posthoc_ema_sigmas": [0.05, 0.1],
       "checkpointing.phema_every": 4}


def test_a_recovery_moves_the_abandoned_stretchs_snapshots_aside_and_ema_never_uses_them(tmp_path, monkeypatch,
                                                                                         cli):
    """Data positions 18-59 are non-finite: the failure shows at step 24 (7 in a row), the run goes back to
    checkpoint-10 and skips 14 steps of data, meets the same failure again at step 16 and stops (recover_max 1).
    Snapshots of steps 12-24 from before the recovery held the failed stretch; 12 and 16 are written again after
    it, 20 and 24 never: `ditpipe ema` must not find them."""
    from ditpipe.stages.train import train

    shards_dir = pixel_shards(tmp_path / "shards", 128)
    monkeypatch.setenv(INJECT_ENV, "nan:18:60")
    with pytest.raises(DitpipeError, match="non-finite losses in a row"):
        train(load_config(None, {**RUN, "shards.path": str(shards_dir), "logging.output_dir": str(tmp_path),
                                 "logging.run_name": "r"}))
    run, folder = tmp_path / "r", tmp_path / "r" / phema.SNAPSHOT_DIR
    assert (run / "checkpoint-20.abandoned").is_dir() and validate(run / "checkpoint-10")["step"] == 10
    steps = sorted({s.step for s in phema.list_snapshots(folder)})
    assert steps and max(steps) <= 16, steps  # nothing from the abandoned stretch is listed
    aside = sorted(p.name for p in folder.iterdir() if "abandoned" in p.name)
    assert {n.split("-sigma")[0] for n in aside} == {f"step-{s:07d}" for s in (12, 16, 20, 24)}, aside  # moved
    assert all(n.endswith(".safetensors.abandoned") for n in aside)
    code, _, err = cli("ema", run, "--sigma-rel", "0.08", "--out", tmp_path / "e")
    assert code == 0, err[-2000:]
    assert f"at step {max(steps)}:" in flat(err)  # the default step: the last one the run kept
    code, _, err = cli("ema", run, "--sigma-rel", "0.08", "--step", "24", "--out", tmp_path / "e24")
    assert code == 1 and "--step 24 has no snapshots" in flat(err)


# ---------------------------------------------------------------------------------------------------- H1: quickstart


TINY = ["--training.num_epochs", "1", "--data.num_samples", "128", "--validation.every_steps", "1000",
        "--validation.sampling_steps", "2"]


def quickstart(cli, out: Path) -> tuple[int, str]:
    code, _, err = cli("quickstart", "--out", out, *TINY)
    return code, flat(err)


def test_quickstart_again_refuses_a_run_extended_with_resume_and_keeps_it(tmp_path, monkeypatch, cli):
    """The run `ditpipe quickstart` trains can be extended with `ditpipe resume … --restretch-schedule`; running
    the quickstart again then must not delete the longer run."""
    monkeypatch.chdir(tmp_path)
    out = Path("outputs/qs")
    code, err = quickstart(cli, out)
    assert code == 0, err[-2000:]
    code, _, err = cli("resume", out, "--training.num_epochs", "2", "--restretch-schedule")
    assert code == 0, err[-2000:]
    assert (out / "checkpoint-4").is_dir()
    before = tree(out)
    code, err = quickstart(cli, out)
    assert code == 1 and str(out) in err and "changed since" in err and "checkpoint-4" in err, err[-2000:]
    assert tree(out) == before


def test_quickstart_again_replaces_only_what_it_wrote(tmp_path, monkeypatch, cli):
    """A file the user put into the folder stops the replacement (nothing is deleted); once it is moved out, the
    quickstart replaces its own files, and a listed file already gone (a clear killed half way) is no reason to
    refuse."""
    monkeypatch.chdir(tmp_path)
    out = Path("outputs/qs")
    assert quickstart(cli, out)[0] == 0
    first = tree(out)
    (out / "samples" / "my-notes.txt").write_text("keep me")
    code, err = quickstart(cli, out)
    assert code == 1 and "samples/my-notes.txt" in err and str(out) in err, err[-2000:]
    assert (out / "samples" / "my-notes.txt").read_text() == "keep me" and tree(out).keys() == first.keys() | {
        "samples/my-notes.txt"}
    (out / "samples" / "my-notes.txt").unlink()
    (out / "loss.png").unlink()
    code, err = quickstart(cli, out)
    assert code == 0, err[-2000:]
    again = tree(out)
    mine = lambda files: {k for k in files if not k.startswith("tensorboard/")}  # noqa: E731 (named by the time)
    assert mine(again) == mine(first) and again["samples/0009_class1.png"] == first["samples/0009_class1.png"]
    assert len([k for k in again if k.startswith("tensorboard/")]) == 1  # the earlier run's events file went too
