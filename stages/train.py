"""`ditpipe train` / `ditpipe resume`: latent shards → DiT, in one readable loop (EDM2 style).

One counter drives everything: `step`, the optimizer steps done. It fixes the data position (step · global batch
samples consumed), the LR, the EMA decay, and the keyed generators for timesteps, noise and label dropout. The
loop checkpoints *before* a step, so checkpoint-N holds the state after N steps, and resuming from it replays
nothing and skips nothing.
"""

from __future__ import annotations

import contextlib
import math
import shlex
import signal
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from ditpipe.pipeline import checkpoint, lock, objstore, run_store, shards
from ditpipe.pipeline.config import CPU_RECIPE, Config, override_args
from ditpipe.pipeline.device import describe, peak_tflops
from ditpipe.pipeline.errors import ConfigError, DitpipeError
from ditpipe.pipeline.estimate import LONG_ON_CPU_SECONDS, duration, remaining, step_seconds
from ditpipe.pipeline.latent_norm import LatentNorm
from ditpipe.pipeline.manifest import Manifest, load_manifest
from ditpipe.pipeline.metrics import MetricsLog
from ditpipe.pipeline.order import Plan
from ditpipe.pipeline.phema import SNAPSHOT_DIR, write_snapshots
from ditpipe.pipeline.recovery import RecoveryState
from ditpipe.pipeline.run import (Run, Stream, build_model_for, build_step_for, open_run, prepare_folder, recover,
                                  restore, run_dir_of, spike_watch)
from ditpipe.pipeline.schedule import lr_at, schedule_warnings
from ditpipe.pipeline.step import FLOPS_CONVENTION, Micro, Step
from ditpipe.pipeline.training import conditioning_for, shard_folders
from ditpipe.pipeline.validation import HeldOut, eval_model, held_out_losses
from ditpipe.pipeline.workers import capped_workers

MANY_CHECKPOINTS = 20  # the preflight warns when a run would keep more checkpoint folders than this


# ---------------------------------------------------------------------------------------------------- the loop


@lock.holding(lambda cfg, config_name, resume, **_: (run_dir_of(cfg, config_name, resume),
                                                      "resume" if resume else "train"), records_end=True)
