"""A training run, built from a config and a resume point: what `ditpipe train` sets up before its loop, and what
`ditpipe bench train` times, from the same code.

    open_run(cfg, resume)      the accelerator, the data (manifest, store, held-out set, plan), the saved state
                               validated, the batch split kept on a resume, the schedule's length and end, training FID
    build_model_for(run)       the model (seeded; a fine-tune's weights) and the objective
    prepare_folder(run, say)   a new run's folder made, or a resume's shards checked and temporaries cleared
    build_step_for(run, ...)   the `pipeline.step.Step`, with the saved model, EMA and optimizer state loaded
    Stream(run, workers)       the micro-batches from an optimizer step on (`start(step)`; `feed` is what the step
                               draws from)
    restore(run, step)         this rank's RNG states and loss window, after the stream has drawn its base seed

and the resume policy: which checkpoint (`find_checkpoint`), which config (`resume_config`, `elastic_split`), whether
the shards are the run's (`check_same_encoders`), and `recover`, training.recover's way back.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ditpipe.pipeline import atomic, checkpoint, hooks, lock, run_store
from ditpipe.pipeline.config import RESUMABLE_CHANGES, Config, flat, resumable_keys, set_dotted, validate_tree
from ditpipe.pipeline.device import make_accelerator
from ditpipe.pipeline.diffusion import make_objective
from ditpipe.pipeline.errors import ConfigError, DitpipeError, ShardError
from ditpipe.pipeline.finetune import init_from
from ditpipe.pipeline.latent_norm import LatentNorm
from ditpipe.pipeline.manifest import Manifest
from ditpipe.pipeline.order import Plan
from ditpipe.pipeline.phema import SNAPSHOT_DIR, clean_temporaries
from ditpipe.pipeline.ranks import Group, group_of
from ditpipe.pipeline.remote import unconfirmed_remote
from ditpipe.pipeline.recovery import RecoveryState, SpikeWatch
from ditpipe.pipeline.schedule import restretched_length
from ditpipe.pipeline.step import Micro, Step, build_step
from ditpipe.pipeline.threads import Threads
from ditpipe.pipeline.threads import apply as apply_threads
from ditpipe.pipeline.training import (batch_condition, build_model, conditioning_for, make_plan, num_classes_for,
                                       open_data)
from ditpipe.pipeline.training import training_batches
from ditpipe.pipeline.training_fid import TrainingFID
from ditpipe.pipeline.validation import HeldOutSpec, open_held_out


@dataclass
class Run:
    """What a run is, derived once from the config, the manifest and the resume point (`open_run`)."""

    cfg: Config  # as resumed: the batch split fitted to this launch's world size
    acc: object  # the Accelerator: the run's only source of devices
    precision: str  # what runs ("bf16" for the config's fp16 on a CPU)
    notice: str | None  # why the precision differs from the config's
    group: Group
    hooks: hooks.Hooks
    manifest: Manifest  # the shard manifest, with the latent normalisation the run trains with
    folder: Path | str  # the shards (a URL stays a string)
    store: object | None  # the shard store; None for the online-VAE baseline
    online: object | None  # (source, codec) of the online-VAE baseline
    norm: LatentNorm
    held_spec: HeldOutSpec | None  # the held-out set; None without one
    excluded: np.ndarray  # global sample indices never trained on (the held-out ones)
    plan: Plan
    num_classes: int  # 0: unconditional or captions
    conditioning: str  # class | none | caption
    run_dir: Path
    total_steps: int  # the LR schedule's length
    end_step: int  # where this launch stops
    resume: Path | None = None  # the checkpoint folder resumed from
    saved: dict | None = None  # its training state
    threads: Threads | None = None
    elastic_note: str | None = None  # how the batch split changed to keep the global batch
    restretched: list[int] = field(default_factory=list)  # steps where the schedule was restretched
    fid_watch: TrainingFID | None = None

    @property
    def device(self) -> torch.device:
        return self.acc.device

    @property
    def start_step(self) -> int:
        return int(self.saved["step"]) if self.saved else 0

    @property
    def finished(self) -> bool:
        """A resume of a run at its end: nothing to run."""
        return bool(self.saved) and self.end_step == self.saved["step"]

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(self.manifest.latent["shape"][1:])  # (C, H, W)

    @property
    def posterior(self) -> bool:
        """Whether the latents are a posterior with a std (a VAE), for which the step draws ε."""
        return "std" in self.manifest.latent["slices"]


def run_dir_of(cfg: Config, config_name: str | None, resume: Path | None) -> Path:
    """The run folder: a resumed checkpoint's parent, or output_dir / run_name (else the config's name, else run);
    for an output_dir in object storage, this node's staging folder of it (pipeline/run_store.py)."""
    if resume:
        return Path(resume).parent
    name = cfg.logging.run_name or (Path(config_name).stem if config_name else "run")
    if run_store.is_remote(cfg.logging.output_dir):
        run_dir = run_store.staging_dir(cfg.storage.cache_dir, cfg.logging.output_dir, name)
        run_store.RemoteRun.of(cfg, run_dir)  # refuses what a run in object storage cannot do, before anything runs
        return run_dir
    return Path(cfg.logging.output_dir) / name


