"""`training.recover`: a run that survives its own NaN or loss spike.

Without it, a non-finite step is skipped and `training.max_nonfinite_steps` of them in a row stop the run. With it,
that stop rule, or a loss spike (the step loss above `recover_spike_factor` × its running median for
`recover_spike_steps` steps in a row), makes the run go back, in the same process, to its newest checkpoint from
before the trouble began, skip the data that the failed stretch consumed, optionally lower the LR, and go on. After
`recover_max` recoveries it stops as it would have without.

Skipping data is a position change: the data order is keyed on positions, so the data position of optimizer step s
is s + `data_offset`, and a recovery to checkpoint c at step now sets the offset so that step c reads what step now
would have read. The draws of a step are keyed on its data position too, so the retried steps see new samples and
new noise. `data_offset`, `lr_scale` and the number of recoveries are recorded in every checkpoint's
training_state.json (a resume carries them on) and each recovery as a line of metrics.jsonl.

The spike watch runs on the device like the rest of the step (a median over a fixed ring buffer by sort and gather:
CUDA's torch.nanmedian syncs);
the loop reads its verdict at log steps.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

SPIKE_WARMUP = 20  # finite steps in the history before a spike can be called


@dataclass
class RecoveryState:
    """What recoveries changed, carried in training_state.json."""

    data_offset: int = 0  # optimizer steps' worth of data skipped: step s reads data position s + data_offset
    lr_scale: float = 1.0  # multiplies the schedule's LR
    recoveries: int = 0

    @classmethod
    def from_state(cls, state: dict | None) -> "RecoveryState":
        return cls(**{k: state[k] for k in asdict(cls()) if state and k in state})

    def record(self) -> dict:
        return asdict(self)


class SpikeWatch:
    """Spike steps in a row, on the device: a finite step loss above `factor` × the median of the last `window`
    finite step losses (once `SPIKE_WARMUP` are in). `take()` gives the longest run since the last call and the step
    it began at."""

    def __init__(self, device: torch.device, factor: float, window: int):
        self.factor = factor
        self.history = torch.full((window,), float("nan"), device=device)  # (window,) ring buffer; NaN: empty
        self.seen = torch.zeros((), dtype=torch.long, device=device)
        self.run, self.start = (torch.zeros((), dtype=torch.long, device=device) for _ in range(2))
        self.worst, self.worst_start = (torch.zeros((), dtype=torch.long, device=device) for _ in range(2))

    @torch.no_grad()
    def update(self, step: int, loss: torch.Tensor, bad: torch.Tensor) -> None:
        """Count step `step`'s loss (), or nothing when it was non-finite (`bad`)."""
        median = _nanmedian(self.history)  # () NaN while empty
        spike = ~bad & (self.seen >= SPIKE_WARMUP) & (loss > self.factor * median)
        self.run.copy_(torch.where(spike, self.run + 1, torch.where(bad, self.run, 0)))
        self.start.copy_(torch.where(spike & (self.run == 1), step, self.start))
        longer = self.run > self.worst
        self.worst_start.copy_(torch.where(longer, self.start, self.worst_start))
        torch.maximum(self.worst, self.run, out=self.worst)
        slot = (self.seen % len(self.history)).view(1)  # (1,) a device index: no host read
        self.history.index_copy_(0, slot, torch.where(bad, self.history.index_select(0, slot), loss.view(1)))
        self.seen += (~bad).long()

    def take(self) -> tuple[int, int]:
        """(the longest run of spike steps since the last call, its first step); reads the device."""
        out = int(self.worst), int(self.worst_start)
        self.worst.copy_(self.run)
        self.worst_start.copy_(self.start)
        return out

    def reset_runs(self) -> None:
        for t in (self.run, self.start, self.worst, self.worst_start):
            t.zero_()


def _nanmedian(x: torch.Tensor) -> torch.Tensor:
    """torch.nanmedian of a 1-D tensor (the lower middle of the non-NaN values; NaN when there are none) without a
    host sync: CUDA's nanmedian reads the NaN count back with `.item()`. NaN sorts last, so the median is a gather
    at an index computed on the device."""
    ordered = torch.sort(x).values  # (n,) NaN at the end
    count = (~torch.isnan(x)).sum()  # () long
    middle = ((count - 1).clamp(min=0) // 2).view(1)  # (1,) a device index
    return torch.where(count > 0, ordered.index_select(0, middle)[0], torch.nan)  # ()
