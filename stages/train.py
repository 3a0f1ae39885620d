"""`ditpipe train` / `ditpipe resume`: latent shards → DiT, in one readable loop (EDM2 style).

One counter drives everything: `step`, the optimizer steps done. It fixes the data position (step · global batch
samples consumed), the LR, the EMA decay, and the keyed generators for timesteps, noise and label dropout. The
loop checkpoints *before* a step, so checkpoint-N holds the state after N steps, and resuming from it replays
nothing and skips nothing.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from pipeline import __version__, checkpoint, shards
from pipeline.config import Config, validate_tree
from pipeline.diffusion import make_objective, micro_loss
from pipeline.ema import EMA, ema_decay
from pipeline.errors import ConfigError, DitpipeError, ShardError
from pipeline.finetune import init_from
from pipeline.latent_norm import LatentNorm
from pipeline.loader import (EpochOrder, ImageBatches, MicroBatches, Plan, is_url, make_loader, open_shards,
                            unconfirmed_remote)
from pipeline.metrics import MetricsLog
from pipeline.model import build_dit
from pipeline.schedule import lr_at
from pipeline.validation import HeldOut, loss_sums, open_held_out

# Debugging aid (see _SampleRecord): a path; each rank appends the global sample indices of every micro-batch.
RECORD_ENV = "DITPIPE_RECORD_SAMPLES"
# Keys that may differ between a run's saved config and the one it resumes with (DESIGN.md, Runs and checkpoints).
# A no-grad forward keeps no activations for backward, so the held-out loss takes this many times the micro-batch.
EVAL_BATCH_FACTOR = 4
RESUMABLE_CHANGES = ("training.num_epochs", "training.max_steps", "logging.", "checkpointing.", "validation.")


@dataclass
class RunSpec:
    """What a run is, derived once from the config and the manifest; printed in the preflight."""

    precision: str
    notice: str | None
    num_classes: int  # 0: unconditional or captions
    plan: Plan
    total_steps: int
    run_dir: Path
    held_out: str | None  # the validation set, described
    conditioning: str = "class"  # class | none | caption, resolved from model.conditioning and the manifest


# ---------------------------------------------------------------------------------------------------- set-up


def effective_precision(requested: str, device: torch.device) -> tuple[str, str | None]:
    if requested == "fp16" and device.type != "cuda":
        return "bf16", "fp16 autocast does not exist on CPU (accelerate would silently run fp32); using bf16"
    if requested == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return "fp16", "this GPU has no bf16; using fp16 with loss scaling"
    return requested, None


def encode_command(cfg: Config) -> str:
    d = cfg.data
    parts = [f"ditpipe encode --dataset {d.dataset_name}"]
    if d.dataset_name != "shapes":
        parts.append(f"--data-path {d.dataset_path}")
    if d.dataset_name == "coco":
        parts.append(f"--split {d.split}")
    parts += [f"--image-size {d.image_size}", f"--num-samples {d.num_samples if d.num_samples else 'null'}",
              f"--vae {cfg.vae.name}", f"--format {cfg.shards.format}", f"--out {cfg.shards_path}"]
    return " ".join(parts)


def check_manifest(cfg: Config, manifest: dict, folder: Path) -> None:
    """Refuse shards that are not what the config asks for, naming both values."""
    src, codec = manifest["source"], manifest["codec"]
    problems = []
    if src.get("dataset") != cfg.data.dataset_name:
        problems.append(("data.dataset_name", f"config says {cfg.data.dataset_name!r}, shards hold {src.get('dataset')!r}"))
    if src.get("image_size") != cfg.data.image_size:
        problems.append(("data.image_size", f"config says {cfg.data.image_size}, shards hold {src.get('image_size')}"))
    want = cfg.vae.name if cfg.vae.name == "pixel" else str(Path(cfg.vae.name).resolve()) \
        if Path(cfg.vae.name).exists() else cfg.vae.name
    if codec["name"] != want:
        problems.append(("vae.name", f"config says {cfg.vae.name!r}, shards were encoded with {codec['name']!r}"))
    if cfg.model.conditioning == "class" and not manifest.get("labels"):
        problems.append(("model.conditioning", "config says 'class', but the shards carry no labels"))
    enc = shards.text_encoder_of(manifest)
    if cfg.data.captions and enc and enc["name"] != _encoder_name(cfg.text.encoder):
        problems.append(("text.encoder", f"config says {cfg.text.encoder!r}, shards were encoded with {enc['name']!r}"))
    if cfg.model.conditioning == "caption" and not enc:
        problems.append(("model.conditioning", "config says 'caption', but the shards carry no caption embeddings; "
                                               "encode with `ditpipe encode ... --captions`"))
    if problems:
        raise ConfigError(problems, header=f"the shards in '{folder}' do not match the config")


def _encoder_name(spec: str) -> str:
    """text.encoder as the manifest records it: an alias as is, a local folder resolved."""
    from pipeline.text import ALIASES

    return spec if spec == "minilm" or spec in ALIASES or not Path(spec).exists() else str(Path(spec).resolve())


def _data(cfg: Config):
    """(manifest, shard folder, store, (source, codec) or None): shards for a normal run; for the online-VAE baseline
    (`data.source: images`) the source and codec, with the manifest encode would have written (minus the shards)."""
    folder = cfg.shards.path if is_url(cfg.shards.path or "") else cfg.shards_path  # a URL stays a string
    if cfg.data.source == "images":
        if cfg.model.conditioning == "caption":
            raise ConfigError([("model.conditioning", "the online baseline (data.source: images) embeds no captions; "
                                                      "encode shards with --captions and train on those")])
        from pipeline.codec import load_codec
        from pipeline.sources import make_source

        source = make_source(cfg.data)
        codec = load_codec(cfg.vae.name, cfg.vae.dtype, use_slicing=cfg.vae.use_slicing)
        manifest = shards.manifest_header(source, codec, cfg.shards.samples_per_shard,
                                          shards.latent_slices(codec.stores_std, "mean_std", False),
                                          flip_at_load=cfg.shards.flip)
        manifest["num_samples"] = len(source)
        return manifest, Path(f"{cfg.data.dataset_name} images (online {cfg.vae.name})"), None, (source, codec)
    if not is_url(folder) and not (folder / shards.MANIFEST).is_file():
        raise ShardError(f"no shards at '{folder}'. Make them first with:\n  {encode_command(cfg)}")
    store, manifest = open_shards(folder)
    check_manifest(cfg, manifest, folder)
    return manifest, folder, store, None


def _precomputed(device: torch.device):
    return lambda batch: batch["latents"].to(device, non_blocking=True)


def _online(codec, norm: LatentNorm, device: torch.device):
    """The baseline's per-step encode: z = (mean + std·ε − shift)·scale, ε and the flip drawn by the loader."""

    def to_latents(batch: dict) -> torch.Tensor:
        mean, std = codec.encode(batch["pixels"])  # (B, C, h, w) each, std None for pixels
        z = mean if std is None else mean + std * batch["eps"].to(device)
        return norm.normalize(z).to(device)  # (B, C, h, w)

    return to_latents


