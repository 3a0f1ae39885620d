"""The typer app: the only module that knows typer, and the one place errors become messages and exit codes.

Imports stay light (no torch) so `ditpipe --help` is fast; each verb imports its stage when it runs.
Dotted overrides in the training guide's spelling (`--data.dataset_name custom`) and `--set key=value` work on
every verb that takes a config.
"""

from __future__ import annotations

import json
import pickle
import shlex
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.markup import escape

from ditpipe.pipeline import __version__
from ditpipe.pipeline.config import resumable_keys
from ditpipe.pipeline.sample_options import EVALUATE_BATCH, SAMPLE_BATCH, SampleOptions
from ditpipe.pipeline.samplers import NAMES as SAMPLER_NAMES, SAMPLERS
from ditpipe.pipeline.errors import DitpipeError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="ditpipe: encode images to latent shards once, then train DiT models on them.")
err = Console(stderr=True)
out = Console()
OVERRIDES = {"allow_extra_args": True, "ignore_unknown_options": True}
OVERRIDES_HELP = ("Any config key as --section.key VALUE (e.g. --data.dataset_name custom), or --set section.key=VALUE."
                  " Every key with its value, default and meaning: ditpipe config show \\[--config C] \\[overrides].")


def _version(value: bool) -> None:
    if value:
        out.print(f"ditpipe {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    _quiet_third_party_warnings()


def _quiet_third_party_warnings() -> None:
    """Libraries' deprecation notices (e.g. huggingface_hub's `local_dir_use_symlinks` while diffusers looks for a
    VAE) are for their callers' authors, not for our users; printed in front of our own messages they bury them."""
    import warnings

    theirs = r"(?!ditpipe\.)"  # the module a warning is attributed to
    for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category, module=theirs)
    warnings.filterwarnings("ignore", message=r"(?s).*\bdeprecated\b", category=UserWarning, module=theirs)


def build_config(config: Optional[str], shorthands: dict[str, Any], extra: list[str]):
    """Defaults ← --config file ← shorthand flags ← dotted overrides (the most specific wins)."""
    from ditpipe.pipeline.config import load_config, parse_overrides

    overrides = {k: v for k, v in shorthands.items() if v is not None}
    overrides.update(parse_overrides(extra))
    return load_config(config, overrides)


@app.command(context_settings=OVERRIDES, epilog=OVERRIDES_HELP)
def encode(
    ctx: typer.Context,
    config: Optional[str] = typer.Option(None, "--config", "-c", help="YAML config (a path, or a shipped name: "
                                                                       "train_config, quickstart)."),
    dataset: Optional[str] = typer.Option(None, help="coco | custom | shapes (data.dataset_name)"),
    data_path: Optional[str] = typer.Option(None, help="COCO root or custom folder (data.dataset_path)"),
    split: Optional[str] = typer.Option(None, help="COCO split: train | val (data.split)"),
    out_dir: Optional[str] = typer.Option(None, "--out", help="Shard folder (shards.path)"),
    image_size: Optional[int] = typer.Option(None, help="Pixels (data.image_size)"),
    num_samples: Optional[str] = typer.Option(None, help="Deterministic subset size, or null for all "
                                                         "(data.num_samples)"),
    seed: Optional[int] = typer.Option(None, help="Subset and shapes seed (data.seed)"),
    vae: Optional[str] = typer.Option(None, help="A diffusers autoencoder id or folder, or 'pixel' (vae.name)"),
    vae_dtype: Optional[str] = typer.Option(None, help="fp32 | bf16 (vae.dtype)"),
    batch_size: Optional[int] = typer.Option(None, help="Encode batch, halved on OOM (vae.batch_size)"),
    fmt: Optional[str] = typer.Option(None, "--format", help="wds | parquet (shards.format)"),
    store: Optional[str] = typer.Option(None, help="mean_std | mean (shards.store)"),
    flip: Optional[bool] = typer.Option(None, "--flip/--no-flip", help="Random horizontal flips in training (VAE "
                                        "codecs also encode the mirror; shards.flip). --no-flip for digits, text, "
                                        "logos, maps: a mirrored glyph is another glyph."),
    samples_per_shard: Optional[int] = typer.Option(None, help="Inputs per shard (shards.samples_per_shard)"),
    num_workers: Optional[int] = typer.Option(None, help="Decode workers (data.num_workers)"),
    download: Optional[bool] = typer.Option(None, "--download", help="COCO: fetch the official archives first"),
    captions: Optional[bool] = typer.Option(None, "--captions/--no-captions", help="Also embed every caption once "
                                            "with the text encoder (data.captions; needs ditpipe\\[text])"),
    text_encoder: Optional[str] = typer.Option(None, help="minilm (offline) | clip | t5 | hub id | local folder "
                                                          "(text.encoder)"),
    targets: Optional[str] = typer.Option(None, help="Also store a frozen image encoder's tokens for REPA: dinov2 | "
                                                     "inception (offline) | hub id | local folder (targets.encoder)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace shards made with other parameters."),
) -> None:
    """Encode images once through the VAE (or the pixel codec) into latent shards plus a manifest.

    Example: ditpipe encode --dataset shapes --vae pixel --image-size 32 --num-samples 2000 --out shards/shapes

    Text-to-image: ditpipe encode --dataset coco --data-path data/coco --captions --text-encoder minilm

    REPA targets: ditpipe encode --dataset custom --data-path data/photos --targets models/dinov2-base
    """
    shorthands = {
        "data.dataset_name": dataset, "data.dataset_path": data_path, "data.split": split, "shards.path": out_dir,
        "data.image_size": image_size, "data.seed": seed, "vae.name": vae,
        "vae.dtype": vae_dtype, "vae.batch_size": batch_size, "shards.format": fmt, "shards.store": store,
        "shards.flip": flip, "shards.samples_per_shard": samples_per_shard, "data.num_workers": num_workers,
        "data.download": download, "data.captions": captions, "text.encoder": text_encoder,
        "targets.encoder": targets}
    # --num-samples null means all, as --data.num_samples null does: it goes in as a dotted override (read as YAML)
    extra = (["--data.num_samples", num_samples] if num_samples is not None else []) + list(ctx.args)
    cfg = build_config(config, shorthands, extra)
    from ditpipe.stages.encode import encode as run_encode

    run_encode(cfg, overwrite=overwrite, console=err)
    # what comes next: train on these shards (on a CPU with the small recipe: pipeline.config.train_command)
    import torch

    from ditpipe.pipeline.config import parse_overrides, train_command

    given = {k: v for k, v in shorthands.items() if v is not None} | parse_overrides(extra)
    argv, why = train_command(cfg, config, given, "cuda" if torch.cuda.is_available() else "cpu")
    err.print("next: " + shlex.join(argv), highlight=False, markup=False, soft_wrap=True)
    if why:
        err.print(why, highlight=False, markup=False, soft_wrap=True)


