"""One optimizer step: the same code for `ditpipe train` and `ditpipe bench train`, so the benchmark times what
users run and a fix lands once.

Set-up order (`build_step`), the rule that keeps every CUDA path right by construction:
    model built → moved to the Accelerator's device → its buckets' position embeddings made there → EMA and
    optimizer made from the on-device parameters → saved state loaded into them → `acc.prepare` (DDP) →
    `torch.compile` (of the prepared module, so DDP's all-reduce overlaps the backward and no `_orig_mod.` prefix
    reaches a checkpoint: `raw` is the plain module; static shapes, one graph per bucket, each made at its first
    step, and dynamo allowed one per bucket: `allow_graphs`).
Under training.parallel fsdp the model is sharded (`fsdp.shard`, FSDP2) right after it is on its device, so the
EMAs and the optimizer are made from the shards; there is no DDP (accelerate wraps only the optimizer), each
micro-batch reduce-scatters, and the gradient norm is the sharded one (pipeline/fsdp.py).

The step reads nothing back to the host. Everything it decides, it decides on the device:
- a non-finite loss on any rank poisons that rank's last backward (loss × NaN), so the all-reduced gradient norm is
  non-finite on every rank, and the update is skipped on the device: fused AdamW takes a `found_inf` flag (the
  mechanism GradScaler uses), and under fp16 GradScaler itself finds the NaN;
- the EMA lerps with weight (1 − decay)·[update applied], so a skipped step (fp16 overflow included) leaves it;
- the loss sum, the count of finite steps and the non-finite counters accumulate in device tensors (`StepStats`)
  that the loop reads at log steps, where it syncs anyway.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch

from ditpipe.pipeline import checkpoint, fsdp
from ditpipe.pipeline.device import generator
from ditpipe.pipeline.diffusion import micro_loss
from ditpipe.pipeline.ema import EMA, ema_decay
from ditpipe.pipeline.latent_norm import LatentNorm
from ditpipe.pipeline.order import Plan
from ditpipe.pipeline.model import prepare_grids
from ditpipe.pipeline.phema import PowerEMA
from ditpipe.pipeline.repa import Aligned, alignment_loss, check_depth



def step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """The generator of one optimizer step, the same on every rank: all of the step's draws come from it."""
    key = int(np.random.SeedSequence([seed, step, 3]).generate_state(1, np.uint64)[0] >> 1)
    return generator(device, key)


class Draws(NamedTuple):
    """One optimizer step's random draws for each position 0 … G−1 of its global batch (G = B·accum·world)."""

    t: torch.Tensor  # (G,) timesteps
    noise: torch.Tensor  # (G, C, H, W) the diffusion noise
    drop: torch.Tensor | None  # (G,) bool label dropout; None when nothing can be dropped
    eps: torch.Tensor | None  # (G, C, H, W) the posterior noise in z = mean + std·ε; None without a std

    def at(self, start: int, stop: int) -> "Draws":
        return Draws(*(None if d is None else d[start:stop] for d in self))


def step_draws(objective, gen: torch.Generator, global_batch: int, latent_shape: tuple[int, int, int],
               drop_prob: float, posterior: bool, device: torch.device) -> Draws:
    """All of one step's draws, for the whole global batch, in a fixed order. Every rank draws all of them and takes
    its positions, so no draw depends on the world size, the accumulation or the batch size at the same global
    batch: 1 process × 4 micro-batches, 2 × 2 and 4 × 1 train on the same draws (and, the order being keyed on
    positions, the same samples). The dropout mask is None when nothing can be dropped (a model without a null
    class must not be handed one). A few MB for a large global batch; a GPU draws it in microseconds."""
    t = objective.sample_timesteps(global_batch, gen, device)  # (G,)
    noise = torch.randn((global_batch, *latent_shape), generator=gen, device=device)  # (G, C, H, W)
    drop = torch.rand(global_batch, generator=gen, device=device) < drop_prob  # (G,) once per sample
    eps = torch.randn((global_batch, *latent_shape), generator=gen, device=device) if posterior else None
    return Draws(t, noise, drop if drop_prob > 0 else None, eps)


