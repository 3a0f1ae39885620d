"""One checkpoint module (issue 27, item 2): pipeline/checkpoint.py spells every file name, says what is written and
reads it back; `open_weights` opens whatever path sample, evaluate, export, fine-tune and ema are given."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

from ditpipe.pipeline import checkpoint

ROOT = Path(__file__).resolve().parents[1]
# The names only a checkpoint or an export has (manifest.json and config.json are also a shard folder's and a
# diffusers model's, so they are left out here).
NAMES = ("model.pt", "ema.pt", "optimizer.pt", "scaler.pt", "phema.pt", "training_state.json", "model.safetensors",
         "config.yaml")


def test_only_the_checkpoint_module_spells_a_checkpoints_file_names():
    found = []
    for path in [*sorted((ROOT / "pipeline").glob("*.py")), *sorted((ROOT / "stages").glob("*.py"))]:
        if path.name == "checkpoint.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and (
                    node.value in NAMES or node.value.startswith("rng-rank")):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value!r}")
    assert not found, found


def test_the_two_manifest_excerpts_are_one_function_with_the_keys_each_writes():
    manifest = {"codec": {"name": "pixel"}, "labels": None, "captions": None, "latent": {"shape": [1, 3, 4, 4]},
                "source": "s", "stats": {}, "latent_norm": {"kind": "scale"}, "buckets": [{"size": [4, 4]}],
                "shards": ["not in either"]}
    assert list(checkpoint.manifest_excerpt(manifest)) == ["codec", "labels", "captions", "latent", "buckets"]
    assert list(checkpoint.manifest_excerpt(manifest, checkpoint.CHECKPOINT_EXCERPT_KEYS)) == [
        "codec", "labels", "captions", "latent", "source", "stats", "latent_norm", "buckets"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run (EMA kept), its raw-only twin, and an export of the first."""
    from conftest import train_tiny
    from ditpipe.stages.export import export

    tmp = tmp_path_factory.mktemp("weights")
    run = train_tiny(tmp / "a", 32, **{"training.max_steps": 2, "checkpointing.steps": 2})
    bare = train_tiny(tmp / "b", 32, **{"training.max_steps": 2, "checkpointing.steps": 2,
                                        "training.use_ema": False})
    out = export(run, "safetensors", tmp / "export")
    return run, bare, out


def test_open_weights_opens_every_kind_of_path(trained, tmp_path):
    run, bare, out = trained
    ckpt = run / "checkpoint-2"
    ema = checkpoint.load_tensors(ckpt / checkpoint.EMA)
    model = checkpoint.load_tensors(ckpt / checkpoint.MODEL)
    same = lambda a, b: a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # noqa: E731

    for path in (ckpt, run):  # a checkpoint folder; a run folder (its newest valid checkpoint)
        w = checkpoint.open_weights(path)
        assert (w.kind, w.source, w.which, w.step) == ("checkpoint", ckpt, "ema", 2) and same(w.state, ema)
        assert w.cfg.training.max_steps == 2 and w.manifest["latent"]["shape"]
    assert same(checkpoint.open_weights(run, "model").state, model)

    w = checkpoint.open_weights(bare)  # no ema.pt: the raw weights, or a refusal
    assert w.which == "model"
    with pytest.raises(checkpoint.NoEMAError):
        checkpoint.open_weights(bare, fallback=False)

    for path in (out, out / checkpoint.EXPORT_WEIGHTS):  # an export folder, or its weights file
        w = checkpoint.open_weights(path)
        assert (w.kind, w.source, w.step) == ("export", out, 2) and same(w.state, ema)
        assert w.meta["weights"] == "ema" and "latent_norm" in w.manifest

    from safetensors.torch import save_file

    alone = tmp_path / "alone.safetensors"  # a .safetensors with no config.json beside it
    save_file({k: v.contiguous() for k, v in ema.items()}, str(alone))
    w = checkpoint.open_weights(alone)
    assert (w.kind, w.which, w.manifest, w.cfg) == ("file", "unknown", {}, None) and same(w.state, ema)

    torch.save({"model": model, "ema": ema, "opt": {}}, tmp_path / "official.pt")  # the official training layout
    torch.save(model, tmp_path / "plain.pt")
    assert same(checkpoint.open_weights(tmp_path / "official.pt").state, ema)
    assert checkpoint.open_weights(tmp_path / "official.pt", "model").which == "its 'model' entry"
    w = checkpoint.open_weights(tmp_path / "plain.pt")
    assert (w.kind, w.which) == ("file", "state dict") and same(w.state, model)

    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        checkpoint.open_weights(tmp_path / "missing")


def test_fine_tune_and_export_read_through_open_weights(trained):
    """The two converted readers give what they gave: the same weights and descriptions."""
    from rich.console import Console

    from ditpipe.pipeline.finetune import load_init
    from ditpipe.stages.export import open_checkpoint

    run, _, out = trained
    ckpt = run / "checkpoint-2"
    source = load_init(run)
    assert source.description == f"{ckpt} (ema.pt, step 2)" and source.manifest["latent_norm"]
    assert load_init(out).description == f"{out / checkpoint.EXPORT_WEIGHTS} (ema weights, step 2)"
    folder, cfg, manifest, model, meta = open_checkpoint(run, True, Console(stderr=True))
    assert folder == ckpt and meta["weights"] == "raw" and meta["step"] == 2
    assert json.loads((out / checkpoint.EXPORT_CONFIG).read_text())["manifest"] == checkpoint.manifest_excerpt(
        json.loads((ckpt / checkpoint.MANIFEST).read_text()))
