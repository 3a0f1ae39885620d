"""One optimizer step: the same code for `ditpipe train` and `ditpipe bench train`, so the benchmark times what
users run and a fix lands once.

Set-up order (`build_step`), the rule that keeps every CUDA path right by construction:
    model built → moved to the Accelerator's device → EMA and optimizer made from the on-device parameters →
    saved state loaded into them → `acc.prepare` (DDP) → `torch.compile` (of the prepared module, so DDP's
    all-reduce overlaps the backward and no `_orig_mod.` prefix reaches a checkpoint: `raw` is the plain module).

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

from pipeline import checkpoint
from pipeline.diffusion import micro_loss
from pipeline.ema import EMA, ema_decay
from pipeline.loader import Plan
from pipeline.phema import PowerEMA

# The optimizer's own execution flags: fixed by this build, never by a checkpoint (one written on a CPU without
# fused kernels must not switch a GPU run to the unfused AdamW, which cannot skip a step on the device).
_OPTIMIZER_FLAGS = ("fused", "foreach", "capturable", "differentiable")
PHEMA_FILE = "phema.pt"  # a checkpoint's post-hoc EMA shadows (PowerEMA.state_dict)


def step_generator(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    """The generator for one optimizer step on one rank: timesteps, noise and label dropout come from it alone."""
    key = int(np.random.SeedSequence([seed, step, rank, 3]).generate_state(1, np.uint64)[0] >> 1)
    return torch.Generator(device=device).manual_seed(key)


def step_draws(objective, gen: torch.Generator, n: int, latent_shape: tuple[int, int, int], drop_prob: float,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """All of one step's random draws for this rank's n = B·accum samples, at once and in a fixed order, so that
    accumulation only splits the batch: B=8 × 1 and B=4 × 2 see the same timesteps, noise and dropout. The dropout
    mask is None when nothing can be dropped (a model without a null class must not be handed one)."""
    t = objective.sample_timesteps(n, gen, device)  # (n,)
    noise = torch.randn((n, *latent_shape), generator=gen, device=device)  # (n, C, H, W)
    drop = torch.rand(n, generator=gen, device=device) < drop_prob  # (n,) CFG label dropout, once per sample
    return t, noise, (drop if drop_prob > 0 else None)


class Micro(NamedTuple):
    """One micro-batch as the step consumes it: x0 (B, C, H, W) on the device, the model's y, and the loader's
    batch (indices, epoch) for observers."""

    x0: torch.Tensor
    y: object
    batch: dict | None = None


@dataclass
class StepStats:
    """Device-side counters the step updates and the loop reads only at log steps."""

    device: torch.device
    loss_sum: torch.Tensor = None  # () float32: this rank's finite step losses since the last read
    finite_steps: torch.Tensor = None  # () float32: how many steps that sum holds
    nonfinite_run: torch.Tensor = None  # () long: steps in a row with a non-finite loss on some rank
    nonfinite_total: torch.Tensor = None  # () long: such steps in the whole run (checkpointed)
    nonfinite_worst: torch.Tensor = None  # () long: the longest such run since the last read
    grad_norm: torch.Tensor = None  # () float32: the last step's gradient norm before clipping

    def __post_init__(self):
        zero = lambda dtype: torch.zeros((), dtype=dtype, device=self.device)  # noqa: E731
        self.loss_sum, self.finite_steps, self.grad_norm = (zero(torch.float32) for _ in range(3))
        self.nonfinite_run, self.nonfinite_total, self.nonfinite_worst = (zero(torch.long) for _ in range(3))

    def take_window(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss sum, finite steps) since the last call, and reset them: the next log line's window."""
        out = self.loss_sum.clone(), self.finite_steps.clone()
        self.loss_sum.zero_()
        self.finite_steps.zero_()
        return out

    def take_worst_run(self) -> torch.Tensor:
        """The longest run of non-finite steps since the last call (the stop rule reads it at log steps)."""
        out = self.nonfinite_worst.clone()
        self.nonfinite_worst.copy_(self.nonfinite_run)
        return out


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
    latent_shape: tuple[int, int, int]
    seed: int
    rank: int
    drop_prob: float
    conditional: bool
    max_grad_norm: float
    ema_decay: float
    ema_warmup: bool
    phema: PowerEMA | None = None  # the post-hoc EMAs (training.posthoc_ema), updated beside the classic EMA
    stats: StepStats = field(init=False)

    def __post_init__(self):
        self.stats = StepStats(self.acc.device)

    def __call__(self, step: int, lr: float, feed: Callable[[], Micro],
                 observe: Callable[[int, int, Micro, torch.Tensor], None] | None = None) -> None:
        """Optimizer step `step` (0-based) at learning rate `lr`: `plan.accum` micro-batches from `feed`, then
        clipping, the optimizer and the EMA. `observe(step, micro, batch, loss)` sees each micro-batch's loss (a
        debugging aid; reading the loss syncs)."""
        acc, plan, stats, device = self.acc, self.plan, self.stats, self.acc.device
        for group in self.opt.param_groups:
            group["lr"] = lr
        draws = step_draws(self.objective, step_generator(self.seed, step, self.rank, device),
                           plan.batch_size * plan.accum, self.latent_shape, self.drop_prob, device)
        step_loss = torch.zeros((), device=device)
        for micro in range(plan.accum):
            m = feed()
            part = slice(micro * plan.batch_size, (micro + 1) * plan.batch_size)
            last = micro == plan.accum - 1
            with contextlib.nullcontext() if last else acc.no_sync(self.model):
                loss = micro_loss(self.model, self.objective, m.x0, m.y, self.conditional,
                                  *(None if d is None else d[part] for d in draws)).mean()
                step_loss += loss.detach() / plan.accum
                if last:  # a non-finite loss anywhere makes every rank's gradient NaN (the all-reduce spreads it)
                    bad = ~torch.isfinite(step_loss)
                    loss = loss * torch.where(bad, torch.nan, 1.0)
                acc.backward(loss / plan.accum)
            if observe is not None:
                observe(step, micro, m, loss)
        bad = _any_rank(acc, ~torch.isfinite(step_loss))  # () bool, the same on every rank
        grad_norm = acc.clip_grad_norm_(self.raw.parameters(), self.max_grad_norm or math.inf)  # unscales first
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
        stats.loss_sum += torch.where(bad, 0.0, step_loss)
        stats.finite_steps += (~bad).float()
        stats.nonfinite_run.copy_(torch.where(bad, stats.nonfinite_run + 1, 0))
        stats.nonfinite_total += bad.long()
        torch.maximum(stats.nonfinite_worst, stats.nonfinite_run, out=stats.nonfinite_worst)
        stats.grad_norm.copy_(grad_norm.float())