@lock.holding(lambda cfg, resume, **_: (shard_folders(cfg), "resume" if resume else "train"), shared=True)
def train(cfg: Config, config_name: str | None = None, resume: Path | None = None,
          console: Console | None = None, restretch_schedule: bool = False) -> Path:
    """Train (or resume, from the checkpoint folder `resume`) and return the run folder. `restretch_schedule` (on
    resume) stretches the LR schedule over the run's current length (pipeline/schedule.py)."""
    console = console or Console(stderr=True)
    say = lambda line: console.print(line, highlight=False, soft_wrap=True)  # noqa: E731
    objstore.configure(cfg.storage)  # the endpoint and retries of s3:// shards and run folders
    run = open_run(cfg, config_name, resume, restretch_schedule)  # pipeline/run.py: everything a refusal needs
    cfg, t, acc, plan, device, saved = run.cfg, run.cfg.training, run.acc, run.plan, run.device, run.saved
    start_step, end_step, run_dir, main = run.start_step, run.end_step, run.run_dir, acc.is_main_process
    if run.finished:  # a finished run: nothing to do, so say how to extend it
        if main:
            _finished(console, run_dir, saved, cfg, plan)
        return run_dir
    model, objective, init_notes = build_model_for(run)
    prepare_folder(run, say)
    step_fn = build_step_for(run, model, objective)
    raw, stats = step_fn.raw, step_fn.stats
    recovery, watch = RecoveryState.from_state(saved), spike_watch(run)  # data offset, LR scale, recoveries so far
    log = MetricsLog(run_dir, cfg.logging.tensorboard, enabled=main, resume_step=start_step if saved else None)
    workers, fewer = capped_workers(cfg.data.num_workers)
    stream = Stream(run, workers)
    stream.start(start_step, recovery.data_offset)
    restore(run, step_fn)  # after the stream drew its base seed: the saved RNG states come after it
    ahead = stream.read_ahead()  # the preflight times a step on it, the first step trains on it
    with _oom_advice(device, plan):  # the probe takes a step's memory: an out-of-memory shows here, explained
        seconds = step_seconds(raw, objective, ahead, run.norm, run.conditioning != "none", plan.accum, acc.autocast,
                               device) if end_step > start_step else 0.0
    if main:
        _preflight(console, run, raw, saved["total_steps"] if saved and restretch_schedule else None, seconds)
        for line in ([f"[cyan]elastic:[/] {run.elastic_note}"] if run.elastic_note else []) + [
                f"[cyan]init:[/] {note}" for note in init_notes] + ([f"[yellow]note:[/] {fewer}"] if fewer else []):
            say(line)
    record = run.hooks.sample_record(acc.process_index)
    stop = _StopFlag()
    since_log, last_loss, epoch_task = 0, math.nan, None
    t_log = t_start = time.time()
    t_first = None  # when the first step of this launch ended: the rate for the time left starts there (it skips the
    # first step's one-off costs: compile, allocator, workers starting)
    bar = _progress(console, main)
    work = _Periodic(run, step_fn, objective, recovery, log, bar.console)

    with bar, stop.installed(), _oom_advice(device, plan):
        if work.held is not None and cfg.validation.every_steps and not saved:
            work.validate(0, grid=False)  # where a fine-tune starts from, and a from-scratch run's baseline
        step = start_step
        while step < end_step:
            epoch, step_in_epoch = divmod(step, plan.steps_per_epoch)
            work.before(step)  # post-hoc EMA snapshots, checkpoints, validation, training FID, as due
            if _stop_requested(acc, stop, step, cfg.logging.steps):
                work.save(checkpoint.step_name(step), step)
                raise _Stopped(work.remote.url if work.remote else run_dir, step)
            if epoch_task is None or step_in_epoch == 0:
                epoch_task = _epoch_task(bar, epoch, t.num_epochs, plan.steps_per_epoch, step_in_epoch)

            lr = recovery.lr_scale * lr_at(step, t.learning_rate, cfg.lr_scheduler.type, cfg.lr_scheduler.warmup_steps,
                                           run.total_steps)
            stream.position = step + recovery.data_offset  # keys the step's data and draws
            loss, bad = step_fn(step, lr, stream.feed, record.write if record is not None else None, stream.position)
            if watch is not None:
                watch.update(step, loss, bad)  # on the device, like the step

            done = step = step + 1
            t_first = t_first or time.time()
            bar.update(epoch_task, advance=1, loss=last_loss)
            since_log += 1
            if done % cfg.logging.steps == 0 or done == end_step:  # the one place the loop reads the device
                loss_sum, finite = (float(x) for x in step_fn.stats.take_window())  # the same on every rank
                mean_loss = loss_sum / finite if finite else math.nan
                align = {} if step_fn.projector is None else {  # REPA's alignment loss, beside the denoising one
                    "align_loss": float(stats.take_align()) / finite if finite else math.nan}
                worst, worst_start = (int(x) for x in stats.take_worst_run())
                ips = since_log * plan.global_batch / max(time.time() - t_log, 1e-9)
                last_loss = mean_loss
                left = remaining(time.time() - t_first, done - start_step - 1, end_step - done) \
                    if done - start_step > 1 else remaining(time.time() - t_start, 1, end_step - done)
                bar.update(epoch_task, loss=mean_loss, ips=ips, left=left)
                if main:
                    bar.console.print(f"Step {done}, Loss: {mean_loss:.4f}, LR: {lr:.2e}"
                                      + "".join(f", Align: {v:.4f}" for v in align.values())
                                      + (f", {duration(left)} left" if done < end_step else ""), highlight=False)
                peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
                log.scalars(done, loss=mean_loss, lr=lr, grad_norm=float(stats.grad_norm), img_per_s=ips,
                            peak_mem_gib=peak, epoch=epoch + 1, nonfinite_total=int(stats.nonfinite_total), **align)
                since_log, t_log = 0, time.time()
                # rank-consistent: every rank counted the same steps
                failure = (f"{worst} non-finite losses in a row by step {done}", worst_start) \
                    if worst >= t.max_nonfinite_steps else _spike(watch, t, done)
                if failure and not (t.recover and recovery.recoveries < t.recover_max):
                    raise DitpipeError(f"{failure[0]}; stopping. Lower training.learning_rate, use bf16 instead of "
                                       "fp16, or set model.qk_norm: true (or training.recover: true); resume from "
                                       "the last checkpoint")
                if failure:
                    step = recover(failure, done, run_dir, run.group, step_fn, recovery, t, log,
                                   lambda line: bar.console.print(line, highlight=False, soft_wrap=True))
                    stats.reset_runs()
                    if watch is not None:
                        watch.reset_runs()
                    stream.start(step, recovery.data_offset)

        work.before(end_step, final=True)  # the final checkpoint, and the end's snapshots, validation and FID
    log.close()
    if main:
        seconds = time.time() - t_start
        _closing(console, run_dir, last_loss, seconds, (end_step - start_step) * plan.global_batch, end_step,
                 int(stats.nonfinite_total), acc.num_processes, _train_flops_per_sample(step_fn, stream.last, device),
                 peak_tflops(device))
    return run_dir


