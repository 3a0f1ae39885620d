"""`ditpipe export`: a checkpoint's weights for the rest of the ecosystem.

    --format safetensors   DIR/model.safetensors (EMA weights, or --raw) in the official DiT layout, and
                           DIR/config.json: the architecture, objective, latent normalisation, the shard manifest's
                           codec/labels/captions sections, and the run's config. `--init-from DIR` reads it back.
    --format diffusers     DIR/transformer/ for `DiTTransformer2DModel.from_pretrained`; with 1,000 classes (what
                           diffusers' DiTPipeline assumes: class 1000 is its null class) also DIR/vae/,
                           DIR/scheduler/ and model_index.json, a folder `DiTPipeline.from_pretrained` samples from.

The folder is written under a temporary name and renamed, so a crash leaves no half export. An existing --out is
replaced only with --overwrite, and only once the new export is complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import yaml
from rich.console import Console

from pipeline import __version__, checkpoint
from pipeline.config import Config, validate_tree
from pipeline.errors import DitpipeError
from pipeline.latent_norm import LatentNorm

FORMATS = ("safetensors", "diffusers")
PIPELINE_CLASSES = 1000  # diffusers' DiTPipeline hard-codes class 1000 as the null class


def export(checkpoint_path: Path, fmt: str, out: Path, *, raw: bool = False, vae: str | None = None,
           overwrite: bool = False, console: Console | None = None) -> Path:
    console = console or Console(stderr=True)
    if fmt not in FORMATS:
        raise DitpipeError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    ckpt, cfg, manifest, model, meta = open_checkpoint(Path(checkpoint_path), raw, console)
    out = Path(out)
    _refuse_existing(out, overwrite)
    tmp = out.parent / f".{out.name}.export-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if fmt == "safetensors":
            _write_safetensors(tmp, model, meta)
        else:
            _write_diffusers(tmp, model, cfg, manifest, meta, vae, console)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)  # --overwrite: only now that the new export is whole
    os.replace(tmp, out)
    console.print(f"exported {ckpt} ({meta['weights']} weights, step {meta['step']}) → {out} ({fmt})")
    return out


def open_checkpoint(path: Path, raw: bool, console: Console):
    """(checkpoint folder, config, manifest excerpt, model with the chosen weights, export metadata)."""
    from stages.train import build_model, num_classes_for

    if path.is_file():
        raise DitpipeError(f"'{path}' is a file; `ditpipe export` takes a ditpipe checkpoint folder (or a run folder: "
                           "its newest valid checkpoint). An official DiT .pt is already in the official layout: "
                           "fine-tune it with `ditpipe train --init-from`, then export that run")
    if not path.is_dir():
        raise DitpipeError(f"'{path}' does not exist; pass a checkpoint folder such as outputs/RUN/checkpoint-1000, "
                           "or a run folder")
    if not (path / checkpoint.STATE).is_file():
        path = checkpoint.find_resumable(path, lambda m: console.print(f"[yellow]warning:[/] {m}"))[0]
    state = checkpoint.validate(path)
    cfg = validate_tree(yaml.safe_load((path / "config.yaml").read_text()))
    manifest = json.loads((path / "manifest.json").read_text())
    weights = "raw" if raw else "ema"
    file = path / ("model.pt" if raw else "ema.pt")
    if not file.is_file():
        raise DitpipeError(f"'{path}' has no ema.pt (the run had training.use_ema off); export the raw weights with "
                           "--raw")
    num_classes = num_classes_for(cfg, manifest)
    model = build_model(cfg, manifest, num_classes)
    model.load_state_dict(checkpoint.load_tensors(file), strict=True)
    norm = manifest.get("latent_norm") or LatentNorm.from_manifest(manifest, cfg.data.latent_norm).record()
    meta = {"format": "ditpipe-dit", "written_by": f"ditpipe {__version__}", "checkpoint": str(path),
            "step": state["step"], "weights": weights, "model": architecture(cfg, model),
            "objective": cfg.diffusion.objective, "latent_norm": norm,
            "manifest": {k: manifest.get(k) for k in ("codec", "labels", "captions", "latent")},
            "config": cfg.to_dict()}
    return path, cfg, manifest, model.eval(), meta


def architecture(cfg: Config, model) -> dict:
    """What builds the model again: `pipeline.model.DiT(**architecture minus name)`."""
    return {"name": cfg.model.name, "input_size": model.input_size, "patch_size": model.patch_size,
            "in_channels": model.in_channels, "hidden_size": model.hidden_size, "depth": model.depth,
            "num_heads": model.num_heads, "num_classes": model.num_classes, "learn_sigma": model.learn_sigma,
            "class_dropout_prob": model.class_dropout_prob, "qk_norm": cfg.model.qk_norm}


def _refuse_existing(out: Path, overwrite: bool) -> None:
    if out.is_file():
        raise DitpipeError(f"--out '{out}' is a file; name a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise DitpipeError(f"--out '{out}' already exists and is not empty; choose another folder or pass "
                           "--overwrite to replace it")


def _write_safetensors(folder: Path, model, meta: dict) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt", "ditpipe": json.dumps(
        {k: meta[k] for k in ("weights", "step", "objective")})})
    (folder / "config.json").write_text(json.dumps(meta, indent=1))


def _write_diffusers(folder: Path, model, cfg: Config, manifest: dict, meta: dict, vae: str | None,
                     console: Console) -> None:
    from diffusers import DiTTransformer2DModel

    from pipeline.diffusers_dit import diffusers_config, to_diffusers

    _check_diffusers_fit(model, cfg)
    transformer = DiTTransformer2DModel(**diffusers_config(model))
    transformer.load_state_dict(to_diffusers(model.state_dict(), model.depth), strict=True)
    reason = _no_pipeline_reason(model, cfg, manifest, meta["latent_norm"])
    if reason:
        transformer.save_pretrained(folder / "transformer")
        console.print(f"transformer only ({reason}): its transformer/ folder loads with "  # folder: a temporary
                      "DiTTransformer2DModel.from_pretrained")
    else:
        _write_pipeline(folder, transformer, cfg, manifest, vae, console)
    (folder / "ditpipe.json").write_text(json.dumps({**meta, "diffusers_note": (
        "diffusers' DiT computes its timestep features with frequencies 10000^(-i/127); DiT, which these weights "
        "were trained with, uses 10000^(-i/128). For outputs equal to ditpipe's, call "
        "pipeline.diffusers_dit.match_official_timesteps(transformer) after loading. DiTPipeline uses class 1000 as "
        "its null class, so guidance through it needs a 1,000-class model.")}, indent=1))


def _check_diffusers_fit(model, cfg: Config) -> None:
    if model.num_classes == 0:
        raise DitpipeError("diffusers' DiTTransformer2DModel is class-conditional only, and this model is "
                           "unconditional; export it with --format safetensors")
    if cfg.model.qk_norm:
        raise DitpipeError("diffusers' DiTTransformer2DModel has no QK-norm, and this model was trained with "
                           "model.qk_norm; export it with --format safetensors")
    if model.null_class is None:
        raise DitpipeError("diffusers' DiT always has a null-class row (it trains with 10 % label dropout), and this "
                           "model was trained with model.class_dropout_prob 0; export it with --format safetensors")


def _no_pipeline_reason(model, cfg: Config, manifest: dict, norm: dict) -> str | None:
    """Why no DiTPipeline folder is written beside the transformer, or None when one is."""
    if model.num_classes != PIPELINE_CLASSES:
        return (f"{model.num_classes} classes: diffusers' DiTPipeline takes class {PIPELINE_CLASSES} as its null "
                f"class, so only {PIPELINE_CLASSES}-class models get a pipeline folder")
    if cfg.diffusion.objective != "ddpm":
        return f"a {cfg.diffusion.objective} model: DiTPipeline samples DDPM-ε models only"
    if manifest["codec"]["kind"] != "vae":
        return "a pixel-space model: DiTPipeline decodes with a VAE"
    if norm["kind"] != "scale" or any(norm["shift"]):
        return "its latents are shifted or normalised per channel, and DiTPipeline only divides by the VAE's scaling " \
               "factor"
    return None


def _write_pipeline(folder: Path, transformer, cfg: Config, manifest: dict, vae: str | None, console: Console) -> None:
    from diffusers import DDIMScheduler, DiTPipeline

    from pipeline.codec import load_codec
    from pipeline.diffusion import DDPM

    codec_info = manifest["codec"]
    try:
        codec = load_codec(vae or codec_info["name"], "fp32", torch.device("cpu"))
    except DitpipeError as e:
        raise DitpipeError(f"the DiTPipeline folder needs the run's VAE ({codec_info['name']}): {e} Pass it with "
                           "--vae PATH") from None
    if codec.weights_hash() != codec_info["hash"]:
        raise DitpipeError(f"the VAE at '{vae or codec_info['name']}' is not the one the run's shards were encoded "
                           f"with (hash {codec.weights_hash()[:12]}, the checkpoint records {codec_info['hash'][:12]})"
                           "; pass the right one with --vae PATH")
    betas = DDPM().betas  # the objective's own schedule: linear, 1e-4 → 0.02 over 1000 steps
    scheduler = DDIMScheduler(num_train_timesteps=len(betas), beta_start=float(betas[0]), beta_end=float(betas[-1]),
                              beta_schedule="linear", prediction_type="epsilon", clip_sample=False,
                              timestep_spacing="trailing")
    DiTPipeline(transformer=transformer, vae=codec.vae, scheduler=scheduler).save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    names = (manifest.get("labels") or {}).get("names") or [str(i) for i in range(PIPELINE_CLASSES)]
    index["id2label"] = {str(i): name for i, name in enumerate(names)}  # DiTPipeline.get_label_ids reads it
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    console.print(f"DiTPipeline folder with the run's VAE ({codec_info['name']}) and a DDIM scheduler; "
                  "DiTPipeline.from_pretrained loads it")
