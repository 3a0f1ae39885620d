"""The learning-rate schedule: a pure function of the optimizer step, so resume needs only the step.

The schedule's length (`total_steps`) is fixed when a run starts and recorded in every checkpoint. Extending a run
(`resume --training.num_epochs N`) keeps it, so the extra steps run at the schedule's final LR, which for cosine and
linear is about 0. `resume --restretch-schedule` records a new length instead: the run's own schedule (same peak,
warm-up and type) recomputed over the extended run, continued from the current step; the checkpoints carry the new
length, so a later resume continues the restretched schedule exactly.
"""

from __future__ import annotations

import math

NEAR_ZERO = 0.01  # of the peak LR: below it, steps barely move the weights


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


def restretched_length(step: int, new_total: int) -> int:
    """The schedule length after `--restretch-schedule` at `step`: `new_total`, the extended run's length, which
    must leave steps to run. From `step` on, lr_at(s, ..., new_total) is the run's schedule stretched over the
    extended run; for a longer run it starts at or above the current LR (cosine and linear decay more slowly), and
    it reaches its final value at the new end instead of the old one."""
    if new_total <= step:
        raise ValueError(f"nothing to restretch over: the run is at step {step:,} and its epochs end at step "
                         f"{new_total:,}; extend it with a larger --training.num_epochs")
    return new_total


def schedule_warnings(base_lr: float, kind: str, warmup_steps: int, total_steps: int, start_step: int,
                      end_step: int) -> list[tuple[bool, str]]:
    """What in a schedule is likely a mistake, said before step 1, as (loud, text): a warm-up over a tenth of the
    run, a short run that decays to almost nothing, and (loud, on resume) steps that would run at an LR near zero."""
    notes = []
    if warmup_steps > total_steps / 10:
        notes.append((False, f"lr_scheduler.warmup_steps {warmup_steps:,} is {warmup_steps / total_steps:.0%} of the "
                     f"schedule's {total_steps:,} steps; a tenth or less is usual (e.g. --lr_scheduler.warmup_steps "
                     f"{max(1, total_steps // 20)})"))
    final = lr_at(total_steps - 1, base_lr, kind, warmup_steps, total_steps)
    if kind != "constant" and total_steps < 1000 and final < NEAR_ZERO * base_lr:
        notes.append((False, f"the {kind} schedule falls from {base_lr:.2e} to {final:.2e} within {total_steps:,} steps: a "
                     "run this short spends its last steps at almost no LR; lr_scheduler.type constant, or more "
                     "epochs, may learn more"))
    now = lr_at(start_step, base_lr, kind, warmup_steps, total_steps)
    if start_step and end_step > start_step and now < NEAR_ZERO * base_lr:
        notes.append((True, f"LR near zero: at step {start_step:,} the schedule (over {total_steps:,} steps) gives "
                     f"{now:.2e}, {100 * now / base_lr:.2g} % of the peak {base_lr:.2e}; the {end_step - start_step:,} steps "
                     "to run will barely change the weights. To train on, restretch the schedule over the extended "
                     "run: add --restretch-schedule"))
    return notes