def open_run(cfg: Config, config_name: str | None = None, resume: Path | None = None,
             restretch_schedule: bool = False, threads: bool = True) -> Run:
    """The run `cfg` (or its resume from the checkpoint folder `resume`), everything a refusal needs checked before
    any model is built or folder made. `threads`: choose torch's thread count (pipeline/threads.py); bench chooses
    it itself."""
    t = cfg.training
    acc, precision, notice = make_accelerator(t.mixed_precision, tf32=t.tf32, deterministic=t.deterministic)
    rank, world, device = acc.process_index, acc.num_processes, acc.device
    chosen = apply_threads(t.threads, device.type, int(os.environ.get("LOCAL_WORLD_SIZE", world))) if threads \
        else None
    group = group_of(acc)
    manifest, folder, store, online = open_data(cfg, device)
    norm = LatentNorm.from_manifest(manifest, cfg.data.latent_norm)
    manifest = manifest.with_latent_norm(norm.record())  # so every checkpoint records what sampling must invert
    held_spec = open_held_out(cfg, manifest, store)  # None without a held-out set
    excluded = held_spec.exclude if held_spec else np.zeros(0, dtype=np.int64)  # never trained on
    saved = validated(group, resume) if resume else None  # rank 0 hashes the files; every rank gets its answer
    elastic_note = None
    if saved:  # first: every later check (epoch length, end step) depends on the split of the global batch
        cfg, elastic_note = elastic_split(cfg, saved, world, resume)
        t = cfg.training
    plan = make_plan(cfg, manifest, len(excluded), world)
    if plan.steps_per_epoch == 0:
        raise ConfigError([("training.batch_size", f"the global batch ({plan.global_batch} = batch × accumulation × "
                                                   f"{world} processes) exceeds the {plan.num_samples} samples")])
    num_classes, conditioning = num_classes_for(cfg, manifest), conditioning_for(cfg, manifest)
    # before the run folder exists: a bad reference loses nothing; rank 0 computes it (cached by content)
    fid_watch = TrainingFID.start(cfg, manifest, folder, rank, world, device, num_classes, conditioning)
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
    return Run(cfg, acc, precision, notice, group, hooks.read(), manifest, folder, store, online, norm, held_spec,
               excluded, plan, num_classes, conditioning, run_dir_of(cfg, config_name, resume), total_steps, end_step,
               resume if saved else None, saved, chosen, elastic_note, restretched, fid_watch)


def build_model_for(run: Run) -> tuple[torch.nn.Module, object, list[str]]:
    """(the model on the run's device, the objective, the fine-tune's notes): the model built under the seeded
    global RNG (its one draw), with a fine-tune's weights loaded (`model.init_from`; the EMA starts from them too)."""
    cfg, t = run.cfg, run.cfg.training
    torch.manual_seed(t.seed)  # model init is the one draw from the global RNG, and it is seeded
    random.seed(t.seed)  # python's and numpy's are unused by the step; seeded so the saved RNG states repeat too
    np.random.seed(t.seed)
    model = build_model(cfg, run.manifest, run.num_classes).to(run.device)  # on its device before anything else
    notes = [] if run.saved or not cfg.model.init_from else init_from(
        model, cfg.model.init_from, cfg.model.init_weights, run.manifest.class_names,
        run.manifest)
    return model, make_objective(cfg.diffusion.objective, model.learn_sigma, cfg.diffusion), notes


def build_step_for(run: Run, model: torch.nn.Module, objective) -> Step:
    """The run's step (pipeline/step.py) made from `model`, with a resume's model, EMA, optimizer and scaler state
    loaded."""
    cfg, targets = run.cfg, run.manifest.targets
    if cfg.training.parallel == "fsdp":
        from ditpipe.pipeline.fsdp import refuse_unbuilt

        refuse_unbuilt(cfg)
    aligned = cfg.training.repa.weight > 0  # check_run refused REPA without targets
    return build_step(run.acc, model, objective, run.plan, run.latent_shape, norm=run.norm, posterior=run.posterior,
                      training=cfg.training, rank=run.acc.process_index, drop_prob=cfg.model.class_dropout_prob,
                      conditional=run.conditioning != "none", compile=cfg.model.compile, resume=run.resume,
                      target_dim=targets["encoder"]["dim"] if aligned else 0,
                      target_skip=int(targets["class_token"]) if aligned else 0)


