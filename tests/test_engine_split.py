"""Issue 27 (items 5 and 6): the library holds the engines and the verbs are thin. Encode's engine is
pipeline/encode.py and reports through an observer (bench stamps batches with it); `Sampleable` lives in
pipeline/sampleable.py; `sample` and `evaluate` take one options object; the sampler names are listed once."""

from __future__ import annotations

import ast
import inspect
from dataclasses import fields
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
STAGES = sorted((ROOT / "stages").glob("*.py"))


def _stage_imports(path: Path) -> list[tuple[str, str]]:
    """(stage module, name) of every name a stage takes from another stage: `from ditpipe.stages.x import n`, and
    `stage.n` on a module bound by `import ditpipe.stages.x as stage` / `from ditpipe.stages import x`; modules are
    named by folder (`stages.x`)."""
    me = f"stages.{path.stem}"
    tree = ast.parse(path.read_text())
    named = lambda module: (module or "").removeprefix("ditpipe.")  # noqa: E731 (the installed name, by folder)
    modules: dict[str, str] = {}  # local name -> stage module
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and named(node.module).startswith("stages."):
            found += [(named(node.module), a.name) for a in node.names if named(node.module) != me]
        elif isinstance(node, ast.ImportFrom) and named(node.module) == "stages":
            modules.update({a.asname or a.name: f"stages.{a.name}" for a in node.names})
        elif isinstance(node, ast.Import):
            modules.update({a.asname: named(a.name) for a in node.names
                            if named(a.name).startswith("stages.") and a.asname})
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules:
            if modules[node.value.id] != me:
                found.append((modules[node.value.id], node.attr))
    return found


@pytest.mark.parametrize("path", STAGES, ids=[p.stem for p in STAGES])
def test_no_stage_imports_another_stages_private_name(path):
    private = [f"{module}.{name}" for module, name in _stage_imports(path) if name.startswith("_")]
    assert not private, f"{path.name} reaches into another stage: {private}"


def test_evaluate_imports_nothing_from_sample():
    assert not [m for m, _ in _stage_imports(ROOT / "stages" / "evaluate.py") if m == "stages.sample"]
    tree = ast.parse((ROOT / "stages" / "evaluate.py").read_text())
    names = {a.name for n in ast.walk(tree)
             if isinstance(n, ast.ImportFrom) and n.module in ("stages", "ditpipe.stages") for a in n.names}
    assert "sample" not in names


def test_bench_hooks_encode_through_its_callback_not_by_swapping_a_function():
    src = (ROOT / "stages" / "bench.py").read_text()
    assert "_encode_batch" not in src and "on_batch=" in src


def test_the_encode_engine_lives_in_pipeline_and_pipeline_imports_no_stage():
    from ditpipe.pipeline import encode

    assert callable(encode.encode) and issubclass(encode.Observer, object)
    for path in (ROOT / "pipeline").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                    else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not [m for m in mods if m == "stages" or m.startswith("stages.")], path


# ---------------------------------------------------------------------------------------------------- samplers


def _config_accepts(objective: str, sampler: str) -> bool:
    from ditpipe.pipeline.config import load_config
    from ditpipe.pipeline.errors import ConfigError

    try:
        load_config(None, {"diffusion.objective": objective, "validation.sampler": sampler})
        return True
    except ConfigError:
        return False


def _dispatches(objective, sampler: str) -> bool:
    def model_fn(x, t):
        return torch.zeros(x.shape[0], x.shape[1] * objective.out_channels_factor, *x.shape[2:])  # (N, C·k, H, W)

    try:
        objective.sample(model_fn, (1, 1, 2, 2), sampler, 4, torch.Generator().manual_seed(0), "cpu")
        return True
    except ValueError as e:
        assert "unknown sampler" in str(e)
        return False


def test_config_validation_and_the_dispatch_accept_the_same_samplers_per_objective():
    from typing import get_args

    from ditpipe.pipeline.config import ValidationConfig
    from ditpipe.pipeline.diffusion import OBJECTIVES, make_objective

    literal = next(a for a in get_args(ValidationConfig.model_fields["sampler"].annotation) if get_args(a))
    names = set(get_args(literal)) | {"no-such-sampler"}
    for name in OBJECTIVES:
        objective = make_objective(name, learn_sigma=False)
        accepted = {s for s in names if _config_accepts(name, s)}
        dispatched = {s for s in names if _dispatches(objective, s)}
        assert accepted == dispatched == set(objective.samplers), name
        assert objective.default_sampler in accepted


def test_sampler_names_are_written_in_one_file():
    """The names appear as string literals in pipeline/samplers.py alone: config, CLI help and dispatch read it."""
    from ditpipe.pipeline.samplers import NAMES

    holders = {}
    for path in [*(ROOT / "pipeline").rglob("*.py"), *STAGES]:
        tree = ast.parse(path.read_text())
        respacing = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "space_timesteps"]
        skip = {id(n) for f in respacing for n in ast.walk(f)}  # "ddim25" there is a respacing spec, not a sampler
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value in ("ddim", "euler", "heun") and id(node) not in skip:
                holders.setdefault(node.value, set()).add(path.relative_to(ROOT).as_posix())
    assert set(NAMES) >= {"ddim", "euler", "heun"}
    assert all(files == {"pipeline/samplers.py"} for files in holders.values()), holders


# ---------------------------------------------------------------------------------------------------- options


def test_sample_and_evaluate_take_the_one_options_object():
    from ditpipe.pipeline.sample_options import SampleOptions
    from ditpipe.stages.evaluate import evaluate
    from ditpipe.stages.sample import sample

    shared = {f.name for f in fields(SampleOptions)}
    for verb in (sample, evaluate):
        params = inspect.signature(verb).parameters
        takes = [p for p in params.values() if p.annotation in ("SampleOptions", SampleOptions)]
        assert len(takes) == 1 and takes[0].default == SampleOptions(), verb.__name__
        assert not shared & set(params), f"{verb.__name__} repeats options as arguments: {shared & set(params)}"
    with pytest.raises(AttributeError):
        SampleOptions().seed = 1  # frozen


# ---------------------------------------------------------------------------------------------------- observer


def test_the_encode_observer_sees_every_batch(tmp_path):
    from ditpipe.pipeline.config import load_config
    from ditpipe.pipeline.encode import Observer, encode

    class Count(Observer):
        def __init__(self):
            self.batches, self.summaries = [], []

        def batch(self, n: int) -> None:
            self.batches.append(n)

        def summary(self, run) -> None:
            self.summaries.append(run)

    def config(folder: str):
        return load_config(None, {"data.dataset_name": "shapes", "data.image_size": 16, "data.num_samples": 10,
                                  "vae.name": "pixel", "vae.batch_size": 3, "data.num_workers": 0,
                                  "shards.samples_per_shard": 4, "shards.path": str(tmp_path / folder)})

    seen = Count()
    manifest = encode(config("engine"), observer=seen)
    assert sum(seen.batches) == manifest["num_samples"] == 10
    assert seen.batches == [3, 1, 3, 1, 2]  # a batch never crosses a shard
    assert len(seen.summaries) == 1 and seen.summaries[0].encoded == 10
    again = Count()
    assert encode(config("engine"), observer=again)["shards"] == manifest["shards"] and again.batches == []  # kept

    from ditpipe.stages.encode import encode as verb

    stamped = []
    assert verb(config("verb"), on_batch=stamped.append)["num_samples"] == sum(stamped) == 10  # bench's hook
