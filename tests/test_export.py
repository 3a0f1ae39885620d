"""`ditpipe export`: safetensors + JSON that rebuild the model, a diffusers transformer whose outputs equal ours,
a DiTPipeline folder for 1,000-class models that samples offline, and clear refusals."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ditpipe.pipeline.config import load_config
from ditpipe.pipeline.diffusers_dit import match_official_timesteps
from ditpipe.pipeline.errors import DitpipeError
from ditpipe.pipeline.finetune import load_init
from ditpipe.pipeline.model import DiT, TimestepEmbedder
from ditpipe.stages.encode import encode
from ditpipe.stages.export import export
from ditpipe.stages.train import train

from conftest import train_tiny
from tiny import TINY_MODEL


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """8 shapes classes, pixel codec, trained enough that every weight (adaLN, final layer) is away from its init."""
    return train_tiny(tmp_path_factory.mktemp("run"), 128, **{"training.max_steps": 16, "training.learning_rate": 1e-2,
                                                              "lr_scheduler.warmup_steps": 0, "model.depth": 2})


def rebuild(folder):
    meta = json.loads((folder / "config.json").read_text())
    arch = {k: v for k, v in meta["model"].items() if k != "name"}
    model = DiT(**arch)
    from safetensors.torch import load_file

    model.load_state_dict(load_file(folder / "model.safetensors"), strict=True)
    return model.eval(), meta


def test_safetensors_and_its_json_rebuild_the_model(run, tmp_path):
    ckpt = run / "checkpoint-16"
    export(run, "safetensors", tmp_path / "ema")
    model, meta = rebuild(tmp_path / "ema")
    ema = torch.load(ckpt / "ema.pt", weights_only=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ema.items())
    assert meta["weights"] == "ema" and meta["step"] == 16 and meta["objective"] == "ddpm"
    assert meta["manifest"]["codec"]["kind"] == "pixel" and meta["manifest"]["labels"]["num_classes"] == 8
    assert meta["latent_norm"]["kind"] == "scale" and meta["config"]["model"]["depth"] == 2
    export(run, "safetensors", tmp_path / "raw", raw=True)
    raw, _ = rebuild(tmp_path / "raw")
    assert all(torch.equal(raw.state_dict()[k], v) for k, v in torch.load(ckpt / "model.pt", weights_only=True).items())
    # and the export is a valid --init-from source, class names included
    source = load_init(tmp_path / "ema")
    assert source.class_names == meta["manifest"]["labels"]["names"] and "ema weights, step 16" in source.description


def test_diffusers_transformer_equals_our_model(run, tmp_path, monkeypatch):
    from diffusers import DiTTransformer2DModel

    export(run, "diffusers", tmp_path / "d")
    assert not (tmp_path / "d" / "model_index.json").exists()  # 8 classes: the transformer alone
    theirs, info = DiTTransformer2DModel.from_pretrained(tmp_path / "d" / "transformer", output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    ours, _ = rebuild_from_checkpoint(run)
    theirs.eval()  # eval mode: no label dropout
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 16, 16, generator=gen)
    t, y = torch.tensor([0, 250, 600, 999]), torch.tensor([0, 3, 7, 8])  # 8: the null class
    with torch.no_grad():
        want = ours(x, t, y)  # (4, 6, 16, 16): eps and learned sigma
        stock = theirs(x, t, y).sample
        assert want.abs().max() > 0.05  # not the zero-init output: the comparison can fail
        # diffusers' own timestep frequencies differ from DiT's (see pipeline/diffusers_dit.py) ...
        assert (stock - want).abs().max() > 1e-3
        # ... and are the only difference: our model with diffusers' frequencies gives the stock output
        monkeypatch.setattr(TimestepEmbedder, "timestep_embedding", staticmethod(_diffusers_freqs))
        assert torch.allclose(ours(x, t, y), stock, atol=1e-5, rtol=1e-5)
        monkeypatch.undo()
        match_official_timesteps(theirs)
        assert torch.allclose(theirs(x, t, y).sample, want, atol=1e-5, rtol=1e-5)
    note = json.loads((tmp_path / "d" / "ditpipe.json").read_text())["diffusers_note"]
    assert "match_official_timesteps" in note and "class 1000" in note


def _diffusers_freqs(t, dim, max_period=10000):
    """DiT's [cos | sin] features with diffusers' frequencies 10000^(-i/(half - 1))."""
    import math

    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / (half - 1))
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rebuild_from_checkpoint(run):
    from ditpipe.stages.export import open_checkpoint
    from rich.console import Console

    _, _, _, model, meta = open_checkpoint(run, False, Console(stderr=True))
    return model, meta


def test_export_refusals_name_the_file_and_the_fix(run, tmp_path, cli):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    code, _, err = cli("export", str(run), "--format", "safetensors", "--out", str(tmp_path / "busy"))
    assert code == 1 and "busy" in err and "--overwrite" in err and (tmp_path / "busy" / "keep.txt").exists()
    code, _, err = cli("export", str(run), "--format", "safetensors", "--out", str(tmp_path / "busy"), "--overwrite")
    assert code == 1 and "not an earlier ditpipe export" in err  # --overwrite replaces exports of ours only
    assert sorted(p.name for p in (tmp_path / "busy").iterdir()) == ["keep.txt"]
    torch.save({"w": torch.ones(1)}, tmp_path / "DiT-XL-2-256x256.pt")
    code, _, err = cli("export", str(tmp_path / "DiT-XL-2-256x256.pt"), "--format", "diffusers", "--out",
                       str(tmp_path / "x"))
    assert code == 1 and "DiT-XL-2-256x256.pt' is a file" in err and "--init-from" in err
    code, _, err = cli("export", str(run), "--format", "onnx", "--out", str(tmp_path / "y"))
    assert code == 1 and "safetensors, diffusers" in err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    uncond = train_tiny(tmp_path / "u", 32, **{"training.max_steps": 1, "model.conditioning": "none"})
    with pytest.raises(DitpipeError, match="class-conditional only.*--format safetensors"):
        export(uncond, "diffusers", tmp_path / "z")
    assert not list(tmp_path.glob(".z*"))  # no temporary left behind


def flat_cli(cli, *argv) -> tuple[int, str]:
    """(exit code, stderr with rich's line wrapping undone)."""
    code, _, err = cli(*argv)
    return code, " ".join(err.split())


def tree(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_overwrite_replaces_only_an_earlier_export_and_never_the_run_or_cwd(run, tmp_path, cli, monkeypatch):
    out = tmp_path / "exports" / "e"
    code, err = flat_cli(cli, "export", run, "--format", "diffusers", "--out", out)
    assert code == 0 and "transformer only" in err and "e/transformer loads with" in err, err
    assert ".tmp" not in err and "export-new" not in err  # the messages name the final folder, never a temporary
    marker = json.loads((out / "ditpipe-export.json").read_text())
    assert marker["format"] == "diffusers" and set(marker["files"]) == set(tree(out)) - {"ditpipe-export.json"}
    code, err = flat_cli(cli, "export", run, "--format", "safetensors", "--out", out, "--overwrite")  # ours: replaced
    assert code == 0, err
    assert set(tree(out)) == {"model.safetensors", "config.json", "ditpipe-export.json"}
    assert sorted(p.name for p in out.parent.iterdir()) == ["e"]  # the old export, moved aside, is gone
    before = tree(out)
    # a failure after the lock (diffusers refuses an unconditional model) leaves the earlier export as it was
    uncond = train_tiny(tmp_path / "u", 32, **{"training.max_steps": 1, "model.conditioning": "none"})
    code, err = flat_cli(cli, "export", uncond, "--format", "diffusers", "--out", out, "--overwrite")
    assert code == 1 and "class-conditional only" in err and tree(out) == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["e"]
    (out / "notes.txt").write_text("mine")  # something the export did not write: --overwrite keeps off
    code, err = flat_cli(cli, "export", run, "--format", "safetensors", "--out", out, "--overwrite")
    assert code == 1 and "notes.txt" in err and (out / "notes.txt").read_text() == "mine"

    # the run, the checkpoint, a folder inside it, their ancestors and `.` are never --out, even with --overwrite
    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    (work / "data" / "precious.txt").write_text("mine")
    monkeypatch.chdir(work)
    run_files = tree(run)
    refused = {".": "the current folder", run: "its run folder", run / "checkpoint-16": "the checkpoint",
               run.parent: "a folder holding its run folder", run / "checkpoint-16" / "x": "inside the checkpoint",
               work.parent: "a folder holding the current folder", "/": "holding"}
    for target, says in refused.items():
        code, err = flat_cli(cli, "export", run, "--format", "safetensors", "--out", target, "--overwrite")
        assert code == 1 and says in err, (target, err)
    assert tree(run) == run_files and (work / "data" / "precious.txt").read_text() == "mine"
    assert sorted(p.name for p in work.iterdir()) == ["data"]


def test_a_1000_class_model_becomes_a_dit_pipeline_that_samples_offline(tmp_path, tiny_vae):
    from diffusers import DiTPipeline

    root = tmp_path / "thousand"
    rng = np.random.default_rng(0)
    for c in range(1000):
        (root / f"c{c:04d}").mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / f"c{c:04d}" / "0.png")
    data = {"data.dataset_name": "custom", "data.dataset_path": str(root), "data.image_size": 16,
            "data.num_samples": None, "vae.name": str(tiny_vae), "shards.path": str(tmp_path / "s"),
            "data.num_workers": 0, "vae.batch_size": 250}
    encode(load_config(None, data))
    run = train(load_config(None, {**data, **TINY_MODEL, "model.name": "DiT-S/2",
                                   "training.mixed_precision": "no", "training.batch_size": 8,
                                   "training.gradient_accumulation_steps": 1, "training.max_steps": 2,
                                   "logging.tensorboard": False, "logging.output_dir": str(tmp_path / "out")}))
    export(run, "diffusers", tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["_class_name"] == "DiTPipeline" and index["id2label"]["999"] == "c0999"
    pipe = DiTPipeline.from_pretrained(tmp_path / "pipe")
    assert pipe.transformer.config.num_embeds_ada_norm == 1000 and pipe.get_label_ids(["c0007"]) == [7]
    assert pipe.vae.config.scaling_factor == json.loads((tmp_path / "s" / "manifest.json").read_text())[
        "codec"]["scaling_factor"]
    images = pipe(class_labels=[7, 999], num_inference_steps=2, guidance_scale=4.0, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all() and 0 <= images.min() <= images.max() <= 1