def spike_watch(run: Run) -> SpikeWatch | None:
    """training.recover's loss-spike watch, when it watches for spikes."""
    t = run.cfg.training
    return SpikeWatch(run.device, t.recover_spike_factor, t.recover_window) if t.recover and t.recover_spike_factor \
        else None


def restore(run: Run, step: Step) -> None:
    """A resume's per-rank state (RNG states, the unlogged loss window), after the data stream has drawn its base
    seed from torch's global RNG: the saved states come after it."""
    if run.saved:
        checkpoint.restore_rank_state(run.resume, run.saved, run.acc.process_index, step.stats, run.device)


class Stream:
    """The run's micro-batches from an optimizer step on, at data position `step + data_offset` (`start` again
    after a recovery). `position` keys the step's data and draws; `feed` is what the step draws its micro-batches
    from: first the one read ahead (the preflight times a step on it), then the stream's."""

    def __init__(self, run: Run, workers: int, end_step: int | None = None):
        self.run, self.workers = run, workers
        self.end_step = run.end_step if end_step is None else end_step
        self.to_y = batch_condition(run.conditioning, run.device)
        self.batches, self.posterior, self.ahead = None, None, None
        self.position = 0
        self.last: Micro | None = None  # the latest micro-batch: the closing summary counts FLOPs on one like it

    def start(self, step: int, data_offset: int = 0) -> None:
        """The data stream from optimizer step `step` on; a recovery's new stream replaces the old (its workers
        stop)."""
        r = self.run
        self.batches = self.ahead = None
        loader, self.posterior = training_batches(r.cfg, r.manifest, r.store, r.online, r.plan, r.acc.process_index,
                                                  r.conditioning, r.excluded, step + data_offset,
                                                  self.end_step + data_offset, r.device, self.workers)
        self.batches = iter(loader)  # draws a base seed from torch's global RNG: the saved states come after

    def next(self) -> Micro:
        batch = next(self.batches)
        target = batch.get("target")  # (B, T, D) float16: REPA's, from the shards
        target = None if target is None else target.to(self.run.device, non_blocking=True)
        return Micro(*self.posterior(batch), self.to_y(batch), batch, target)  # mean, std (B, C, H, W), y, target

    def read_ahead(self) -> Micro:
        """The first micro-batch, read now: the preflight times a step on it, the first step trains on it."""
        self.ahead = self.next()
        return self.ahead

    def feed(self) -> Micro:
        m, self.ahead = self.ahead or self.next(), None
        if (kind := self.run.hooks.injected(self.position)) is not None:  # a test hook; never set in real runs
            m = m._replace(mean=m.mean * (torch.nan if kind == "nan" else 30.0))
        self.last = m
        return m


# ---------------------------------------------------------------------------------------------------- resume


def validated(group: Group, ckpt: Path) -> dict:
    """checkpoint.validate(ckpt) on rank 0 alone (it hashes every file: gigabytes for XL/2), its result or its
    error sent to every rank, so all ranks go on, or stop with the same message, together."""
    return group.on_rank0(lambda: checkpoint.validate(ckpt), checkpoint.CheckpointError)


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
    if (target / checkpoint.STATE).is_file() or checkpoint.is_checkpoint_name(target.name):
        checkpoint.validate(target)
        return target
    return checkpoint.find_resumable(target, warn)[0]


def auto_resume(cfg: Config, config_name: str | None, warn) -> Path | None:
    """`train --resume auto` (what an elastic agent's restart reruns): the checkpoint to resume the run `cfg` names
    from, or None to start it. A local (or shared) run folder resumes from its newest valid checkpoint when it holds
    any; a run in object storage from the checkpoint its `latest` names in the bucket, fetched into this node's
    staging folder. A staging folder whose checkpoints never reached the bucket is moved aside (by one process per
    node), so the start is a clean one."""
    run_dir = run_dir_of(cfg, config_name, None)
    remote_run = run_store.RemoteRun.of(cfg, run_dir)
    if remote_run is not None:
        if remote_run.latest() is not None:
            return remote_run.fetch()
        if os.environ.get("LOCAL_RANK", "0") == "0" and (aside := remote_run.set_aside_unpublished()):
            warn(f"'{run_dir}' held checkpoints never published to '{remote_run.url}'; moved to '{aside}', starting "
                 "the run again")
        return None
    if (run_dir / checkpoint.LATEST).exists() or checkpoint.list_checkpoints(run_dir):
        return find_checkpoint(run_dir, run_dir.parent, warn)
    return None  # a new run, or one whose start failed before its first checkpoint: started (again)


