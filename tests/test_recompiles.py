"""Recompiles under `model.compile: true` (issue 24), counted with torch's own dynamo counters: the compiled step
makes one graph per bucket shape at most, none past dynamo's recompile limit (which would run the rest eager), and
none once every shape has run, for the 11 `auto` buckets at 256 px and for real square and bucketed `train()` runs.
Before the fix the forward made each bucket's position embedding with numpy into a dict: of the 11 buckets 8
compiled and 3 ran eager every step (9 frames, 8 graphs, 1 recompile-limit fallback), and a 5-bucket run made 7
graphs in two epochs (the dict's growth failed the guards of buckets already compiled).

torch.compile runs with the `eager` backend here: dynamo decides graphs, guards and recompiles before it hands a
graph to the backend, so the counts are the same with inductor, which takes minutes a shape on a busy 2-core CPU."""

from __future__ import annotations

import functools

import pytest
import torch
from torch._dynamo.utils import counters

from ditpipe.pipeline import buckets
from ditpipe.pipeline.config import load_config
from ditpipe.pipeline.device import make_accelerator
from ditpipe.pipeline.diffusion import make_objective
from ditpipe.pipeline.latent_norm import LatentNorm
from ditpipe.pipeline.order import Plan
from ditpipe.pipeline.metrics import read_metrics
from ditpipe.pipeline.step import Micro, build_step
from ditpipe.pipeline.training import build_model
from ditpipe.stages.encode import encode
from ditpipe.stages.train import train

from conftest import jpeg_bytes, photo, pixel_shards
from tiny import TINY_MODEL, tiny_dit

TINY = {**TINY_MODEL, "model.name": "DiT-S/2",
        "model.compile": True, "model.class_dropout_prob": 0.1, "training.mixed_precision": "bf16",
        "data.num_workers": 0, "logging.tensorboard": False, "checkpointing.every_epoch": False,
        "lr_scheduler.warmup_steps": 2, "training.learning_rate": 1e-3}
BACKEND = "eager"  # module docstring


@pytest.fixture
def dynamo(monkeypatch):
    """Empty dynamo caches and counters; torch.compile with BACKEND; the recompile
    limit build_step raises comes back after the test."""
    from torch._dynamo import config

    torch._dynamo.reset()
    counters.clear()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=BACKEND))
    with config.patch(recompile_limit=config.recompile_limit):
        yield
    torch._dynamo.reset()


def compiles() -> tuple[int, int, int, list[str]]:
    """(frames dynamo began to compile, frames it compiled, graphs it made, its recompile-limit fallbacks)."""
    limit = [k for k in counters["unimplemented"] if "recompile limit" in k.lower()]
    return counters["frames"]["total"], counters["frames"]["ok"], counters["stats"]["unique_graphs"], limit