class Micro(NamedTuple):
    """One micro-batch as the step consumes it, on the device: the posterior's mean and std (None for a
    deterministic codec), (B, C, H, W) each, as stored; the model's y; the loader's batch (indices, epoch) for
    observers."""

    mean: torch.Tensor
    std: torch.Tensor | None
    y: object
    batch: dict | None = None
    target: torch.Tensor | None = None  # (B, T, D) float16: REPA's targets, from the shards (pipeline/targets.py)


@dataclass
class StepStats:
    """Device-side counters the step updates and the loop reads only at log steps."""

    device: torch.device
    # The same on every rank: the step's loss is all-reduced with its finiteness flag (one collective a step).
    loss_sum: torch.Tensor = None  # () float32: the global mean step losses of finite steps since the last read
    finite_steps: torch.Tensor = None  # () float32: how many steps that sum holds
    nonfinite_run: torch.Tensor = None  # () long: steps in a row with a non-finite loss on some rank
    nonfinite_total: torch.Tensor = None  # () long: such steps in the whole run (checkpointed)
    nonfinite_worst: torch.Tensor = None  # () long: the longest such run since the last read
    nonfinite_start: torch.Tensor = None  # () long: the first step of the current run
    nonfinite_worst_start: torch.Tensor = None  # () long: the first step of the longest one
    grad_norm: torch.Tensor = None  # () float32: the last step's gradient norm before clipping
    align_sum: torch.Tensor = None  # () float32: REPA's alignment losses of finite steps since the last read

    def __post_init__(self):
        zero = lambda dtype: torch.zeros((), dtype=dtype, device=self.device)  # noqa: E731
        self.loss_sum, self.finite_steps, self.grad_norm = (zero(torch.float32) for _ in range(3))
        self.align_sum = zero(torch.float32)
        self.nonfinite_run, self.nonfinite_total, self.nonfinite_worst = (zero(torch.long) for _ in range(3))
        self.nonfinite_start, self.nonfinite_worst_start = zero(torch.long), zero(torch.long)

    def take_window(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss sum, finite steps) since the last call, and reset them: the next log line's window."""
        out = self.loss_sum.clone(), self.finite_steps.clone()
        self.loss_sum.zero_()
        self.finite_steps.zero_()
        return out

    def take_align(self) -> torch.Tensor:
        """REPA's alignment loss summed over the window's finite steps (divide by its `finite_steps`), and reset:
        read right after `take_window`."""
        out = self.align_sum.clone()
        self.align_sum.zero_()
        return out

    def take_worst_run(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(the longest run of non-finite steps since the last call, its first step): the stop rule, and
        training.recover's choice of checkpoint, read them at log steps."""
        out = self.nonfinite_worst.clone(), self.nonfinite_worst_start.clone()
        self.nonfinite_worst.copy_(self.nonfinite_run)
        self.nonfinite_worst_start.copy_(self.nonfinite_start)
        return out

    def reset_runs(self) -> None:
        """After a recovery: the loss window and the runs start again (the total stays)."""
        for t in (self.loss_sum, self.finite_steps, self.nonfinite_run, self.nonfinite_worst, self.nonfinite_start,
                  self.nonfinite_worst_start, self.align_sum):
            t.zero_()


@dataclass
class Step:
    """The parts one optimizer step needs, made once by `build_step`; calling it runs step `step`."""

    acc: object  # accelerate.Accelerator
    model: torch.nn.Module  # what the step calls: DDP-wrapped and/or compiled
    raw: torch.nn.Module  # the plain module: its state dict is the checkpoint's, the EMA tracks its parameters
    opt: object  # accelerate's AcceleratedOptimizer around a fused AdamW
    ema: EMA | None
    objective: object
    plan: Plan
    latent_shape: tuple[int, int, int]  # the manifest's (square) one; a step draws for its batch's shape (bucket)
    norm: LatentNorm  # the manifest's latent normalisation, applied to z = mean + std·ε on the device
    posterior: bool  # the data has a std (a VAE posterior): the step draws ε
    seed: int
    rank: int
    drop_prob: float
    conditional: bool
    max_grad_norm: float
    ema_decay: float
    ema_warmup: bool
    phema: PowerEMA | None = None  # the post-hoc EMAs (training.posthoc_ema), updated beside the classic EMA
    projector: torch.nn.Module | None = None  # REPA's projector (plain), trained beside `raw`; None without REPA
    repa_weight: float = 0.0
    target_skip: int = 0  # leading stored target tokens the alignment does not use (a class token)
    sharded: bool = False  # training.parallel fsdp: `model` and `raw` are FSDP2 modules (pipeline/fsdp.py)
    stats: StepStats = field(init=False)

    def __post_init__(self):
        self.stats = StepStats(self.acc.device)
        self.params = list(self.raw.parameters()) + ([] if self.projector is None else
                                                     list(self.projector.parameters()))  # what is clipped

    def __call__(self, step: int, lr: float, feed: Callable[[], Micro],
                 observe: Callable[[int, int, Micro, torch.Tensor, Draws], None] | None = None,
                 position: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Optimizer step `step` (0-based) at learning rate `lr`: `plan.accum` micro-batches from `feed`, then
        clipping, the optimizer and the EMA; returns (the step loss over all ranks, whether it was non-finite) as
        device tensors. The draws are keyed on the step's data `position` (the step itself unless a recovery
        skipped data). `observe(step, micro, batch, loss, draws)` sees each micro-batch's loss and its positions'
        draws (a debugging aid; reading them syncs)."""
        acc, plan, stats, device = self.acc, self.plan, self.stats, self.acc.device
        for group in self.opt.param_groups:
            group["lr"] = lr
        m = feed()  # first: its shape is the step's bucket's (one bucket a global batch), which the draws take
        draws = step_draws(self.objective, step_generator(self.seed, step if position is None else position, device),
                           plan.global_batch, tuple(m.mean.shape[1:]), self.drop_prob, self.posterior, device)
        step_loss = torch.zeros((), device=device)
        step_align = torch.zeros((), device=device)  # stays 0 without REPA
        for micro in range(plan.accum):
            m = m if micro == 0 else feed()
            start = (micro * plan.world_size + self.rank) * plan.batch_size  # this rank's block of the micro-batch
            mine = draws.at(start, start + plan.batch_size)
            z = m.mean.float() if m.std is None else m.mean.float() + m.std.float() * mine.eps  # (B, C, H, W)
            x0 = self.norm.normalize(z)  # (B, C, H, W) float32, in the model's space
            last = micro == plan.accum - 1
            # fsdp reduce-scatters every micro-batch, so gradients stay sharded between them (pipeline/fsdp.py)
            with contextlib.nullcontext() if last or self.sharded else acc.no_sync(self.model):
                tokens = None if self.projector is None else []
                loss = micro_loss(self.model, self.objective, x0, m.y, self.conditional, mine.t, mine.noise,
                                  mine.drop, tokens).mean()
                step_loss += loss.detach() / plan.accum
                if tokens is not None:  # REPA: + weight · alignment with the stored targets
                    align = alignment_loss(tokens[0], m.target[:, self.target_skip:]).mean()  # ()
                    step_align += align.detach() / plan.accum
                    loss = loss + self.repa_weight * align
                if last:  # a non-finite loss anywhere makes every rank's gradient NaN (the all-reduce spreads it)
                    bad = ~torch.isfinite(step_loss + step_align)
                    loss = loss * torch.where(bad, torch.nan, 1.0)
                acc.backward(loss / plan.accum)
            if observe is not None:
                observe(step, micro, m, loss, mine)
        global_loss, bad, global_align = _over_ranks(acc, step_loss, step_align)  # () means over the ranks, () bool
        clip = fsdp.clip_grad_norm_ if self.sharded else acc.clip_grad_norm_  # accelerate's unscales first
        grad_norm = clip(self.params, self.max_grad_norm or math.inf)
        applied = torch.isfinite(grad_norm)  # () bool: false for a poisoned step and for an fp16 overflow
        inner = self.opt.optimizer
        if acc.scaler is None:  # under fp16, GradScaler found the NaN/inf itself when it unscaled
            inner.found_inf = (~applied).float()
        self.opt.step()
        inner.__dict__.pop("found_inf", None)
        if self.ema is not None:
            self.ema.update(ema_decay(step, self.ema_decay, self.ema_warmup), applied)
        if self.phema is not None:
            self.phema.update(step, applied)
        self.opt.zero_grad(set_to_none=True)
        stats.loss_sum += torch.where(bad, 0.0, global_loss)
        if self.projector is not None:
            stats.align_sum += torch.where(bad, 0.0, global_align)
        stats.finite_steps += (~bad).float()
        stats.nonfinite_run.copy_(torch.where(bad, stats.nonfinite_run + 1, 0))
        stats.nonfinite_start.copy_(torch.where(bad & (stats.nonfinite_run == 1), step, stats.nonfinite_start))
        stats.nonfinite_worst_start.copy_(torch.where(stats.nonfinite_run > stats.nonfinite_worst,
                                                      stats.nonfinite_start, stats.nonfinite_worst_start))
        stats.nonfinite_total += bad.long()
        torch.maximum(stats.nonfinite_worst, stats.nonfinite_run, out=stats.nonfinite_worst)
        stats.grad_norm.copy_(grad_norm.float())
        return global_loss, bad


def _over_ranks(acc, step_loss: torch.Tensor, step_align: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the step loss averaged over the ranks, whether any rank's loss or alignment loss was non-finite, the
    alignment loss averaged), on the device and the same on every rank: one all-reduce that the host never waits for
    (NCCL enqueues it)."""
    bad = ~torch.isfinite(step_loss + step_align)
    if acc.num_processes == 1:
        return step_loss, bad, step_align
    finite = lambda x: torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)  # noqa: E731
    both = acc.reduce(torch.stack([bad.float(), finite(step_loss), finite(step_align)]), "sum")
    return both[1] / acc.num_processes, both[0] > 0, both[2] / acc.num_processes