def conditioning_for(cfg: Config, manifest: dict) -> str:
    """model.conditioning with `auto` resolved from the manifest: caption embeddings → caption (encoding them is
    opt-in, so they win over labels the source also has, as shapes' do), else labels → class, else none."""
    if cfg.model.conditioning != "auto":
        return cfg.model.conditioning
    if shards.text_encoder_of(manifest):
        return "caption"
    return "class" if manifest.get("labels") else "none"


def num_classes_for(cfg: Config, manifest: dict) -> int:
    if conditioning_for(cfg, manifest) != "class":
        return 0
    return int(manifest["labels"]["num_classes"])


def build_model(cfg: Config, manifest: dict, num_classes: int) -> torch.nn.Module:
    """The official-layout DiT for class / unconditional runs, the caption DiT (model_text.py) for caption runs."""
    from pipeline.model_text import CAPTION_PRESETS, build_caption_dit

    _, channels, size, _ = manifest["latent"]["shape"]
    m = cfg.model
    caption = conditioning_for(cfg, manifest) == "caption"
    if not caption and m.name in CAPTION_PRESETS:
        raise ConfigError([("model.name", f"{m.name} is a caption model; it needs shards with caption embeddings "
                                          f"(encode --captions) and model.conditioning caption or auto, or use "
                                          f"{m.name.replace('DiT-T-', 'DiT-')} for a class model")])
    try:
        if caption:
            return build_caption_dit(m.name, input_size=size, in_channels=channels,
                                     text_dim=shards.text_encoder_of(manifest)["dim"],
                                     learn_sigma=m.learn_sigma and cfg.diffusion.objective == "ddpm",
                                     caption_dropout_prob=m.class_dropout_prob, qk_norm=m.qk_norm,
                                     gradient_checkpointing=m.gradient_checkpointing, hidden_size=m.hidden_size,
                                     depth=m.depth, num_heads=m.num_heads, patch_size=m.patch_size)
        return build_dit(m.name, input_size=size, in_channels=channels, num_classes=num_classes,
                         learn_sigma=m.learn_sigma and cfg.diffusion.objective == "ddpm",
                         class_dropout_prob=m.class_dropout_prob if num_classes else 0.0, qk_norm=m.qk_norm,
                         gradient_checkpointing=m.gradient_checkpointing, hidden_size=m.hidden_size, depth=m.depth,
                         num_heads=m.num_heads, patch_size=m.patch_size)
    except ValueError as e:
        raise ConfigError([("model", str(e))]) from None


