"""A new user's data, first hour (issue 26): a custom folder's name in its default shard folder, `train` pointing at
the shards it did not find by name, COCO without its captions file, a failed download leaving no empty folder, and
encode's `next:` line naming the small recipe on a CPU and training as printed."""

from __future__ import annotations

import os
import shlex
import shutil
import socket
from pathlib import Path

import pytest
import torch

from conftest import photo, write_coco
from ditpipe.pipeline import shards
from ditpipe.pipeline.config import load_config, parse_overrides, shipped_configs
from ditpipe.pipeline.errors import DataError, ShardError
from ditpipe.pipeline.manifest import load_manifest
from ditpipe.pipeline.training import check_manifest, open_data

CUSTOM = ["--dataset", "custom", "--data-path", "imgs", "--vae", "pixel", "--image-size", "16", "--num-workers", "0"]


def _images(folder: Path, n: int = 4) -> None:
    folder.mkdir(parents=True)
    for i in range(n):
        photo(24, 20, i).save(folder / f"{i}.png")


def _unreachable() -> str:
    with socket.socket() as s:  # a port that was free a moment ago: connection refused, no network
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def _first_line(err: str) -> str:
    line = next(x for x in err.splitlines() if x.startswith("error: "))
    return line


def _selected(args: list[str], keys: dict):
    """The config train builds from `keys` plus the pointer's `args`, and the folder it trains on (checked as train
    checks it: the manifest there must match)."""
    cfg = load_config(None, {**keys, **parse_overrides(args)})
    check_manifest(cfg, load_manifest(cfg.shards_path), cfg.shards_path)
    return cfg.shards_path


# ---------------------------------------------------------------------------------------- item 4: folder names


def test_two_custom_folders_get_their_own_default_shard_folder():
    def path(**keys):
        return load_config(None, keys).shards_path

    a = path(**{"data.dataset_name": "custom", "data.dataset_path": "data/My Photos", "data.num_samples": None,
                "vae.name": "stabilityai/sd-vae-ft-mse"})
    b = path(**{"data.dataset_name": "custom", "data.dataset_path": "data/holiday/", "data.num_samples": None,
                "vae.name": "stabilityai/sd-vae-ft-mse"})
    assert a == Path("shards/custom-my_photos-256px-sd-vae-ft-mse-all")
    assert b == Path("shards/custom-holiday-256px-sd-vae-ft-mse-all")
    weird = path(**{"data.dataset_name": "custom", "data.dataset_path": "x/.Été [2024]/", "vae.name": "pixel"})
    assert weird == Path("shards/custom-ete_2024-256px-pixel-5000")  # safe: no dot, space or bracket
    # coco and shapes keep their names
    assert path(**{"data.split": "val", "data.num_samples": None}) == Path("shards/coco-val-256px-sd-vae-ft-ema-all")
    assert path(**{"data.dataset_name": "shapes", "vae.name": "pixel", "data.image_size": 32}) == \
        Path("shards/shapes-32px-pixel-5000")


@pytest.fixture
def encoded(tmp_path, monkeypatch, cli):
    """A folder `imgs` of 4 images encoded with --num-samples null (shards/custom-imgs-16px-pixel-all), and the same
    shards under the name ditpipe gave them before the folder's name was in it (shards/custom-16px-pixel-all)."""
    monkeypatch.chdir(tmp_path)
    _images(tmp_path / "imgs")
    code, _, err = cli("encode", *CUSTOM, "--num-samples", "null", "--out", "shards/custom-imgs-16px-pixel-all")
    assert code == 0, err  # the default name of these keys (test_two_custom_folders_...), spelt out
    return tmp_path


def test_train_without_num_samples_null_points_at_the_all_folder(encoded, cli):
    keys = {"data.dataset_name": "custom", "data.dataset_path": "imgs", "vae.name": "pixel", "data.image_size": 16}
    code, _, err = cli("train", *[a for k, v in keys.items() for a in (f"--{k}", str(v))])
    assert code == 1, err
    line = _first_line(err)  # one line: where it looked, what is there instead, and the override that takes it
    assert "no shards at 'shards/custom-imgs-16px-pixel-5000'" in line
    assert "'shards/custom-imgs-16px-pixel-all' (add --data.num_samples null)" in line, line
    assert _selected(["--data.num_samples", "null"], keys) == Path("shards/custom-imgs-16px-pixel-all")
    assert "ditpipe encode" in err  # and still how to make the ones it looked for
    assert not (encoded / "shards" / "custom-imgs-16px-pixel-5000").exists()


