"""Test hooks: environment variables only tests set, all of them here, read once when a run starts (`read`), never
on a hot path. Unset, each does nothing.

    DITPIPE_CHECKPOINT_PAUSE_S   seconds to sleep after writing each file of a checkpoint, so a test can kill -9 a
                                 run while a `.checkpoint-*.tmp` folder is half written
    DITPIPE_RECORD_SAMPLES       a path: each rank appends one JSON line per micro-batch it trains on (SampleRecord)
    DITPIPE_TEST_INJECT          "nan:A:B" or "spike:A:B": the micro-batches of data positions (optimizer steps +
                                 data_offset) in [A, B) are made non-finite, or 30× too large, as a corrupt stretch
                                 of data would be (training.recover's tests)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

PAUSE_ENV = "DITPIPE_CHECKPOINT_PAUSE_S"
RECORD_ENV = "DITPIPE_RECORD_SAMPLES"
INJECT_ENV = "DITPIPE_TEST_INJECT"


@dataclass(frozen=True)
class Hooks:
    """The test hooks of one run, as the environment set them when it started."""

    checkpoint_pause_s: float = 0.0
    record_samples: str | None = None  # the path SampleRecord appends to
    inject: tuple[str, int, int] | None = None  # (kind, A, B)

    def injected(self, position: int) -> str | None:
        """The injection for a data position: "nan", "spike" or None (always None in real runs)."""
        if self.inject is None:
            return None
        kind, a, b = self.inject
        return kind if a <= position < b else None

    def sample_record(self, rank: int) -> "SampleRecord | None":
        return SampleRecord(self.record_samples, rank) if self.record_samples else None


def read() -> Hooks:
    """The hooks the environment sets now."""
    spec = os.environ.get(INJECT_ENV)
    inject = None
    if spec:
        kind, a, b = spec.split(":")
        inject = (kind, int(a), int(b))
    return Hooks(float(os.environ.get(PAUSE_ENV) or 0), os.environ.get(RECORD_ENV) or None, inject)


class SampleRecord:
    """A debugging aid, off unless DITPIPE_RECORD_SAMPLES=PATH is set: every rank appends one JSON line per
    micro-batch it trains on, `{"rank", "step", "micro", "epoch", "q", "indices", "loss", "t", "noise"}` (global
    sample indices, this rank's local micro-batch mean loss, and each sample's timestep and diffusion-noise sum),
    so exactly-once across ranks, the loss reduction and the per-position draws can be checked from outside. Each
    line is one O_APPEND write, so the ranks may share one file. It costs a device sync per micro-batch; never set
    it for real runs."""

    def __init__(self, path: str, rank: int):
        self.fd, self.rank = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644), rank

    def write(self, step: int, micro: int, m, loss, draws) -> None:
        """`m` a pipeline.step.Micro, `loss` its () tensor, `draws` its pipeline.step.Draws."""
        batch = m.batch
        line = {"rank": self.rank, "step": step, "micro": micro, "epoch": int(batch["epoch"]), "q": int(batch["q"]),
                "indices": [int(g) for g in batch["indices"]], "loss": float(loss.detach().float().item()),
                "t": [round(float(x), 6) for x in draws.t], "noise": [round(float(x), 4) for x in
                                                                    draws.noise.flatten(1).sum(1)]}
        os.write(self.fd, (json.dumps(line) + "\n").encode())
