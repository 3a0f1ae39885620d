"""Files anyone may have altered (issue 15: 9, 12, 13): checkpoints, `--init-from` weights, exports, configs, shard
manifests and sidecars. Whatever they hold (a pickle that runs code, a truncated zip, a tensor larger than its
storage, JSON or YAML nested past Python's recursion limit, a latent shape or model size that would allocate
gigabytes, a run name that leaves the output folder), ditpipe answers with one line naming the file (and the key),
allocates nothing big, runs nothing, and writes nothing outside its folders.

Altered checkpoints are re-signed (`resign`): their recorded hashes match, as a deliberate change's would, so only
the checks that do not trust them can catch it."""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

from ditpipe.pipeline import model as dit
from ditpipe.pipeline.config import load_config
from ditpipe.pipeline.errors import ShardError

from conftest import resign, train_tiny
from tiny import TINY_FLAGS

DEEP = 100_000  # nesting far past Python's recursion limit (1,000)
DATA = {"data.dataset_name": "shapes", "data.image_size": 16, "data.num_samples": 32, "vae.name": "pixel",
        "data.num_workers": 0}
TINY = [*TINY_FLAGS, "--training.mixed_precision", "no", "--training.batch_size", "16",
        "--training.gradient_accumulation_steps", "1", "--training.max_steps", "1", "--logging.tensorboard", "false"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny trained run (class-conditional, EMA on): checkpoint-2 in run/."""
    return train_tiny(tmp_path_factory.mktemp("hostile"), 32, **{"training.max_steps": 2})


@pytest.fixture
def ckpt(run, tmp_path) -> Path:
    """A copy of the run's checkpoint to alter (inside a run folder of its own)."""
    copy = tmp_path / "run" / "checkpoint-2"
    shutil.copytree(run / "checkpoint-2", copy)
    return copy


@pytest.fixture
def shard_folder(run, tmp_path) -> Path:
    copy = tmp_path / "shards"
    shutil.copytree(run.parent.parent / "shards", copy)
    return copy


def one_error(cli, *argv, code: int = 1) -> str:
    """Run `ditpipe ARGV`: it must exit `code` with exactly one error line and no traceback; returns that line
    (rich's wrapping undone)."""
    rc, _, err = cli(*argv)
    flat = " ".join(err.split())
    assert rc == code, err
    assert "Traceback" not in err and flat.count("error:") == 1, err
    return flat[flat.index("error:"):]


def edit_json(path: Path, change) -> None:
    tree = json.loads(path.read_text())
    change(tree)
    path.write_text(json.dumps(tree))


def deep_json(path: Path) -> None:
    path.write_text("[" * DEEP + "]" * DEEP)


class Payload:
    """Pickled, it asks the unpickler to make a folder: the proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


# ---------------------------------------------------------------------------------------------------- 9. sizes


def test_a_forged_latent_shape_is_refused_before_anything_is_allocated(shard_folder, tmp_path, cli):
    from ditpipe.pipeline.manifest import check_latent_shape

    # the shapes manifest says image_size 16 and the pixel codec's downsample 1: a latent side of 16
    edit_json(shard_folder / "manifest.json", lambda m: m["latent"].update(shape=[1, 3, 300000, 300000]))
    line = one_error(cli, "train", *TINY, "--data.dataset_name", "shapes", "--data.image_size", "16",
                     "--data.num_samples", "32", "--vae.name", "pixel", "--shards.path", shard_folder,
                     "--logging.output_dir", tmp_path / "out")
    assert "manifest.json': latent.shape [1, 3, 300000, 300000]" in line and "H = W <= 4096" in line
    manifest = json.loads((shard_folder / "manifest.json").read_text())
    manifest["latent"]["shape"] = [1, 3, 30000, 30000]  # the issue's: 7.2 GB for pos_embed
    with pytest.raises(ShardError, match=r"H = W <= 4096"):
        check_latent_shape(manifest, "m.json")
    manifest["latent"]["shape"] = [1, 3, 32, 32]
    with pytest.raises(ShardError, match=r"source.image_size 16 / codec.downsample 1 = 16"):
        check_latent_shape(manifest, "m.json")
    manifest["source"]["image_size"], manifest["codec"]["downsample"] = 256, 8
    check_latent_shape(manifest, "m.json")  # 256 px at f8: 32, as a real manifest says
    for shape in ([1, 3, 16], [5, 3, 16, 16], [1, 3, 16, 8], [1, 3, "16", 16], None):
        manifest["latent"]["shape"] = shape
        with pytest.raises(ShardError, match="latent.shape"):
            check_latent_shape(manifest, "m.json")
    code, _, err = cli("verify", shard_folder)  # verify and inspect read the manifest the same way
    assert code == 1 and "latent.shape" in err


def test_a_checkpoints_config_or_manifest_cannot_ask_for_a_huge_model(ckpt, tmp_path, cli):
    config = yaml.safe_load((ckpt / "config.yaml").read_text())
    config["model"]["hidden_size"] = 1_000_000  # 6·10^12 parameters in adaLN alone
    (ckpt / "config.yaml").write_text(yaml.safe_dump(config))
    resign(ckpt)
    line = one_error(cli, "sample", "--checkpoint", ckpt, "--out", tmp_path / "g.png", code=2)
    assert f"invalid configuration in '{ckpt / 'config.yaml'}'" in line and "model.hidden_size" in line
    config["model"]["hidden_size"] = 32
    (ckpt / "config.yaml").write_text(yaml.safe_dump(config))
    edit_json(ckpt / "manifest.json", lambda m: m["latent"].update(shape=[1, 3, 300000, 300000]))
    resign(ckpt)
    line = one_error(cli, "export", ckpt, "--format", "safetensors", "--out", tmp_path / "e")
    assert "manifest.json': latent.shape [1, 3, 300000, 300000]" in line
    assert not (tmp_path / "e").exists()


def test_model_bounds_admit_real_models_and_refuse_absurd_ones():
    with torch.device("meta"):  # shapes only, no memory
        for name, latent in (("DiT-XL/2", 64), ("DiT-XL/2", 128), ("DiT-XL/2", 256), ("DiT-XL/8", 512)):
            model = dit.build_dit(name, input_size=latent, in_channels=4, num_classes=1000)  # 512 px .. 4096 px
            assert sum(p.numel() for p in model.parameters()) < dit.MAX_PARAMETERS
        dit.build_dit("DiT-XL/2", input_size=64, in_channels=32, num_classes=21_841)  # DC-AE latents, IN-21k
        from ditpipe.pipeline.model_text import build_caption_dit

        build_caption_dit("DiT-T-XL/2", input_size=64, in_channels=4, text_dim=4096)  # T5-XXL captions
    too_big = [(dict(input_size=30000 // 4, patch_size=4), "3,515,625 tokens"),  # the latent, patch 4
               (dict(hidden_size=1 << 20), "hidden_size 1,048,576 is over"),
               (dict(depth=100_000, hidden_size=32, num_heads=2), "depth 100,000 is over"),
               (dict(num_heads=1 << 12), "num_heads 4,096"), (dict(in_channels=1 << 24), "in_channels"),
               (dict(num_classes=10**9), "num_classes"),
               (dict(hidden_size=8192, depth=256), "parameters"), (dict(depth=0), "positive integer")]
    for change, says in too_big:
        arch = {"input_size": 32, "patch_size": 2, "in_channels": 4, "hidden_size": 1152, "depth": 28, "num_heads": 16,
                "num_classes": 1000, **change}
        with pytest.raises(ValueError, match=says):
            dit.DiT(**arch)


# ---------------------------------------------------------------------------------------------------- 12. run name


@pytest.mark.parametrize("name", ["../escape", "/tmp/abs", "a/b", "a\\b", "..", ".", ""])
def test_a_run_name_is_one_path_component(name, tmp_path, cli):
    (tmp_path / "shards").mkdir()
    line = one_error(cli, "train", *TINY, "--logging.output_dir", tmp_path / "out", "--logging.run_name", name,
                     "--shards.path", tmp_path / "shards", code=2)
    assert "logging.run_name" in line and "one path component" in line
    assert not (tmp_path / "escape").exists() and not (tmp_path / "out").exists()
    with pytest.raises(Exception, match="logging.run_name"):
        load_config(None, {"logging.run_name": name})


# ---------------------------------------------------------------------------------------------------- 13. files


def on_shards(folder: Path, out: Path) -> list:
    """`ditpipe train` arguments for a tiny run on the shapes shards in `folder`, writing under `out`."""
    return [*TINY, *[a for k, v in DATA.items() for a in (f"--{k}", str(v))], "--shards.path", folder,
            "--logging.output_dir", out]


def test_a_pt_that_is_not_plain_tensors_never_runs_and_is_named(ckpt, shard_folder, tmp_path, cli):
    marker = tmp_path / "code-ran"
    torch.save({"w": Payload(marker)}, ckpt / "model.pt")
    resign(ckpt)
    line = one_error(cli, "resume", ckpt, "--training.max_steps", "3")  # a step to run: the weights are loaded
    assert f"cannot load '{ckpt / 'model.pt'}' with torch.load(weights_only=True)" in line
    assert "UnpicklingError" in line
    line = one_error(cli, "export", ckpt, "--format", "safetensors", "--raw", "--out", tmp_path / "e")
    assert "model.pt" in line and "weights_only" in line
    torch.save({"x_embedder.proj.weight": Payload(marker)}, tmp_path / "evil.pt")
    line = one_error(cli, "sample", "--checkpoint", tmp_path / "evil.pt", "--model", "DiT-S/4", "--image-size", "16")
    assert "evil.pt" in line and "weights_only" in line
    line = one_error(cli, "train", "--init-from", tmp_path / "evil.pt", *on_shards(shard_folder, tmp_path / "o"))
    assert "evil.pt" in line and "weights_only" in line
    assert not marker.exists()
    torch.save({"w": torch.ones(2)}, tmp_path / "not-dit.pt")  # plain tensors, but no DiT
    line = one_error(cli, "sample", "--checkpoint", tmp_path / "not-dit.pt", "--model", "DiT-S/4", "--image-size", "16")
    assert "not-dit.pt' is not a DiT state dict" in line


def test_truncated_and_oversized_tensor_files_are_one_line_naming_them(ckpt, tmp_path, cli):
    data = (ckpt / "ema.pt").read_bytes()
    (ckpt / "ema.pt").write_bytes(data[: len(data) // 2])  # a truncated zip
    resign(ckpt)
    line = one_error(cli, "sample", "--checkpoint", ckpt, "--out", tmp_path / "g.png")
    assert f"cannot load '{ckpt / 'ema.pt'}'" in line
    huge_tensor_file(tmp_path / "small.pt", ckpt / "ema.pt")  # a tensor of 10^9 elements on a storage of 4
    resign(ckpt)
    line = one_error(cli, "sample", "--checkpoint", ckpt, "--out", tmp_path / "g.png")
    assert f"cannot load '{ckpt / 'ema.pt'}'" in line and "RuntimeError" in line


def huge_tensor_file(scratch: Path, out: Path) -> None:
    """A .pt whose one tensor claims 10^9 elements on a storage that holds 4."""
    torch.save({"w": torch.zeros(4)}, scratch)
    with zipfile.ZipFile(scratch) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("data.pkl"):
                assert b"K\x00K\x04\x85" in data  # storage offset 0, size (4,)
                data = data.replace(b"K\x00K\x04\x85", b"K\x00J\x00\xca\x9a\x3b\x85")  # size (10^9,)
            dst.writestr(info.filename, data)


def test_json_and_yaml_nested_past_the_recursion_limit_are_one_line_naming_the_file(ckpt, shard_folder,
                                                                                     tmp_path, cli, run):
    state = ckpt / "training_state.json"
    original = state.read_text()
    deep_json(state)
    line = one_error(cli, "resume", ckpt)
    assert f"'{ckpt}' has no readable training_state.json (RecursionError" in line
    state.write_text(original)
    deep_json(ckpt / "manifest.json")
    resign(ckpt)
    line = one_error(cli, "sample", "--checkpoint", ckpt, "--out", tmp_path / "g.png")
    assert f"'{ckpt / 'manifest.json'}' is not readable JSON (RecursionError" in line
    (ckpt / "config.yaml").write_text("a: " + "[" * DEEP + "]" * DEEP + "\n")
    resign(ckpt)
    line = one_error(cli, "sample", "--checkpoint", ckpt, "--out", tmp_path / "g.png")
    assert "config.yaml' is not a readable config (RecursionError" in line

    config = tmp_path / "deep.yaml"
    config.write_text("training: " + "[" * DEEP + "]" * DEEP + "\n")
    line = one_error(cli, "train", "--config", config, code=2)
    assert f"{config}: cannot be read as YAML (RecursionError" in line
    laughs = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
    config.write_text(laughs + "validation: {prompts: *i}\n")  # 9^9 strings, if anyone expanded them
    line = one_error(cli, "train", "--config", config, code=2)
    assert "YAML anchor &a is not accepted" in line

    deep_json(shard_folder / "manifest.json")
    for verb in ("inspect", "verify"):
        line = one_error(cli, verb, shard_folder)
        assert f"'{shard_folder / 'manifest.json'}' is not valid JSON (RecursionError" in line

    export = tmp_path / "export"
    code, _, err = cli("export", run, "--format", "safetensors", "--out", export)
    assert code == 0, err
    deep_json(export / "config.json")
    line = one_error(cli, "train", "--init-from", export, *on_shards(run.parent.parent / "shards", tmp_path / "o"))
    assert f"'{export / 'config.json'}' is not readable JSON (RecursionError" in line


def test_a_sidecar_nested_past_the_recursion_limit_is_one_line(shard_folder, tmp_path, cli):
    deep_json(shard_folder / "shard-00000.meta.json")
    line = one_error(cli, "train", *on_shards(shard_folder, tmp_path / "o"))  # the loader checks its sha256 first
    assert "shard-00000.meta.json" in line and "sha256" in line and "ditpipe verify" in line
    code, _, err = cli("verify", shard_folder)  # which checks the sidecar against the manifest's sha256
    assert code == 1 and "shard-00000.meta.json: missing or does not match" in " ".join(err.split())