def step_generator(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    """The generator for one optimizer step on one rank: timesteps, noise and label dropout come from it alone."""
    key = int(np.random.SeedSequence([seed, step, rank, 3]).generate_state(1, np.uint64)[0] >> 1)
    return torch.Generator(device=device).manual_seed(key)


def step_draws(objective, gen: torch.Generator, n: int, latent_shape: tuple[int, int, int], drop_prob: float,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All of one step's random draws for this rank's n = B·accum samples, at once and in a fixed order, so that
    accumulation only splits the batch: B=8 × 1 and B=4 × 2 see the same timesteps, noise and dropout."""
    t = objective.sample_timesteps(n, gen, device)  # (n,)
    noise = torch.randn((n, *latent_shape), generator=gen, device=device)  # (n, C, H, W)
    drop = torch.rand(n, generator=gen, device=device) < drop_prob  # (n,) CFG label dropout, once per sample
    return t, noise, drop


def batch_condition(conditioning: str, device: torch.device):
    """batch → the model's `y`: class labels, a Caption, or None (unconditional). Chosen once per run."""
    from pipeline.text import Caption

    if conditioning == "caption":
        return lambda batch: Caption(batch["caption"]["tokens"], batch["caption"]["mask"],
                                     batch["caption"]["pooled"]).to(device)
    return lambda batch: batch["labels"].to(device, non_blocking=True)  # (B,); unused when unconditional


def _run_name(cfg: Config, config_name: str | None) -> str:
    return cfg.logging.run_name or (Path(config_name).stem if config_name else "run")


# ---------------------------------------------------------------------------------------------------- the loop


def train(cfg: Config, config_name: str | None = None, resume: Path | None = None,
          console: Console | None = None) -> Path:
    """Train (or resume, from the checkpoint folder `resume`) and return the run folder."""
    from accelerate import Accelerator

    console = console or Console(stderr=True)
    manifest, folder, store, online = _data(cfg)
    norm = LatentNorm.from_manifest(manifest, cfg.data.latent_norm)
    manifest = {**manifest, "latent_norm": norm.record()}  # so every checkpoint records what sampling must invert
    held_spec = open_held_out(cfg, manifest, store)  # None without a held-out set
    excluded = held_spec.exclude if held_spec else np.zeros(0, dtype=np.int64)  # never trained on

    probe = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision, notice = effective_precision(cfg.training.mixed_precision, probe)
    acc = Accelerator(mixed_precision=precision, cpu=probe.type == "cpu")
    rank, world, device = acc.process_index, acc.num_processes, acc.device
    saved = checkpoint.validate(resume) if resume else None
    if saved:  # first: every later check (epoch length, end step) depends on the world size
        _check_world_size(saved, world, resume)
    t = cfg.training
    plan = Plan(manifest["num_samples"] - len(excluded), t.batch_size, t.gradient_accumulation_steps, world)
    if plan.steps_per_epoch == 0:
        raise ConfigError([("training.batch_size", f"the global batch ({plan.global_batch} = batch × accumulation × "
                                                   f"{world} processes) exceeds the {plan.num_samples} samples")])
    num_classes, conditioning = num_classes_for(cfg, manifest), conditioning_for(cfg, manifest)
    if held_spec and conditioning == "caption":  # HeldOut reads labels, not caption records
        raise ConfigError([("validation.shards" if cfg.validation.shards else "data.val_fraction",
                            "the held-out loss is not built for caption models yet; drop the key for this run")])
    latent_shape = tuple(manifest["latent"]["shape"][1:])  # (C, H, W)
    run_dir = resume.parent if resume else Path(cfg.logging.output_dir) / _run_name(cfg, config_name)
    total_steps = saved["total_steps"] if saved else plan.steps_per_epoch * t.num_epochs
    end_step = min(plan.steps_per_epoch * t.num_epochs, t.max_steps or math.inf)
    if saved and end_step < saved["step"]:  # the final save would file this state under an earlier step's name
        raise ConfigError([("training.max_steps" if t.max_steps and t.max_steps < saved["step"]
                            else "training.num_epochs",
                            f"the run would end at step {end_step}, but '{resume}' is already at step "
                            f"{saved['step']}; resume with an end at or past it")])
    spec = RunSpec(precision, notice, num_classes, plan, total_steps, run_dir,
                   held_spec.description if held_spec else None, conditioning)

    torch.manual_seed(t.seed)  # model init is the one draw from the global RNG, and it is seeded
    random.seed(t.seed)  # python's and numpy's are unused by the step; seeded so the saved RNG states repeat too
    np.random.seed(t.seed)
    model = build_model(cfg, manifest, num_classes)
    init_notes = [] if saved or not cfg.model.init_from else init_from(  # a fine-tune; the EMA starts from it too
        model, cfg.model.init_from, cfg.model.init_weights, (manifest.get("labels") or {}).get("names"), manifest)
    objective = make_objective(cfg.diffusion.objective, model.learn_sigma)
    ema = EMA(model) if t.use_ema else None
    opt = torch.optim.AdamW(model.parameters(), lr=t.learning_rate, weight_decay=t.weight_decay,
                            betas=(t.adam_beta1, t.adam_beta2), fused=device.type == "cuda")
    start_step = 0
    if saved:
        _check_same_encoders(resume, manifest)
        start_step = _load_state(resume, saved, model, ema, opt, acc, world, rank)
        if acc.is_main_process:
            checkpoint.clean_temporaries(run_dir)  # half-written checkpoints of the killed run
    else:
        _refuse_existing_run_dir(run_dir)  # on every rank, before rank 0 makes it: all ranks exit with the message
        acc.wait_for_everyone()
        if acc.is_main_process:
            _new_run_dir(run_dir, cfg)
    if cfg.model.compile:
        model = torch.compile(model)
    model, opt = acc.prepare(model, opt)
    raw = acc.unwrap_model(model, keep_torch_compile=False)

    log = MetricsLog(run_dir, cfg.logging.tensorboard, enabled=acc.is_main_process,
                     resume_step=start_step if saved else None)
    if acc.is_main_process:
        _preflight(console, cfg, manifest, folder, raw, spec, device, start_step, end_step)
        for note in init_notes:
            console.print(f"[cyan]init:[/] {note}", highlight=False, soft_wrap=True)
    order = EpochOrder([min(manifest["samples_per_shard"], plan.num_samples - i) for i in
                        range(0, plan.num_samples, manifest["samples_per_shard"])] if store is None else store.counts,
                       t.seed, cfg.data.shuffle_window, exclude=excluded)
    if store is not None:
        dataset = MicroBatches(store, order, plan, rank, t.seed, norm, captions=conditioning == "caption")
        to_latents = _precomputed(device)
    else:
        _, c, h, w = manifest["latent"]["shape"]
        source, codec = online
        dataset = ImageBatches(source, order, plan, rank, t.seed, (c, h, w), cfg.shards.flip, codec.stores_std)
        to_latents = _online(codec, norm, device)
    loader = make_loader(dataset, plan, start_step, end_step, cfg.data.num_workers, pin_memory=device.type == "cuda")
    batches = iter(loader)  # draws a base seed from torch's global RNG: restore the saved states after it
    window = {"loss": torch.zeros((), device=device), "steps": 0}  # the loss averaged into the next log line
    if saved and (resume / f"rng-rank{rank}.pt").is_file():
        rank_state = checkpoint.load_tensors(resume / f"rng-rank{rank}.pt")
        checkpoint.set_rng_state(rank_state)
        window["loss"] += rank_state["log_window"][0].to(device)
        window["steps"] = int(rank_state["log_window"][1])
    to_y, conditional = batch_condition(conditioning, device), conditioning != "none"
    stop = _StopFlag()
    record = _SampleRecord.from_env(rank)
    counters = {"nonfinite_total": saved.get("nonfinite_total", 0) if saved else 0, "nonfinite_run": 0}

    def save(name: str, step: int) -> None:
        checkpoint.save(run_dir, name, _writers(acc, cfg, manifest, raw, ema, opt, window),
                        _ckpt_state(cfg, step, plan, total_steps, counters), rank=rank,
                        barrier=acc.wait_for_everyone, needed_bytes=_needed_bytes(raw))
        if acc.is_main_process:
            checkpoint.prune(run_dir, cfg.checkpointing.total_limit, cfg.checkpointing.keep_epochs)

    evaluation: dict = {}  # an eval copy of the model and the grids' decoder, built on first use (never for a step)
    held = HeldOut(held_spec.store, held_spec.evaluate, norm, cfg.data.seed, rank, world) if held_spec else None

    def validate(step: int, grid: bool = True) -> None:
        if held is not None:
            losses = held_out_losses(acc, cfg, manifest, held, raw, ema, objective, num_classes, evaluation)
            log.scalars(step, prefix="val", **losses)
            if acc.is_main_process:
                bar.console.print(f"Step {step}, held-out loss: " + ", ".join(
                    f"{losses[f'loss_{w}']:.4f} ({w})" for w in ("ema", "raw") if f"loss_{w}" in losses),
                    highlight=False)
        if grid and cfg.validation.grid and acc.is_main_process:
            path = validation_grid(cfg, manifest, raw, ema, objective, num_classes, step, run_dir, device, evaluation)
            log.image(step, "samples", np.asarray(Image.open(path).convert("RGB")))
            bar.console.print(f"samples at step {step}: {path}")
        acc.wait_for_everyone()

    since_log = 0
    t_log = t_start = time.time()
    last_loss = math.nan
    bar = _progress(console, acc.is_main_process)
    epoch_task = None

    with bar, stop.installed(), _oom_advice(device, plan):
        if held is not None and cfg.validation.every_steps and not saved:
            validate(0, grid=False)  # where a fine-tune starts from, and a from-scratch run's baseline
        for step in range(start_step, end_step):
            epoch, step_in_epoch = divmod(step, plan.steps_per_epoch)
            if step > start_step and step_in_epoch == 0 and cfg.checkpointing.every_epoch:
                save(checkpoint.epoch_name(epoch), step)
            if step > start_step and step % cfg.checkpointing.steps == 0:
                save(checkpoint.step_name(step), step)  # last, so `latest` names the step checkpoint
            if cfg.validation.every_steps and step > start_step and step % cfg.validation.every_steps == 0:
                validate(step)
            if _all_true(acc, stop.raised):
                save(checkpoint.step_name(step), step)
                raise _Stopped(run_dir, step)
            if epoch_task is None or step_in_epoch == 0:
                epoch_task = _epoch_task(bar, epoch, t.num_epochs, plan.steps_per_epoch, step_in_epoch)

            lr = lr_at(step, t.learning_rate, cfg.lr_scheduler.type, cfg.lr_scheduler.warmup_steps, total_steps)
            for group in opt.param_groups:
                group["lr"] = lr
            draws = step_draws(objective, step_generator(t.seed, step, rank, device), plan.batch_size * plan.accum,
                               latent_shape, cfg.model.class_dropout_prob, device)
            step_loss = torch.zeros((), device=device)
            for micro in range(plan.accum):
                batch = next(batches)
                x0 = to_latents(batch)  # (B, C, H, W) float32, scaled
                y = to_y(batch)  # (B,) labels, or a Caption of B
                part = slice(micro * plan.batch_size, (micro + 1) * plan.batch_size)
                sync = contextlib.nullcontext() if micro == plan.accum - 1 else acc.no_sync(model)
                with sync:
                    loss = micro_loss(model, objective, x0, y, conditional, *(d[part] for d in draws)).mean()
                    acc.backward(loss / plan.accum)
                step_loss += loss.detach() / plan.accum
                if record is not None:
                    record.write(step, micro, batch, loss)
            finite = bool(acc.reduce(torch.isfinite(step_loss).float(), "sum").item() == world)
            grad_norm = math.nan
            if finite:
                grad_norm = float(acc.clip_grad_norm_(raw.parameters(), t.max_grad_norm or math.inf))
                opt.step()
                if ema is not None and not acc.optimizer_step_was_skipped:
                    ema.update(ema_decay(step, t.ema_decay, t.ema_warmup))
                counters["nonfinite_run"] = 0
                window["loss"] += step_loss
                window["steps"] += 1
            else:
                counters["nonfinite_total"] += 1
                counters["nonfinite_run"] += 1
                if counters["nonfinite_run"] >= t.max_nonfinite_steps:
                    raise DitpipeError(f"{counters['nonfinite_run']} non-finite losses in a row at step {step + 1}; "
                                       "stopping. Lower training.learning_rate, use bf16 instead of fp16, or set "
                                       "model.qk_norm: true; resume from the last checkpoint")
            opt.zero_grad(set_to_none=True)

            done = step + 1
            bar.update(epoch_task, advance=1, loss=last_loss)
            since_log += 1
            if done % cfg.logging.steps == 0 or done == end_step:
                mean_loss = float(acc.reduce(window["loss"], "sum").item()) / max(1, window["steps"] * world)
                ips = since_log * plan.global_batch / max(time.time() - t_log, 1e-9)
                last_loss = mean_loss
                bar.update(epoch_task, loss=mean_loss, ips=ips)
                if acc.is_main_process:
                    bar.console.print(f"Step {done}, Loss: {mean_loss:.4f}, LR: {lr:.2e}", highlight=False)
                peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
                log.scalars(done, loss=mean_loss, lr=lr, grad_norm=grad_norm, img_per_s=ips, peak_mem_gib=peak,
                            epoch=epoch + 1, nonfinite_total=counters["nonfinite_total"])
                window["loss"].zero_()
                window["steps"], since_log, t_log = 0, 0, time.time()

        if end_step % plan.steps_per_epoch == 0 and cfg.checkpointing.every_epoch and end_step > start_step:
            save(checkpoint.epoch_name(end_step // plan.steps_per_epoch), end_step)
        save(checkpoint.step_name(end_step), end_step)
        if cfg.validation.every_steps and end_step > start_step:
            validate(end_step)
    log.close()
    if acc.is_main_process:
        _closing(console, run_dir, last_loss, time.time() - t_start, (end_step - start_step) * plan.global_batch,
                 end_step, counters)
    return run_dir


# ---------------------------------------------------------------------------------------------------- validation


def eval_model(cfg: Config, manifest: dict, num_classes: int, weights: dict, device: torch.device,
               cache: dict) -> torch.nn.Module:
    """A model in eval mode holding `weights` (EMA or raw), built once per run and cached. Building initialises
    weights, so it runs under a forked RNG: validation never moves the global RNG the saved states record."""
    if "model" not in cache:
        with torch.random.fork_rng(devices=[]):
            cache["model"] = build_model(cfg, manifest, num_classes).to(device).eval()
    cache["model"].load_state_dict(weights)
    return cache["model"]


def held_out_losses(acc, cfg: Config, manifest: dict, held: HeldOut, raw, ema, objective, num_classes: int,
                    cache: dict) -> dict:
    """The held-out loss with the EMA weights (when kept) and the raw ones: the mean over the fixed timesteps, and
    the mean at each (`loss_<weights>_by_t`), summed over every rank's share."""
    out = {}
    weights = {"ema": ema.state_dict()} if ema is not None else {}
    for name, state in {**weights, "raw": raw.state_dict()}.items():
        model = eval_model(cfg, manifest, num_classes, state, acc.device, cache)
        with acc.autocast():
            sums = loss_sums(model, objective, held, num_classes, cfg.validation.loss_timesteps,
                             EVAL_BATCH_FACTOR * cfg.training.batch_size, acc.device)  # (k,)
        by_t = (acc.reduce(sums, "sum") if acc.num_processes > 1 else sums) / held.total  # (k,)
        out[f"loss_{name}"], out[f"loss_{name}_by_t"] = float(by_t.mean()), [round(float(x), 6) for x in by_t]
    return out


def validation_grid(cfg: Config, manifest: dict, raw, ema, objective, num_classes: int, step: int, run_dir: Path,
                    device: torch.device, cache: dict) -> Path:
    """A grid of `validation.num_samples` samples (EMA weights when kept), one class per column cycle, written to
    samples/step-NNNNNNN.png. The same seed every time, so grids compare across steps."""
    from pipeline.codec import load_codec
    from pipeline.generate import decode, generate
    from pipeline.images import make_grid, to_uint8

    model = eval_model(cfg, manifest, num_classes, ema.state_dict() if ema is not None else raw.state_dict(), device,
                       cache)
    n, v = cfg.validation.num_samples, cfg.validation
    labels = torch.arange(n) % num_classes if num_classes else None
    names = manifest["labels"]["names"][:num_classes] if 0 < num_classes <= 16 else None
    if conditioning_for(cfg, manifest) == "caption":  # one prompt per column
        from pipeline.text import encode_prompts, load_for_manifest

        if "text" not in cache:
            cache["text"] = load_for_manifest(shards.text_encoder_of(manifest), device)
            cache["prompts"] = (v.prompts or _shard_prompts(cfg.shards_path))[:16]
        names = cache["prompts"]
        labels = encode_prompts(cache["text"], [names[i % len(names)] for i in range(n)])
    _, channels, size, _ = manifest["latent"]["shape"]
    z = generate(model, objective, (channels, size, size), labels, n, v.sampler, v.sampling_steps, v.cfg_scale,
                 cfg.training.seed, device, cfg_interval=v.cfg_interval)
    codec = manifest["codec"]
    if "codec" not in cache:
        cache["codec"] = load_codec(codec["name"], codec["dtype"], device)
    images = to_uint8(decode(z, cache["codec"], LatentNorm.from_record(manifest["latent_norm"])))
    path = run_dir / "samples" / f"step-{step:07d}.png"
    path.parent.mkdir(exist_ok=True)
    make_grid(images, ncols=len(names) if names else int(math.ceil(n ** 0.5)), column_labels=names,
              min_cell=64).save(path)
    return path


def _shard_prompts(folder: Path, count: int = 8) -> list[str]:
    """The first `count` distinct first-captions of the first shard: validation prompts the data really has."""
    manifest, prompts = shards.load_manifest(folder), []
    for sample in shards.iter_shard(folder, manifest["shards"][0]["name"], manifest):
        caption = (sample.meta.get("captions") or [None])[0]
        if caption and caption not in prompts:
            prompts.append(caption)
        if len(prompts) == count:
            break
    if not prompts:
        raise ConfigError([("validation.prompts", f"the shards in '{folder}' hold no captions to prompt with; "
                                                  "set validation.prompts")])
    return prompts


# ---------------------------------------------------------------------------------------------------- state


def _ckpt_state(cfg: Config, step: int, plan: Plan, total_steps: int, counters: dict) -> dict:
    from importlib.metadata import version

    return {"written_by": f"ditpipe {__version__}", "step": step, "epoch": step // plan.steps_per_epoch,
            "samples_consumed": step * plan.global_batch, "steps_per_epoch": plan.steps_per_epoch,
            "total_steps": total_steps, "world_size": plan.world_size, "config_hash": cfg.hash(),
            "nonfinite_total": counters["nonfinite_total"],
            "versions": {name: version(name) for name in ("torch", "accelerate", "numpy", "ditpipe")}}


def _writers(acc, cfg: Config, manifest: dict, raw, ema, opt, window: dict) -> dict:
    """{file: write(path)} for this rank. Every rank saves its RNG states and its unlogged loss window (so the
    first log line after a resume averages the same steps as an uninterrupted run's)."""
    rank = acc.process_index
    log_window = torch.stack([window["loss"].detach().double().cpu(), torch.tensor(float(window["steps"]))])
    writers = {f"rng-rank{rank}.pt": lambda p: torch.save({**checkpoint.rng_state(), "log_window": log_window}, p)}
    if not acc.is_main_process:
        return writers
    excerpt = {k: manifest.get(k) for k in ("codec", "labels", "captions", "latent", "source", "stats", "latent_norm")}
    writers.update({
        "model.pt": lambda p: torch.save(raw.state_dict(), p),
        "optimizer.pt": lambda p: torch.save(opt.state_dict(), p),
        "config.yaml": lambda p: p.write_text(cfg.to_yaml()),
        "manifest.json": lambda p: p.write_text(json.dumps(excerpt, indent=1)),
    })
    if ema is not None:
        writers["ema.pt"] = lambda p: torch.save(ema.state_dict(), p)
    if acc.scaler is not None:
        writers["scaler.pt"] = lambda p: torch.save(acc.scaler.state_dict(), p)
    return writers


def _needed_bytes(raw) -> int:
    params = sum(p.numel() * 4 for p in raw.parameters())
    return params * 4  # model + EMA + two Adam moments, in fp32


def _check_world_size(saved: dict, world: int, ckpt: Path) -> None:
    if saved["world_size"] != world:
        raise ConfigError([("world size", f"the run was trained on {saved['world_size']} process(es) (world size "
                                          f"{saved['world_size']}), this launch has {world}; resume with the same "
                                          "number (the data split depends on it), e.g. `torchrun --nproc_per_node "
                                          f"{saved['world_size']} $(which ditpipe) resume ...` when on one node")],
                          header=f"cannot resume '{ckpt}' with a different world size")


def _check_same_encoders(ckpt: Path, manifest: dict) -> None:
    """A checkpoint continues only on shards made by the same codec and caption encoder (by weights hash): the
    same names with other weights would silently train on other latents or embeddings."""
    path = ckpt / "manifest.json"
    if not path.is_file():
        return
    then = json.loads(path.read_text())
    pairs = [("codec", (then.get("codec") or {}).get("hash"), manifest["codec"].get("hash")),
             ("caption encoder", (shards.text_encoder_of(then) or {}).get("hash"),
              (shards.text_encoder_of(manifest) or {}).get("hash"))]
    wrong = [f"{what}: {a[:12] if a else None} in the checkpoint, {b[:12] if b else None} in the shards"
             for what, a, b in pairs if a != b]
    if wrong:
        raise ShardError(f"'{ckpt}' was trained on shards from another encoder ({'; '.join(wrong)}); resume on the "
                         "shards it was trained on, or re-encode with the same codec and text encoder")


def _load_state(ckpt: Path, saved: dict, model, ema, opt, acc, world: int, rank: int) -> int:
    _check_world_size(saved, world, ckpt)
    model.load_state_dict(checkpoint.load_tensors(ckpt / "model.pt"), strict=True)
    opt.load_state_dict(checkpoint.load_tensors(ckpt / "optimizer.pt"))
    if ema is not None:
        if (ckpt / "ema.pt").is_file():
            ema.load_state_dict(checkpoint.load_tensors(ckpt / "ema.pt"))
    if acc.scaler is not None and (ckpt / "scaler.pt").is_file():
        acc.scaler.load_state_dict(checkpoint.load_tensors(ckpt / "scaler.pt"))
    return int(saved["step"])


def _refuse_existing_run_dir(run_dir: Path) -> None:
    if run_dir.exists() and any(run_dir.iterdir()):
        raise DitpipeError(f"run folder '{run_dir}' already exists. Continue it with `ditpipe resume {run_dir}`, or "
                           "start a new run with --logging.run_name NAME")


def _new_run_dir(run_dir: Path, cfg: Config) -> None:
    _refuse_existing_run_dir(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())


# ---------------------------------------------------------------------------------------------------- debugging


class _SampleRecord:
    """A debugging aid, off unless DITPIPE_RECORD_SAMPLES=PATH is set: every rank appends one JSON line per
    micro-batch it trains on, `{"rank", "step", "micro", "epoch", "q", "indices", "loss"}` (global sample indices,
    this rank's local micro-batch mean loss), so exactly-once across ranks and the loss reduction can be checked from
    outside. Each line is one O_APPEND write, so the ranks may share one file. It costs a device sync per
    micro-batch; never set it for real runs."""

    def __init__(self, path: str, rank: int):
        self.fd, self.rank = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644), rank

    @classmethod
    def from_env(cls, rank: int) -> "_SampleRecord | None":
        path = os.environ.get(RECORD_ENV)
        return cls(path, rank) if path else None

    def write(self, step: int, micro: int, batch: dict, loss: torch.Tensor) -> None:
        line = {"rank": self.rank, "step": step, "micro": micro, "epoch": int(batch["epoch"]), "q": int(batch["q"]),
                "indices": [int(g) for g in batch["indices"]], "loss": float(loss.detach().float().item())}
        os.write(self.fd, (json.dumps(line) + "\n").encode())


# ---------------------------------------------------------------------------------------------------- signals


@contextlib.contextmanager
def _oom_advice(device: torch.device, plan: Plan):
    """A CUDA out-of-memory becomes one message with the peak memory and the fixes, instead of a traceback."""
    try:
        yield
    except torch.OutOfMemoryError:
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        total = torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else float("nan")
        raise DitpipeError(
            f"out of GPU memory (peak {peak:.1f} GiB allocated of {total:.1f} GiB). Fixes: a smaller "
            f"training.batch_size with more gradient_accumulation_steps (same effective batch {plan.global_batch}), "
            "model.gradient_checkpointing: true, a smaller model.name preset, or training.mixed_precision bf16 "
            "(in a new run: these settings cannot change on resume)") from None


class _Stopped(DitpipeError):
    exit_code = 130

    def __init__(self, run_dir: Path, step: int):
        super().__init__(f"stopped by signal after step {step}; checkpoint written. Continue with "
                         f"`ditpipe resume {run_dir}`")


class _StopFlag:
    """SIGINT/SIGTERM finish the current optimizer step, then the loop checkpoints and exits."""

    def __init__(self):
        self.raised = False

    def _handler(self, signum, frame):
        self.raised = True

    @contextlib.contextmanager
    def installed(self):
        old = {s: signal.signal(s, self._handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)


def _all_true(acc, flag: bool) -> bool:
    """A decision every rank takes together (any rank stopping stops all)."""
    if acc.num_processes == 1:
        return flag
    return bool(acc.reduce(torch.tensor(float(flag), device=acc.device), "sum").item() > 0)


# ---------------------------------------------------------------------------------------------------- console


def _progress(console: Console, enabled: bool) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("steps"),
                    TimeElapsedColumn(), TextColumn("<"), TimeRemainingColumn(),
                    TextColumn("loss={task.fields[loss]:.4f} {task.fields[ips]:,.0f} img/s"), console=console,
                    disable=not enabled)


def _epoch_task(bar: Progress, epoch: int, num_epochs: int, steps: int, done: int):
    for task in bar.tasks:
        bar.update(task.id, visible=False)
    return bar.add_task(f"Epoch {epoch + 1}/{num_epochs}", total=steps, completed=done, loss=math.nan, ips=0.0)


def _preflight(console, cfg: Config, manifest, folder, raw, spec: RunSpec, device, start_step, end_step) -> None:
    t, plan = cfg.training, spec.plan
    table = Table(title="ditpipe train", show_header=False, title_justify="left")
    table.add_row("device", f"{device} × {plan.world_size} process(es)")
    table.add_row("precision", spec.precision + (f"  ({spec.notice})" if spec.notice else ""))
    params = sum(p.numel() for p in raw.parameters() if p.requires_grad)
    table.add_row("model", f"{cfg.model.name} (hidden {raw.hidden_size}, depth {raw.depth}, patch {raw.patch_size}),"
                           f" {params:,} trainable parameters, "
                           + (f"{spec.num_classes} classes" if spec.num_classes else "unconditional"
                              if spec.conditioning == "none" else _caption_line(manifest)))
    table.add_row("objective", cfg.diffusion.objective)
    where = (f"{manifest['num_shards']} {manifest['format']} shard(s)" if "shards" in manifest
             else "images, encoded every step (data.source: images)")
    table.add_row("data", f"{folder}: {manifest['num_samples']:,} samples in {where}, latent "
                          f"{tuple(manifest['latent']['shape'])}")
    table.add_row("batch", f"{t.batch_size} × {t.gradient_accumulation_steps} accumulation × {plan.world_size} = "
                           f"{plan.global_batch} per optimizer step")
    table.add_row("steps", f"{plan.steps_per_epoch:,} optimizer steps per epoch; {end_step:,} to run"
                           + (f" (from step {start_step:,})" if start_step else "")
                           + f"; LR schedule over {spec.total_steps:,}")
    if spec.held_out:
        every = (f"every {cfg.validation.every_steps:,} steps" if cfg.validation.every_steps
                 else "never: validation.every_steps is 0")
        table.add_row("held-out loss", f"{spec.held_out}; at {cfg.validation.loss_timesteps} fixed timesteps, {every}")
    table.add_row("output", str(spec.run_dir))
    console.print(table)
    if start_step and end_step > spec.total_steps:
        console.print(f"[yellow]note:[/] steps beyond {spec.total_steps:,} continue at the schedule's final LR")


def _caption_line(manifest: dict) -> str:
    enc = shards.text_encoder_of(manifest)
    return (f"captions ({enc['name']}, {enc['dim']}-d, {manifest['captions']['num_captions']:,} captions, up to "
            f"{manifest['captions']['max_tokens_seen']} tokens)")


def _closing(console, run_dir: Path, loss: float, seconds: float, images: int, step: int, counters: dict) -> None:
    final = run_dir / checkpoint.step_name(step)
    console.print(f"[green]done[/]: {step:,} steps, final loss {loss:.4f}, {seconds:.1f} s, "
                  f"{images / max(seconds, 1e-9):,.1f} img/s"
                  + (f", {counters['nonfinite_total']} non-finite step(s) skipped" if counters["nonfinite_total"] else ""))
    console.print(f"final model: {final}/model.pt (EMA: ema.pt); logs: {run_dir}/metrics.jsonl, {run_dir}/tensorboard")


# ---------------------------------------------------------------------------------------------------- resume


def find_checkpoint(target: Path | None, output_dir: Path, warn) -> Path:
    """A checkpoint folder from: nothing (the run under `output_dir` whose `latest` changed last), a run folder
    (its newest valid checkpoint), or a checkpoint folder (validated as it is)."""
    if target is None:
        runs = [p.parent for p in Path(output_dir).glob(f"*/{checkpoint.LATEST}")]
        runs += [Path(output_dir)] if (Path(output_dir) / checkpoint.LATEST).is_file() else []
        if not runs:
            raise DitpipeError(f"no run to resume under '{output_dir}' (no '{checkpoint.LATEST}' pointer); name one: "
                               "`ditpipe resume outputs/RUN`")
        target = max(runs, key=lambda p: (p / checkpoint.LATEST).stat().st_mtime)
    target = Path(target)
    if not target.is_dir():
        raise DitpipeError(f"'{target}' is not a folder; pass a run folder or a checkpoint folder")
    if (target / checkpoint.STATE).is_file() or checkpoint._NAME.match(target.name):
        checkpoint.validate(target)
        return target
    return checkpoint.find_resumable(target, warn)[0]


def resume_config(ckpt: Path, new: Config | None = None, overrides: dict | None = None) -> Config:
    """The config to resume with: the run's saved one, with `overrides` (dotted) applied, or `new` as given.
    Keys outside RESUMABLE_CHANGES that differ from the saved config are refused, each named."""
    import yaml

    saved = yaml.safe_load((ckpt / "config.yaml").read_text())
    if new is None:
        if remote := unconfirmed_remote(saved, overrides or {}):
            raise ConfigError(remote, header=f"cannot resume '{ckpt}' from a remote location it names itself")
        merged = json.loads(json.dumps(saved))
        for key, value in (overrides or {}).items():
            section, _, name = key.partition(".")
            merged.setdefault(section, {})[name] = value
        new = validate_tree(merged)
    cfg = new
    old = validate_tree(saved).to_dict()
    new = cfg.to_dict()
    refused = [(f"{s}.{k}", f"was {old[s][k]!r} in the run, now {new[s][k]!r}; only "
                            f"{', '.join(RESUMABLE_CHANGES)}* may change on resume (start a new run instead)")
               for s in new for k in new[s]
               if new[s][k] != old[s][k] and not f"{s}.{k}".startswith(RESUMABLE_CHANGES)]
    if refused:
        raise ConfigError(refused, header=f"cannot resume '{ckpt}' with a different config")
    return cfg