def build_step(acc, model: torch.nn.Module, objective, plan: Plan, latent_shape: tuple[int, int, int], *,
               norm: LatentNorm, posterior: bool, training, drop_prob: float, conditional: bool, compile: bool,
               rank: int, resume: Path | None = None, target_dim: int = 0, target_skip: int = 0) -> Step:
    """The step's parts in the order docs/design.md prescribes (A step; the module docstring). `training` is the
    config's TrainingConfig; `resume` a validated checkpoint folder to load the model, EMA, optimizer and scaler from.
    The model's `bucket_grids` (training.build_model; none for square shards) are the patch grids its batches take.
    `target_dim`: the REPA targets' width when training.repa.weight > 0 (the projector is built, trained beside the
    model, saved and loaded as `projector.pt`)."""
    t = training
    model = model.to(acc.device)  # first: the EMA, the optimizer and loaded state are made from these parameters
    grids = sorted(set(getattr(model, "bucket_grids", ())))  # the run's buckets' patch grids (training.build_model)
    prepare_grids(model, grids)  # on the device, before compile: the compiled forward only looks them up
    trained = model
    if t.repa.weight > 0:
        check_depth(model, t.repa.depth)
        trained = Aligned(model, t.repa.depth, t.repa.projector_dim, target_dim).to(acc.device)
    sharded = t.parallel == "fsdp"
    if sharded:  # FSDP2 (pipeline/fsdp.py): before the EMAs and the optimizer, which are made from the shards
        fsdp.shard(acc, model, trained, acc.mixed_precision, t.fsdp_cpu_offload)
    ema = EMA(model) if t.use_ema else None  # the DiT's: sampling never runs REPA's projector
    phema = PowerEMA(model, t.posthoc_ema_sigmas) if t.posthoc_ema else None
    opt = torch.optim.AdamW(trained.parameters(), lr=t.learning_rate, weight_decay=t.weight_decay,
                            betas=(t.adam_beta1, t.adam_beta2), fused=True)  # fused: skips steps on the device
    projector = trained.projector if trained is not model else None
    if resume is not None:
        checkpoint.load_state(resume, model, ema, opt, acc.scaler, phema, projector)
    if sharded:  # no DDP: FSDP reduces the gradients; accelerate only wraps the optimizer, where it is
        opt, raw = acc.prepare_optimizer(opt, device_placement=False), model
    else:
        trained, opt = acc.prepare(trained, opt)
        raw = acc.unwrap_model(trained, keep_torch_compile=False)
        raw, projector = (raw.dit, raw.projector) if projector is not None else (raw, None)
    if compile:
        allow_graphs(len(grids))
        trained = torch.compile(trained, dynamic=False)  # one graph per bucket shape, each made at its first step
    return Step(acc, trained, raw, opt, ema, objective, plan, latent_shape, norm, posterior, t.seed, rank, drop_prob,
                conditional, t.max_grad_norm, t.ema_decay, t.ema_warmup, phema, projector, t.repa.weight,
                target_skip, sharded)


