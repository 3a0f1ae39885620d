"""The learning-rate schedule: a pure function of the optimizer step, so resume needs only the step."""

from __future__ import annotations

import math


def lr_at(step: int, base_lr: float, kind: str, warmup_steps: int, total_steps: int) -> float:
    """LR for optimizer step `step` (0-based): linear warm-up from base/warmup to base over `warmup_steps`, then
    cosine to 0, constant, or linear to 0 at `total_steps`. Past `total_steps` (an extended run) it stays at the
    schedule's final value (the LR of its last step)."""
    step = min(step, max(0, total_steps - 1))
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if kind == "constant":
        return base_lr
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if kind == "cosine":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    if kind == "linear":
        return base_lr * (1.0 - progress)
    raise ValueError(f"unknown lr_scheduler.type {kind!r}")