RESTRETCH_HELP = ("On resume: stretch the LR schedule (same peak, warm-up and type) over the run's new length, e.g. "
                  "after --training.num_epochs N; recorded in the checkpoints. Without it, steps past the old end "
                  "run at its final LR (about 0 for cosine).")


@app.command(context_settings=OVERRIDES, epilog=OVERRIDES_HELP)
def train(
    ctx: typer.Context,
    config: Optional[str] = typer.Option(None, "--config", "-c", help="YAML config (a path, or a shipped name)."),
    resume: Optional[str] = typer.Option(None, help="Continue from this checkpoint or run folder (the guide's "
                                                    "--resume ./outputs/checkpoint-1000; s3://… too), or 'auto': "
                                                    "resume the run this command names when it has a checkpoint, "
                                                    "else start it (for torchrun's elastic restarts)."),
    init_from: Optional[str] = typer.Option(None, help="Fine-tune: start from these weights (an official DiT .pt, a "
                                                       "checkpoint or run folder, an exported .safetensors); a new "
                                                       "run, step 0, fresh optimizer (model.init_from)."),
    init_weights: Optional[str] = typer.Option(None, help="ema | raw: which weights of one of our checkpoints "
                                                          "--init-from takes (model.init_weights, default ema)."),
    restretch_schedule: bool = typer.Option(False, "--restretch-schedule", help=RESTRETCH_HELP),
) -> None:
    """Train a DiT on latent shards (made by `ditpipe encode` from the same config).

    Example: ditpipe train --config configs/train_config.yaml --data.dataset_name shapes --vae.name pixel
    Fine-tune: ditpipe train --config my.yaml --init-from DiT-XL-2-256x256.pt --model.name DiT-XL/2
    """
    if resume not in (None, "auto") and init_from is not None:  # auto: a fine-tune's restart resumes it
        raise DitpipeError("--init-from starts a new run from given weights; --resume continues a run with its own "
                           "weights and optimizer. Use one of them")
    cfg = build_config(config, {"model.init_from": init_from, "model.init_weights": init_weights}, ctx.args)
    from ditpipe.pipeline import run
    from ditpipe.stages import train as stage

    ckpt = None
    if resume == "auto":  # a folder named auto: ./auto/ (a path with a separator)
        from ditpipe.pipeline import objstore

        objstore.configure(cfg.storage)
        ckpt = run.auto_resume(cfg, config, _warn)
        if ckpt is None and restretch_schedule:
            raise DitpipeError("--restretch-schedule changes a resumed run's LR schedule, and this run has no "
                               "checkpoint yet: drop it")
        err.print(f"resuming from {ckpt}" if ckpt else "no checkpoint yet: starting the run", highlight=False,
                  soft_wrap=True)
    elif resume is not None and _is_url(resume):
        from ditpipe.pipeline import objstore

        objstore.configure(cfg.storage)
        ckpt, where = run.fetch_remote(resume, cfg.storage.cache_dir)
        cfg = cfg.model_copy(update={"logging": cfg.logging.model_copy(update={
            "output_dir": where["logging.output_dir"], "run_name": where["logging.run_name"]})})
    elif resume is not None:
        ckpt = run.find_checkpoint(Path(resume), Path(cfg.logging.output_dir), _warn)
    if ckpt is not None:
        stage.train(run.resume_config(ckpt, new=cfg), resume=ckpt, console=err,
                    restretch_schedule=restretch_schedule)
    else:
        if restretch_schedule:
            raise DitpipeError("--restretch-schedule changes a resumed run's LR schedule; a new run's schedule "
                               "already spans its num_epochs. Use it with --resume")
        stage.train(cfg, config_name=config, console=err)


