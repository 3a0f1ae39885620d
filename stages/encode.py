"""`ditpipe encode`: every input through the codec once, into verified latent shards and a manifest.

The engine is pipeline/encode.py (workers, batching, the codec, the shard writer, the per-rank split and the manifest
merge, what a rerun reuses); this verb draws what it reports: notes, the download and encode bars, the summary.
"""

from __future__ import annotations

import contextlib
from typing import Callable

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from rich.table import Table

from ditpipe.pipeline import encode as engine
from ditpipe.pipeline import remote_encode, shards
from ditpipe.pipeline.config import Config
from ditpipe.pipeline.encode import Run
from ditpipe.pipeline.manifest import Manifest
from ditpipe.pipeline.remote import is_url
from ditpipe.stages.progress import mean_rate, progress_bar, rate_text


def encode(cfg: Config, overwrite: bool = False, console: Console | None = None,
           on_batch: Callable[[int], None] | None = None) -> dict:
    """Encode what `cfg.data` describes into `cfg.shards_path` (pipeline.encode.encode), or into the folder URL
        `cfg.shards.path` (pipeline.remote_encode.encode), on the console. Returns the manifest. `on_batch(n)` is called
    after each encoded batch of `n` inputs (bench stamps the batches with it)."""
    observer = _Console(console or Console(stderr=True), on_batch)
    if is_url(cfg.shards.path or ""):  # staged on this node, uploaded shard by shard, the manifest last
        return remote_encode.encode(cfg, overwrite, observer)
    return engine.encode(cfg, overwrite, observer)


class _Console(engine.Observer):
    """The engine's reports on the console: notes, a download bar, the encode bar (rank 0's) and the summary."""

    def __init__(self, console: Console, on_batch: Callable[[int], None] | None):
        self.console, self.on_batch = console, on_batch
        self.bar, self.task = None, None

    def note(self, text: str) -> None:
        self.console.print(f"[yellow]note:[/] {text}", highlight=False, soft_wrap=True)

    @contextlib.contextmanager
    def downloading(self):
        with Progress(TextColumn("download {task.description}"), BarColumn(), DownloadColumn(),
                      TransferSpeedColumn(), console=self.console) as bar:
            tasks: dict[str, int] = {}

            def report(name: str, done: int, total: int | None) -> None:
                if name not in tasks:
                    tasks[name] = bar.add_task(name, total=total)
                bar.update(tasks[name], completed=done)

            yield report

    @contextlib.contextmanager
    def encoding(self, description: str, total: int, shown: bool):
        with progress_bar(self.console, disable=not shown) as bar:  # counts what this run decodes and encodes
            self.bar, self.task = bar, bar.add_task(description, total=total, reused=0)
            yield

    def batch(self, n: int) -> None:
        if self.on_batch is not None:
            self.on_batch(n)
        self.bar.update(self.task, advance=n)

    def summary(self, run: Run) -> None:
        _summary(self.console, run, mean_rate(self.bar.tasks[0]))


def _summary(console: Console, run: Run, rate: float) -> None:
    manifest, out, seconds, state = Manifest.of(run.manifest), run.out, run.seconds, run.state
    skipped = manifest.raw["skipped"]  # encode's own sections: what it skipped, converted, and what an update did
    kept, reused, encoded, hashed, rewritten = run.kept, run.reused, run.encoded, run.hashed, run.rewritten
    table = Table(title=f"encoded into {out}", show_header=False)
    table.add_row("encoded", f"{manifest.num_samples:,}")
    table.add_row("skipped", f"{len(skipped):,}")
    table.add_row("converted", f"{len(manifest.raw['converted']):,}")
    table.add_row("shards", f"{manifest.num_shards} ({manifest.format})")
    if manifest.bucketed:
        table.add_row("buckets", manifest.describe_buckets())
    table.add_row("bytes", f"{sum(s['bytes'] for s in manifest.entries):,}")
    table.add_row("time", f"{seconds:.1f} s" + (f" ({kept:,} inputs reused from complete shards)" if kept else ""))
    table.add_row("rate", f"{rate_text(rate)} img/s (this run's encoded inputs / its encoding seconds, as the bar)")
    if state.get("halvings"):
        table.add_row("batch", f"halved {state['halvings']}× on out-of-memory, now {state['batch']}")
    console.print(table)
    console.print(f"this run: {encoded:,} inputs decoded, {reused:,} latents reused, {hashed:,} files hashed, "
                  f"{rewritten:,} shards written", soft_wrap=True)
    if rewritten == 0 and not encoded:
        console.print(f"up to date: {manifest.num_inputs:,} inputs unchanged (size, mtime, ctime, inode and "
                      "device, or sha256 where they moved); nothing decoded", soft_wrap=True)
    elif manifest.raw.get("update") and rewritten:
        u = manifest.raw["update"]
        console.print(f"updated: {u['changed']:,} changed, {u['added']:,} added, {u['removed']:,} removed; "
                      f"{u['shards_rewritten']:,} of {manifest.num_shards} shards rewritten"
                      + (f", {u['shards_removed']} removed" if u["shards_removed"] else ""), soft_wrap=True)
    if skipped:
        reasons: dict[str, int] = {}
        for s in skipped:
            reasons[s["reason"].split(":")[0]] = reasons.get(s["reason"].split(":")[0], 0) + 1
        console.print("[yellow]skipped:[/] " + ", ".join(f"{n} × {r}" for r, n in sorted(reasons.items())))
        for s in skipped[:10]:
            console.print(f"  {s['file']}: {s['reason']}")
        if len(skipped) > 10:
            console.print(f"  … and {len(skipped) - 10} more in {out / shards.MANIFEST}")
