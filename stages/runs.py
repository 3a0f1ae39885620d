"""`ditpipe runs` and `ditpipe inspect RUN|CHECKPOINT`: what the output folder holds, without loading a model.

A run folder is `<output_dir>/<run>/` with its `config.yaml`, `metrics.jsonl`, `latest` and checkpoint folders
(pipeline/checkpoint.py). Its state:
- running: a live train/resume process holds the run's lock (`<run>/.lock`, an exclusive flock; pipeline/lock.py);
- finished, stopped, failed: how its last train/resume process ended, as it recorded (`<run>/ended.json`,
  pipeline/lock.py): it reached its end step; a signal stopped it (Ctrl-C: it wrote a checkpoint; resume it); it
  raised an error (the record keeps its message's first line);
- killed: the lock file is left, held by nobody, and that process recorded no end (kill -9, a power loss, an
  out-of-memory kill): resume it;
- without a record (a run from before runs recorded their end): finished when the newest checkpoint is at the run's
  end (its epochs, or training.max_steps), else unknown. A record that does not read (damaged) counts as none.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from ditpipe.pipeline import checkpoint, lock, safe_yaml
from ditpipe.pipeline.errors import DitpipeError
from ditpipe.pipeline.manifest import Manifest

LOCK = lock.NAME  # held (flock LOCK_EX) by the train/resume process of a run, its record (pid, verb) inside


def lock_holder(run_dir: Path) -> tuple[bool | None, int | None]:
    """(held, pid) of the run's lock: True with the holder's pid while a process trains the run, False when the
    lock file exists but nobody holds it, None when there is no lock file to ask."""
    held, rec = _lock_state(run_dir)
    return held, rec["pid"] if held and rec else None


def _lock_state(run_dir: Path) -> tuple[bool | None, dict | None]:
    """(held, the record in the lock file) as `lock_holder`. Never creates the file, never follows a link, and holds
    a shared lock only for the instant of the test."""
    path = Path(run_dir) / LOCK
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None, None
    try:
        rec = lock.record(fd)  # the JSON record pipeline/lock.py writes after locking
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True, rec
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False, rec
    finally:
        os.close(fd)


def _state(run_dir: Path, at_end: bool) -> tuple[str, int | None, str]:
    """(state, pid while running, the failure's or stop's message) of a run; see the module's docstring."""
    held, rec = _lock_state(run_dir)
    if held:
        return "running", rec["pid"] if rec else None, ""
    end = lock.ended(run_dir)
    if held is False and not (end and rec and [end.get(k) for k in ("pid", "host", "since")]
                              == [rec.get(k) for k in ("pid", "host", "since")]):
        return "killed", None, ""  # its lock's holder died without recording an end (that record is older)
    if end:
        return end["outcome"], None, end["message"]
    return ("finished" if at_end else "unknown"), None, ""


@dataclass
class CheckpointInfo:
    name: str
    step: int | None
    epoch: int | None
    ema: bool
    valid: bool | None  # None: not checked (listing runs does not hash every file)
    problem: str = ""
    loss: float | None = None  # the training loss logged at (or just before) the checkpoint's step


@dataclass
class RunInfo:
    path: str
    state: str
    step: int | None  # the last logged step (metrics.jsonl), else the newest checkpoint's
    end_step: int | None
    loss: float | None
    latest: str | None
    age_s: float | None  # since the run last wrote anything we read
    pid: int | None = None
    message: str = ""  # how a failed (or stopped) run ended: its error's first line, as its process recorded it
    checkpoints: list[CheckpointInfo] = field(default_factory=list)


def is_run(path: Path) -> bool:
    path = Path(path)
    return path.is_dir() and not (path / checkpoint.STATE).is_file() and (
        (path / checkpoint.LATEST).is_file() or (path / checkpoint.CONFIG).is_file() and (
            (path / "metrics.jsonl").is_file() or bool(checkpoint.list_checkpoints(path))))


def is_checkpoint(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / checkpoint.STATE).is_file()