RESUME_EPILOG = (f"Only the keys that cannot change the trained weights may differ from the run's config: "
                 f"{resumable_keys()} (e.g. --training.num_epochs 80 --restretch-schedule).")


@app.command(context_settings=OVERRIDES, epilog=RESUME_EPILOG)
def resume(
    ctx: typer.Context,
    target: Optional[str] = typer.Argument(None, metavar="[RUN_DIR_OR_CHECKPOINT]",
                                           help="Default: the run under ./outputs whose latest checkpoint is newest. "
                                                "A run in object storage: s3://BUCKET/PREFIX/RUN (its latest "
                                                "checkpoint, fetched into storage.cache_dir)."),
    output_dir: Path = typer.Option(Path("./outputs"), help="Where to look for runs when no target is given."),
    restretch_schedule: bool = typer.Option(False, "--restretch-schedule", help=RESTRETCH_HELP),
) -> None:
    """Continue a run exactly where its newest valid checkpoint left it (a run whose start failed before its first
    checkpoint starts again from its config.yaml).

    Example: ditpipe resume outputs/train_config --training.num_epochs 80 --restretch-schedule
    """
    from ditpipe.pipeline import run
    from ditpipe.pipeline.config import parse_overrides
    from ditpipe.stages import train as stage

    args = list(ctx.args)
    if target is not None and str(target).startswith("--"):  # `resume --training.num_epochs 80`: no target given
        args, target = [str(target), *args], None
    if target is not None and _is_url(target):
        _resume_remote(target, parse_overrides(args), restretch_schedule)
        return
    target = Path(target) if target is not None else None
    if target is not None and _never_checkpointed(target):
        if restretch_schedule:
            raise DitpipeError(f"'{target}' has no checkpoint, so it starts again, and a new run's schedule already "
                               "spans its num_epochs: drop --restretch-schedule")
        stage.train(_fresh_start_config(target, parse_overrides(args)), console=err)
        return
    ckpt = run.find_checkpoint(target, output_dir, _warn)
    err.print(f"resuming from {ckpt}", highlight=False, soft_wrap=True)
    stage.train(run.resume_config(ckpt, overrides=parse_overrides(args)), resume=ckpt, console=err,
                restretch_schedule=restretch_schedule)


def _is_url(target: str) -> bool:
    from ditpipe.pipeline.remote import is_url

    return is_url(target)


def _resume_remote(url: str, overrides: dict, restretch_schedule: bool) -> None:
    """`resume s3://…/run[/checkpoint-N]`: the checkpoint fetched into this node's staging folder (storage.* from
    the command line, else the defaults), then resumed, publishing to the same run folder."""
    from ditpipe.pipeline import objstore, run
    from ditpipe.pipeline.config import load_config
    from ditpipe.stages import train as stage

    storage = load_config(None, {k: v for k, v in overrides.items() if k.startswith("storage.")}).storage
    objstore.configure(storage)
    ckpt, where = run.fetch_remote(url, storage.cache_dir)
    err.print(f"resuming from {url} (fetched into {ckpt})", highlight=False, soft_wrap=True)
    stage.train(run.resume_config(ckpt, overrides={**overrides, **where}), resume=ckpt, console=err,
                restretch_schedule=restretch_schedule)


def _never_checkpointed(run: Path) -> bool:
    """A run folder whose start failed before its first checkpoint: its config.yaml and no checkpoint at all (a
    damaged checkpoint is not this: resume falls back past it, or names it)."""
    from ditpipe.pipeline import checkpoint

    return (run.is_dir() and (run / checkpoint.CONFIG).is_file() and not (run / checkpoint.STATE).exists()
            and not (run / checkpoint.LATEST).exists() and not checkpoint.list_checkpoints(run))


def _fresh_start_config(run: Path, overrides: dict):
    """The run's saved config.yaml with `overrides` applied (anything may change: no weights were saved), as a new
    run in the same folder; train replaces that failed start's files, or refuses a folder with files of the user's."""
    from ditpipe.pipeline import checkpoint, safe_yaml
    from ditpipe.pipeline.config import validate_tree
    from ditpipe.pipeline.errors import ConfigError
    from ditpipe.pipeline.remote import unconfirmed_remote

    saved = safe_yaml.safe_load((run / checkpoint.CONFIG).read_text())
    if not isinstance(saved, dict):
        raise DitpipeError(f"'{run / checkpoint.CONFIG}' is not a ditpipe config; start the run with `ditpipe train`")
    if remote := unconfirmed_remote(saved, overrides):
        raise ConfigError(remote, header=f"cannot start '{run}' again from a remote location its config names")
    merged = json.loads(json.dumps(saved))
    for key, value in {**overrides, "logging.output_dir": str(run.parent), "logging.run_name": run.name}.items():
        section, _, name = key.partition(".")
        merged.setdefault(section, {})[name] = value
    return validate_tree(merged)  # train says that it starts the run again, or why it cannot