def _any_rank(acc, flag: torch.Tensor) -> torch.Tensor:
    """`flag` or-ed over the ranks, on the device: an all-reduce that the host never waits for (NCCL enqueues it)."""
    if acc.num_processes == 1:
        return flag
    return acc.reduce(flag.float(), "sum") > 0


def build_step(acc, model: torch.nn.Module, objective, plan: Plan, latent_shape: tuple[int, int, int], *,
               training, drop_prob: float, conditional: bool, compile: bool, rank: int,
               resume: Path | None = None) -> Step:
    """The step's parts in the order DESIGN.md prescribes (module docstring). `training` is the config's
    TrainingConfig; `resume` a validated checkpoint folder to load the model, EMA, optimizer and scaler from."""
    t = training
    model = model.to(acc.device)  # first: the EMA, the optimizer and loaded state are made from these parameters
    ema = EMA(model) if t.use_ema else None
    phema = PowerEMA(model, t.posthoc_ema_sigmas) if t.posthoc_ema else None
    opt = torch.optim.AdamW(model.parameters(), lr=t.learning_rate, weight_decay=t.weight_decay,
                            betas=(t.adam_beta1, t.adam_beta2), fused=True)  # fused: skips steps on the device
    if resume is not None:
        load_state(resume, model, ema, opt, acc.scaler, phema)
    model, opt = acc.prepare(model, opt)
    raw = acc.unwrap_model(model, keep_torch_compile=False)
    if compile:
        model = torch.compile(model)
    return Step(acc, model, raw, opt, ema, objective, plan, latent_shape, t.seed, rank, drop_prob, conditional,
                t.max_grad_norm, t.ema_decay, t.ema_warmup, phema)


def load_state(ckpt: Path, model: torch.nn.Module, ema: EMA | None, opt: torch.optim.Optimizer, scaler,
               phema: PowerEMA | None = None) -> None:
    """A checkpoint's model, EMA, optimizer, loss-scaler and post-hoc EMA state, into objects already on their
    device. The files are memory-mapped: every rank reads them through the page cache instead of holding its own
    host copy."""
    model.load_state_dict(checkpoint.load_tensors(ckpt / "model.pt", mmap=True), strict=True)
    flags = {k: opt.defaults[k] for k in _OPTIMIZER_FLAGS if k in opt.defaults}
    opt.load_state_dict(checkpoint.load_tensors(ckpt / "optimizer.pt", mmap=True))
    for group in opt.param_groups:
        group.update(flags)
    for p, state in opt.state.items():  # a step count saved by an unfused optimizer lives on the CPU
        if flags.get("fused") and "step" in state:
            state["step"] = state["step"].to(p.device, torch.float32)
    if ema is not None and (ckpt / "ema.pt").is_file():
        ema.load_state_dict(checkpoint.load_tensors(ckpt / "ema.pt", mmap=True))
    if phema is not None:  # required: the config cannot switch posthoc_ema on at a resume
        phema.load_state_dict(checkpoint.load_tensors(ckpt / PHEMA_FILE, mmap=True))
    if scaler is not None and (ckpt / "scaler.pt").is_file():
        scaler.load_state_dict(checkpoint.load_tensors(ckpt / "scaler.pt"))


def forward_flops(raw: torch.nn.Module, objective, x0: torch.Tensor, y, conditional: bool) -> int:
    """FLOPs of one forward pass of `raw` and the objective on the micro-batch x0 (B, C, H, W), y
    (torch.utils.flop_counter, without grad). A training step costs about 3× this (forward + backward): the
    convention MFU figures use, whatever gradient checkpointing recomputes. Label dropout may draw from the global
    RNG: callers that care fork it."""
    from torch.utils.flop_counter import FlopCounterMode

    t = objective.fixed_timesteps(len(x0), x0.device)  # (B,)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        micro_loss(raw, objective, x0, y, conditional, t, torch.zeros_like(x0), None)
    return counter.get_total_flops()
