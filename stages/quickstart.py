"""`ditpipe quickstart`: the whole pipeline, offline, on the built-in shapes, through the normal stages.

encode (pixel codec) → train (configs/quickstart.yaml) → sample (one class per column) → loss curve, then it prints
the three commands that do the same step by step. The samples are scored with a simple colour-and-shape classifier
(`pipeline.sources.classify_shape`), so "it learned" is a number, not an impression.
"""

from __future__ import annotations

import json
import os
import shlex
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from ditpipe.pipeline import atomic, lock
from ditpipe.pipeline.config import load_config
from ditpipe.pipeline.errors import DitpipeError
from ditpipe.pipeline.metrics import plot_loss
from ditpipe.pipeline.sources import SHAPES_CLASS_NAMES, classify_shape

MARKER = "quickstart.json"  # written last, with every file the quickstart wrote: what the next one may replace


def quickstart(out: Path = Path("outputs/quickstart"), overrides: dict | None = None,
               console: Console | None = None) -> dict:
    """Run it all; `overrides` (dotted keys) adjust configs/quickstart.yaml, e.g. fewer epochs on a slow machine."""
    from ditpipe.pipeline.sample_options import SampleOptions
    from ditpipe.stages.encode import encode
    from ditpipe.stages.sample import sample
    from ditpipe.stages.train import train

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
    images = sample(run, SampleOptions(num=per_class * len(SHAPES_CLASS_NAMES), seed=cfg.training.seed),
                    out=out / "grid.png", out_dir=samples, console=console)  # sampler, steps, guidance: validation.*
    labels = np.arange(len(images)) % len(SHAPES_CLASS_NAMES)
    accuracy = float(np.mean([classify_shape(img) == y for img, y in zip(images, labels)]))
    loss_png = plot_loss(run, out / "loss.png", "quickstart: training loss")
    seconds = time.time() - t0
    result = {"accuracy": accuracy, "seconds": round(seconds, 1), "grid": str(out / "grid.png"),
              "samples": str(samples), "loss_plot": str(loss_png), "run": str(run), "shards": str(cfg.shards_path)}
    atomic.write_json(out / MARKER, {**result, "files": _present(out)})
    _report(console, result, step_by_step(out, overrides))
    return result


def _clear_previous(out: Path) -> None:
    """Delete an earlier quickstart's files, only when the folder holds exactly what it wrote: its run can be
    extended (`ditpipe resume ... --restretch-schedule`, as ditpipe suggests) and a user can save files there,
    and neither is ours to delete. A file it wrote that is already gone (a clear killed half way) is no change."""
    if not out.exists():
        return
    if not (out / MARKER).is_file():
        raise DitpipeError(f"'{out}' exists and is not a finished quickstart; remove it or pass --out elsewhere")
    wrote = _recorded(out)
    now = _present(out)
    changed = sorted(rel for rel, sha in now.items() if wrote.get(rel) != sha)
    if changed:
        raise DitpipeError(f"'{out}' changed since the quickstart wrote it ({_describe(changed, wrote)}), so "
                           "nothing was deleted: move those out of it, or keep it and pass --out elsewhere")
    for rel in now:
        (out / rel).unlink()
    for folder in sorted({p for rel in now for p in (out / rel).parents if out in p.parents},
                         key=lambda p: -len(p.parts)):
        if not any(folder.iterdir()):
            folder.rmdir()
    (out / MARKER).unlink()  # last: a clear killed before this is finished by the next quickstart
    if not any(out.iterdir()):
        out.rmdir()


def _recorded(out: Path) -> dict[str, str]:
    """{file: sha256} of what the quickstart at `out` wrote, from its marker; refused when it has none."""
    try:
        files = json.loads((out / MARKER).read_text())["files"]
        if isinstance(files, dict) and all(isinstance(v, str) for v in files.values()):
            return files
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        pass
    raise DitpipeError(f"'{out / MARKER}' does not list the files the quickstart wrote (an earlier ditpipe, or "
                       f"damaged), so '{out}' is not replaced; remove the folder yourself or pass --out elsewhere")


def _present(out: Path) -> dict[str, str]:
    """{file: sha256} of every file under `out` but the marker and a lock. A link or anything else that is not a
    regular file is listed as such, never followed or read (we write neither, so it never matches a record)."""
    found = {}
    for root, dirs, files in os.walk(out):  # does not enter linked folders
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            path = Path(root) / name
            rel = path.relative_to(out).as_posix()
            if rel != MARKER and not lock.is_lock(path):
                regular = path.is_file() and not path.is_symlink()
                found[rel] = atomic.sha256_file(path) if regular else "not a regular file"
    return found


def _describe(changed: list[str], wrote: dict[str, str]) -> str:
    """The changed files, a folder the quickstart never had named once (`checkpoint-2000/`), at most six."""
    known = {rel.split("/")[0] for rel in wrote}
    names = sorted({rel.split("/")[0] + "/" if "/" in rel and rel.split("/")[0] not in known else rel
                    for rel in changed})
    return ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")


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