def _interval(text: str | None) -> tuple[float, float] | None:
    """--cfg-interval LOW,HIGH → (low, high), checked: noise levels with 0 <= low <= high <= 1; None if not given."""
    if text is None:
        return None
    try:
        low, high = (float(x) for x in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"{text!r}: expected LOW,HIGH, e.g. 0.5,1", param_hint="--cfg-interval") from None
    if not 0.0 <= low <= high <= 1.0:
        raise typer.BadParameter(f"{text!r}: needs 0 <= LOW <= HIGH <= 1", param_hint="--cfg-interval")
    return low, high


def _warn(message: str) -> None:
    err.print(f"[yellow]warning:[/] {escape(message)}", soft_wrap=True)


PROTOCOL_HELP = ("dit: the DiT paper's FID-50K sampling (250 DDPM steps, cfg 1.5, 50,000 samples, labels uniform at "
                 "random); flags given still win.")
CFG_CHANNELS_HELP = ("official (guide the first 3 latent channels, as official DiT) | all. Default: official for an "
                     "official DiT .pt, all for ditpipe's own checkpoints.")
PRECISION_HELP = "bf16 (autocast on CUDA; the default there) | fp32 (no autocast, TF32 off). A CPU computes in fp32."
NPZ_HELP = "Also write the samples as the ADM evaluator's input: arr_0, uint8 N×H×W×3."
TORCHRUN_NUM = "torchrun's own parser takes --num for its --numa-binding"


def _run_default(key: str, official: str) -> str:
    return f"Default: the run's validation.{key} (an official DiT .pt: {official})."


@app.command()
def sample(
    checkpoint_path: Path = typer.Option(..., "--checkpoint", help="A checkpoint folder, a run folder (its newest valid "
                                                                  "checkpoint), or an official DiT .pt state dict."),
    ema: bool = typer.Option(True, "--ema/--no-ema", help="EMA weights (default, when the checkpoint has them)."),
    classes: Optional[str] = typer.Option(None, help="Comma-separated class ids or names (red_circle,3), cycled to "
                                                     "--num (default: all)."),
    num: Optional[int] = typer.Option(None, "--num", min=1, metavar="N", help="Number of samples (default: one per "
                                      "class, or 16). Under torchrun spell it --num-samples (" + TORCHRUN_NUM + ")."),
    num_samples: Optional[int] = typer.Option(None, "--num-samples", min=1, hidden=True, help="--num (torchrun)."),
    cfg_scale: Optional[float] = typer.Option(None, min=1.0, metavar="SCALE", help="Classifier-free guidance scale; "
                                              "1 = plain conditional sampling. "
                                              + _run_default("cfg_scale", "4, as official sample.py")),
    cfg_interval: Optional[str] = typer.Option(None, help="LOW,HIGH: guide only at noise levels in [LOW, HIGH] (0 "
                                                          "data, 1 noise); e.g. 0.5,1 guides the layout but not the "
                                                          "fine detail. " + _run_default("cfg_interval", "0,1")),
    steps: Optional[int] = typer.Option(None, min=1, metavar="N", help="Sampling steps. "
                                        + _run_default("sampling_steps", "250")),
    sampler: Optional[str] = typer.Option(None, help=", ".join(f"{' | '.join(names)} ({objective} models)"
                                                               for objective, names in SAMPLERS.items()) + ". "
                                                     + _run_default("sampler", "ddpm")),
    seed: int = typer.Option(0, min=0, metavar="N", help="Seed; the same seed gives the same samples."),
    out: Path = typer.Option(Path("grid.png"), help="Grid PNG (one class per column when classes repeat)."),
    out_dir: Optional[Path] = typer.Option(None, help="Also one PNG per sample: <index>_class<k>.png."),
    batch_size: int = typer.Option(SAMPLE_BATCH, min=1, metavar="N", help="Samples per batch."),
    vae: Optional[str] = typer.Option(None, help="Decoder override (default: the checkpoint's codec; "
                                                 "stabilityai/sd-vae-ft-ema for official checkpoints)."),
    model: Optional[str] = typer.Option(None, help="Official checkpoints only: the preset, e.g. DiT-XL/2."),
    image_size: Optional[int] = typer.Option(None, min=8, metavar="N", help="Official checkpoints only: pixels, "
                                                                             "e.g. 256."),
    prompt: Optional[list[str]] = typer.Option(None, "--prompt", help="Caption models: what to draw; repeat for "
                                                                      "more prompts (cycled to --num)."),
    text_encoder: Optional[str] = typer.Option(None, help="Caption models: a local copy of the manifest's text "
                                                          "encoder (checked by its weights hash)."),
    size: Optional[str] = typer.Option(None, help="WxH pixels, e.g. 320x208: another size than the run's most "
                                                  "common bucket (any multiple of downsample × patch)."),
    decoder: Optional[str] = typer.Option(None, help="Decode with this autoencoder instead (e.g. TAESD for an "
                                                     "SD-VAE run); checked to share the run's latent space."),
    protocol: Optional[str] = typer.Option(None, help=PROTOCOL_HELP),
    cfg_channels: Optional[str] = typer.Option(None, help=CFG_CHANNELS_HELP),
    precision: Optional[str] = typer.Option(None, help=PRECISION_HELP),
    npz_out: Optional[Path] = typer.Option(None, "--npz", help=NPZ_HELP),
) -> None:
    """Sample a grid (and per-sample PNGs, or an ADM .npz) from a checkpoint, with classifier-free guidance. The
    sampler, steps and guidance default to what the run validated with; every value used is printed. Sample i's
    noise is keyed on (seed, i): the same images for any batch size, and under torchrun for any process count.

    Example: ditpipe sample --checkpoint outputs/quickstart --num 64 --out-dir outputs/quickstart/samples

    Caption model: ditpipe sample --checkpoint outputs/shapes_captions --prompt "a blue square" --prompt "a red circle"

    The DiT paper's 50,000 on 8 GPUs: torchrun --nproc_per_node 8 $(which ditpipe) sample --checkpoint
    DiT-XL-2-256x256.pt --model DiT-XL/2 --image-size 256 --protocol dit --batch-size 256 --npz samples.npz
    """
    from ditpipe.stages.sample import sample as run_sample

    if num is not None and num_samples is not None and num != num_samples:
        raise typer.BadParameter(f"--num {num} and --num-samples {num_samples} differ; give one")
    num = num if num is not None else num_samples
    options = SampleOptions(num=num, seed=seed, use_ema=ema, sampler=sampler, steps=steps, cfg_scale=cfg_scale,
                            cfg_interval=_interval(cfg_interval), batch_size=batch_size, vae=vae, model_name=model,
                            image_size=image_size, text_encoder=text_encoder, protocol=protocol,
                            cfg_channels=cfg_channels, precision=precision, npz_out=npz_out)
    run_sample(checkpoint_path, options, classes=classes, prompts=prompt, out=out, out_dir=out_dir, size=size,
               decoder=decoder, console=err)


