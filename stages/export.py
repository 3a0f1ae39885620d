"""`ditpipe export`: a checkpoint's weights for the rest of the ecosystem.

    --format safetensors   DIR/model.safetensors (EMA weights, or --raw) in the official DiT layout, and
                           DIR/config.json: the architecture, objective, latent normalisation, the shard manifest's
                           codec/labels/captions sections, and the run's config (pipeline/exported.py).
                           `--init-from DIR`, `sample --checkpoint DIR`, `evaluate` and `export` read it back.
    --format diffusers     DIR/transformer/ for `DiTTransformer2DModel.from_pretrained`; with 1,000 classes (what
                           diffusers' DiTPipeline assumes: class 1000 is its null class) also DIR/vae/,
                           DIR/scheduler/ and model_index.json, a folder `DiTPipeline.from_pretrained` samples from.

The folder is written under a temporary name and renamed, so a crash leaves no half export. Every export holds
MARKER, which lists its files, so an earlier export can be told from anything else. An existing --out is replaced only
with --overwrite, only when it is an export of ours holding nothing but the files it lists, and only once the new
export is complete (the old one is moved aside, then deleted). `.`, the checkpoint, its run folder, their ancestors,
the home folder and the root are refused as --out whatever the flags say. The output folder's lock
(pipeline/lock.py) is held throughout.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from rich.console import Console

from ditpipe.pipeline import __version__, checkpoint, exported
from ditpipe.pipeline.config import Config
from ditpipe.pipeline.errors import DitpipeError
from ditpipe.pipeline.manifest import Manifest

FORMATS = ("safetensors", "diffusers")
PIPELINE_CLASSES = 1000  # diffusers' DiTPipeline hard-codes class 1000 as the null class


def export(checkpoint_path: Path, fmt: str, out: Path, *, raw: bool = False, vae: str | None = None,
           overwrite: bool = False, console: Console | None = None) -> Path:
    console = console or Console(stderr=True)
    if fmt not in FORMATS:
        raise DitpipeError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    ckpt, cfg, manifest, model, meta = open_checkpoint(Path(checkpoint_path), raw, console)
    out = Path(out)
    with exported.written_to(out), exported.replacing(out, overwrite, protect=ckpt, fmt=fmt, meta=meta,
                                                      verb="export") as tmp:
        if fmt == "safetensors":
            exported.write(tmp, model.state_dict(), meta)
        else:
            _write_diffusers(tmp, model, cfg, manifest, meta, vae, console, out)
    console.print(f"exported {ckpt} ({meta['weights']} weights, step {meta['step']}) → {out} ({fmt})")
    return out


def open_checkpoint(path: Path, raw: bool, console: Console):
    """(checkpoint folder, config, manifest excerpt, model with the chosen weights, export metadata). An export
    folder (`ditpipe ema --out`, an earlier safetensors export) holds one set of weights and is taken as it is."""
    from ditpipe.pipeline.training import build_model, num_classes_for

    folder = exported.folder_of(path)
    if folder is not None and raw:
        raise DitpipeError(f"'{folder}' is an export that holds one set of weights; drop --raw")
    if folder is None and path.is_file():
        raise DitpipeError(f"'{path}' is a file; `ditpipe export` takes a ditpipe checkpoint folder (or a run folder: "
                           "its newest valid checkpoint). An official DiT .pt is already in the official layout: "
                           "fine-tune it with `ditpipe train --init-from`, then export that run")
    if folder is None and not path.is_dir():
        raise DitpipeError(f"'{path}' does not exist; pass a checkpoint folder such as outputs/RUN/checkpoint-1000, "
                           "or a run folder")
    try:
        w = checkpoint.open_weights(path, "model" if raw else "ema", fallback=False,
                                    warn=lambda m: console.print(f"[yellow]warning:[/] {m}"))
    except checkpoint.NoEMAError as e:
        raise DitpipeError(f"{e} (the run had training.use_ema off); export the raw weights with --raw") from None
    model = build_model(w.cfg, w.manifest, num_classes_for(w.cfg, w.manifest))
    model.load_state_dict(w.state, strict=True)
    if w.kind == "export":
        return w.source, w.cfg, w.manifest, model.eval(), {**w.meta, "written_by": f"ditpipe {__version__}"}
    meta = exported.metadata(w.cfg, w.manifest, model, source=str(w.source), step=w.step,
                             weights="raw" if raw else "ema")
    return w.source, w.cfg, w.manifest, model.eval(), meta


def _write_diffusers(folder: Path, model, cfg: Config, manifest: dict, meta: dict, vae: str | None,
                     console: Console, out: Path) -> None:
    """Into `folder` (a temporary); `out` is the final folder, as the command named it, for the messages."""
    from diffusers import DiTTransformer2DModel

    from ditpipe.pipeline.diffusers_dit import diffusers_config, to_diffusers

    _check_diffusers_fit(model, cfg)
    transformer = DiTTransformer2DModel(**diffusers_config(model))
    transformer.load_state_dict(to_diffusers(model.state_dict(), model.depth), strict=True)
    reason = _no_pipeline_reason(model, cfg, manifest, meta["latent_norm"])
    if reason:
        transformer.save_pretrained(folder / "transformer")
        console.print(f"transformer only ({reason}): {out / 'transformer'} loads with "
                      "DiTTransformer2DModel.from_pretrained", markup=False, highlight=False, soft_wrap=True)
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
    if Manifest.of(manifest).codec["kind"] != "vae":
        return "a pixel-space model: DiTPipeline decodes with a VAE"
    if norm["kind"] != "scale" or any(norm["shift"]):
        return "its latents are shifted or normalised per channel, and DiTPipeline only divides by the VAE's scaling " \
               "factor"
    return None


def _write_pipeline(folder: Path, transformer, cfg: Config, manifest: dict, vae: str | None, console: Console) -> None:
    from diffusers import DDIMScheduler, DiTPipeline

    from ditpipe.pipeline.codec import load_codec
    from ditpipe.pipeline.diffusion import DDPM

    manifest = Manifest.of(manifest)
    codec_info = manifest.codec
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
    names = manifest.class_names or [str(i) for i in range(PIPELINE_CLASSES)]
    index["id2label"] = {str(i): name for i, name in enumerate(names)}  # DiTPipeline.get_label_ids reads it
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    console.print(f"DiTPipeline folder with the run's VAE ({codec_info['name']}) and a DDIM scheduler; "
                  "DiTPipeline.from_pretrained loads it")
