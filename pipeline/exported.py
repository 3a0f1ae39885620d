"""The exported-weights layout, written by `ditpipe export --format safetensors` and `ditpipe ema --out`, and read
by `sample`, `evaluate`, `export` and `--init-from`:

    DIR/model.safetensors   one set of weights in the official DiT layout (fp32)
    DIR/config.json         what rebuilds and samples the model: the architecture, objective, latent normalisation,
                            the shard manifest's codec/labels/captions/latent (and buckets) sections, the run's
                            config, the step and which weights these are
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape

from ditpipe.pipeline import __version__, atomic, lock
from ditpipe.pipeline.checkpoint import (EXPORT_CONFIG as CONFIG, EXPORT_WEIGHTS as WEIGHTS, manifest_excerpt,
                                         read_json, write_trouble)
from ditpipe.pipeline.config import Config, validate_tree
from ditpipe.pipeline.errors import DitpipeError
from ditpipe.pipeline.latent_norm import LatentNorm
from ditpipe.pipeline.manifest import Manifest


def architecture(cfg: Config, model) -> dict:
    """What builds the model again: `pipeline.model.DiT(**architecture minus name)`."""
    return {"name": cfg.model.name, "input_size": model.input_size, "patch_size": model.patch_size,
            "in_channels": model.in_channels, "hidden_size": model.hidden_size, "depth": model.depth,
            "num_heads": model.num_heads, "num_classes": model.num_classes, "learn_sigma": model.learn_sigma,
            "class_dropout_prob": model.class_dropout_prob, "qk_norm": cfg.model.qk_norm}


def metadata(cfg: Config, manifest: dict, model, *, source: str, step: int, weights: str, **extra) -> dict:
    """config.json's content for `model` (holding `weights`, e.g. "ema") taken at `step` from `source`."""
    norm = Manifest.of(manifest).latent_norm or LatentNorm.from_manifest(manifest, cfg.data.latent_norm).record()
    return {"format": "ditpipe-dit", "written_by": f"ditpipe {__version__}", "checkpoint": source, "step": step,
            "weights": weights, "model": architecture(cfg, model), "objective": cfg.diffusion.objective,
            "latent_norm": norm, "manifest": manifest_excerpt(manifest), "config": cfg.to_dict(), **extra}


def write(folder: Path, state: dict[str, torch.Tensor], meta: dict) -> None:
    """The two files into `folder` (a temporary one the caller renames: see `replacing`)."""
    from safetensors.torch import save_file

    from ditpipe.pipeline.phema import sort_metadata

    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    save_file(state, str(Path(folder) / WEIGHTS), metadata={"format": "pt", "ditpipe": json.dumps(
        {k: meta[k] for k in ("weights", "step", "objective")})})
    sort_metadata(Path(folder) / WEIGHTS)  # hash-map order otherwise: the same weights would differ in bytes
    (Path(folder) / CONFIG).write_text(json.dumps(meta, indent=1))


MARKER = "ditpipe-export.json"  # in every export: what wrote it and its files, so --overwrite knows what it replaces


@contextlib.contextmanager
def replacing(out: Path, overwrite: bool, *, protect: Path, fmt: str, meta: dict, verb: str):
    """Yields an empty temporary folder beside `out`; when the block succeeds it becomes `out`, with MARKER listing
    its files. Under `out`'s lock throughout (pipeline/lock.py). `.`, `protect` (the checkpoint or run the weights
    come from), its parent, their ancestors, the home folder and the root are refused whatever the flags; an existing
    `out` is replaced only with `overwrite`, only when it is an export of ours holding nothing but what it lists, and
    only once the new one is complete (the old one is moved aside, then only the files it lists are deleted: a file
    saved into it while the export ran is kept, see `_clear_aside`). On failure the temporary goes and `out` stays
    as it was."""
    out = Path(out)
    _refuse_protected(out, Path(protect))
    with lock.hold(out, verb):
        tmp, aside = (out.parent / f".{out.name}.export-{what}{atomic.TMP_SUFFIX}" for what in ("new", "old"))
        if aside.exists():  # a killed export's moved-aside folder, cleared by the same rule
            _put_back(aside, out)
        listed = _refuse_existing(out, overwrite)
        shutil.rmtree(tmp, ignore_errors=True)  # our own hidden name, left by a killed export (we hold the lock)
        tmp.mkdir(parents=True)
        try:
            yield tmp
            _as_umask_makes(tmp)
            _write_marker(tmp, fmt, meta)
            _swap(tmp, out, aside)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _say_kept(out, _clear_aside(aside, out, listed))