@app.command()
def evaluate(
    checkpoint_path: Path = typer.Option(..., "--checkpoint", help="A checkpoint folder, a run folder, or an official "
                                                                  "DiT .pt (with --model/--image-size)."),
    reference: Optional[str] = typer.Option(None, help="Real images: an image folder, pixel-codec shards, or an ADM "
                                                       "reference batch .npz (its stored statistics are used as they "
                                                       "are). Caption models default to the prompts' own images."),
    num: Optional[int] = typer.Option(None, "--num", "--num-samples", min=1, help="Samples to generate (default "
                                      "10,000, classes cycled; --protocol dit: 50,000; caption models: one per "
                                      "prompt). Under torchrun spell it --num-samples (" + TORCHRUN_NUM + ")."),
    cfg_scale: Optional[float] = typer.Option(None, min=1.0, help="Guidance scale. " + _run_default(
                                                                      "cfg_scale", "1.5, as official sample_ddp.py")),
    cfg_interval: Optional[str] = typer.Option(None, help="LOW,HIGH: guide only at noise levels in [LOW, HIGH]. "
                                                          + _run_default("cfg_interval", "0,1")),
    steps: Optional[int] = typer.Option(None, min=1, help="Sampling steps. "
                                                       + _run_default("sampling_steps", "250")),
    sampler: Optional[str] = typer.Option(None, help=" | ".join(SAMPLER_NAMES) + ". "
                                                     + _run_default("sampler", "ddpm")),
    seed: int = typer.Option(0, min=0, help="Seed for the generated samples."),
    batch_size: int = typer.Option(EVALUATE_BATCH, min=1, help="Images per batch, for generation and Inception."),
    ema: bool = typer.Option(True, "--ema/--no-ema", help="EMA weights (default, when present)."),
    kid: bool = typer.Option(False, "--kid", help="Also KID (on the reference's features)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the results as JSON here."),
    cache_dir: Optional[Path] = typer.Option(None, help="Reference statistics cache (default ~/.cache/ditpipe/fid)."),
    vae: Optional[str] = typer.Option(None, help="Decoder override; official checkpoints default to sd-vae-ft-ema."),
    model: Optional[str] = typer.Option(None, help="Official checkpoints only: the preset, e.g. DiT-XL/2."),
    image_size: Optional[int] = typer.Option(None, min=8, help="Official checkpoints only: pixels, e.g. 256."),
    protocol: Optional[str] = typer.Option(None, help=PROTOCOL_HELP),
    cfg_channels: Optional[str] = typer.Option(None, help=CFG_CHANNELS_HELP),
    precision: Optional[str] = typer.Option(None, help=PRECISION_HELP),
    npz_out: Optional[Path] = typer.Option(None, "--npz", help=NPZ_HELP),
    prompts: Optional[str] = typer.Option(None, help="Caption models: COCO captions_val2017.json, a text file of one "
                                                     "prompt a line, or a caption shard folder; one image each."),
    text_encoder: Optional[str] = typer.Option(None, help="Caption models: a local copy of the manifest's text "
                                                          "encoder (checked by its weights hash)."),
    inception_head: Optional[Path] = typer.Option(None, help="For the Inception Score: a file with the same "
                                                             "Inception's classifier layer (inception-2015-12-05.pt "
                                                             "or pt_inception-2015-12-05-*.pth)."),
) -> None:
    """FID, sFID, precision/recall (and the Inception Score, with --inception-head) of generated samples against
    real images, offline (needs the `eval` extra). The sampler, steps and guidance default to what the run validated
    with; every value used is printed.

    Example: ditpipe evaluate --checkpoint outputs/quickstart --reference shards/shapes-16px-pixel-4000 --num 2000

    The DiT paper's table: torchrun --nproc_per_node 8 $(which ditpipe) evaluate --checkpoint DiT-XL-2-256x256.pt
    --model DiT-XL/2 --image-size 256 --protocol dit --reference VIRTUAL_imagenet256_labeled.npz --batch-size 256
    """
    from ditpipe.stages.evaluate import evaluate as run_evaluate

    options = SampleOptions(num=num, seed=seed, use_ema=ema, sampler=sampler, steps=steps, cfg_scale=cfg_scale,
                            cfg_interval=_interval(cfg_interval), batch_size=batch_size, vae=vae, model_name=model,
                            image_size=image_size, text_encoder=text_encoder, protocol=protocol,
                            cfg_channels=cfg_channels, precision=precision, npz_out=npz_out)
    run_evaluate(checkpoint_path, reference, options, kid=kid, json_out=json_out, cache_dir=cache_dir, prompts=prompts,
                 inception_head=inception_head, console=err)