def fetch_remote(url: str, cache_dir: str) -> tuple[Path, dict]:
    """`resume s3://…/run[/checkpoint-N]`: (the checkpoint, fetched and validated into this node's staging folder
    under `cache_dir`, the logging keys that keep the resumed run publishing to `url`'s run folder)."""
    remote_run, name = run_store.RemoteRun.from_url(url, cache_dir)
    return remote_run.fetch(name), {"logging.output_dir": remote_run.output_dir,
                                    "logging.run_name": remote_run.local.name}


def resume_config(ckpt: Path, new: Config | None = None, overrides: dict | None = None) -> Config:
    """The config to resume with: the run's saved one, with `overrides` (dotted) applied, or `new` as given.
    Keys outside RESUMABLE_CHANGES that differ from the saved config are refused, each named."""
    from ditpipe.pipeline import safe_yaml as yaml  # no aliases: the JSON round trip below would expand them

    saved = yaml.safe_load((ckpt / checkpoint.CONFIG).read_text())
    if new is None:
        if remote := unconfirmed_remote(saved, overrides or {}):
            raise ConfigError(remote, header=f"cannot resume '{ckpt}' from a remote location it names itself")
        merged = json.loads(json.dumps(saved))
        for key, value in (overrides or {}).items():
            set_dotted(merged, key, value)
        new = validate_tree(merged)
    cfg = new
    old, new = flat(validate_tree(saved).to_dict()), flat(cfg.to_dict())
    refused = [(key, f"was {old[key]!r} in the run, now {value!r}") for key, value in new.items()
               if value != old[key] and not key.startswith(RESUMABLE_CHANGES)]
    if refused:
        raise ConfigError(refused, header=f"cannot resume '{ckpt}' with a different config (only {resumable_keys()} "
                                          "may change on resume; for anything else start a new run, e.g. with "
                                          "--init-from this checkpoint)")
    return cfg


def elastic_split(cfg: Config, saved: dict, world: int, ckpt: Path) -> tuple[Config, str | None]:
    """(the config with the run's global batch G fitted to this launch's world size, a note of what changed); `cfg`
    itself is left as it is.

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
            return cfg, None
        return cfg, (f"the run was trained on {saved['world_size']} process(es), this launch has {world}: batch "
                     f"{t.batch_size} × accumulation {t.gradient_accumulation_steps} × {world} keeps its global "
                     f"batch {g}")
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
    split = t.model_copy(update={"batch_size": choice[0], "gradient_accumulation_steps": choice[1]})
    return cfg.model_copy(update={"training": split}), (
        f"the run was trained on {saved['world_size']} process(es) (batch {run_b} × accumulation {run_a}), this "
        f"launch has {world}: batch {choice[0]} × accumulation {choice[1]} keeps its global batch {g}, so the "
        "same samples and draws at every step")


def check_same_encoders(ckpt: Path, manifest: Manifest | dict) -> None:
    """A checkpoint continues only on shards made by the same codec and caption encoder (by weights hash): the
    same names with other weights would silently train on other latents or embeddings."""
    path = ckpt / checkpoint.MANIFEST
    if not path.is_file():
        return
    then, manifest = Manifest.of(checkpoint.read_json(path)), Manifest.of(manifest)
    pairs = [("codec", then.codec.get("hash"), manifest.codec.get("hash")),
             ("caption encoder", (then.text_encoder or {}).get("hash"), (manifest.text_encoder or {}).get("hash"))]
    wrong = [f"{what}: {a[:12] if a else None} in the checkpoint, {b[:12] if b else None} in the shards"
             for what, a, b in pairs if a != b]
    if wrong:
        raise ShardError(f"'{ckpt}' was trained on shards from another encoder ({'; '.join(wrong)}); resume on the "
                         "shards it was trained on, or re-encode with the same codec and text encoder")


def recover(failure: tuple[str, int], now: int, run_dir: Path, group: Group, step: Step, recovery: RecoveryState,
            t, log, say: Callable[[str], None]) -> int:
    """training.recover: back to the newest valid checkpoint from before the failure began, in this process, with
    the data the failed stretch consumed skipped and the LR scaled; returns the step to go on from. Newer
    checkpoints (written during the failure) are moved aside as `<name>.abandoned`, never deleted. `say` prints
    rank 0's line (console markup)."""
    what, began = failure
    chosen = group.broadcast(checkpoint.newest_valid(run_dir, before=began) if group.rank == 0 else None)
    if chosen is None:
        raise DitpipeError(f"{what}; training.recover found no valid checkpoint from before step {began} to go back "
                           f"to in '{run_dir}' (checkpoint more often with checkpointing.steps); stopping")
    ckpt, state = Path(chosen[0]), chosen[1]
    checkpoint.load_state(ckpt, step.raw, step.ema, step.opt.optimizer, step.acc.scaler, step.phema, step.projector)
    if group.rank == 0:
        checkpoint.abandon_after(run_dir, int(state["step"]), ckpt.name)
    back = int(state["step"])
    recovery.data_offset += now - back  # step `back` now reads what step `now` would have: the stretch is skipped
    recovery.lr_scale *= t.recover_lr_factor
    recovery.recoveries += 1
    log.rewind(back)
    log.scalars(back, recovered_from=now, reason=what, checkpoint=ckpt.name, **recovery.record())
    if group.rank == 0:
        say(f"[yellow]recovered:[/] {what}; back to {ckpt.name}, skipping {now - back} steps of data "
            f"(data offset {recovery.data_offset}), LR × {recovery.lr_scale:g} "
            f"({recovery.recoveries}/{t.recover_max} recoveries)")
    return back