def test_an_old_name_folder_and_another_size_are_named_with_the_override_that_selects_each(encoded, cli):
    shutil.copytree(encoded / "shards" / "custom-imgs-16px-pixel-all", encoded / "shards" / "custom-16px-pixel-all")
    keys = {"data.dataset_name": "custom", "data.dataset_path": "imgs", "vae.name": "pixel", "data.image_size": 32,
            "data.num_samples": None}
    with pytest.raises(ShardError) as e:
        open_data(load_config(None, keys), torch.device("cpu"))
    line = str(e.value).splitlines()[0]
    assert "no shards at 'shards/custom-imgs-32px-pixel-all'" in line
    pointers = dict(p.split("' (add ") for p in line.split("are at '", 1)[1].split(". Or make")[0].split("), '"))
    assert set(pointers) == {"shards/custom-imgs-16px-pixel-all", "shards/custom-16px-pixel-all"}, line
    for folder, args in pointers.items():  # each override, as printed, trains on that very folder
        assert _selected(shlex.split(args.rstrip(")")), keys) == Path(folder), (folder, args)
    assert pointers["shards/custom-16px-pixel-all"].startswith("--shards.path shards/custom-16px-pixel-all")


def test_shards_under_the_old_custom_name_stay_their_folders_and_no_other_folders(encoded, cli):
    """An existing user's shards (`shards/custom-16px-pixel-all`, the name before the folder's was in it) are still
    where train, resume and encode look for that folder's, while no folder of the new name exists; another folder's
    shards under the old name (the clash the new name ends) are not."""
    root = encoded / "shards"
    os.replace(root / "custom-imgs-16px-pixel-all", root / "custom-16px-pixel-all")
    keys = {"data.dataset_name": "custom", "data.dataset_path": "imgs", "vae.name": "pixel", "data.image_size": 16,
            "data.num_samples": None}
    assert load_config(None, keys).shards_path == Path("shards/custom-16px-pixel-all")
    code, _, err = cli("encode", *CUSTOM, "--num-samples", "null")  # an update of those shards, not a new encode
    assert code == 0 and "up to date" in err and not (root / "custom-imgs-16px-pixel-all").exists(), err
    _images(encoded / "other")
    other = load_config(None, {**keys, "data.dataset_path": "other"})
    assert other.shards_path == Path("shards/custom-other-16px-pixel-all")  # not imgs' shards under the old name


def test_damaged_linked_and_foreign_neighbours_are_passed_over_in_silence_and_nothing_is_written(encoded):
    root = encoded / "shards"
    good = root / "custom-imgs-16px-pixel-all"
    (root / "damaged").mkdir()
    (root / "damaged" / shards.MANIFEST).write_text("{ not json")
    (root / "truncated").mkdir()
    (root / "truncated" / shards.MANIFEST).write_bytes((good / shards.MANIFEST).read_bytes()[:100])
    os.symlink(good, root / "a-link")  # a link to a good folder: never followed
    (root / "manifest-link").mkdir()
    os.symlink(good / shards.MANIFEST, root / "manifest-link" / shards.MANIFEST)
    (root / "not-a-folder").write_text("x")
    keys = {"data.dataset_name": "custom", "data.dataset_path": "imgs", "vae.name": "pixel", "data.image_size": 16}
    before = sorted((str(p), p.lstat().st_mtime_ns, p.lstat().st_size) for p in encoded.rglob("*"))
    with pytest.raises(ShardError) as e:
        open_data(load_config(None, keys), torch.device("cpu"))
    line = str(e.value).splitlines()[0]
    assert "custom-imgs-16px-pixel-all' (add --data.num_samples null)" in line
    for other in ("damaged", "truncated", "a-link", "manifest-link", "not-a-folder"):
        assert other not in line, line
    assert sorted((str(p), p.lstat().st_mtime_ns, p.lstat().st_size) for p in encoded.rglob("*")) == before


# ---------------------------------------------------------------------------------------- item 7: COCO captions


@pytest.fixture
def coco_without_captions(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    write_coco(tmp_path / "coco", "val", n=3)
    ann = tmp_path / "coco" / "annotations" / "captions_val2017.json"
    ann.unlink()
    return ann


def test_coco_without_its_captions_file_says_the_shards_get_no_captions(coco_without_captions, cli):
    code, _, err = cli("encode", "--dataset", "coco", "--data-path", "coco", "--split", "val", "--vae", "pixel",
                       "--image-size", "16", "--num-samples", "null", "--num-workers", "0", "--out", "s")
    assert code == 0, err
    flat = " ".join(err.split())
    assert f"note: COCO's captions file '{Path('coco/annotations/captions_val2017.json')}' does not exist: these " \
           "shards get no captions" in flat, err
    assert load_manifest(Path("s"))["num_samples"] == 3  # the images are encoded all the same


def test_coco_without_its_captions_file_refuses_captions_naming_the_file(coco_without_captions, cli):
    code, _, err = cli("encode", "--dataset", "coco", "--data-path", "coco", "--split", "val", "--vae", "pixel",
                       "--image-size", "16", "--num-workers", "0", "--captions", "--out", "s")
    assert code == 1, err
    line = _first_line(err)
    assert "coco/annotations/captions_val2017.json' does not exist" in line and "--download" in line, line
    assert "without --captions" in line and "Traceback" not in err
    assert not Path("s").exists()


# ---------------------------------------------------------------------------------------- item 8: downloads


def test_a_failed_download_leaves_no_folder_it_made_and_keeps_what_was_there(tmp_path):
    from ditpipe.pipeline.download import download_coco

    fresh = tmp_path / "data" / "coco"  # neither exists: both made by the download, both gone after it fails
    with pytest.raises(DataError, match="could not download"):
        download_coco(fresh, "val", base_url=_unreachable(), expected_images=3)
    assert not (tmp_path / "data").exists() and tmp_path.is_dir()

    there = tmp_path / "mine"
    (there / ".downloads").mkdir(parents=True)  # the user's: left as it is, empty or not
    with pytest.raises(DataError):
        download_coco(there, "val", base_url=_unreachable(), expected_images=3)
    assert (there / ".downloads").is_dir() and not list((there / ".downloads").iterdir())

    held = tmp_path / "held"
    held.mkdir()
    (held / "notes.txt").write_text("mine")
    with pytest.raises(DataError):
        download_coco(held, "val", base_url=_unreachable(), expected_images=3)
    assert sorted(p.name for p in held.iterdir()) == ["notes.txt"]  # no empty .downloads/ beside it


def test_encode_download_offline_leaves_no_empty_downloads_folder(tmp_path, monkeypatch, cli):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "coco").mkdir()
    code, _, err = cli("encode", "--dataset", "coco", "--data-path", "coco", "--download", "--data.download_url",
                       _unreachable(), "--vae", "pixel", "--image-size", "16", "--num-workers", "0", "--out", "s")
    assert code == 1 and "could not download" in err, err
    assert list((tmp_path / "coco").iterdir()) == []  # no .downloads/, and the folder the user made stays