@app.command(context_settings=OVERRIDES, epilog=OVERRIDES_HELP)
def quickstart(ctx: typer.Context,
               out: Path = typer.Option(Path("outputs/quickstart"), help="Where the run, samples and plot go.")) -> None:
    """The whole pipeline offline on built-in shapes: encode, train, sample, plot. A few minutes on a laptop CPU.

    Example: ditpipe quickstart
    """
    from ditpipe.pipeline.config import parse_overrides
    from ditpipe.stages.quickstart import quickstart as run_quickstart

    run_quickstart(out, parse_overrides(ctx.args), console=err)


@app.command()
def bench(
    part: str = typer.Argument("all", metavar="[encode|loader|train|memory|all]",
                               help="What to measure; several as a comma-separated list (encode,train)."),
    device: str = typer.Option("cpu", help="cpu | cuda"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the JSON result here."),
    vae_shape: str = typer.Option("sd", help="sd (sd-vae-ft-ema's architecture, random weights: the same cost) | dc-ae (DC-AE f32c32, Sana's) | tiny"),
    vae_dtype: str = typer.Option("fp32", help="fp32 | bf16 (vae.dtype)"),
    model: str = typer.Option("DiT-S/2", help="DiT preset for the train and memory parts."),
    image_size: int = typer.Option(256, help="Pixels (latent side = image size / 8)."),
    precision: str = typer.Option("fp16", help="Training precision as training.mixed_precision (CPU: bf16)."),
    compile_model: bool = typer.Option(False, "--compile", help="torch.compile the DiT (model.compile)."),
    gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing",
                                                help="Recompute each block in backward (model.gradient_checkpointing)."),
    batch_size: int = typer.Option(0, help="Train micro-batch (0: 4 on CPU, 256 on CUDA)."),
    accum: int = typer.Option(1, help="Gradient accumulation steps per optimizer step."),
    steps: int = typer.Option(0, help="Timed optimizer steps, at least (0: 3 on CPU, 20 on CUDA)."),
    warmup: int = typer.Option(0, help="Untimed steps first (0: 1 on CPU, 3 on CUDA)."),
    min_seconds: float = typer.Option(0.0, help="Time cheap loops at least this long (0: 5 s)."),
    encode_images: int = typer.Option(0, help="Images through the encode stage, the first batch untimed "
                                              "(0: 12 on CPU, 1024 on CUDA)."),
    encode_batch: int = typer.Option(0, help="Encode batch, vae.batch_size (0: 4 on CPU, 32 on CUDA)."),
    encode_source: str = typer.Option("jpeg", help="jpeg (generated 640x480 photo-like JPEGs) | shapes"),
    jpeg_count: int = typer.Option(64, help="JPEGs for the decode measurement."),
    loader_samples: int = typer.Option(20000, help="Samples in the loader comparison."),
    loader_batch: int = typer.Option(256, help="Loader batch size."),
    num_workers: int = typer.Option(-1, help="Loader workers (-1: data.num_workers' default)."),
    repeats: int = typer.Option(3, help="Trials per loader and decode measurement (median reported)."),
    memory_small: int = typer.Option(1000, help="Samples in the small loader-memory shard set."),
    memory_large: int = typer.Option(100000, help="Samples in the large loader-memory shard set."),
    memory_image_size: int = typer.Option(8, help="Pixel-codec image size for the loader-memory shards."),
    memory_steps: int = typer.Option(2, help="Training steps in each memory measurement."),
    peak_tflops: float = typer.Option(0.0, help="Device peak for MFU (0: known GPUs, e.g. H200 989 bf16)."),
    threads: int = typer.Option(0, help="torch threads in each measuring process (0: as train chooses them)."),
    workdir: Optional[Path] = typer.Option(None, help="Keep generated data here and reuse it (default: a temp dir)."),
    repa: bool = typer.Option(False, "--repa", help="train: also time the step with REPA (training.repa.weight 0.5) "
                                                    "on the same shards, with random targets a token."),
    repa_projector_dim: int = typer.Option(2048, help="REPA's projector width (training.repa.projector_dim)."),
    repa_target_dim: int = typer.Option(768, help="The synthetic targets' width (DINOv2-B: 768)."),
    shards: str = typer.Option("", help="loader: a URL shard folder (s3://bucket/prefix), read from a local copy, "
                                        "cold (empty cache) and warm, same run; storage.* from the environment."),
) -> None:
    """Measure encode, loader, train and memory on this machine; print one JSON object (stdout, and --json).

    Example: ditpipe bench all --json bench.json

    REPA's cost: ditpipe bench train --repa --json repa.json

    Shards in object storage: ditpipe bench loader --shards s3://bucket/shards --json s3.json
    """
    from ditpipe.stages.bench import BenchOptions, run as run_bench

    opts = BenchOptions(device=device, vae_shape=vae_shape, vae_dtype=vae_dtype, image_size=image_size, model=model,
                        precision=precision, compile=compile_model, gradient_checkpointing=gradient_checkpointing,
                        batch_size=batch_size, accum=accum, steps=steps,
                        warmup=warmup, min_seconds=min_seconds, encode_images=encode_images,
                        encode_batch=encode_batch, encode_source=encode_source, jpeg_count=jpeg_count,
                        loader_samples=loader_samples, loader_batch=loader_batch, num_workers=num_workers,
                        repeats=repeats, memory_small=memory_small, memory_large=memory_large,
                        memory_image_size=memory_image_size, memory_steps=memory_steps, peak_tflops=peak_tflops,
                        threads=threads, workdir=str(workdir) if workdir else "", repa=repa,
                        repa_projector_dim=repa_projector_dim, repa_target_dim=repa_target_dim, shards=shards)
    run_bench(part.split(","), opts, json_out)