# ---------------------------------------------------------------------------------------------------- the run folder


def prepare_folder(run: Run, say: Callable[[str], None]) -> None:
    """Before the step is built: a resume checks that the shards are the run's (the encoders by weights hash; the
    manifest, where a notice says when it cannot be checked) and clears what the killed run half wrote; a new run
    makes its folder (every rank refuses a folder that is not a failed start of the same run first, so all exit with
    the message). `say` prints a line (console markup) on rank 0."""
    acc, run_dir = run.acc, run.run_dir
    if run.saved:
        check_same_encoders(run.resume, run.manifest)
        if (notice := checkpoint.check_same_shards(run.saved, run.manifest, run.resume, run.folder)) \
                and acc.is_main_process:
            say(f"[yellow]note:[/] {notice}")
        if acc.is_main_process:
            checkpoint.clean_temporaries(run_dir)  # half-written checkpoints of the killed run
            clean_temporaries(run_dir / SNAPSHOT_DIR)  # and half-written post-hoc EMA snapshots
        return
    if (remote_run := run_store.RemoteRun.of(run.cfg, run_dir)) is not None:  # the bucket's run folder, by rank 0
        run.group.on_rank0(remote_run.refuse_published)
    refuse_existing_run_dir(run_dir)  # on every rank, before rank 0 makes it: all ranks exit with the message
    acc.wait_for_everyone()
    if acc.is_main_process:
        _new_run_dir(run_dir, run.cfg, say)


# What a start that failed before its first checkpoint leaves, every file ditpipe's own by its exact name (and the
# hidden temporaries a kill leaves of them): the next start of the run replaces them. Anything else is kept.
def _or_its_temporary(name: str) -> re.Pattern:
    """`name`, or the hidden temporary pipeline.atomic writes it through (`.<name>.<pid>.tmp`), left by a kill."""
    return re.compile(rf"(?:{name})|\.(?:{name})\.\d+\.tmp")


_FAILED_START_FILES = _or_its_temporary(re.escape(checkpoint.CONFIG) + r"|metrics\.jsonl")
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


def refuse_existing_run_dir(run_dir: Path) -> list[Path]:
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


def _new_run_dir(run_dir: Path, cfg: Config, say: Callable[[str], None]) -> None:
    """Make the run folder, or start it again where an earlier start failed before its first checkpoint: that
    start's files (and only they) are replaced, so its metrics, grids and snapshots never mix with this one's."""
    if ours := refuse_existing_run_dir(run_dir):  # again on rank 0, under the run's lock: nothing changed since
        say(f"[yellow]note:[/] '{run_dir}' has no checkpoint (an earlier start failed before its first one): "
            f"starting it again, replacing that start's {len(ours)} file(s) (config.yaml, metrics, grids, post-hoc EMA "
            "snapshots)")
        for p in ours:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        for sub in _FAILED_START_DIRS:
            with contextlib.suppress(OSError):  # only an emptied folder goes
                (run_dir / sub).rmdir()
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic.write_bytes(run_dir / checkpoint.CONFIG, cfg.to_yaml().encode())  # a temporary renamed: no link followed