def allow_graphs(count: int) -> None:
    """Let dynamo keep `count` graphs of the forward (one a bucket). It keeps at most `recompile_limit` (8) per
    function and runs the calls that would need more eager, silently and for the whole run: with 11 buckets, 3 ran
    uncompiled. A run with more buckets raises the limit to their count rather than warn: the shapes are the
    manifest's, known before step 0, so the graphs are bounded and each is made once; what it costs is one compile
    a bucket, at that bucket's first step."""
    from torch._dynamo import config

    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # torch < 2.7's name
    setattr(config, name, max(getattr(config, name), count))


# What `train_flops_per_sample` counts, stated beside every MFU (bench JSON, train's closing line): the DiT paper's
# "Gflops" are multiply-adds (DiT-XL/2 at 256 px: 118.6), torch's flop counter counts 2 FLOPs per multiply-add.
FLOPS_CONVENTION = ("FLOPs (2 per multiply-add; the DiT paper's Gflops are multiply-adds), counted by "
                    "torch.utils.flop_counter: forward + backward = 3 x forward, + 1 forward recomputed with "
                    "gradient checkpointing")


def forward_flops(raw: torch.nn.Module, objective, x0: torch.Tensor, y, conditional: bool) -> int:
    """FLOPs (2 per multiply-add) of one forward pass of `raw` and the objective on the micro-batch x0 (B, C, H, W),
    y (torch.utils.flop_counter, without grad; works on the meta device too). Label dropout may draw from the global
    RNG: callers that care fork it."""
    from torch.utils.flop_counter import FlopCounterMode

    t = objective.fixed_timesteps(len(x0), x0.device)  # (B,)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        micro_loss(raw, objective, x0, y, conditional, t, torch.zeros_like(x0), None)
    return counter.get_total_flops()


def train_flops_per_sample(raw: torch.nn.Module, objective, x0: torch.Tensor, y, conditional: bool) -> float:
    """Training FLOPs per sample, as FLOPS_CONVENTION states: the backward costs two forwards (gradients of the
    activations and of the weights), and gradient checkpointing runs each block's forward once more in the backward.
    That recomputation is work the GPU does, so it is counted (PaLM's "hardware FLOPs"; its MFU would leave it out);
    the embedders and the final layer are not recomputed but are under 0.1 % of a DiT's FLOPs."""
    passes = 4 if getattr(raw, "gradient_checkpointing", False) else 3
    return passes * forward_flops(raw, objective, x0, y, conditional) / len(x0)
