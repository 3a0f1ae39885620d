"""Sampling spread over processes: `torchrun --nproc_per_node N $(which ditpipe) sample|evaluate ...`.

Every rank takes a contiguous block of the sample indices and generates it; because each sample's noise and label
are keyed on (seed, index) (pipeline/generate.py), the union is the same set of images whatever N is. What the
metrics need (Inception features, never images) is gathered to rank 0 in index order; rank 0 writes the results.
One process (no torchrun) needs no process group at all.

Under torchrun, accelerate's process state sets up the group (NCCL on GPUs, each rank on its own device via
`torch.cuda.set_device(LOCAL_RANK)`; gloo on CPUs), with a long timeout: the other ranks wait while rank 0 reads or
computes the reference statistics.
"""

from __future__ import annotations

import os
from datetime import timedelta

import numpy as np
import torch


TIMEOUT = timedelta(hours=2)  # rank 0 may spend many minutes on reference statistics while the others wait


class Spread:
    """This process's place among the ranks of a sample/evaluate launch."""

    def __init__(self, rank: int = 0, world: int = 1, device: torch.device | None = None):
        self.rank, self.world = rank, world
        self.device = device or (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))

    @classmethod
    def start(cls) -> "Spread":
        """One process, or this rank of a torchrun launch (WORLD_SIZE > 1)."""
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls()
        from accelerate import PartialState

        state = PartialState(cpu=not torch.cuda.is_available(), timeout=TIMEOUT)
        return cls(state.process_index, state.num_processes, state.device)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, n: int) -> range:
        """This rank's block of the indices 0..n-1: rank r takes [r·n/N, (r+1)·n/N)."""
        return range(self.rank * n // self.world, (self.rank + 1) * n // self.world)

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def gather(self, rows: np.ndarray) -> np.ndarray | None:
        """Every rank's rows (k_r, ...) concatenated in rank order on rank 0 (None elsewhere). Shapes past the first
        and the dtype must agree; the counts may differ (they are padded for the collective and trimmed)."""
        if self.world == 1:
            return rows
        dev = self._comm_device()
        counts = [torch.zeros(1, dtype=torch.long, device=dev) for _ in range(self.world)]
        torch.distributed.all_gather(counts, torch.tensor([len(rows)], dtype=torch.long, device=dev))
        counts = [int(c.item()) for c in counts]
        padded = np.zeros((max(counts), *rows.shape[1:]), dtype=rows.dtype)
        padded[: len(rows)] = rows
        mine = torch.from_numpy(padded).to(dev)
        parts = [torch.empty_like(mine) for _ in range(self.world)] if self.main else None
        torch.distributed.gather(mine, parts, dst=0)
        if not self.main:
            return None
        return np.concatenate([p[:c].cpu().numpy() for p, c in zip(parts, counts)])

    def _comm_device(self) -> torch.device:
        return self.device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