class _Periodic:
    """The loop's periodic work, due before a step (and at the end): post-hoc EMA snapshots, checkpoints (every
    `checkpointing.steps` and at an epoch's end), the held-out loss and grid, and training FID. The evaluation copy
    of the model, the grids' decoder and text encoder are built on first use (never for a step) and kept in `cache`,
    off the GPU between uses."""

    def __init__(self, run: Run, step: Step, objective, recovery: RecoveryState, log: MetricsLog, console: Console):
        self.run, self.step, self.objective, self.recovery, self.log, self.console = (run, step, objective, recovery,
                                                                                      log, console)
        self.cache: dict = {}
        self.remote = run_store.RemoteRun.of(run.cfg, run.run_dir)  # None: the run folder is a (shared) folder
        h, cfg = run.held_spec, run.cfg
        self.held = HeldOut(h.store, h.evaluate, run.norm, cfg.data.seed, run.acc.process_index,
                            run.acc.num_processes) if h else None

    def before(self, step: int, final: bool = False) -> None:
        """The work due before `step`; `final`: at the run's end, where the checkpoint is always written."""
        run, c, v = self.run, self.run.cfg.checkpointing, self.run.cfg.validation
        moved = step > run.start_step
        if moved and (final or step % c.phema_every == 0):
            self.snapshots(step)
        epoch, step_in_epoch = divmod(step, run.plan.steps_per_epoch)
        epoch_end = moved and step_in_epoch == 0 and c.every_epoch
        if final or (moved and step % c.steps == 0):  # `latest` names the step checkpoint
            self.save(checkpoint.step_name(step), step, also=checkpoint.epoch_name(epoch) if epoch_end else None)
        elif epoch_end:
            self.save(checkpoint.epoch_name(epoch), step)
        if v.every_steps and moved and (final or step % v.every_steps == 0):
            self.validate(step)
        if run.fid_watch is not None and run.fid_watch.due(step, run.start_step, run.end_step):
            self.training_fid(step)

    def save(self, name: str, step: int, also: str | None = None) -> None:
        """Checkpoint `name` of `step`; `also`, a second name for the same state (an epoch's end on a step
        checkpoint), is linked to it rather than written again."""
        run, s, main = self.run, self.step, self.run.acc.is_main_process
        state = checkpoint.state_record(run.cfg, step, run.plan, run.total_steps, int(s.stats.nonfinite_total),
                                        run.manifest, run.restretched, run.precision)
        writers = checkpoint.writers(run.acc, run.cfg, run.manifest, s)
        if self.remote is not None:  # nodes stage apart: rank 0 writes every rank's files (pipeline/run_store.py)
            writers = run_store.gathered_writers(run.group, writers, main)
        checkpoint.save(run.run_dir, name, writers, {**state, **self.recovery.record()}, group=run.group,
                        needed_bytes=checkpoint.needed_bytes(s.raw, s), pause=run.hooks.checkpoint_pause_s)
        if also:
            checkpoint.link(run.run_dir, name, also, group=run.group)
        pruned = checkpoint.prune(run.run_dir, run.cfg.checkpointing.total_limit,
                                  run.cfg.checkpointing.keep_epochs) if main else []
        if self.remote is not None:  # rank 0's, and its failure every rank's
            run.group.on_rank0(lambda: self.publish(name, also, [p.name for p in pruned]))

    def publish(self, name: str, also: str | None, pruned: list[str]) -> None:
        """A run in object storage: the checkpoint's objects, then `latest`, then retention's deletes."""
        self.remote.publish(name, also)
        self.remote.remove(pruned)

    def snapshots(self, at: int) -> None:
        """Rank 0 writes the post-hoc EMA snapshots of step `at`, before that step's checkpoint (so a checkpoint
        implies its snapshots, and a resume from it need not write them again). Its failure (a full disk) stops every
        rank with the same message, where the others would wait for rank 0 in the next step's all-reduce (under a
        launcher that does not kill the rest, until the collective times out)."""
        if self.step.phema is not None:
            whole = self.step.phema.gathered()  # every rank: fsdp's sharded shadows gathered (None under ddp)
            self.run.group.on_rank0(lambda: write_snapshots(self.run.run_dir / SNAPSHOT_DIR, at, self.step.phema,
                                                            whole))

    def validate(self, step: int, grid: bool = True) -> None:
        run, s, cfg, main = self.run, self.step, self.run.cfg, self.run.acc.is_main_process
        if self.held is not None:
            weights = {"ema": s.ema.state_dict()} if s.ema is not None else {}
            losses = held_out_losses(run.acc, cfg, run.manifest, self.held, {**weights, "raw": s.raw.state_dict()},
                                     self.objective, run.num_classes, self.cache)
            self.log.scalars(step, prefix="val", **losses)
            if main:
                self.console.print(f"Step {step}, held-out loss: " + ", ".join(
                    f"{losses[f'loss_{w}']:.4f} ({w})" for w in ("ema", "raw") if f"loss_{w}" in losses),
                    highlight=False)
        if grid and cfg.validation.grid and main:
            path = validation_grid(cfg, run.manifest, s.raw, s.ema, self.objective, run.num_classes, step,
                                   run.run_dir, run.device, self.cache)
            self.log.image(step, "samples", np.asarray(Image.open(path).convert("RGB")))
            self.console.print(f"samples at step {step}: {path}")
        _park(self.cache)  # off the GPU until the next validation: the training step needs the memory
        run.acc.wait_for_everyone()

    def training_fid(self, step: int) -> None:  # every rank samples its share (pipeline/training_fid.py)
        s = self.step
        self.run.fid_watch(step, (s.ema if s.ema is not None else s.raw).state_dict(), self.objective,
                           self.run.device, self.cache, self.log, self.console)
        _park(self.cache)


