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
from pipeline.device import describe, make_accelerator, peak_tflops
from pipeline.diffusion import make_objective
from pipeline.errors import ConfigError, DitpipeError, ShardError
from pipeline.finetune import init_from
from pipeline.latent_norm import LatentNorm
from pipeline.loader import Plan
from pipeline.metrics import MetricsLog
from pipeline.phema import SNAPSHOT_DIR, clean_temporaries, write_snapshots
from pipeline.schedule import lr_at
from pipeline.step import PHEMA_FILE, Micro, Step, build_step, forward_flops
from pipeline.training import (batch_condition, build_model, conditioning_for, num_classes_for, open_data,
                               training_batches)
from pipeline.validation import HeldOut, eval_model, held_out_losses, open_held_out

# Debugging aid (see _SampleRecord): a path; each rank appends the global sample indices of every micro-batch.
RECORD_ENV = "DITPIPE_RECORD_SAMPLES"
# Keys that may differ between a run's saved config and the one it resumes with (DESIGN.md, Runs and checkpoints).
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


def _run_name(cfg: Config, config_name: str | None) -> str:
    return cfg.logging.run_name or (Path(config_name).stem if config_name else "run")


# ---------------------------------------------------------------------------------------------------- the loop


def train(cfg: Config, config_name: str | None = None, resume: Path | None = None,
          console: Console | None = None) -> Path:
    """Train (or resume, from the checkpoint folder `resume`) and return the run folder."""
    console = console or Console(stderr=True)
    t = cfg.training
    acc, precision, notice = make_accelerator(t.mixed_precision, tf32=t.tf32, deterministic=t.deterministic)
    rank, world, device = acc.process_index, acc.num_processes, acc.device  # the run's only source of devices
    group = _group(acc)
    manifest, folder, store, online = open_data(cfg, device)
    norm = LatentNorm.from_manifest(manifest, cfg.data.latent_norm)
    manifest = {**manifest, "latent_norm": norm.record()}  # so every checkpoint records what sampling must invert
    held_spec = open_held_out(cfg, manifest, store)  # None without a held-out set
    excluded = held_spec.exclude if held_spec else np.zeros(0, dtype=np.int64)  # never trained on
    saved = _validated(group, resume) if resume else None  # rank 0 hashes the files; every rank gets its answer
    if saved:  # first: every later check (epoch length, end step) depends on the world size
        _check_world_size(saved, world, resume)
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
    model = build_model(cfg, manifest, num_classes).to(device)  # on its device before anything is made from it
    init_notes = [] if saved or not cfg.model.init_from else init_from(  # a fine-tune; the EMA starts from it too
        model, cfg.model.init_from, cfg.model.init_weights, (manifest.get("labels") or {}).get("names"), manifest)
    objective = make_objective(cfg.diffusion.objective, model.learn_sigma)
    if saved:
        _check_same_encoders(resume, manifest)
    else:
        _refuse_existing_run_dir(run_dir)  # on every rank, before rank 0 makes it: all ranks exit with the message
        acc.wait_for_everyone()
        if acc.is_main_process:
            _new_run_dir(run_dir, cfg)
    step_fn = build_step(acc, model, objective, plan, latent_shape, training=t, rank=rank,
                         drop_prob=cfg.model.class_dropout_prob, conditional=conditioning != "none",
                         compile=cfg.model.compile, resume=resume if saved else None)
    raw, ema, stats = step_fn.raw, step_fn.ema, step_fn.stats
    start_step = int(saved["step"]) if saved else 0
    if saved and acc.is_main_process:
        checkpoint.clean_temporaries(run_dir)  # half-written checkpoints of the killed run
        clean_temporaries(run_dir / SNAPSHOT_DIR)  # and half-written post-hoc EMA snapshots

    log = MetricsLog(run_dir, cfg.logging.tensorboard, enabled=acc.is_main_process,
                     resume_step=start_step if saved else None)
    if acc.is_main_process:
        _preflight(console, cfg, manifest, folder, raw, spec, device, start_step, end_step)
        for note in init_notes:
            console.print(f"[cyan]init:[/] {note}", highlight=False, soft_wrap=True)
    loader, to_latents = training_batches(cfg, manifest, store, online, plan, rank, norm, conditioning, excluded,
                                          start_step, end_step, device)
    batches = iter(loader)  # draws a base seed from torch's global RNG: restore the saved states after it
    if saved and (resume / f"rng-rank{rank}.pt").is_file():
        rank_state = checkpoint.load_tensors(resume / f"rng-rank{rank}.pt")
        checkpoint.set_rng_state(rank_state, device)
        stats.loss_sum += rank_state["log_window"][0].to(device)  # the unlogged steps before the kill
        stats.finite_steps += rank_state["log_window"][1].to(device)
    if saved:
        stats.nonfinite_total.fill_(int(saved.get("nonfinite_total", 0)))
    to_y = batch_condition(conditioning, device)
    last: list[Micro] = []  # the latest micro-batch: the closing summary counts FLOPs on one like it

    def feed() -> Micro:
        batch = next(batches)
        last[:] = [Micro(to_latents(batch), to_y(batch), batch)]  # x0 (B, C, H, W) on the device, y
        return last[0]

    record = _SampleRecord.from_env(rank)
    stop = _StopFlag()

    def save(name: str, step: int) -> None:
        checkpoint.save(run_dir, name, _writers(acc, cfg, manifest, step_fn),
                        _ckpt_state(cfg, step, plan, total_steps, int(stats.nonfinite_total)), group=group,
                        needed_bytes=_needed_bytes(raw, step_fn))
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
            if step > start_step and step % cfg.checkpointing.phema_every == 0:
                _phema_snapshots(acc, run_dir, step_fn, step)
            if step > start_step and step_in_epoch == 0 and cfg.checkpointing.every_epoch:
                save(checkpoint.epoch_name(epoch), step)
            if step > start_step and step % cfg.checkpointing.steps == 0:
                save(checkpoint.step_name(step), step)  # last, so `latest` names the step checkpoint
            if cfg.validation.every_steps and step > start_step and step % cfg.validation.every_steps == 0:
                validate(step)
            if _stop_requested(acc, stop, step, cfg.logging.steps):
                save(checkpoint.step_name(step), step)
                raise _Stopped(run_dir, step)
            if epoch_task is None or step_in_epoch == 0:
                epoch_task = _epoch_task(bar, epoch, t.num_epochs, plan.steps_per_epoch, step_in_epoch)

            lr = lr_at(step, t.learning_rate, cfg.lr_scheduler.type, cfg.lr_scheduler.warmup_steps, total_steps)
            step_fn(step, lr, feed, record.write if record is not None else None)  # no host sync inside

            done = step + 1
            bar.update(epoch_task, advance=1, loss=last_loss)
            since_log += 1
            if done % cfg.logging.steps == 0 or done == end_step:  # the one place the loop reads the device
                loss_sum, finite = step_fn.stats.take_window()
                sums = acc.reduce(torch.stack([loss_sum, finite]), "sum") if world > 1 else torch.stack([loss_sum,
                                                                                                       finite])
                mean_loss = float(sums[0]) / float(sums[1]) if float(sums[1]) else math.nan
                worst = int(stats.take_worst_run())
                ips = since_log * plan.global_batch / max(time.time() - t_log, 1e-9)
                last_loss = mean_loss
                bar.update(epoch_task, loss=mean_loss, ips=ips)
                if acc.is_main_process:
                    bar.console.print(f"Step {done}, Loss: {mean_loss:.4f}, LR: {lr:.2e}", highlight=False)
                peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
                log.scalars(done, loss=mean_loss, lr=lr, grad_norm=float(stats.grad_norm), img_per_s=ips,
                            peak_mem_gib=peak, epoch=epoch + 1, nonfinite_total=int(stats.nonfinite_total))
                since_log, t_log = 0, time.time()
                if worst >= t.max_nonfinite_steps:  # rank-consistent: every rank counted the same steps
                    raise DitpipeError(f"{worst} non-finite losses in a row by step {done}; stopping. Lower "
                                       "training.learning_rate, use bf16 instead of fp16, or set model.qk_norm: "
                                       "true; resume from the last checkpoint")

        if end_step > start_step:
            _phema_snapshots(acc, run_dir, step_fn, end_step)
        if end_step % plan.steps_per_epoch == 0 and cfg.checkpointing.every_epoch and end_step > start_step:
            save(checkpoint.epoch_name(end_step // plan.steps_per_epoch), end_step)
        save(checkpoint.step_name(end_step), end_step)
        if cfg.validation.every_steps and end_step > start_step:
            validate(end_step)
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
        cache["text"].to(device)
        names = cache["prompts"]
        labels = encode_prompts(cache["text"], [names[i % len(names)] for i in range(n)])
    _, channels, size, _ = manifest["latent"]["shape"]
    z = generate(model, objective, (channels, size, size), labels, n, v.sampler, v.sampling_steps, v.cfg_scale,
                 cfg.training.seed, device, cfg_interval=v.cfg_interval, bf16=v.bf16)  # bf16 autocast on CUDA
    codec = manifest["codec"]
    if "codec" not in cache:
        cache["codec"] = load_codec(codec["name"], codec["dtype"], device)
    cache["codec"].to(device)
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


def _ckpt_state(cfg: Config, step: int, plan: Plan, total_steps: int, nonfinite_total: int) -> dict:
    from importlib.metadata import version

    return {"written_by": f"ditpipe {__version__}", "step": step, "epoch": step // plan.steps_per_epoch,
            "samples_consumed": step * plan.global_batch, "steps_per_epoch": plan.steps_per_epoch,
            "total_steps": total_steps, "world_size": plan.world_size, "config_hash": cfg.hash(),
            "nonfinite_total": nonfinite_total,
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


def _needed_bytes(raw, step: Step) -> int:
    params = sum(p.numel() * 4 for p in raw.parameters())
    return params * (4 + len(step.phema.emas if step.phema else []))  # model, EMA, Adam's 2 moments, post-hoc EMAs


def _phema_snapshots(acc, run_dir: Path, step: Step, at: int) -> None:
    """Rank 0 writes the post-hoc EMA snapshots of step `at`, before that step's checkpoint (so a checkpoint implies
    its snapshots, and a resume from it need not write them again)."""
    if step.phema is not None and acc.is_main_process:
        write_snapshots(run_dir / SNAPSHOT_DIR, at, step.phema)


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


def _group(acc) -> checkpoint.Group:
    """The collectives a checkpoint save across processes needs, from accelerate's process group."""
    if acc.num_processes == 1:
        return checkpoint.Group()
    from accelerate.utils import broadcast_object_list, gather_object

    return checkpoint.Group(acc.process_index, lambda value: broadcast_object_list([value], from_process=0)[0],
                            lambda value: gather_object([value]))


def _validated(group: checkpoint.Group, ckpt: Path) -> dict:
    """checkpoint.validate(ckpt) on rank 0 alone (it hashes every file: gigabytes for XL/2), its result or its
    error message sent to every rank, so all ranks go on, or stop with the same message, together."""
    answer = None
    if group.rank == 0:
        try:
            answer = checkpoint.validate(ckpt)
        except checkpoint.CheckpointError as e:
            answer = str(e)
    answer = group.broadcast(answer)
    if isinstance(answer, str):
        raise checkpoint.CheckpointError(answer)
    return answer


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

    def write(self, step: int, micro: int, m: Micro, loss: torch.Tensor) -> None:
        batch = m.batch
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
    table.add_row("device", f"{describe(device)} × {plan.world_size} process(es)")
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
    if t.posthoc_ema:
        size = 4 * sum(p.numel() for p in raw.state_dict().values()) * len(t.posthoc_ema_sigmas) / 2**20
        table.add_row("post-hoc EMA", f"σ_rel {', '.join(f'{s:g}' for s in t.posthoc_ema_sigmas)}: snapshots every "
                                      f"{cfg.checkpointing.phema_every:,} steps and at the end ({size:,.1f} MiB "
                                      f"each step) in {spec.run_dir / SNAPSHOT_DIR}; `ditpipe ema` reconstructs")
    table.add_row("output", str(spec.run_dir))
    console.print(table)
    if start_step and end_step > spec.total_steps:
        console.print(f"[yellow]note:[/] steps beyond {spec.total_steps:,} continue at the schedule's final LR")


def _caption_line(manifest: dict) -> str:
    enc = shards.text_encoder_of(manifest)
    return (f"captions ({enc['name']}, {enc['dim']}-d, {manifest['captions']['num_captions']:,} captions, up to "
            f"{manifest['captions']['max_tokens_seen']} tokens)")


def _train_flops_per_sample(step: Step, last: list, device: torch.device) -> float | None:
    """About 3 × the forward FLOPs per sample (forward + backward), counted on the last micro-batch's shapes; only
    on CUDA, where a peak makes it an MFU (a forward there costs milliseconds)."""
    if device.type != "cuda" or not last:
        return None
    m = last[0]
    with torch.random.fork_rng(devices=[device]):
        return 3 * forward_flops(step.raw, step.objective, m.x0, m.y, step.conditional) / len(m.x0)


def _closing(console, run_dir: Path, loss: float, seconds: float, images: int, step: int, nonfinite: int,
             world: int, flops_per_sample: float | None, peak: float | None) -> None:
    final = run_dir / checkpoint.step_name(step)
    rate = images / max(seconds, 1e-9)
    speed = f"{rate:,.1f} img/s" + (f" ({rate / world:,.1f} per process)" if world > 1 else "")
    if flops_per_sample and peak:
        speed += f", MFU {flops_per_sample * rate / world / (peak * 1e12):.1%} of {peak:g} TFLOP/s bf16"
    console.print(f"[green]done[/]: {step:,} steps, final loss {loss:.4f}, {seconds:.1f} s, {speed}"
                  + (f", {nonfinite} non-finite step(s) skipped" if nonfinite else ""), highlight=False)
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