@contextlib.contextmanager
def written_to(out: Path):
    """A failed write of the export folder `out` (a full disk: OSError from Python, SafetensorError from
    safetensors) as one line naming `out`. Put it outside `exported.replacing`, which has then removed the temporary
    and left an earlier export as it was."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, SafetensorError) as e:
        full, what = write_trouble(out.parent, e)
        raise DitpipeError(f"could not write '{out}': {what}. Nothing of it was kept (an earlier export there is as "
                           f"it was); {'free some space' if full else 'fix the cause'} and run the command again") \
            from None


def _as_umask_makes(folder: Path) -> None:
    """Every file written into the temporary `folder` (all ours) gets the mode the umask gives a new file, as
    config.json has: safetensors' writer (ours, and diffusers' save_pretrained) leaves its files 0600."""
    mode = atomic.new_file_mode()
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, mode)


def _refuse_protected(out: Path, ckpt: Path) -> None:
    """--out may never be a folder whose replacement loses what is not an export: `.`, the checkpoint, its run
    folder, any folder holding them, the home folder or the root. Checked before the lock makes the folder."""
    if out.is_symlink() or out.is_file():
        raise DitpipeError(f"--out '{out}' is a {'symbolic link' if out.is_symlink() else 'file'}; name a folder")
    target = out.resolve()
    for keep, what in ((Path.cwd(), "the current folder"), (ckpt.parent, "its run folder"), (ckpt, "the checkpoint")):
        keep = keep.resolve()
        if target == keep or target in keep.parents:
            raise DitpipeError(f"--out '{out}' is {what if target == keep else f'a folder holding {what}'} ('{keep}')"
                               "; an export goes into a folder of its own, e.g. --out exports/NAME")
    if ckpt.resolve() in target.parents:
        raise DitpipeError(f"--out '{out}' is inside the checkpoint '{ckpt}'; an export goes into a folder of its "
                           "own, e.g. --out exports/NAME")
    if target == Path.home().resolve() or target == Path(target.anchor):  # when `.` is not below them
        raise DitpipeError(f"--out '{out}' is the home folder or the root; an export goes into a folder of its own, "
                           "e.g. --out exports/NAME")


def _refuse_existing(out: Path, overwrite: bool) -> set[str]:
    """The files of the earlier export at `out` (its MARKER's list and MARKER), the only ones it may delete; a
    one-line refusal when `out` is not an export of ours or holds anything else."""
    present = sorted(p.name for p in out.iterdir() if not lock.is_lock(p))
    if not present:
        return set()
    if not overwrite:
        raise DitpipeError(f"--out '{out}' already exists and is not empty; choose another folder or pass "
                           "--overwrite to replace an earlier export there")
    try:
        listed = set(json.loads((out / MARKER).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        raise DitpipeError(f"--out '{out}' is not an earlier ditpipe export (it has no readable {MARKER}), so "
                           "--overwrite will not replace it; choose another folder") from None
    foreign = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and not lock.is_lock(p)
                     and str(p.relative_to(out)) not in listed | {MARKER})
    if foreign:
        raise DitpipeError(f"--out '{out}' is an earlier export, but also holds files it did not write ("
                           f"{', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}); move them out, or "
                           "choose another folder")
    return listed | {MARKER}


def _listed(folder: Path) -> set[str]:
    """The files an export's MARKER lists (and MARKER), or nothing when it has none that reads."""
    try:
        files = json.loads((folder / MARKER).read_text())["files"]
        return {str(f) for f in files} | {MARKER}
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return set()


def _write_marker(folder: Path, fmt: str, meta: dict) -> None:
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    (folder / MARKER).write_text(json.dumps({"written_by": meta["written_by"], "format": fmt,
                                             "checkpoint": meta["checkpoint"], "files": files}, indent=1))


def _swap(tmp: Path, out: Path, aside: Path) -> None:
    """Put the complete export `tmp` at `out`; an earlier export there is moved to `aside` first (`_clear_aside`
    then deletes what it listed). The locked `.lock` moves into the new folder, so the lock never lapses."""
    if (out / lock.NAME).exists():
        os.replace(out / lock.NAME, tmp / lock.NAME)
    os.replace(out, aside)
    os.replace(tmp, out)
    atomic.fsync_dir(out.parent)


def _clear_aside(aside: Path, out: Path, listed: set[str]) -> list[str]:
    """Delete from the old export moved to `aside` only the regular files in `listed` (what it wrote), listed
    again now, under the lock: the check before the export began cannot see a file saved into the folder while
    the new one was being written. Anything else goes back to its place in `out`, or, where the new export took
    its name, into a visible `<out>.kept` folder. Returns where what was kept is now, for the message."""
    back, beside, kept = [], [], None
    for path in [p for p in aside.rglob("*") if p.is_symlink() or not p.is_dir()]:  # links are moved, not entered
        rel = str(path.relative_to(aside))
        if rel in listed and path.is_file() and not path.is_symlink():
            if rel != MARKER:  # MARKER goes last: a clear killed half way is redone from the same list
                path.unlink()
            continue
        if _free(out / rel, out):
            dest = out / rel
            back.append(rel)
        else:
            kept = kept or _unused(out.with_name(f"{out.name}.kept"))
            dest = kept / rel
            beside.append(rel)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, dest)
    (aside / MARKER).unlink(missing_ok=True)
    for folder in sorted((p for p in aside.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)) + [aside]:
        with contextlib.suppress(OSError):
            folder.rmdir()  # only empty ones
    names = lambda xs: ", ".join(xs[:5]) + (" ..." if len(xs) > 5 else "")  # noqa: E731
    where = ([f"in '{out}': {names(back)}"] if back else []) + (
        [f"in '{kept}', as the new export took their names: {names(beside)}"] if beside else [])
    if aside.exists():  # something was saved into it even while it was cleared: into sight, whole
        rest = _unused(out.with_name(f"{out.name}.kept"))
        os.replace(aside, rest)
        where.append(f"what was saved while the old files were deleted, in '{rest}'")
    return where


