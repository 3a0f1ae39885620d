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
import re
import shlex
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from pipeline import __version__, atomic, checkpoint, lock, shards
from pipeline.config import CPU_RECIPE, RESUMABLE_CHANGES, Config, override_args, resumable_keys, validate_tree
from pipeline.device import describe, make_accelerator, peak_tflops
from pipeline.diffusion import make_objective
from pipeline.estimate import LONG_ON_CPU_SECONDS, duration, remaining, step_seconds
from pipeline.errors import ConfigError, DitpipeError, ShardError
from pipeline.finetune import init_from
from pipeline.latent_norm import LatentNorm
from pipeline.loader import Plan, unconfirmed_remote
from pipeline.metrics import MetricsLog
from pipeline.phema import SNAPSHOT_DIR, clean_temporaries, write_snapshots
from pipeline.recovery import RecoveryState, SpikeWatch, injected
from pipeline.schedule import lr_at, restretched_length, schedule_warnings
from pipeline.threads import Threads
from pipeline.threads import apply as apply_threads
from pipeline.step import FLOPS_CONVENTION, PHEMA_FILE, Micro, Step, build_step, load_state
from pipeline.training import (batch_condition, build_model, conditioning_for, grid_shape, make_plan,
                               num_classes_for, open_data, shard_folders, training_batches)
from pipeline.training_fid import TrainingFID
from pipeline.validation import HeldOut, eval_model, held_out_losses, open_held_out
from pipeline.workers import capped_workers

# Debugging aid (see _SampleRecord): a path; each rank appends the global sample indices of every micro-batch.
RECORD_ENV = "DITPIPE_RECORD_SAMPLES"
MANY_CHECKPOINTS = 20  # the preflight warns when a run would keep more checkpoint folders than this


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


def _run_name(cfg: Config, config_name: str | None) -> str:
    return cfg.logging.run_name or (Path(config_name).stem if config_name else "run")


# ---------------------------------------------------------------------------------------------------- the loop


def _run_dir(cfg: Config, config_name: str | None, resume: Path | None) -> Path:
    return Path(resume).parent if resume else Path(cfg.logging.output_dir) / _run_name(cfg, config_name)


@lock.holding(lambda cfg, config_name, resume, **_: (_run_dir(cfg, config_name, resume),
                                                      "resume" if resume else "train"), records_end=True)