# ---------------------------------------------------------------------------------------------------- validation


def _park(cache: dict) -> None:
    """Move the cached evaluation model, decoder and text encoder to the CPU: on a tight GPU the step needs the
    3-4 GB they hold (XL/2 and its VAE) until the next validation brings them back."""
    for key in ("model", "codec", "text"):
        if key in cache:
            cache[key].to(torch.device("cpu"))


def validation_grid(cfg: Config, manifest: Manifest | dict, raw, ema, objective, num_classes: int, step: int,
                    run_dir: Path, device: torch.device, cache: dict) -> Path:
    """A grid of `validation.num_samples` samples (EMA weights when kept), one class per column cycle, written to
    samples/step-NNNNNNN.png. The same seed every time, so grids compare across steps."""
    from ditpipe.pipeline import atomic
    from ditpipe.pipeline.codec import load_decoder
    from ditpipe.pipeline.generate import decode, generate
    from ditpipe.pipeline.images import make_grid, to_uint8

    manifest = Manifest.of(manifest)
    model = eval_model(cfg, manifest, num_classes, ema.state_dict() if ema is not None else raw.state_dict(), device,
                       cache)
    n, v = cfg.validation.num_samples, cfg.validation
    labels = torch.arange(n) % num_classes if num_classes else None
    names = manifest.class_names[:num_classes] if 0 < num_classes <= 16 else None
    if conditioning_for(cfg, manifest) == "caption":  # one prompt per column
        from ditpipe.pipeline.text import encode_prompts, load_for_manifest

        if "text" not in cache:
            cache["text"] = load_for_manifest(manifest.text_encoder, device)
            cache["prompts"] = (v.prompts or _shard_prompts(cfg.shards_path))[:16]
        cache["text"].to(device)
        names = cache["prompts"]
        labels = encode_prompts(cache["text"], [names[i % len(names)] for i in range(n)])
    z = generate(model, objective, manifest.grid, labels, n, v.sampler, v.sampling_steps, v.cfg_scale,
                 cfg.training.seed, device, cfg_interval=v.cfg_interval, bf16=v.bf16)  # bf16 autocast on CUDA
    codec = manifest.codec
    if "codec" not in cache:  # the run's codec, or validation.decoder (checked to decode its latents)
        cache["codec"] = load_decoder(v.decoder or codec["name"], codec, codec["dtype"], device)
    cache["codec"].to(device)
    images = to_uint8(decode(z, cache["codec"], LatentNorm.from_record(manifest.latent_norm)))
    path = run_dir / "samples" / f"step-{step:07d}.png"
    path.parent.mkdir(exist_ok=True)
    grid = make_grid(images, ncols=len(names) if names else int(math.ceil(n ** 0.5)), column_labels=names, min_cell=64)
    # A temporary name renamed over `path`: a link planted there is replaced, never written through.
    with atomic.atomic_path(path) as tmp, open(tmp, "wb") as f:
        grid.save(f, format="PNG")
    return path