def _put_back(aside: Path, out: Path) -> None:
    """A killed export's moved-aside folder: its listed files go, the rest back into `out`; when the kill came
    between the two renames (`out` holds nothing but the lock), the whole earlier export goes back."""
    alone = all(lock.is_lock(p) for p in out.iterdir())
    where = _clear_aside(aside, out, set() if alone else _listed(aside))
    if alone:
        _warn(f"put back the earlier export in '{out}', which an export killed while replacing it had moved aside")
    else:
        _say_kept(out, where)


def _free(dest: Path, root: Path) -> bool:
    """Whether `dest` (below `root`) can be made without touching anything there: no entry at it, and no file or
    link where a folder above it must be."""
    if os.path.lexists(dest):
        return False
    return all(not os.path.lexists(p) or (p.is_dir() and not p.is_symlink())
               for p in dest.parents if root in p.parents or p == root)


def _unused(path: Path) -> Path:
    """`path`, or `path-2`, `path-3`, ...: the first name nothing has."""
    n, name = 1, path
    while os.path.lexists(name):
        n += 1
        name = path.with_name(f"{path.name}-{n}")
    return name


def _say_kept(out: Path, where: list[str]) -> None:
    """One warning line naming every file that was kept rather than deleted, and where it is now."""
    if not where:
        return
    _warn(f"'{out}' held files the earlier export did not write (saved while it was replaced); they were kept, "
          f"not deleted: {'; '.join(where)}")


def _warn(text: str) -> None:
    Console(stderr=True).print(f"[yellow]warning:[/] {escape(text)}", highlight=False, soft_wrap=True)


def folder_of(path: Path) -> Path | None:
    """The export folder `path` names (the folder, or its model.safetensors), or None when it is not one."""
    path = Path(path)
    folder = path.parent if path.is_file() and path.name == WEIGHTS else path
    return folder if (folder / WEIGHTS).is_file() and (folder / CONFIG).is_file() else None


@dataclass
class Exported:
    cfg: Config
    manifest: dict  # the manifest excerpt, with the recorded latent_norm
    state: dict[str, torch.Tensor]
    meta: dict

    @property
    def description(self) -> str:
        return f"{self.meta['weights']} weights, step {self.meta['step']}"


def read(folder: Path) -> Exported:
    """An export folder, or a one-line error naming the file that is wrong."""
    from safetensors.torch import load_file

    folder = Path(folder)
    meta = read_json(folder / CONFIG)  # hostile JSON (nesting past the recursion limit too): one line naming it
    try:
        cfg, manifest = validate_tree(meta["config"]), {**meta["manifest"], "latent_norm": meta["latent_norm"]}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DitpipeError(f"'{folder / CONFIG}' is not an export's config.json ({type(e).__name__}: {e}); write it "
                           "again with `ditpipe export` or `ditpipe ema`") from None
    try:
        state = load_file(str(folder / WEIGHTS))
    except Exception as e:  # noqa: BLE001 (a truncated or foreign file)
        raise DitpipeError(f"cannot read '{folder / WEIGHTS}' as safetensors ({e}); write it again") from None
    return Exported(cfg, manifest, state, meta)
