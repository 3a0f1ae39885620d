"""`ditpipe quickstart`: the whole pipeline, offline, on the built-in shapes, through the normal stages.

encode (pixel codec) → train (configs/quickstart.yaml) → sample (one class per column) → loss curve, then it prints
the three commands that do the same step by step. The samples are scored with a simple colour-and-shape classifier
(`pipeline.sources.classify_shape`), so "it learned" is a number, not an impression.
"""

from __future__ import annotations

import json
import shlex
import shutil
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from pipeline.config import load_config
from pipeline.errors import DitpipeError
from pipeline.metrics import plot_loss
from pipeline.sources import SHAPES_CLASS_NAMES, classify_shape

MARKER = "quickstart.json"  # written last; its presence makes the folder ours to replace on the next quickstart


def quickstart(out: Path = Path("outputs/quickstart"), overrides: dict | None = None,
               console: Console | None = None) -> dict:
    """Run it all; `overrides` (dotted keys) adjust configs/quickstart.yaml, e.g. fewer epochs on a slow machine."""
    from stages.encode import encode
    from stages.sample import sample
    from stages.train import train

    console = console or Console(stderr=True)
    t0 = time.time()
    out = Path(out)
    overrides = {**(overrides or {}), "logging.output_dir": str(out.parent), "logging.run_name": out.name}
    cfg = load_config("quickstart", overrides)
    _clear_previous(out)
    console.rule("1/3 encode the built-in shapes (pixel codec: no VAE, no download)")
    encode(cfg, console=console)
    console.rule("2/3 train a small DiT (configs/quickstart.yaml)")
    run = train(cfg, config_name="quickstart", console=console)
    console.rule("3/3 sample one class per column")
    per_class, samples = 8, out / "samples"
    images = sample(run, num=per_class * len(SHAPES_CLASS_NAMES), seed=cfg.training.seed, out=out / "grid.png",
                    out_dir=samples, console=console)  # sampler, steps and guidance: the run's validation.*
    labels = np.arange(len(images)) % len(SHAPES_CLASS_NAMES)
    accuracy = float(np.mean([classify_shape(img) == y for img, y in zip(images, labels)]))
    loss_png = plot_loss(run, out / "loss.png", "quickstart: training loss")
    seconds = time.time() - t0
    result = {"accuracy": accuracy, "seconds": round(seconds, 1), "grid": str(out / "grid.png"),
              "samples": str(samples), "loss_plot": str(loss_png), "run": str(run), "shards": str(cfg.shards_path)}
    (out / MARKER).write_text(json.dumps(result, indent=1) + "\n")
    _report(console, result, step_by_step(out, overrides))
    return result


def _clear_previous(out: Path) -> None:
    if not out.exists():
        return
    if not (out / MARKER).is_file():
        raise DitpipeError(f"'{out}' exists and is not a finished quickstart; remove it or pass --out elsewhere")
    shutil.rmtree(out)  # our own earlier quickstart: run it again from scratch (same seed, same result)


def step_by_step(out: Path, overrides: dict) -> list[list[str]]:
    """The quickstart as three commands a user can paste: the same config and overrides, trained into a run folder
    of its own (`<out>-by-hand`), so it never collides with the quickstart's own run."""
    mine = ("logging.output_dir", "logging.run_name")
    extra = [a for k, v in overrides.items() if k not in mine for a in (f"--{k}", _arg(v))]
    run = out.with_name(f"{out.name}-by-hand")
    return [["ditpipe", "encode", "--config", "quickstart", *extra],
            ["ditpipe", "train", "--config", "quickstart", *extra, "--logging.output_dir", str(run.parent),
             "--logging.run_name", run.name],
            ["ditpipe", "sample", "--checkpoint", str(run), "--num", "64", "--out", str(run / "grid.png"),
             "--out-dir", str(run / "samples")]]


def _arg(value) -> str:
    """An override's value as the command line reads it back (YAML: null, true, [0.5, 1.0])."""
    return value if isinstance(value, str) else json.dumps(list(value) if isinstance(value, tuple) else value)


def _report(console: Console, result: dict, commands: list[list[str]]) -> None:
    t = Table(title="quickstart", show_header=False, title_justify="left")
    t.add_row("time", f"{result['seconds']:.0f} s")
    t.add_row("class accuracy", f"{result['accuracy']:.1%} of the samples show their class's colour and shape "
                                "(simple colour/shape classifier)")
    t.add_row("grid", result["grid"])
    t.add_row("samples", f"{result['samples']}/<index>_class<k>.png")
    t.add_row("loss curve", result["loss_plot"])
    t.add_row("run", f"{result['run']} (checkpoints, config.yaml, metrics.jsonl, tensorboard/)")
    t.add_row("shards", result["shards"])
    console.print(t)
    console.print("The same, step by step (sampling uses the run's own validation settings):")
    for argv in commands:  # unwrapped and shell-quoted: each line pastes as it is
        console.print("  " + shlex.join(argv), highlight=False, markup=False, soft_wrap=True)