def test_the_step_makes_one_graph_per_auto_bucket_at_256px_and_none_on_the_next_pass(dynamo):
    """The 11 auto buckets of an f8 codec at 256 px, patch 2 (docs/codecs-and-buckets.md lists them), through the
    real set-up: the model of a bucketed manifest (training.build_model), build_step with compile on, two passes of
    optimizer steps over every bucket's shape. Each bucket compiles once, at its first step; the second pass compiles
    nothing."""
    sizes = buckets.auto_buckets(256, 16)
    shapes = [(4, h // 8, w // 8) for w, h in sizes]  # (C, H, W) latents of each bucket
    assert len(set(shapes)) == 11
    manifest = {"latent": {"shape": [1, 4, 32, 32]}, "labels": {"num_classes": 8},  # what build_model reads
                "buckets": [{"size": list(size), "latent_shape": [1, *s], "samples": 8}
                            for size, s in zip(sizes, shapes)]}
    cfg = load_config(None, {**TINY, "data.image_size": 256, "data.buckets": "auto", "training.batch_size": 2,
                             "training.gradient_accumulation_steps": 1})
    acc, _, _ = make_accelerator(cfg.training.mixed_precision)
    torch.manual_seed(0)
    step = build_step(acc, build_model(cfg, manifest, 8), make_objective("flow", False), Plan(88, 2, 1, 1),
                      (4, 32, 32), norm=LatentNorm("scale", (0.0,) * 4, (1.0,) * 4), posterior=False,
                      training=cfg.training, drop_prob=0.1, conditional=True, compile=True, rank=0)
    g = torch.Generator().manual_seed(1)
    micros = [Micro(torch.randn((2, *s), generator=g), None, torch.tensor([0, 5])) for s in shapes]
    for i, m in enumerate(micros):
        step(i, 1e-3, lambda m=m: m)
    assert compiles() == (11, 11, 11, []), counters["unimplemented"]  # (frames, compiled, graphs, fallbacks)
    for i, m in enumerate(reversed(micros)):  # the same shapes again, in another order: no guard fails
        step(11 + i, 1e-3, lambda m=m: m)
    assert compiles() == (11, 11, 11, [])
    assert torch.isfinite(step.stats.loss_sum) and int(step.stats.finite_steps) == 22
    plain = tiny_dit("DiT-S/2", input_size=32, in_channels=4, num_classes=8)
    assert list(step.raw.state_dict()) == list(plain.state_dict())  # the tables are no state: official layout


def test_a_compiled_square_train_makes_one_graph(dynamo, tmp_path):
    """A real `train()` on square shards, accumulation 2 and label dropout: one graph, made at step 0."""
    folder = pixel_shards(tmp_path / "shards", 32)
    cfg = load_config(None, {**TINY, "data.dataset_name": "shapes", "data.image_size": 16, "data.num_samples": 32,
                             "vae.name": "pixel", "shards.path": str(folder), "model.name": "DiT-S/4",
                             "training.batch_size": 2, "training.gradient_accumulation_steps": 2,
                             "training.max_steps": 6, "logging.steps": 3, "checkpointing.steps": 1000,
                             "logging.output_dir": str(tmp_path / "out")})
    run = train(cfg, config_name="square")
    assert read_metrics(run)[-1]["step"] == 6
    assert compiles() == (1, 1, 1, [])


def test_a_compiled_bucketed_train_makes_one_graph_per_bucket_over_two_epochs(dynamo, tmp_path):
    """A real `train()` over the 5 auto buckets of a mixed folder at 16 px (pixel codec, patch 4), two epochs: every
    bucket's shape compiles once in the first epoch, and the second compiles nothing."""
    photos = tmp_path / "photos"
    for c in ("a", "b"):
        (photos / c).mkdir(parents=True)
        for i, (w, h) in enumerate([(30, 60), (36, 60), (48, 48), (60, 36), (60, 30)] * 2):
            (photos / c / f"{i:02d}.jpg").write_bytes(jpeg_bytes(photo(w, h, i)))
    data = {"data.dataset_name": "custom", "data.dataset_path": str(photos), "data.image_size": 16,
            "data.num_samples": None, "vae.name": "pixel", "shards.path": str(tmp_path / "shards"),
            "data.num_workers": 0, "data.buckets": "auto", "model.name": "DiT-S/4"}  # the patch makes the buckets
    manifest = encode(load_config(None, data))
    assert len(manifest["buckets"]) == 5
    cfg = load_config(None, {**TINY, **data, "training.batch_size": 2,
                             "training.gradient_accumulation_steps": 1, "training.num_epochs": 2, "logging.steps": 5,
                             "checkpointing.steps": 1000, "logging.output_dir": str(tmp_path / "out")})
    run = train(cfg, config_name="buckets")
    assert read_metrics(run)[-1]["step"] == 20  # 5 buckets × 4 photos ÷ 2 a step, twice
    assert compiles() == (5, 5, 5, [])


def test_prepared_tables_are_the_ones_an_eager_forward_makes(dynamo):
    """prepare_grids makes what the forward would: numpy's exact sincos values, on the model's device and dtype."""
    from ditpipe.pipeline.model import get_2d_sincos_pos_embed, grid_pos_embed, prepare_grids

    model = tiny_dit("DiT-S/2", input_size=8, in_channels=4, num_classes=3, any_grid=True).to(torch.bfloat16)
    prepare_grids(model, [(3, 6), (4, 4)])
    assert grid_pos_embed(model, (4, 4)) is model.pos_embed  # the square grid is the parameter, as official
    table = grid_pos_embed(model, (3, 6))  # (1, 18, 32)
    want = torch.from_numpy(get_2d_sincos_pos_embed(32, (3, 6))).to(torch.bfloat16)  # (18, 32)
    assert table.dtype == torch.bfloat16 and torch.equal(table[0], want)
    assert grid_pos_embed(model, (3, 6)) is table  # made once