def run_info(run_dir: Path, check: bool = False) -> RunInfo:
    """What a run folder holds; `check` validates every checkpoint (every file's size and sha256)."""
    run_dir = Path(run_dir)
    losses = _losses(run_dir)
    latest_file = run_dir / checkpoint.LATEST
    latest = latest_file.read_text().strip() if latest_file.is_file() else None
    ckpts = [_checkpoint_info(p, losses, check) for _, _, p in checkpoint.list_checkpoints(run_dir)]
    usable = [c for c in ckpts if c.valid is not False]  # a damaged checkpoint is skipped, as resume skips it
    newest = next((c for c in usable if c.name == latest), None) or next(iter(usable), None)
    end = _end_step(run_dir / newest.name) if newest else None
    step = max([s for s in (max(losses, default=None), newest.step if newest else None) if s is not None],
               default=None)
    state, pid, message = _state(run_dir, newest is not None and end is not None and newest.step is not None
                                 and newest.step >= end)
    stamps = [p.stat().st_mtime for p in (run_dir / "metrics.jsonl", latest_file, run_dir / checkpoint.CONFIG)
              if p.is_file()]
    return RunInfo(str(run_dir), state, step, end, losses.get(step) if step in losses else _last(losses), latest,
                   time.time() - max(stamps) if stamps else None, pid, checkpoints=ckpts, message=message)


def _losses(run_dir: Path) -> dict[int, float]:
    """step → logged training loss, from metrics.jsonl (validation lines carry no `loss`)."""
    out = {}
    path = run_dir / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            row = json.loads(line)
            if "loss" in row:
                out[int(row["step"])] = float(row["loss"])
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a kill
    return out


def _last(losses: dict[int, float]) -> float | None:
    return losses[max(losses)] if losses else None


def _checkpoint_info(path: Path, losses: dict[int, float], check: bool) -> CheckpointInfo:
    try:
        state = checkpoint.validate(path) if check else checkpoint.read_state(path)
        problem, valid = "", True if check else None
    except (checkpoint.CheckpointError, OSError, ValueError) as e:
        state, problem, valid = {}, str(e), False
    step = state.get("step")
    logged = [s for s in losses if step is not None and s <= step]
    return CheckpointInfo(path.name, step, state.get("epoch"), checkpoint.has_ema(path, state), valid, problem,
                          losses[max(logged)] if logged else None)


def _end_step(ckpt: Path) -> int | None:
    """Where the run that wrote `ckpt` ends: its epochs, or training.max_steps when that comes first."""
    try:
        state = checkpoint.read_state(ckpt)
        t = safe_yaml.safe_load((ckpt / checkpoint.CONFIG).read_text())["training"]
        end = int(state["steps_per_epoch"]) * int(t["num_epochs"])
        return min(end, int(t["max_steps"])) if t.get("max_steps") else end
    except (checkpoint.CheckpointError, OSError, ValueError, KeyError, TypeError, OverflowError):
        return None


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"


def _num(value, fmt: str = ",") -> str:
    return "–" if value is None else format(value, fmt)


# ---------------------------------------------------------------------------------------------------- the verbs


