"""How long a run will take: before its first step, from a timed forward and backward of the run's own model on its
first micro-batch; while it runs, from the steps done so far.

Why before the first step: `encode`'s `next:` command pasted on a CPU trained DiT-B/2 for 5,600 steps, 34 s a step,
about two days, and said nothing; a minute in, the user cannot tell a two-day run from a two-hour one.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import torch

from ditpipe.pipeline.diffusion import micro_loss

LONG_ON_CPU_SECONDS = 3 * 3600  # the preflight warns when a CPU run is estimated past this
QUICK_PROBE_SECONDS = 0.5  # a probe faster than this is timed again: the first call pays one-off set-up
PROBE_REPEATS = 3


def duration(seconds: float) -> str:
    """`38 s`, `4 min 10 s`, `2 h 13 min`, `2 d 3 h`: two units at most, what a person plans with."""
    if not math.isfinite(seconds):
        return "unknown"
    s = max(int(round(seconds)), 0)
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min {s} s" if minutes else f"{s} s"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":  # kernels run behind the host: time them, not their launch
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], None], device: torch.device) -> float:
    """Seconds one call of `fn` takes: timed once, and when that was quick (set-up then dominates: the allocator,
    kernel choices, caches) PROBE_REPEATS more times, keeping the fastest."""
    times = []
    for _ in range(1 + PROBE_REPEATS):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
        if times[0] >= QUICK_PROBE_SECONDS:
            break
    return min(times[1:] or times)


def step_seconds(raw: torch.nn.Module, objective, micro, norm, conditional: bool, accum: int, autocast,
                 device: torch.device) -> float:
    """Seconds of one optimizer step's compute, about: `accum` forwards and backwards of the plain model `raw` on
    the micro-batch `micro` (pipeline.step.Micro: the run's shapes and conditioning) under the run's `autocast`, and
    the gradient norm. Nothing persists: the gradients are dropped (the step starts from none, as after every
    step), the optimizer and EMAs are not touched, every RNG is forked. AdamW and the EMA are left out: memory-bound
    passes over the parameters, a few percent of a step at any size worth estimating. The plain module, not the
    DDP or compiled one: no all-reduce other ranks would have to join, no compile the first real step pays anyway."""
    x0 = norm.normalize(micro.mean.float())  # (B, C, H, W)
    t = objective.fixed_timesteps(len(x0), device)  # (B,)
    noise = torch.zeros_like(x0)  # the cost does not depend on the values

    def one_step() -> None:
        for _ in range(accum):
            with autocast():
                loss = micro_loss(raw, objective, x0, micro.y, conditional, t, noise, None).mean()
            loss.backward()
        torch.nn.utils.clip_grad_norm_(raw.parameters(), math.inf)  # the norm every step computes; no sync
        raw.zero_grad(set_to_none=True)

    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # label dropout draws from the global RNG
        return time_call(one_step, device)


def remaining(seconds_so_far: float, steps_so_far: int, steps_left: int) -> float:
    """Seconds left at the rate so far (checkpoints and validation included: they recur)."""
    return seconds_so_far / max(steps_so_far, 1) * steps_left