@lock.holding(lambda cfg, resume, **_: (shard_folders(cfg), "resume" if resume else "train"), shared=True)
def train(cfg: Config, config_name: str | None = None, resume: Path | None = None,
          console: Console | None = None, restretch_schedule: bool = False) -> Path:
    """Train (or resume, from the checkpoint folder `resume`) and return the run folder. `restretch_schedule` (on
    resume) stretches the LR schedule over the run's current length (pipeline/schedule.py)."""
    console = console or Console(stderr=True)
    t = cfg.training
    acc, precision, notice = make_accelerator(t.mixed_precision, tf32=t.tf32, deterministic=t.deterministic)
    rank, world, device = acc.process_index, acc.num_processes, acc.device  # the run's only source of devices
    threads = apply_threads(t.threads, device.type, int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    group = _group(acc)
    manifest, folder, store, online = open_data(cfg, device)
    norm = LatentNorm.from_manifest(manifest, cfg.data.latent_norm)
    manifest = {**manifest, "latent_norm": norm.record()}  # so every checkpoint records what sampling must invert
    held_spec = open_held_out(cfg, manifest, store)  # None without a held-out set
    excluded = held_spec.exclude if held_spec else np.zeros(0, dtype=np.int64)  # never trained on
    saved = _validated(group, resume) if resume else None  # rank 0 hashes the files; every rank gets its answer
    elastic_note = None
    if saved:  # first: every later check (epoch length, end step) depends on the split of the global batch
        elastic_note = elastic_split(cfg, saved, world, resume)
    plan = make_plan(cfg, manifest, len(excluded), world)
    if plan.steps_per_epoch == 0:
        raise ConfigError([("training.batch_size", f"the global batch ({plan.global_batch} = batch × accumulation × "
                                                   f"{world} processes) exceeds the {plan.num_samples} samples")])
    num_classes, conditioning = num_classes_for(cfg, manifest), conditioning_for(cfg, manifest)
    if held_spec and conditioning == "caption":  # HeldOut reads labels, not caption records
        raise ConfigError([("validation.shards" if cfg.validation.shards else "data.val_fraction",
                            "the held-out loss is not built for caption models yet; drop the key for this run")])
    # before the run folder exists: a bad reference loses nothing; rank 0 computes it (cached by content)
    fid_watch = TrainingFID.start(cfg, manifest, folder, rank, world, device, num_classes, conditioning)
    latent_shape = tuple(manifest["latent"]["shape"][1:])  # (C, H, W)
    run_dir = _run_dir(cfg, config_name, resume)
    total_steps = saved["total_steps"] if saved else plan.steps_per_epoch * t.num_epochs
    end_step = min(plan.steps_per_epoch * t.num_epochs, t.max_steps or math.inf)
    if saved and end_step < saved["step"]:  # the final save would file this state under an earlier step's name
        raise ConfigError([("training.max_steps" if t.max_steps and t.max_steps < saved["step"]
                            else "training.num_epochs",
                            f"the run would end at step {end_step}, but '{resume}' is already at step "
                            f"{saved['step']}; resume with an end at or past it")])
    restretched = list(saved.get("restretched_at", [])) if saved else []  # steps where the schedule was restretched
    if saved and restretch_schedule:
        try:
            total_steps = restretched_length(saved["step"], plan.steps_per_epoch * t.num_epochs)
        except ValueError as e:
            raise ConfigError([("training.num_epochs", str(e))]) from None
        restretched.append(saved["step"])
    if saved and end_step == saved["step"]:  # a finished run: nothing to do, so say how to extend it
        if acc.is_main_process:
            _finished(console, run_dir, saved, cfg, plan)
        return run_dir
    spec = RunSpec(precision, notice, num_classes, plan, total_steps, run_dir,
                   held_spec.description if held_spec else None, conditioning)

    torch.manual_seed(t.seed)  # model init is the one draw from the global RNG, and it is seeded
    random.seed(t.seed)  # python's and numpy's are unused by the step; seeded so the saved RNG states repeat too
    np.random.seed(t.seed)
    model = build_model(cfg, manifest, num_classes).to(device)  # on its device before anything is made from it
    init_notes = [] if saved or not cfg.model.init_from else init_from(  # a fine-tune; the EMA starts from it too
        model, cfg.model.init_from, cfg.model.init_weights, (manifest.get("labels") or {}).get("names"), manifest)
    objective = make_objective(cfg.diffusion.objective, model.learn_sigma, cfg.diffusion)
    if saved:
        _check_same_encoders(resume, manifest)
        if (notice := checkpoint.check_same_shards(saved, manifest, resume, folder)) and acc.is_main_process:
            console.print(f"[yellow]note:[/] {notice}", highlight=False, soft_wrap=True)
    else:
        _refuse_existing_run_dir(run_dir)  # on every rank, before rank 0 makes it: all ranks exit with the message
        acc.wait_for_everyone()
        if acc.is_main_process:
            _new_run_dir(run_dir, cfg, console)
    step_fn = build_step(acc, model, objective, plan, latent_shape, norm=norm, posterior=_posterior(manifest),
                         training=t, rank=rank, drop_prob=cfg.model.class_dropout_prob,
                         conditional=conditioning != "none", compile=cfg.model.compile,
                         resume=resume if saved else None)
    raw, ema, stats = step_fn.raw, step_fn.ema, step_fn.stats
    start_step = int(saved["step"]) if saved else 0
    recovery = RecoveryState.from_state(saved)  # data offset, LR scale, recoveries so far
    watch = SpikeWatch(device, t.recover_spike_factor, t.recover_window) if t.recover and t.recover_spike_factor \
        else None
    if saved and acc.is_main_process:
        checkpoint.clean_temporaries(run_dir)  # half-written checkpoints of the killed run
        clean_temporaries(run_dir / SNAPSHOT_DIR)  # and half-written post-hoc EMA snapshots

    log = MetricsLog(run_dir, cfg.logging.tensorboard, enabled=acc.is_main_process,
                     resume_step=start_step if saved else None)
    workers, fewer = capped_workers(cfg.data.num_workers)

    def data_from(step: int) -> None:
        """The data stream from optimizer step `step` on, at data position `step + data_offset`."""
        data.pop("batches", None)  # a recovery's new stream replaces the old (its workers stop)
        data.pop("ahead", None)
        loader, data["posterior"] = training_batches(cfg, manifest, store, online, plan, rank, conditioning,
                                                     excluded, step + recovery.data_offset,
                                                     end_step + recovery.data_offset, device, workers)
        data["batches"] = iter(loader)  # draws a base seed from torch's global RNG: the saved states come after

    data: dict = {}
    data_from(start_step)
    if saved:
        _restore_rank_state(resume, saved, rank, stats, device)
    to_y = batch_condition(conditioning, device)
    last: list[Micro] = []  # the latest micro-batch: the closing summary counts FLOPs on one like it

    def next_micro() -> Micro:
        batch = next(data["batches"])
        return Micro(*data["posterior"](batch), to_y(batch), batch)  # mean, std (B, C, H, W) on the device, y

    data["ahead"] = next_micro()  # the first micro-batch: the preflight times a step on it, the first step trains on it
    with _oom_advice(device, plan):  # the probe takes a step's memory: an out-of-memory shows here, explained
        seconds = step_seconds(raw, objective, data["ahead"], norm, conditioning != "none", plan.accum, acc.autocast,
                               device) if end_step > start_step else 0.0
    if acc.is_main_process:
        _preflight(console, cfg, manifest, folder, raw, spec, device, start_step, end_step,
                   saved["total_steps"] if saved and restretch_schedule else None,
                   fid_watch.describe(plan.global_batch, end_step - start_step) if fid_watch else None, threads,
                   seconds)
        if elastic_note:
            console.print(f"[cyan]elastic:[/] {elastic_note}", highlight=False, soft_wrap=True)
        for note in init_notes:
            console.print(f"[cyan]init:[/] {note}", highlight=False, soft_wrap=True)
        if fewer:
            console.print(f"[yellow]note:[/] {fewer}", highlight=False, soft_wrap=True)

    def feed() -> Micro:
        m = data.pop("ahead", None) or next_micro()  # the micro-batch the preflight timed comes first
        if (kind := injected(data["position"])) is not None:  # a test hook; never set in real runs
            m = m._replace(mean=m.mean * (torch.nan if kind == "nan" else 30.0))
        last[:] = [m]
        return m

    record = _SampleRecord.from_env(rank)
    stop = _StopFlag()

    def save(name: str, step: int, also: str | None = None) -> None:
        """Checkpoint `name` of `step`; `also`, a second name for the same state (an epoch's end on a step
        checkpoint), is linked to it rather than written again."""
        checkpoint.save(run_dir, name, _writers(acc, cfg, manifest, step_fn),
                        {**_ckpt_state(cfg, step, plan, total_steps, int(stats.nonfinite_total), manifest,
                                       restretched, precision),
                         **recovery.record()}, group=group, needed_bytes=_needed_bytes(raw, step_fn))
        if also:
            checkpoint.link(run_dir, name, also, group=group)
        if acc.is_main_process:
            checkpoint.prune(run_dir, cfg.checkpointing.total_limit, cfg.checkpointing.keep_epochs)

    evaluation: dict = {}  # an eval copy of the model and the grids' decoder, built on first use (never for a step)
    held = HeldOut(held_spec.store, held_spec.evaluate, norm, cfg.data.seed, rank, world) if held_spec else None

    def validate(step: int, grid: bool = True) -> None:
        if held is not None:
            weights = {"ema": ema.state_dict()} if ema is not None else {}
            losses = held_out_losses(acc, cfg, manifest, held, {**weights, "raw": raw.state_dict()}, objective,
                                     num_classes, evaluation)
            log.scalars(step, prefix="val", **losses)
            if acc.is_main_process:
                bar.console.print(f"Step {step}, held-out loss: " + ", ".join(
                    f"{losses[f'loss_{w}']:.4f} ({w})" for w in ("ema", "raw") if f"loss_{w}" in losses),
                    highlight=False)
        if grid and cfg.validation.grid and acc.is_main_process:
            path = validation_grid(cfg, manifest, raw, ema, objective, num_classes, step, run_dir, device, evaluation)
            log.image(step, "samples", np.asarray(Image.open(path).convert("RGB")))
            bar.console.print(f"samples at step {step}: {path}")
        _park(evaluation)  # off the GPU until the next validation: the training step needs the memory
        acc.wait_for_everyone()

    def training_fid(step: int) -> None:  # every rank samples its share (pipeline/training_fid.py)
        fid_watch(step, (ema if ema is not None else raw).state_dict(), objective, device, evaluation, log,
                  bar.console)
        _park(evaluation)

    since_log = 0
    t_log = t_start = time.time()
    t_first = None  # when the first step of this launch ended: the rate for the time left starts there (it skips the
    # first step's one-off costs: compile, allocator, workers starting)
    last_loss = math.nan
    bar = _progress(console, acc.is_main_process)
    epoch_task = None

    with bar, stop.installed(), _oom_advice(device, plan):
        if held is not None and cfg.validation.every_steps and not saved:
            validate(0, grid=False)  # where a fine-tune starts from, and a from-scratch run's baseline
        step = start_step
        while step < end_step:
            epoch, step_in_epoch = divmod(step, plan.steps_per_epoch)
            if step > start_step and step % cfg.checkpointing.phema_every == 0:
                _phema_snapshots(group, run_dir, step_fn, step)
            epoch_end = step > start_step and step_in_epoch == 0 and cfg.checkpointing.every_epoch
            if step > start_step and step % cfg.checkpointing.steps == 0:  # `latest` names the step checkpoint
                save(checkpoint.step_name(step), step, also=checkpoint.epoch_name(epoch) if epoch_end else None)
            elif epoch_end:
                save(checkpoint.epoch_name(epoch), step)
            if cfg.validation.every_steps and step > start_step and step % cfg.validation.every_steps == 0:
                validate(step)
            if fid_watch is not None and fid_watch.due(step, start_step, end_step):
                training_fid(step)
            if _stop_requested(acc, stop, step, cfg.logging.steps):
                save(checkpoint.step_name(step), step)
                raise _Stopped(run_dir, step)
            if epoch_task is None or step_in_epoch == 0:
                epoch_task = _epoch_task(bar, epoch, t.num_epochs, plan.steps_per_epoch, step_in_epoch)

            lr = recovery.lr_scale * lr_at(step, t.learning_rate, cfg.lr_scheduler.type, cfg.lr_scheduler.warmup_steps,
                                           total_steps)
            data["position"] = step + recovery.data_offset  # keys the step's data and draws
            loss, bad = step_fn(step, lr, feed, record.write if record is not None else None, data["position"])
            if watch is not None:
                watch.update(step, loss, bad)  # on the device, like the step

            done = step = step + 1
            t_first = t_first or time.time()
            bar.update(epoch_task, advance=1, loss=last_loss)
            since_log += 1
            if done % cfg.logging.steps == 0 or done == end_step:  # the one place the loop reads the device
                loss_sum, finite = (float(x) for x in step_fn.stats.take_window())  # the same on every rank
                mean_loss = loss_sum / finite if finite else math.nan
                worst, worst_start = (int(x) for x in stats.take_worst_run())
                ips = since_log * plan.global_batch / max(time.time() - t_log, 1e-9)
                last_loss = mean_loss
                left = remaining(time.time() - t_first, done - start_step - 1, end_step - done) \
                    if done - start_step > 1 else remaining(time.time() - t_start, 1, end_step - done)
                bar.update(epoch_task, loss=mean_loss, ips=ips, left=left)
                if acc.is_main_process:
                    bar.console.print(f"Step {done}, Loss: {mean_loss:.4f}, LR: {lr:.2e}"
                                      + (f", {duration(left)} left" if done < end_step else ""), highlight=False)
                peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
                log.scalars(done, loss=mean_loss, lr=lr, grad_norm=float(stats.grad_norm), img_per_s=ips,
                            peak_mem_gib=peak, epoch=epoch + 1, nonfinite_total=int(stats.nonfinite_total))
                since_log, t_log = 0, time.time()
                # rank-consistent: every rank counted the same steps
                failure = (f"{worst} non-finite losses in a row by step {done}", worst_start) \
                    if worst >= t.max_nonfinite_steps else _spike(watch, t, done)
                if failure and not (t.recover and recovery.recoveries < t.recover_max):
                    raise DitpipeError(f"{failure[0]}; stopping. Lower training.learning_rate, use bf16 instead of "
                                       "fp16, or set model.qk_norm: true (or training.recover: true); resume from "
                                       "the last checkpoint")
                if failure:
                    step = _recover(failure, done, run_dir, group, step_fn, recovery, t, log, bar.console)
                    stats.reset_runs()
                    if watch is not None:
                        watch.reset_runs()
                    data_from(step)

        if end_step > start_step:
            _phema_snapshots(group, run_dir, step_fn, end_step)
        epoch_end = end_step % plan.steps_per_epoch == 0 and cfg.checkpointing.every_epoch and end_step > start_step
        save(checkpoint.step_name(end_step), end_step,
             also=checkpoint.epoch_name(end_step // plan.steps_per_epoch) if epoch_end else None)
        if cfg.validation.every_steps and end_step > start_step:
            validate(end_step)
        if fid_watch is not None and fid_watch.due(end_step, start_step, end_step):
            training_fid(end_step)
    log.close()
    if acc.is_main_process:
        seconds = time.time() - t_start
        flops = _train_flops_per_sample(step_fn, last, device)
        _closing(console, run_dir, last_loss, seconds, (end_step - start_step) * plan.global_batch, end_step,
                 int(stats.nonfinite_total), world, flops, peak_tflops(device))
    return run_dir


# ---------------------------------------------------------------------------------------------------- validation


def _park(cache: dict) -> None:
    """Move the cached evaluation model, decoder and text encoder to the CPU: on a tight GPU the step needs the
    3-4 GB they hold (XL/2 and its VAE) until the next validation brings them back."""
    for key in ("model", "codec", "text"):
        if key in cache:
            cache[key].to(torch.device("cpu"))


def validation_grid(cfg: Config, manifest: dict, raw, ema, objective, num_classes: int, step: int, run_dir: Path,
                    device: torch.device, cache: dict) -> Path:
    """A grid of `validation.num_samples` samples (EMA weights when kept), one class per column cycle, written to
    samples/step-NNNNNNN.png. The same seed every time, so grids compare across steps."""
    from pipeline import atomic
    from pipeline.codec import load_decoder
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
        cache["text"].to(device)
        names = cache["prompts"]
        labels = encode_prompts(cache["text"], [names[i % len(names)] for i in range(n)])
    z = generate(model, objective, grid_shape(manifest), labels, n, v.sampler, v.sampling_steps, v.cfg_scale,
                 cfg.training.seed, device, cfg_interval=v.cfg_interval, bf16=v.bf16)  # bf16 autocast on CUDA
    codec = manifest["codec"]
    if "codec" not in cache:  # the run's codec, or validation.decoder (checked to decode its latents)
        cache["codec"] = load_decoder(v.decoder or codec["name"], codec, codec["dtype"], device)
    cache["codec"].to(device)
    images = to_uint8(decode(z, cache["codec"], LatentNorm.from_record(manifest["latent_norm"])))
    path = run_dir / "samples" / f"step-{step:07d}.png"
    path.parent.mkdir(exist_ok=True)
    grid = make_grid(images, ncols=len(names) if names else int(math.ceil(n ** 0.5)), column_labels=names, min_cell=64)
    # A temporary name renamed over `path`: a link planted there is replaced, never written through.
    with atomic.atomic_path(path) as tmp, open(tmp, "wb") as f:
        grid.save(f, format="PNG")
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


def _ckpt_state(cfg: Config, step: int, plan: Plan, total_steps: int, nonfinite_total: int, manifest: dict,
                restretched: list[int], precision: str) -> dict:
    from importlib.metadata import version

    return {"written_by": f"ditpipe {__version__}", "step": step, "epoch": step // plan.steps_per_epoch,
            "samples_consumed": step * plan.global_batch, "steps_per_epoch": plan.steps_per_epoch,
            "total_steps": total_steps, "world_size": plan.world_size, "global_batch": plan.global_batch,
            "batch_size": plan.batch_size, "gradient_accumulation_steps": plan.accum, "config_hash": cfg.hash(),
            "nonfinite_total": nonfinite_total, "shards": checkpoint.shards_record(manifest),
            "restretched_at": restretched,
            "precision": precision,  # what ran: the config's fp16 runs as bf16 on a CPU
            "versions": {name: version(name) for name in ("torch", "accelerate", "numpy", "ditpipe")}}


def _writers(acc, cfg: Config, manifest: dict, step: Step) -> dict:
    """{file: write(path)} for this rank. Every rank saves its RNG states and its unlogged loss window (so the
    first log line after a resume averages the same steps as an uninterrupted run's)."""
    rank, stats = acc.process_index, step.stats
    log_window = torch.stack([stats.loss_sum.double().cpu(), stats.finite_steps.double().cpu()])  # a checkpoint syncs
    device = acc.device
    writers = {f"rng-rank{rank}.pt": lambda p: torch.save({**checkpoint.rng_state(device), "log_window": log_window},
                                                          p)}
    if not acc.is_main_process:
        return writers
    excerpt = {k: manifest.get(k) for k in ("codec", "labels", "captions", "latent", "source", "stats", "latent_norm")}
    if manifest.get("buckets"):  # so `sample` knows the run's sizes from the checkpoint alone
        excerpt["buckets"] = manifest["buckets"]
    writers.update({
        "model.pt": lambda p: torch.save(step.raw.state_dict(), p),
        "optimizer.pt": lambda p: torch.save(step.opt.state_dict(), p),
        "config.yaml": lambda p: p.write_text(cfg.to_yaml()),
        "manifest.json": lambda p: p.write_text(json.dumps(excerpt, indent=1)),
    })
    if step.ema is not None:
        writers["ema.pt"] = lambda p: torch.save(step.ema.state_dict(), p)
    if step.phema is not None:
        writers[PHEMA_FILE] = lambda p: torch.save(step.phema.state_dict(), p)
    if acc.scaler is not None:
        writers["scaler.pt"] = lambda p: torch.save(acc.scaler.state_dict(), p)
    return writers


def _needed_bytes(raw, step: Step | None = None) -> int:
    """A checkpoint's size, about: the model, the EMA, Adam's 2 moments and the post-hoc EMAs, in fp32."""
    params = sum(p.numel() * 4 for p in raw.parameters())
    return params * (4 + len(step.phema.emas if step is not None and step.phema else []))


def _phema_snapshots(group: checkpoint.Group, run_dir: Path, step: Step, at: int) -> None:
    """Rank 0 writes the post-hoc EMA snapshots of step `at`, before that step's checkpoint (so a checkpoint implies
    its snapshots, and a resume from it need not write them again). Its failure (a full disk) stops every rank with
    the same message, where the others would wait for rank 0 in the next step's all-reduce (under a launcher that
    does not kill the rest, until the collective times out)."""
    if step.phema is not None:
        group.on_rank0(lambda: write_snapshots(run_dir / SNAPSHOT_DIR, at, step.phema))


def elastic_split(cfg: Config, saved: dict, world: int, ckpt: Path) -> str | None:
    """Fit the run's global batch G to this launch's world size, in place on `cfg.training`; a note of what changed.

    Every draw and the data order are keyed on the global batch's positions, so any split of the same G trains the
    same samples with the same draws. The rule: a split the config already gives (B × A × world = G) is used as it
    is; otherwise, when the config kept the run's batch_size and accumulation (they were not overridden), keep
    batch_size and choose the accumulation, else keep the accumulation and choose batch_size; anything else is
    refused, listing every split that keeps G."""
    t = cfg.training
    run_b, run_a = saved.get("batch_size", t.batch_size), saved.get("gradient_accumulation_steps",
                                                                     t.gradient_accumulation_steps)
    g = int(saved.get("global_batch") or run_b * run_a * saved["world_size"])
    if t.batch_size * t.gradient_accumulation_steps * world == g:
        if world == saved["world_size"]:
            return None
        return (f"the run was trained on {saved['world_size']} process(es), this launch has {world}: batch "
                f"{t.batch_size} × accumulation {t.gradient_accumulation_steps} × {world} keeps its global batch {g}")
    overridden = (t.batch_size, t.gradient_accumulation_steps) != (run_b, run_a)
    choice = None
    if not overridden and g % (t.batch_size * world) == 0:
        choice = (t.batch_size, g // (t.batch_size * world))
    elif not overridden and g % (t.gradient_accumulation_steps * world) == 0:
        choice = (g // (t.gradient_accumulation_steps * world), t.gradient_accumulation_steps)
    if choice is None:
        splits = [f"batch_size {b} × gradient_accumulation_steps {g // (b * world)}" for b in range(1, g // world + 1)
                  if g % world == 0 and (g // world) % b == 0]
        hint = ("; possible with " + str(world) + " process(es): " + ", ".join(splits[:8])
                + (" ..." if len(splits) > 8 else "") + " (pass them as --training.batch_size B "
                "--training.gradient_accumulation_steps A)") if splits else \
            f"; no split of {g} over {world} process(es) exists: use a world size that divides {g}"
        raise ConfigError([("world size", f"the run's global batch is {g} (batch {run_b} × accumulation {run_a} × "
                                          f"{saved['world_size']} process(es)); this launch ({t.batch_size} × "
                                          f"{t.gradient_accumulation_steps} × {world}) does not keep it{hint}")],
                          header=f"cannot resume '{ckpt}' on {world} process(es)")
    t.batch_size, t.gradient_accumulation_steps = choice
    return (f"the run was trained on {saved['world_size']} process(es) (batch {run_b} × accumulation {run_a}), this "
            f"launch has {world}: batch {choice[0]} × accumulation {choice[1]} keeps its global batch {g}, so the "
            "same samples and draws at every step")


def _spike(watch, t, done: int) -> tuple[str, int] | None:
    """(what happened, the step it began) when the spike watch saw `recover_spike_steps` spike steps in a row."""
    if watch is None:
        return None
    run, start = watch.take()
    if run < t.recover_spike_steps:
        return None
    return (f"the loss stayed above {t.recover_spike_factor:g}× its running median for {run} steps from step "
            f"{start}", start)


def _recover(failure: tuple[str, int], now: int, run_dir: Path, group: checkpoint.Group, step: Step,
             recovery: RecoveryState, t, log: MetricsLog, console: Console) -> int:
    """training.recover: back to the newest valid checkpoint from before the failure began, in this process, with
    the data the failed stretch consumed skipped and the LR scaled; returns the step to go on from. Newer
    checkpoints (written during the failure) are moved aside as `<name>.abandoned`, never deleted."""
    what, began = failure
    chosen = group.broadcast(checkpoint.newest_valid(run_dir, before=began) if group.rank == 0 else None)
    if chosen is None:
        raise DitpipeError(f"{what}; training.recover found no valid checkpoint from before step {began} to go back "
                           f"to in '{run_dir}' (checkpoint more often with checkpointing.steps); stopping")
    ckpt, state = Path(chosen[0]), chosen[1]
    load_state(ckpt, step.raw, step.ema, step.opt.optimizer, step.acc.scaler, step.phema)
    if group.rank == 0:
        checkpoint.abandon_after(run_dir, int(state["step"]), ckpt.name)
    back = int(state["step"])
    recovery.data_offset += now - back  # step `back` now reads what step `now` would have: the stretch is skipped
    recovery.lr_scale *= t.recover_lr_factor
    recovery.recoveries += 1
    log.rewind(back)
    log.scalars(back, recovered_from=now, reason=what, checkpoint=ckpt.name, **recovery.record())
    if group.rank == 0:
        console.print(f"[yellow]recovered:[/] {what}; back to {ckpt.name}, skipping {now - back} steps of data "
                      f"(data offset {recovery.data_offset}), LR × {recovery.lr_scale:g} "
                      f"({recovery.recoveries}/{t.recover_max} recoveries)", highlight=False, soft_wrap=True)
    return back


def _restore_rank_state(ckpt: Path, saved: dict, rank: int, stats, device: torch.device) -> None:
    """The saved state that still applies on any world size: this rank's global RNG states when the checkpoint has
    its file (the step draws from keyed generators alone, so a rank the run did not have needs none), and the
    unlogged loss window, the same in every rank's file, so the first log line after a resume averages the same
    steps as an uninterrupted run's."""
    own = ckpt / f"rng-rank{rank}.pt"
    if own.is_file():
        checkpoint.set_rng_state(checkpoint.load_tensors(own), device)
    window = checkpoint.load_tensors(own if own.is_file() else ckpt / "rng-rank0.pt")["log_window"]
    stats.loss_sum += window[0].to(device)
    stats.finite_steps += window[1].to(device)
    stats.nonfinite_total.fill_(int(saved.get("nonfinite_total", 0)))


def _posterior(manifest: dict) -> bool:
    """Whether the latents are a posterior with a std (a VAE), for which the step draws ε."""
    return "std" in manifest["latent"]["slices"]


def _check_same_encoders(ckpt: Path, manifest: dict) -> None:
    """A checkpoint continues only on shards made by the same codec and caption encoder (by weights hash): the
    same names with other weights would silently train on other latents or embeddings."""
    path = ckpt / "manifest.json"
    if not path.is_file():
        return
    then = checkpoint.read_json(path)
    pairs = [("codec", (then.get("codec") or {}).get("hash"), manifest["codec"].get("hash")),
             ("caption encoder", (shards.text_encoder_of(then) or {}).get("hash"),
              (shards.text_encoder_of(manifest) or {}).get("hash"))]
    wrong = [f"{what}: {a[:12] if a else None} in the checkpoint, {b[:12] if b else None} in the shards"
             for what, a, b in pairs if a != b]
    if wrong:
        raise ShardError(f"'{ckpt}' was trained on shards from another encoder ({'; '.join(wrong)}); resume on the "
                         "shards it was trained on, or re-encode with the same codec and text encoder")


def _group(acc) -> checkpoint.Group:
    """The collectives a checkpoint save across processes needs, from accelerate's process group."""
    if acc.num_processes == 1:
        return checkpoint.Group()
    from accelerate.utils import broadcast_object_list, gather_object

    return checkpoint.Group(acc.process_index, lambda value: broadcast_object_list([value], from_process=0)[0],
                            lambda value: gather_object([value]))


def _validated(group: checkpoint.Group, ckpt: Path) -> dict:
    """checkpoint.validate(ckpt) on rank 0 alone (it hashes every file: gigabytes for XL/2), its result or its
    error sent to every rank, so all ranks go on, or stop with the same message, together."""
    return group.on_rank0(lambda: checkpoint.validate(ckpt), checkpoint.CheckpointError)


# What a start that failed before its first checkpoint leaves, every file ditpipe's own by its exact name (and the
# hidden temporaries a kill leaves of them): the next start of the run replaces them. Anything else is kept.
def _or_its_temporary(name: str) -> re.Pattern:
    """`name`, or the hidden temporary pipeline.atomic writes it through (`.<name>.<pid>.tmp`), left by a kill."""
    return re.compile(rf"(?:{name})|\.(?:{name})\.\d+\.tmp")


_FAILED_START_FILES = _or_its_temporary(r"config\.yaml|metrics\.jsonl")
_FAILED_START_DIRS = {  # sub-folder: its files
    "samples": _or_its_temporary(r"step-\d{7}\.png"),
    "tensorboard": re.compile(r"events\.out\.tfevents\.[^/]+"),
    SNAPSHOT_DIR: _or_its_temporary(r"step-\d{7}-sigma-[\d.e+-]+\.safetensors"),
}
_FIRST_SAVE_TMP = re.compile(r"\.checkpoint-(epoch-)?\d+\.tmp")  # the first checkpoint, half written when killed


def _failed_start_files(run_dir: Path) -> tuple[list[Path], Path | None]:
    """(the files of an earlier start that failed before its first checkpoint, the first entry that is not one).
    Ours are regular files (or our temporary folders), never links: a link planted there is someone else's."""
    ours: list[Path] = []
    for p in sorted(run_dir.iterdir()):
        if lock.is_lock(p):
            continue
        if p.is_symlink():
            return ours, p
        if (_FAILED_START_FILES.fullmatch(p.name) and p.is_file()) or \
                (_FIRST_SAVE_TMP.fullmatch(p.name) and p.is_dir()):
            ours.append(p)
            continue
        pattern = _FAILED_START_DIRS.get(p.name)
        if pattern is None or not p.is_dir():
            return ours, p
        for q in sorted(p.iterdir()):
            if q.is_symlink() or not q.is_file() or not pattern.fullmatch(q.name):
                return ours, q
            ours.append(q)
    return ours, None


def _refuse_existing_run_dir(run_dir: Path) -> list[Path]:
    """The files of an earlier start of this run that failed before its first checkpoint, which this start replaces
    (none for a new folder). A folder with a checkpoint is resumed, not restarted; one holding anything ditpipe did
    not write is refused, naming it (nothing of the user's is ever deleted)."""
    if not run_dir.exists():
        return []
    if checkpoint.list_checkpoints(run_dir) or (run_dir / checkpoint.LATEST).exists():
        raise DitpipeError(f"run folder '{run_dir}' already exists and holds checkpoints. Continue it with "
                           f"`ditpipe resume {run_dir}`, or start a new run with --logging.run_name NAME")
    ours, other = _failed_start_files(run_dir)
    if other is not None:
        raise DitpipeError(f"run folder '{run_dir}' already exists and holds '{other}', which ditpipe did not write "
                           "there; move it out and run the same command again, or start a new run with "
                           "--logging.run_name NAME")
    return ours


def _new_run_dir(run_dir: Path, cfg: Config, console: Console) -> None:
    """Make the run folder, or start it again where an earlier start failed before its first checkpoint: that
    start's files (and only they) are replaced, so its metrics, grids and snapshots never mix with this one's."""
    if ours := _refuse_existing_run_dir(run_dir):  # again on rank 0, under the run's lock: nothing changed since
        console.print(f"[yellow]note:[/] '{run_dir}' has no checkpoint (an earlier start failed before its first "
                      f"one): starting it again, replacing that start's {len(ours)} file(s) (config.yaml, metrics, "
                      "grids, post-hoc EMA snapshots)", highlight=False, soft_wrap=True)
        for p in ours:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        for sub in _FAILED_START_DIRS:
            with contextlib.suppress(OSError):  # only an emptied folder goes
                (run_dir / sub).rmdir()
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic.write_bytes(run_dir / "config.yaml", cfg.to_yaml().encode())  # a temporary renamed: no link followed


# ---------------------------------------------------------------------------------------------------- debugging


class _SampleRecord:
    """A debugging aid, off unless DITPIPE_RECORD_SAMPLES=PATH is set: every rank appends one JSON line per
    micro-batch it trains on, `{"rank", "step", "micro", "epoch", "q", "indices", "loss", "t", "noise"}` (global
    sample indices, this rank's local micro-batch mean loss, and each sample's timestep and diffusion-noise sum),
    so exactly-once across ranks, the loss reduction and the per-position draws can be checked from outside. Each line is one O_APPEND write, so the ranks may share one file. It costs a device sync per
    micro-batch; never set it for real runs."""

    def __init__(self, path: str, rank: int):
        self.fd, self.rank = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644), rank

    @classmethod
    def from_env(cls, rank: int) -> "_SampleRecord | None":
        path = os.environ.get(RECORD_ENV)
        return cls(path, rank) if path else None

    def write(self, step: int, micro: int, m: Micro, loss: torch.Tensor, draws) -> None:
        batch = m.batch
        line = {"rank": self.rank, "step": step, "micro": micro, "epoch": int(batch["epoch"]), "q": int(batch["q"]),
                "indices": [int(g) for g in batch["indices"]], "loss": float(loss.detach().float().item()),
                "t": [round(float(x), 6) for x in draws.t], "noise": [round(float(x), 4) for x in
                                                                    draws.noise.flatten(1).sum(1)]}
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


def _stop_requested(acc, stop: _StopFlag, step: int, log_every: int) -> bool:
    """Whether to checkpoint and stop before `step`. One process reads its own flag every step; several agree on it
    at log steps only (an all-reduce the host waits for), so every rank stops at the same step without a sync in
    every step. A signal is honoured within `logging.steps` steps."""
    if acc.num_processes == 1:
        return stop.raised
    if step % log_every:
        return False
    return bool(acc.reduce(torch.tensor(float(stop.raised), device=acc.device), "sum").item() > 0)


# ---------------------------------------------------------------------------------------------------- console


class _RunLeft(ProgressColumn):
    """The whole run's time left (`2 h 13 min left`), measured at log steps; a dash until the first."""

    def render(self, task) -> Text:
        left = task.fields.get("left")
        return Text(f"{'–' if left is None else duration(left)} left")


class _LossRate(ProgressColumn):
    """`loss=0.1234 1,440 img/s`, or dashes until the first log step has measured them."""

    def render(self, task) -> Text:
        loss, ips = task.fields.get("loss", math.nan), task.fields.get("ips", 0.0)
        return Text(f"loss={'–' if math.isnan(loss) else f'{loss:.4f}'} "
                    f"{'–' if not ips else f'{ips:,.0f}'} img/s")


def _progress(console: Console, enabled: bool) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("steps"),
                    TimeElapsedColumn(), _RunLeft(), _LossRate(), console=console, disable=not enabled)


def _epoch_task(bar: Progress, epoch: int, num_epochs: int, steps: int, done: int):
    left = bar.tasks[-1].fields.get("left") if bar.tasks else None  # the run's time left carries over
    for task in bar.tasks:
        bar.update(task.id, visible=False)
    return bar.add_task(f"Epoch {epoch + 1}/{num_epochs}", total=steps, completed=done, loss=math.nan, ips=0.0,
                        left=left)


def _preflight(console, cfg: Config, manifest, folder, raw, spec: RunSpec, device, start_step, end_step,
               restretched_from: int | None = None, fid_line: str | None = None, threads: Threads | None = None,
               step_seconds: float = 0.0) -> None:
    t, plan = cfg.training, spec.plan
    table = Table(title="ditpipe train", show_header=False, title_justify="left")
    table.add_row("device", f"{describe(device)} × {plan.world_size} process(es)")
    if threads is not None:
        table.add_row("threads", f"{threads.count} per process ({threads.why})")
    table.add_row("precision", spec.precision + (f"  ({spec.notice})" if spec.notice else ""))
    params = sum(p.numel() for p in raw.parameters() if p.requires_grad)
    table.add_row("model", f"{cfg.model.name} (hidden {raw.hidden_size}, depth {raw.depth}, patch {raw.patch_size}),"
                           f" {params:,} trainable parameters, {_tokens(manifest, raw.patch_size)}, "
                           + (f"{spec.num_classes} classes" if spec.num_classes else "unconditional"
                              if spec.conditioning == "none" else _caption_line(manifest)))
    table.add_row("objective", cfg.diffusion.objective)
    where = (f"{manifest['num_shards']} {manifest['format']} shard(s)" if "shards" in manifest
             else "images, encoded every step (data.source: images)")
    table.add_row("data", f"{folder}: {manifest['num_samples']:,} samples in {where}, latent "
                          f"{tuple(manifest['latent']['shape'])}")
    table.add_row("batch", f"{t.batch_size} × {t.gradient_accumulation_steps} accumulation × {plan.world_size} = "
                           f"{plan.global_batch} per optimizer step")
    table.add_row("steps", f"{plan.steps_per_epoch:,} optimizer steps per epoch; {end_step - start_step:,} to run"
                           + (f", from step {start_step:,} to {end_step:,}" if start_step else ""))
    lr = lambda step: lr_at(step, t.learning_rate, cfg.lr_scheduler.type, cfg.lr_scheduler.warmup_steps,  # noqa: E731
                            spec.total_steps)
    table.add_row("LR", f"{cfg.lr_scheduler.type}, peak {t.learning_rate:.2e} after {cfg.lr_scheduler.warmup_steps:,}"
                        f" warm-up steps, over {spec.total_steps:,} steps"
                        + (f" (restretched from {restretched_from:,}: {lr(start_step):.2e} at step {start_step:,})"
                           if restretched_from is not None else f"; {lr(start_step):.2e} now" if start_step else ""))
    if spec.held_out:
        every = (f"every {cfg.validation.every_steps:,} steps" if cfg.validation.every_steps
                 else "never: validation.every_steps is 0")
        table.add_row("held-out loss", f"{spec.held_out}; at {cfg.validation.loss_timesteps} fixed timesteps, {every}")
    if fid_line:
        table.add_row("training FID", fid_line)
    if t.posthoc_ema:
        size = 4 * sum(p.numel() for p in raw.state_dict().values()) * len(t.posthoc_ema_sigmas) / 2**20
        table.add_row("post-hoc EMA", f"σ_rel {', '.join(f'{s:g}' for s in t.posthoc_ema_sigmas)}: snapshots every "
                                      f"{cfg.checkpointing.phema_every:,} steps and at the end ({size:,.1f} MiB "
                                      f"each step) in {spec.run_dir / SNAPSHOT_DIR}; `ditpipe ema` reconstructs")
    from pipeline.memory import preflight as memory_preflight  # the prediction's logic lives there

    memory_row, memory_warning = memory_preflight(cfg, manifest, raw, plan.world_size, device)
    table.add_row("memory", memory_row)
    steps_left = end_step - start_step
    total = steps_left * step_seconds
    table.add_row("time", f"about {duration(total)} for {steps_left:,} steps ({step_seconds:.3g} s a step, timed "
                          "on the first batch; the bar and log lines update it)")
    table.add_row("output", str(spec.run_dir))
    console.print(table)
    if device.type == "cpu" and total > LONG_ON_CPU_SECONDS:  # before the first step: a CPU run of days is a mistake
        console.print(f"[bold red]warning:[/] [bold]this run would take about {duration(total)} on this CPU. On a CPU "
                      f"train the small recipe (configs/{CPU_RECIPE}.yaml) instead: {escape(_small_recipe(cfg))}; or "
                      "stop sooner with --training.max_steps N; or train on a GPU[/]", highlight=False, soft_wrap=True)
    if memory_warning:  # before any step: an out-of-memory a minute in wastes the start-up
        console.print(f"[bold red]warning:[/] [bold]{memory_warning}[/]", highlight=False, soft_wrap=True)
    for loud, note in schedule_warnings(t.learning_rate, cfg.lr_scheduler.type, cfg.lr_scheduler.warmup_steps,
                                        spec.total_steps, start_step, end_step):
        console.print(f"[bold red]warning:[/] [bold]{note}[/]" if loud else f"[yellow]warning:[/] {note}",
                      highlight=False, soft_wrap=True)
    if start_step and end_step > spec.total_steps:
        console.print(f"[yellow]note:[/] steps beyond {spec.total_steps:,} continue at the schedule's final LR "
                      f"({lr(spec.total_steps):.2e}); --restretch-schedule stretches it over the run instead",
                      highlight=False, soft_wrap=True)
    kept = _checkpoints_kept(cfg, plan, start_step, end_step)
    if sum(kept) > MANY_CHECKPOINTS:
        console.print(f"[yellow]warning:[/] this run keeps {sum(kept)} checkpoint folders ({kept[0]} per-epoch, "
                      f"{kept[1]} per-step), about {sum(kept) * _needed_bytes(raw) / 2**30:,.1f} GiB; keep fewer with "
                      "--checkpointing.keep_epochs N and --checkpointing.total_limit N, or a larger "
                      "checkpointing.steps", highlight=False, soft_wrap=True)


def _small_recipe(cfg: Config) -> str:
    """The two commands that encode and train the CPU recipe (configs/cpu.yaml) on this run's images."""
    d = cfg.data
    own = d.dataset_name != "shapes"  # a folder of images: its path goes with it
    encode = ["--dataset", d.dataset_name, *(["--data-path", d.dataset_path] if own else [])]
    train = override_args({"data.dataset_name": d.dataset_name,
                           **({"data.dataset_path": d.dataset_path} if own else {})})
    return (shlex.join(["ditpipe", "encode", "--config", CPU_RECIPE, *encode]) + " then "
            + shlex.join(["ditpipe", "train", "--config", CPU_RECIPE, *train]))


def _tokens(manifest: dict, patch: int) -> str:
    """Tokens per image: `256 tokens per image`, or per bucket's image, from the fewest to the most."""
    shapes = [b["latent_shape"] for b in manifest.get("buckets") or []] or [manifest["latent"]["shape"]]
    counts = sorted({(h // patch) * (w // patch) for _, _, h, w in shapes})
    return f"{counts[0]:,} tokens per image" if len(counts) == 1 else \
        f"{counts[0]:,}–{counts[-1]:,} tokens per image over {len(shapes)} buckets"


def _checkpoints_kept(cfg: Config, plan: Plan, start_step: int, end_step: int) -> tuple[int, int]:
    """(epoch, step) checkpoint folders this run writes and retention keeps."""
    c, spe = cfg.checkpointing, plan.steps_per_epoch
    epochs = end_step // spe - start_step // spe if c.every_epoch else 0
    steps = end_step // c.steps - start_step // c.steps + (1 if end_step % c.steps else 0)  # + the final one
    return min(epochs, c.keep_epochs or epochs), min(steps, c.total_limit or steps)


def _caption_line(manifest: dict) -> str:
    enc = shards.text_encoder_of(manifest)
    return (f"captions ({enc['name']}, {enc['dim']}-d, {manifest['captions']['num_captions']:,} captions, up to "
            f"{manifest['captions']['max_tokens_seen']} tokens)")


def _train_flops_per_sample(step: Step, last: list, device: torch.device) -> float | None:
    """Training FLOPs per sample as pipeline.step.FLOPS_CONVENTION states (3 forwards, 4 with gradient
    checkpointing), counted on the last micro-batch's shapes; only on CUDA, where a peak makes it an MFU (a forward
    there costs milliseconds)."""
    from pipeline.step import train_flops_per_sample

    if device.type != "cuda" or not last:
        return None
    m = last[0]
    with torch.random.fork_rng(devices=[device]):
        return train_flops_per_sample(step.raw, step.objective, m.mean.float(), m.y, step.conditional)


def _closing(console, run_dir: Path, loss: float, seconds: float, images: int, step: int, nonfinite: int,
             world: int, flops_per_sample: float | None, peak: float | None) -> None:
    final = run_dir / checkpoint.step_name(step)
    rate = images / max(seconds, 1e-9)
    speed = f"{rate:,.1f} img/s" + (f" ({rate / world:,.1f} per process)" if world > 1 else "")
    if flops_per_sample and peak:
        speed += (f", MFU {flops_per_sample * rate / world / (peak * 1e12):.1%} of {peak:g} TFLOP/s bf16 "
                  f"({FLOPS_CONVENTION})")
    console.print(f"[green]done[/]: {step:,} steps, final loss {loss:.4f}, {seconds:.1f} s, {speed}"
                  + (f", {nonfinite} non-finite step(s) skipped" if nonfinite else ""), highlight=False,
                  soft_wrap=True)
    console.print(f"final model: {final}/model.pt (EMA: ema.pt); logs: {run_dir}/metrics.jsonl, {run_dir}/tensorboard",
                  highlight=False, markup=False, soft_wrap=True)
    console.print("next: " + shlex.join(["ditpipe", "sample", "--checkpoint", str(run_dir), "--out",
                                         str(run_dir / "grid.png")]), highlight=False, markup=False, soft_wrap=True)


def _finished(console, run_dir: Path, saved: dict, cfg: Config, plan: Plan) -> None:
    """Resuming a run that has reached its end: nothing runs; say so, and how to go on."""
    step, t = saved["step"], cfg.training
    by_max = t.max_steps is not None and t.max_steps == step
    more = 2 * t.num_epochs
    extend = ["ditpipe", "resume", str(run_dir)] + (["--training.max_steps", "null"] if by_max else []) + [
        "--training.num_epochs", str(more), "--restretch-schedule"]
    console.print(f"[green]finished[/]: '{run_dir}' is at step {step:,}, the end of its "
                  + (f"training.max_steps {t.max_steps:,}" if by_max else f"{t.num_epochs} epochs") + "; nothing to "
                  f"run. To train further, extend it (e.g. to {more} epochs, {more * plan.steps_per_epoch:,} steps, "
                  "with the LR schedule stretched over them):", highlight=False, soft_wrap=True)
    console.print("  " + shlex.join(extend), highlight=False, markup=False, soft_wrap=True)


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
    from pipeline import safe_yaml as yaml  # no aliases: the JSON round trip below would expand them

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
    refused = [(f"{s}.{k}", f"was {old[s][k]!r} in the run, now {new[s][k]!r}")
               for s in new for k in new[s]
               if new[s][k] != old[s][k] and not f"{s}.{k}".startswith(RESUMABLE_CHANGES)]
    if refused:
        raise ConfigError(refused, header=f"cannot resume '{ckpt}' with a different config (only {resumable_keys()} "
                                          "may change on resume; for anything else start a new run, e.g. with "
                                          "--init-from this checkpoint)")
    return cfg