def list_runs(output_dir: Path, console: Console, as_json: bool = False) -> list[RunInfo]:
    """`ditpipe runs`: every run under `output_dir`, most recently active first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise DitpipeError(f"'{output_dir}' does not exist; runs live in logging.output_dir (default ./outputs)")
    runs = sorted((run_info(p) for p in output_dir.iterdir() if is_run(p)),
                  key=lambda r: r.age_s if r.age_s is not None else float("inf"))
    if as_json:
        console.print_json(json.dumps([asdict(r) | {"checkpoints": len(r.checkpoints)} for r in runs]))
        return runs
    if not runs:
        console.print(f"no runs under '{output_dir}' (start one with `ditpipe train` or `ditpipe quickstart`)")
        return runs
    _print_runs(output_dir, runs, console)
    for r in (r for r in runs if r.state == "failed"):
        console.print(f"[red]{escape(Path(r.path).name)} failed:[/] {escape(r.message)}", highlight=False,
                      soft_wrap=True)
    for c in (c for r in runs for c in r.checkpoints if c.valid is False):
        console.print(f"[yellow]warning:[/] skipping damaged checkpoint: {c.problem}", highlight=False, soft_wrap=True)
    console.print("details: ditpipe inspect RUN; resume a stopped or killed run: ditpipe resume RUN",
                  highlight=False, soft_wrap=True)
    return runs


_COLOUR = {"running": "cyan", "finished": "green", "stopped": "yellow", "killed": "yellow", "failed": "red"}
_COLUMNS = ("run", "state", "step", "loss", "checkpoints", "latest", "age")


def _print_runs(output_dir: Path, runs: list[RunInfo], console: Console) -> None:
    """A table of the runs, each name whole on one line; where the terminal is too narrow for that table, each run
    as two lines instead (its name, then the rest), never a name wrapped or cut."""
    rows = [[escape(Path(r.path).name), f"[{_COLOUR.get(r.state, 'white')}]{r.state}[/]"
             + (f" (pid {r.pid})" if r.pid else ""), f"{_num(r.step)}/{_num(r.end_step)}", _num(r.loss, ".4f"),
             str(len(r.checkpoints)), escape(r.latest or "–"), _age(r.age_s)] for r in runs]
    console.print(f"runs in {output_dir}", highlight=False, soft_wrap=True, markup=False)  # a path whole, too
    widths = [max(Text.from_markup(x).cell_len for x in column) for column in zip(_COLUMNS, *rows)]
    if sum(widths) + 3 * len(widths) + 1 <= console.width:  # each column's padding and border, and the last border
        t = Table()
        for name in _COLUMNS:
            t.add_column(name, justify="right" if name in ("step", "loss", "checkpoints", "age") else "left",
                         no_wrap=True)
        for row in rows:
            t.add_row(*row)
        console.print(t)
        return
    for name, state, step, loss, ckpts, latest, age in rows:
        console.print(f"[bold]{name}[/]", highlight=False, soft_wrap=True)
        console.print(f"  {state}, step {step}, loss {loss}, {ckpts} checkpoints, latest {latest}, {age} ago",
                      highlight=False, soft_wrap=True)


def inspect_run(run_dir: Path, console: Console, as_json: bool = False) -> RunInfo:
    """`ditpipe inspect RUN`: the run's state and every checkpoint, validated."""
    info = run_info(run_dir, check=True)
    if as_json:
        console.print_json(json.dumps(asdict(info)))
        return info
    console.print(f"run {run_dir}: {info.state}" + (f" (pid {info.pid})" if info.pid else "")
                  + (f" ({info.message})" if info.state == "failed" else "")
                  + f", step {_num(info.step)} of {_num(info.end_step)}, loss {_num(info.loss, '.4f')}, last write "
                  f"{_age(info.age_s)} ago", highlight=False, soft_wrap=True, markup=False)
    t = Table(show_header=True, title_justify="left")
    for name in ("checkpoint", "step", "epoch", "loss", "EMA", "valid", "latest"):
        t.add_column(name, justify="right" if name in ("step", "epoch", "loss") else "left", no_wrap=True)
    for c in info.checkpoints:
        t.add_row(c.name, _num(c.step), _num(c.epoch), _num(c.loss, ".4f"), "yes" if c.ema else "no",
                  "[green]yes[/]" if c.valid else "[red]no[/] ¹", "←" if c.name == info.latest else "")
    console.print(t)
    for c in info.checkpoints:
        if not c.valid:
            console.print(f"¹ {c.problem}", highlight=False, soft_wrap=True)
    return info


def _state_or_nothing(ckpt: Path) -> dict:
    """What a checkpoint that failed validation still tells (its state, when only its files are wrong)."""
    try:
        return checkpoint.read_state(ckpt)
    except checkpoint.CheckpointError:
        return {}


