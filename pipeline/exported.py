"""The exported-weights layout, written by `ditpipe export --format safetensors` and `ditpipe ema --out`, and read
by `sample`, `evaluate`, `export` and `--init-from`:

    DIR/model.safetensors   one set of weights in the official DiT layout (fp32)
    DIR/config.json         what rebuilds and samples the model: the architecture, objective, latent normalisation,
                            the shard manifest's codec/labels/captions/latent sections, the run's config, the step
                            and which weights these are
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline import __version__
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
            "latent_norm": norm, "manifest": {k: manifest.get(k) for k in ("codec", "labels", "captions", "latent")},
            "config": cfg.to_dict(), **extra}


def write(folder: Path, state: dict[str, torch.Tensor], meta: dict) -> None:
    """The two files into `folder` (a temporary one the caller renames: see atomic.new_folder)."""
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    save_file(state, str(Path(folder) / WEIGHTS), metadata={"format": "pt", "ditpipe": json.dumps(
        {k: meta[k] for k in ("weights", "step", "objective")})})
    (Path(folder) / CONFIG).write_text(json.dumps(meta, indent=1))


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
