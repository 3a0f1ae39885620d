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

from pipeline import __version__, atomic, lock
from pipeline.config import Config, validate_tree
from pipeline.errors import DitpipeError
from pipeline.latent_norm import LatentNorm

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def architecture(cfg: Config, model) -> dict:
    """What builds the model again: `pipeline.model.DiT(**architecture minus name)`."""
    return {"name": cfg.model.name, "input_size": model.input_size, "patch_size": model.patch_size,
            "in_channels": model.in_channels, "hidden_size": model.hidden_size, "depth": model.depth,
            "num_heads": model.num_heads, "num_classes": model.num_classes, "learn_sigma": model.learn_sigma,
            "class_dropout_prob": model.class_dropout_prob, "qk_norm": cfg.model.qk_norm}


def metadata(cfg: Config, manifest: dict, model, *, source: str, step: int, weights: str, **extra) -> dict:
    """config.json's content for `model` (holding `weights`, e.g. "ema") taken at `step` from `source`."""
    norm = manifest.get("latent_norm") or LatentNorm.from_manifest(manifest, cfg.data.latent_norm).record()
    return {"format": "ditpipe-dit", "written_by": f"ditpipe {__version__}", "checkpoint": source, "step": step,
            "weights": weights, "model": architecture(cfg, model), "objective": cfg.diffusion.objective,
            "latent_norm": norm, "manifest": _excerpt(manifest), "config": cfg.to_dict(), **extra}


def _excerpt(manifest: dict) -> dict:
    """The manifest sections sampling needs; a bucketed run's buckets too, so `sample` knows its sizes."""
    excerpt = {k: manifest.get(k) for k in ("codec", "labels", "captions", "latent")}
    if manifest.get("buckets"):
        excerpt["buckets"] = manifest["buckets"]
    return excerpt


def write(folder: Path, state: dict[str, torch.Tensor], meta: dict) -> None:
    """The two files into `folder` (a temporary one the caller renames: see `replacing`)."""
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    save_file(state, str(Path(folder) / WEIGHTS), metadata={"format": "pt", "ditpipe": json.dumps(
        {k: meta[k] for k in ("weights", "step", "objective")})})
    (Path(folder) / CONFIG).write_text(json.dumps(meta, indent=1))


MARKER = "ditpipe-export.json"  # in every export: what wrote it and its files, so --overwrite knows what it replaces


@contextlib.contextmanager
def replacing(out: Path, overwrite: bool, *, protect: Path, fmt: str, meta: dict, verb: str):
    """Yields an empty temporary folder beside `out`; when the block succeeds it becomes `out`, with MARKER listing
    its files. Under `out`'s lock throughout (pipeline/lock.py). `.`, `protect` (the checkpoint or run the weights
    come from), its parent, their ancestors, the home folder and the root are refused whatever the flags; an existing
    `out` is replaced only with `overwrite`, only when it is an export of ours holding nothing but what it lists, and
    only once the new one is complete (the old one is moved aside, then deleted). On failure the temporary goes and
    `out` stays as it was."""
    out = Path(out)
    _refuse_protected(out, Path(protect))
    with lock.hold(out, verb):
        _refuse_existing(out, overwrite)
        tmp, aside = (out.parent / f".{out.name}.export-{what}{atomic.TMP_SUFFIX}" for what in ("new", "old"))
        shutil.rmtree(tmp, ignore_errors=True)  # our own hidden name, left by a killed export (we hold the lock)
        tmp.mkdir(parents=True)
        try:
            yield tmp
            _write_marker(tmp, fmt, meta)
            _swap(tmp, out, aside)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


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


def _refuse_existing(out: Path, overwrite: bool) -> None:
    present = sorted(p.name for p in out.iterdir() if not lock.is_lock(p))
    if not present:
        return
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


def _write_marker(folder: Path, fmt: str, meta: dict) -> None:
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    (folder / MARKER).write_text(json.dumps({"written_by": meta["written_by"], "format": fmt,
                                             "checkpoint": meta["checkpoint"], "files": files}, indent=1))


def _swap(tmp: Path, out: Path, aside: Path) -> None:
    """Put the complete export `tmp` at `out`; an earlier export there is moved to `aside` first and deleted only
    once the new one is in place. The locked `.lock` moves into the new folder, so the lock never lapses."""
    if (out / lock.NAME).exists():
        os.replace(out / lock.NAME, tmp / lock.NAME)
    if aside.exists():
        shutil.rmtree(aside)  # a killed export's moved-aside folder (our hidden name)
    os.replace(out, aside)
    os.replace(tmp, out)
    atomic.fsync_dir(out.parent)
    shutil.rmtree(aside)


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
    try:
        meta = json.loads((folder / CONFIG).read_text())
        cfg, manifest = validate_tree(meta["config"]), {**meta["manifest"], "latent_norm": meta["latent_norm"]}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DitpipeError(f"'{folder / CONFIG}' is not an export's config.json ({type(e).__name__}: {e}); write it "
                           "again with `ditpipe export` or `ditpipe ema`") from None
    try:
        state = load_file(str(folder / WEIGHTS))
    except Exception as e:  # noqa: BLE001 (a truncated or foreign file)
        raise DitpipeError(f"cannot read '{folder / WEIGHTS}' as safetensors ({e}); write it again") from None
    return Exported(cfg, manifest, state, meta)