def _precision(state: dict, training: dict) -> str:
    """The precision the run ran in, as its checkpoint records it (the config's fp16 runs as bf16 on a CPU, say);
    an older checkpoint records none: then the config's, marked as such."""
    configured = training.get("mixed_precision")
    ran = state.get("precision")
    if ran is None:
        return f"{configured} (configured)"
    return ran if ran == configured else f"{ran} (configured {configured})"


def inspect_checkpoint(ckpt: Path, console: Console, as_json: bool = False) -> dict:
    """`ditpipe inspect CHECKPOINT`: its training state, validated, and a summary of its config and manifest."""
    ckpt = Path(ckpt)
    try:
        state, problem = checkpoint.validate(ckpt), ""
    except checkpoint.CheckpointError as e:
        state, problem = _state_or_nothing(ckpt), str(e)
    cfg = safe_yaml.safe_load((ckpt / checkpoint.CONFIG).read_text()) if (ckpt / checkpoint.CONFIG).is_file() else {}
    manifest = json.loads((ckpt / "manifest.json").read_text()) if (ckpt / "manifest.json").is_file() else {}
    if as_json:
        console.print_json(json.dumps({"state": state, "valid": not problem, "config": cfg, "manifest": manifest}))
        return state
    t = Table(title=str(ckpt), show_header=False, title_justify="left")
    t.add_row("valid", "yes: every file's size and sha256 match" if not problem else f"[red]no[/]: {problem}")
    t.add_row("step", f"{state.get('step', 0):,} of the schedule's {state.get('total_steps', 0):,} (epoch "
                      f"{state.get('epoch')}, {state.get('samples_consumed', 0):,} samples, world size "
                      f"{state.get('world_size')})" + (f"; LR schedule restretched at step(s) "
                                                      f"{', '.join(map(str, state['restretched_at']))}"
                                                      if state.get("restretched_at") else ""))
    t.add_row("files", ", ".join(sorted(state.get("files", {}))))
    t.add_row("written by", f"{state.get('written_by')} ("  # which names ditpipe's own version already
              + ", ".join(f"{k} {v}" for k, v in state.get("versions", {}).items() if k != "ditpipe") + ")")
    m, tr, d = cfg.get("model", {}), cfg.get("training", {}), cfg.get("data", {})
    shape = ", ".join(f"{k} {m[k]}" for k in ("hidden_size", "depth", "num_heads", "patch_size") if m.get(k))
    t.add_row("model", f"{m.get('name')}" + (f" ({shape})" if shape else "") + f", {cfg.get('diffusion', {}).get('objective')}"
              f", conditioning {m.get('conditioning')}")
    t.add_row("training", f"batch {tr.get('batch_size')} × {tr.get('gradient_accumulation_steps')} accumulation, LR "
                          f"{tr.get('learning_rate')} ({cfg.get('lr_scheduler', {}).get('type')}), "
                          f"{tr.get('num_epochs')} epochs, precision {_precision(state, tr)}, EMA "
                          + (f"{tr.get('ema_decay')}" if tr.get("use_ema") else "off"))
    t.add_row("data", f"{d.get('dataset_name')} at {d.get('image_size')} px, shards "
                      f"{cfg.get('shards', {}).get('path') or '(derived from the config)'}")
    v = cfg.get("validation", {})
    t.add_row("sampling", f"{v.get('sampler') or 'the objective default'} × {v.get('sampling_steps')}, cfg "
                          f"{v.get('cfg_scale')} at noise {v.get('cfg_interval')} (what `ditpipe sample` uses)")
    m = Manifest.of(manifest)  # as read, unchecked: a damaged checkpoint is shown, not refused
    codec, labels, latent = m.codec, m.labels, m.raw.get("latent") or {}
    t.add_row("codec", f"{codec.get('name')} ({codec.get('kind')}, hash {str(codec.get('hash'))[:12]})")
    t.add_row("latent", f"{tuple(latent.get('shape', ()))}, normalised by {(m.latent_norm or {}).get('kind')}")
    t.add_row("labels", "none" if not labels else f"{labels['num_classes']} classes: "
              + ", ".join(labels["names"][:12]) + (" …" if labels["num_classes"] > 12 else ""))
    console.print(t)
    return state