@app.command()
def export(
    checkpoint_path: Path = typer.Argument(..., metavar="CHECKPOINT", help="A checkpoint folder, or a run folder "
                                                                          "(its newest valid checkpoint)."),
    fmt: str = typer.Option(..., "--format", help="safetensors | diffusers"),
    out_dir: Path = typer.Option(..., "--out", help="The folder to write (refused if it exists, unless --overwrite)."),
    raw: bool = typer.Option(False, "--raw", help="The raw weights instead of the EMA."),
    vae: Optional[str] = typer.Option(None, help="diffusers, 1,000 classes: the VAE for the DiTPipeline folder "
                                                 "(default: the one the run's shards were encoded with)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out folder."),
) -> None:
    """Export a checkpoint's weights as safetensors (+ a JSON of the model and manifest) or as a diffusers folder.

    Example: ditpipe export outputs/quickstart --format diffusers --out exports/quickstart-diffusers
    """
    from ditpipe.stages.export import export as run_export

    run_export(checkpoint_path, fmt, out_dir, raw=raw, vae=vae, overwrite=overwrite, console=err)


@app.command()
def ema(
    run: Path = typer.Argument(..., metavar="RUN", help="A run folder trained with training.posthoc_ema true."),
    sigma_rel: Optional[float] = typer.Option(None, "--sigma-rel", help="The EMA length to reconstruct (σ_rel, "
                                                                        "EDM2's relative width; 0.05-0.2 is useful)."),
    sweep: Optional[str] = typer.Option(None, help="Several σ_rel, comma-separated: reconstruct each (and score "
                                                   "it with --held-out)."),
    step: Optional[int] = typer.Option(None, help="The step to reconstruct at (a snapshot step; default the last)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="With --sigma-rel: the folder to write (model."
                                                               "safetensors + config.json, as `export` writes)."),
    held_out: bool = typer.Option(False, "--held-out", help="Score each: the held-out loss (data.val_fraction / "
                                                            "validation.shards), the class accuracy on shapes."),
    num: int = typer.Option(256, help="Samples per σ_rel for the class accuracy (shapes)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out folder."),
) -> None:
    """Post-hoc EMA (EDM2): reconstruct the EMA of any length from the run's snapshots, after training.

    Example: ditpipe ema outputs/quickstart --sweep 0.02,0.05,0.1,0.2 --held-out

    Then: ditpipe ema outputs/quickstart --sigma-rel 0.1 --out exports/quickstart-ema010
    """
    from ditpipe.stages.ema import ema as run_ema

    run_ema(run, sigma_rel=sigma_rel, sweep=sweep, step=step, out=out_dir, held_out=held_out, num=num,
            overwrite=overwrite, console=err)


@app.command()
def inspect(path: Path = typer.Argument(..., metavar="PATH", help="A shard folder, a run folder or a checkpoint."),
            as_json: bool = typer.Option(False, "--json", help="Print it as JSON (a shard folder: its manifest).")) -> None:
    """Summarise a shard folder (source, codec, latent layout, labels, shards, skips), a run (its state and every
    checkpoint: step, epoch, loss, EMA, valid, which one `latest` names) or a checkpoint (its config and manifest).

    Example: ditpipe inspect shards/shapes; ditpipe inspect outputs/quickstart
    """
    from ditpipe.stages.shardtools import inspect as run_inspect

    run_inspect(path, as_json, out)


@app.command()
def runs(output_dir: Path = typer.Argument(Path("./outputs"), metavar="[OUTPUT_DIR]",
                                           help="Where the runs are (logging.output_dir)."),
         as_json: bool = typer.Option(False, "--json", help="Print the list as JSON.")) -> None:
    """List the runs under OUTPUT_DIR: state (running, finished, stopped, failed, killed), last step, last loss,
    checkpoints, age.

    Example: ditpipe runs outputs
    """
    from ditpipe.stages.runs import list_runs

    list_runs(output_dir, out, as_json)


@app.command()
def verify(shards_dir: Path = typer.Argument(..., metavar="SHARDS", help="A shard folder.")) -> None:
    """Check every shard's sha256 and decode every sample; exit 1 on any problem.

    Example: ditpipe verify shards/shapes
    """
    from ditpipe.stages.shardtools import verify as run_verify

    run_verify(shards_dir, err)


config_app = typer.Typer(no_args_is_help=True, help="Show the resolved config.")
app.add_typer(config_app, name="config")


@config_app.command("show", context_settings=OVERRIDES, epilog=OVERRIDES_HELP)
def config_show(ctx: typer.Context,
                config: Optional[str] = typer.Option(None, "--config", "-c", help="YAML config (a path, or a shipped "
                                                                                  "name).")) -> None:
    """Every config key: its value (defaults ← --config ← overrides), its default, and what it means.

    Example: ditpipe config show --config quickstart --training.num_epochs 20
    """
    from ditpipe.pipeline.config import key_table

    rows = [(key, _show(value), _show(default), meaning, value != default)
            for key, value, default, meaning in key_table(build_config(config, {}, ctx.args))]
    widths = [max(len(r[i]) for r in rows + [("key", "value", "default")]) for i in range(3)]
    line = "  {:<%d}  {:<%d}  {:<%d}  {}" % tuple(widths)
    out.print(line.format("key", "value", "default", "meaning"), style="bold", markup=False, soft_wrap=True)
    for key, value, default, meaning, changed in rows:
        out.print(("*" if changed else " ") + line.format(key, value, default, meaning)[1:], markup=False,
                  highlight=False, soft_wrap=True)
    out.print("* differs from the default. Override any key with --section.key VALUE.", markup=False,
              highlight=False)


def _show(value: Any) -> str:
    """A value as YAML writes it on one line (null, true, [0.5, 1.0])."""
    import json

    if isinstance(value, tuple):
        value = list(value)
    return value if isinstance(value, str) else json.dumps(value).replace("None", "null")


def main(argv: list[str] | None = None) -> int:
    """Entry point: maps every error to one message and an exit code, here and nowhere else."""
    try:
        rv = app(args=argv, prog_name="ditpipe", standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except DitpipeError as e:  # ConfigError (exit 2) included: every problem, no traceback
        err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        return e.exit_code
    except typer.Exit as e:
        return e.exit_code
    except typer.TyperException as e:  # usage errors: typer's own message and exit code (2)
        e.show()
        return getattr(e, "exit_code", 2)
    except (KeyboardInterrupt, typer.Abort):
        err.print("[yellow]interrupted[/]: rerun the same command to continue where it stopped")
        return 130
    except (RecursionError, MemoryError, pickle.UnpicklingError, OSError) as e:
        # What an untrusted or damaged file raises where no reader named it (each reader of ours does): still one line
        err.print(f"[bold red]error:[/] {escape(_unhandled(e))}", highlight=False, soft_wrap=True)
        return 1


def _unhandled(e: BaseException) -> str:
    if isinstance(e, OSError):
        return f"{e.strerror or e}" + (f": '{e.filename}'" if e.filename else "") + " (an operating-system error)"
    what = {RecursionError: "data nested too deeply to read", MemoryError: "out of memory"}
    return (f"{what.get(type(e), 'a file that is not plain data')} ({type(e).__name__}: {str(e)[:200]}) while "
            "reading an input; run `ditpipe verify` on the shard folder, or check the checkpoint, config or weights "
            "file named on the command line")


def entry() -> None:
    rv = main()
    if rv == 0:  # after an error a rank's peers may still wait in a collective: leave that teardown to the launcher
        from ditpipe.pipeline.device import leave_process_group

        leave_process_group()
    sys.exit(rv)


if __name__ == "__main__":
    entry()
