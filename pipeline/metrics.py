"""Run logs: metrics.jsonl (one JSON object per logged step) and TensorBoard scalars (tensorboardX)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ditpipe.pipeline.atomic import write_bytes


class MetricsLog:
    """`resume_step`: a resumed run first drops what was logged after its checkpoint, so the replayed steps are
    not logged twice."""

    def __init__(self, run_dir: Path, tensorboard: bool, enabled: bool = True, resume_step: int | None = None):
        self.enabled = enabled
        path = self.path = Path(run_dir) / "metrics.jsonl"
        if enabled and resume_step is not None and path.is_file():
            kept = [line for line in path.read_text().splitlines() if _step(line) <= resume_step]
            write_bytes(path, "".join(line + "\n" for line in kept).encode())
        self.file = _append(path) if enabled else None
        self.tb = None
        if enabled and tensorboard:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=resume_step)

    def scalars(self, step: int, prefix: str = "train", **values) -> None:
        """One metrics.jsonl line; `train` values keep their names, others are prefixed (`val_loss_ema`). Numbers
        also go to TensorBoard as `<prefix>/<name>`; lists (per-timestep values) to the jsonl only."""
        if not self.enabled:
            return
        named = values if prefix == "train" else {f"{prefix}_{k}": v for k, v in values.items()}
        self.file.write(json.dumps({"step": step, **named}) + "\n")
        if self.tb is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)):
                    self.tb.add_scalar(f"{prefix}/{name}", value, step)

    def rewind(self, step: int) -> None:
        """Drop what was logged after `step` (training.recover went back there), as a resume does."""
        if not self.enabled:
            return
        path = self.path
        self.file.close()
        kept = [line for line in path.read_text().splitlines() if _step(line) <= step]
        write_bytes(path, "".join(line + "\n" for line in kept).encode())
        self.file = _append(path)
        if self.tb is not None:  # TensorBoard keeps the abandoned points; a new writer purges them from `step` on
            logdir = self.tb.get_logdir()
            self.tb.close()
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(logdir, purge_step=step)

    def image(self, step: int, tag: str, image) -> None:
        """An (H, W, 3) uint8 image, e.g. a validation grid, in TensorBoard."""
        if self.enabled and self.tb is not None:
            self.tb.add_image(tag, image, step, dataformats="HWC")

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def _step(line: str) -> float:
    """The step of a metrics line; a line cut short by a kill counts as after any checkpoint."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def plot_loss(run_dir: Path, path: Path, title: str = "training loss") -> Path:
    """The logged loss against the optimizer step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    rows = [r for r in read_metrics(run_dir) if "loss" in r]  # training lines; validation lines hold val_loss_*
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1.5)
    ax.set(xlabel="optimizer step", ylabel="loss", title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def _append(path: Path):
    """metrics.jsonl opened to append, never through a link planted at its name (O_NOFOLLOW: refused, naming it)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    except OSError as e:
        from ditpipe.pipeline.errors import DitpipeError

        raise DitpipeError(f"cannot append to '{path}' ({e.strerror}): it must be a regular file of this run, not "
                           "a link; move it out and run the command again") from None
    return os.fdopen(fd, "a", buffering=1)