# ---------------------------------------------------------------------------------------- item 3: next on a CPU


def test_the_next_line_names_the_small_recipe_on_a_cpu_and_the_same_folder():
    from ditpipe.pipeline.config import train_command

    over = {"data.dataset_name": "custom", "data.dataset_path": "imgs", "vae.name": "pixel", "data.image_size": 16,
            "data.num_samples": None, "data.download": False}
    cfg = load_config(None, over)
    argv, why = train_command(cfg, None, over, "cpu")
    assert argv[:4] == ["ditpipe", "train", "--config", "cpu"] and "--data.download" not in argv
    assert why.startswith("(on a CPU: the small recipe configs/cpu.yaml; on a GPU: --config train_config")
    keys = parse_overrides(argv[4:])
    assert keys["shards.path"] == str(cfg.shards_path) == "shards/custom-imgs-16px-pixel-all"
    assert {k: keys[k] for k in ("data.dataset_name", "data.image_size", "vae.name", "model.conditioning")} == \
        {"data.dataset_name": "custom", "data.image_size": 16, "vae.name": "pixel", "model.conditioning": "auto"}
    # the GPU recipe named explicitly is replaced the same way; a GPU, or a config of one's own, keeps its config
    assert train_command(cfg, "train_config", over, "cpu")[0][2:4] == ["--config", "cpu"]
    gpu, no_why = train_command(cfg, None, over, "cuda")
    assert "--config" not in gpu and no_why is None and "--shards.path" not in gpu
    assert train_command(cfg, "quickstart", over, "cpu") == (["ditpipe", "train", "--config", "quickstart", *gpu[2:]],
                                                             None)
    assert load_config(None, parse_overrides(gpu[2:])).shards_path == cfg.shards_path  # the same folder by name
    # a bucket folder is named as given (a Path would make s3://b/p into s3:/b/p)
    remote = load_config(None, {**over, "shards.path": "s3://bucket/prefix/shards"})
    assert parse_overrides(train_command(remote, None, over, "cpu")[0][4:])["shards.path"] == "s3://bucket/prefix/shards"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's next line; a GPU machine prints the GPU recipe's")
def test_the_printed_next_line_trains_as_is_on_a_cpu(tmp_path, monkeypatch, cli, one_thread):
    monkeypatch.chdir(tmp_path)
    _images(tmp_path / "my photos")
    if "cpu" not in shipped_configs():  # before configs/cpu.yaml ships: a stand-in here, never in configs/
        (tmp_path / "cpu").write_text("model: {name: DiT-S/4, hidden_size: 32, depth: 1, num_heads: 2}\n"
                                      "training: {mixed_precision: 'no'}\n")
    code, _, err = cli("encode", "--dataset", "custom", "--data-path", "my photos", "--vae", "pixel", "--image-size",
                       "16", "--num-workers", "0")
    assert code == 0, err
    lines = err.splitlines()
    at = next(i for i, x in enumerate(lines) if x.startswith("next: "))
    argv = shlex.split(lines[at][len("next: "):])
    assert argv[:4] == ["ditpipe", "train", "--config", "cpu"], lines[at]
    assert lines[at + 1].startswith("(on a CPU: the small recipe configs/cpu.yaml"), lines[at + 1]
    assert "--shards.path" in argv and "shards/custom-my_photos-16px-pixel-5000" in argv
    code, _, err = cli(*argv[1:], "--training.max_steps", "2", "--training.batch_size", "2",
                       "--validation.every_steps", "0", "--logging.output_dir", "out")
    assert code == 0, err
    assert "done: 2 steps" in " ".join(err.split()), err
