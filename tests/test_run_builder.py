"""The run is the library's (issue 27, item 1): pipeline/run.py builds it for `train` and `bench` alike; the verb
keeps the loop and the console, and the test hooks are read once, in one module."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tree(path: str) -> ast.Module:
    return ast.parse((ROOT / path).read_text())


def test_no_stage_imports_a_private_name_of_another_stage():
    """bench built its trainer from stages.encode's and stages.train's private functions; a stage's `_name` is its
    own business."""
    found = []
    for path in sorted((ROOT / "stages").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("stages.") \
                    and node.module != f"stages.{path.stem}":
                found += [f"{path.name}: from {node.module} import {a.name}" for a in node.names
                          if a.name.startswith("_")]
    assert not found, found


def test_train_fits_on_two_screens():
    train = next(n for n in _tree("stages/train.py").body if isinstance(n, ast.FunctionDef) and n.name == "train")
    assert train.end_lineno - train.lineno <= 120


def test_bench_builds_its_trainer_with_the_run_builder():
    """No copy of the set-up: bench's trainer calls pipeline/run.py's builder, and builds no plan by hand."""
    trainer = next(n for n in _tree("stages/bench.py").body if isinstance(n, ast.ClassDef) and n.name == "_Trainer")
    called = {n.func.id if isinstance(n.func, ast.Name) else getattr(n.func, "attr", None)
              for n in ast.walk(trainer) if isinstance(n, ast.Call)}
    assert {"open_run", "build_model_for", "build_step_for", "Stream"} <= called
    assert not called & {"Plan", "make_accelerator", "build_model", "build_step", "training_batches", "open_data"}


def test_elastic_split_returns_a_new_config_and_leaves_the_given_one():
    from ditpipe.pipeline.config import load_config
    from ditpipe.pipeline.run import elastic_split

    cfg = load_config(None, {"training.batch_size": 8, "training.gradient_accumulation_steps": 1})
    saved = {"batch_size": 8, "gradient_accumulation_steps": 1, "global_batch": 16, "world_size": 2}
    new, note = elastic_split(cfg, saved, 1, Path("ckpt"))
    assert (new.training.batch_size, new.training.gradient_accumulation_steps) == (8, 2) and "global batch 16" in note
    assert (cfg.training.batch_size, cfg.training.gradient_accumulation_steps) == (8, 1)


def test_the_hooks_are_read_once_in_one_module(monkeypatch):
    """The environment is read when the run starts; what changes later (every micro-batch read it) does nothing."""
    from ditpipe.pipeline import hooks

    monkeypatch.setenv(hooks.INJECT_ENV, "nan:3:5")
    monkeypatch.setenv(hooks.PAUSE_ENV, "0.5")
    monkeypatch.delenv(hooks.RECORD_ENV, raising=False)
    read = hooks.read()
    monkeypatch.setenv(hooks.INJECT_ENV, "spike:0:100")
    assert [read.injected(p) for p in range(6)] == [None, None, None, "nan", "nan", None]
    assert read.checkpoint_pause_s == 0.5 and read.sample_record(0) is None
    names = (hooks.INJECT_ENV, hooks.PAUSE_ENV, hooks.RECORD_ENV)
    for path in [*sorted((ROOT / "pipeline").glob("*.py")), *sorted((ROOT / "stages").glob("*.py"))]:
        if path.name != "hooks.py":
            assert not any(name in path.read_text() for name in names), path


def test_train_and_the_builder_take_the_same_first_step(tmp_path, one_thread):
    """The first step's loss of `train` (its metrics line) is the one the builder's run takes, as bench runs it."""
    import torch

    from conftest import pixel_shards, reset_accelerate
    from ditpipe.pipeline.config import load_config
    from ditpipe.pipeline.run import Stream, build_model_for, build_step_for, open_run
    from ditpipe.pipeline.schedule import lr_at
    from ditpipe.stages.train import train
    from tiny import TINY_MODEL

    shards = pixel_shards(tmp_path / "shards", 32)
    over = {"data.dataset_name": "shapes", "data.image_size": 16, "data.num_samples": 32, "vae.name": "pixel",
            "shards.path": str(shards), "data.num_workers": 0, **TINY_MODEL, "training.mixed_precision": "no",
            "training.batch_size": 8, "training.gradient_accumulation_steps": 1, "training.max_steps": 1,
            "logging.steps": 1, "logging.output_dir": str(tmp_path / "out"), "logging.run_name": "r",
            "logging.tensorboard": False, "validation.grid": False}
    run_dir = train(load_config(None, over))
    logged = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    reset_accelerate()

    cfg = load_config(None, over)
    run = open_run(cfg)
    model, objective, _ = build_model_for(run)
    step = build_step_for(run, model, objective)
    stream = Stream(run, 0)
    stream.start(0)
    t = cfg.training
    lr = lr_at(0, t.learning_rate, cfg.lr_scheduler.type, cfg.lr_scheduler.warmup_steps, run.total_steps)
    step(0, lr, stream.feed, None, 0)
    loss_sum, finite = (float(x) for x in step.stats.take_window())
    assert finite == 1 and loss_sum == pytest.approx(logged, rel=0, abs=0) and torch.isfinite(torch.tensor(loss_sum))
    reset_accelerate()