def _shard_prompts(folder: Path, count: int = 8) -> list[str]:
    """The first `count` distinct first-captions of the first shard: validation prompts the data really has."""
    manifest, prompts = load_manifest(folder), []
    for sample in shards.iter_shard(folder, manifest.entries[0]["name"], manifest):
        caption = (sample.meta.get("captions") or [None])[0]
        if caption and caption not in prompts:
            prompts.append(caption)
        if len(prompts) == count:
            break
    if not prompts:
        raise ConfigError([("validation.prompts", f"the shards in '{folder}' hold no captions to prompt with; "
                                                  "set validation.prompts")])
    return prompts


def _spike(watch, t, done: int) -> tuple[str, int] | None:
    """(what happened, the step it began) when the spike watch saw `recover_spike_steps` spike steps in a row."""
    if watch is None:
        return None
    run, start = watch.take()
    if run < t.recover_spike_steps:
        return None
    return (f"the loss stayed above {t.recover_spike_factor:g}× its running median for {run} steps from step "
            f"{start}", start)



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


def _preflight(console, run: Run, raw, restretched_from: int | None = None, step_seconds: float = 0.0) -> None:
    cfg, manifest, folder, device, threads = run.cfg, run.manifest, run.folder, run.device, run.threads
    t, plan, start_step, end_step = cfg.training, run.plan, run.start_step, run.end_step
    fid_line = run.fid_watch.describe(plan.global_batch, end_step - start_step) if run.fid_watch else None
    table = Table(title="ditpipe train", show_header=False, title_justify="left")
    table.add_row("device", f"{describe(device)} × {plan.world_size} process(es)")
    if threads is not None:
        table.add_row("threads", f"{threads.count} per process ({threads.why})")
    table.add_row("precision", run.precision + (f"  ({run.notice})" if run.notice else ""))
    params = sum(p.numel() for p in raw.parameters() if p.requires_grad)
    table.add_row("model", f"{cfg.model.name} (hidden {raw.hidden_size}, depth {raw.depth}, patch {raw.patch_size}),"
                           f" {params:,} trainable parameters, {_tokens(manifest, raw.patch_size)}, "
                           + (f"{run.num_classes} classes" if run.num_classes else "unconditional"
                              if run.conditioning == "none" else _caption_line(manifest)))
    table.add_row("objective", cfg.diffusion.objective)
    where = (f"{manifest.num_shards} {manifest.format} shard(s)" if "shards" in manifest.raw  # online: none
             else "images, encoded every step (data.source: images)")
    table.add_row("data", f"{folder}: {manifest.num_samples:,} samples in {where}, latent "
                          f"{tuple(manifest.latent['shape'])}")
    if t.repa.weight > 0:  # check_run refused REPA without targets
        enc, lay, r = manifest.targets["encoder"], manifest.target_layout(), t.repa
        table.add_row("REPA", f"block {r.depth} → projector {r.projector_dim} → {enc['dim']}, weight {r.weight:g}; "
                              f"targets {enc['name']} ({lay.tokens} tokens × {enc['dim']}, {lay.dtype}, "
                              f"{lay.data_bytes / 1024:,.0f} KiB a sample), read from the shards")
    table.add_row("batch", f"{t.batch_size} × {t.gradient_accumulation_steps} accumulation × {plan.world_size} = "
                           f"{plan.global_batch} per optimizer step")
    table.add_row("steps", f"{plan.steps_per_epoch:,} optimizer steps per epoch; {end_step - start_step:,} to run"
                           + (f", from step {start_step:,} to {end_step:,}" if start_step else ""))
    lr = lambda step: lr_at(step, t.learning_rate, cfg.lr_scheduler.type, cfg.lr_scheduler.warmup_steps,  # noqa: E731
                            run.total_steps)
    table.add_row("LR", f"{cfg.lr_scheduler.type}, peak {t.learning_rate:.2e} after {cfg.lr_scheduler.warmup_steps:,}"
                        f" warm-up steps, over {run.total_steps:,} steps"
                        + (f" (restretched from {restretched_from:,}: {lr(start_step):.2e} at step {start_step:,})"
                           if restretched_from is not None else f"; {lr(start_step):.2e} now" if start_step else ""))
    if run.held_spec:
        every = (f"every {cfg.validation.every_steps:,} steps" if cfg.validation.every_steps
                 else "never: validation.every_steps is 0")
        table.add_row("held-out loss",
                      f"{run.held_spec.description}; at {cfg.validation.loss_timesteps} fixed timesteps, {every}")
    if fid_line:
        table.add_row("training FID", fid_line)
    if t.posthoc_ema:
        size = 4 * sum(p.numel() for p in raw.state_dict().values()) * len(t.posthoc_ema_sigmas) / 2**20
        table.add_row("post-hoc EMA", f"σ_rel {', '.join(f'{s:g}' for s in t.posthoc_ema_sigmas)}: snapshots every "
                                      f"{cfg.checkpointing.phema_every:,} steps and at the end ({size:,.1f} MiB "
                                      f"each step) in {run.run_dir / SNAPSHOT_DIR}; `ditpipe ema` reconstructs")
    from ditpipe.pipeline.memory import preflight as memory_preflight  # the prediction's logic lives there

    memory_row, memory_warning = memory_preflight(cfg, manifest, raw, plan.world_size, device)
    table.add_row("memory", memory_row)
    steps_left = end_step - start_step
    total = steps_left * step_seconds
    table.add_row("time", f"about {duration(total)} for {steps_left:,} steps ({step_seconds:.3g} s a step, timed "
                          "on the first batch; the bar and log lines update it)")
    table.add_row("output", str(run.run_dir))
    console.print(table)
    if device.type == "cpu" and total > LONG_ON_CPU_SECONDS:  # before the first step: a CPU run of days is a mistake
        console.print(f"[bold red]warning:[/] [bold]this run would take about {duration(total)} on this CPU. On a CPU "
                      f"train the small recipe (configs/{CPU_RECIPE}.yaml) instead: {escape(_small_recipe(cfg))}; or "
                      "stop sooner with --training.max_steps N; or train on a GPU[/]", highlight=False, soft_wrap=True)
    if memory_warning:  # before any step: an out-of-memory a minute in wastes the start-up
        console.print(f"[bold red]warning:[/] [bold]{memory_warning}[/]", highlight=False, soft_wrap=True)
    for loud, note in schedule_warnings(t.learning_rate, cfg.lr_scheduler.type, cfg.lr_scheduler.warmup_steps,
                                        run.total_steps, start_step, end_step):
        console.print(f"[bold red]warning:[/] [bold]{note}[/]" if loud else f"[yellow]warning:[/] {note}",
                      highlight=False, soft_wrap=True)
    if start_step and end_step > run.total_steps:
        console.print(f"[yellow]note:[/] steps beyond {run.total_steps:,} continue at the schedule's final LR "
                      f"({lr(run.total_steps):.2e}); --restretch-schedule stretches it over the run instead",
                      highlight=False, soft_wrap=True)
    kept = _checkpoints_kept(cfg, plan, start_step, end_step)
    if sum(kept) > MANY_CHECKPOINTS:
        console.print(f"[yellow]warning:[/] this run keeps {sum(kept)} checkpoint folders ({kept[0]} per-epoch, "
                      f"{kept[1]} per-step), about {sum(kept) * checkpoint.needed_bytes(raw) / 2**30:,.1f} GiB; keep "
                      "fewer with --checkpointing.keep_epochs N and --checkpointing.total_limit N, or a larger "
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


def _tokens(manifest: Manifest, patch: int) -> str:
    """Tokens per image: `256 tokens per image`, or per bucket's image, from the fewest to the most."""
    shapes = [b["latent_shape"] for b in manifest.buckets] or [manifest.latent["shape"]]
    counts = sorted({(h // patch) * (w // patch) for _, _, h, w in shapes})
    return f"{counts[0]:,} tokens per image" if len(counts) == 1 else \
        f"{counts[0]:,}–{counts[-1]:,} tokens per image over {len(shapes)} buckets"


def _checkpoints_kept(cfg: Config, plan: Plan, start_step: int, end_step: int) -> tuple[int, int]:
    """(epoch, step) checkpoint folders this run writes and retention keeps."""
    c, spe = cfg.checkpointing, plan.steps_per_epoch
    epochs = end_step // spe - start_step // spe if c.every_epoch else 0
    steps = end_step // c.steps - start_step // c.steps + (1 if end_step % c.steps else 0)  # + the final one
    return min(epochs, c.keep_epochs or epochs), min(steps, c.total_limit or steps)


def _caption_line(manifest: Manifest) -> str:
    enc = manifest.text_encoder
    return (f"captions ({enc['name']}, {enc['dim']}-d, {manifest.captions['num_captions']:,} captions, up to "
            f"{manifest.captions['max_tokens_seen']} tokens)")


def _train_flops_per_sample(step: Step, m: Micro | None, device: torch.device) -> float | None:
    """Training FLOPs per sample as pipeline.step.FLOPS_CONVENTION states (3 forwards, 4 with gradient
    checkpointing), counted on the shapes of `m`, the last micro-batch; only on CUDA, where a peak makes it an MFU (a
    forward there costs milliseconds)."""
    from ditpipe.pipeline.step import train_flops_per_sample

    if device.type != "cuda" or m is None:
        return None
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
    console.print(f"final model: {final}/{checkpoint.MODEL} (EMA: {checkpoint.EMA}); logs: {run_dir}/metrics.jsonl, "
                  f"{run_dir}/tensorboard", highlight=False, markup=False, soft_wrap=True)
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


