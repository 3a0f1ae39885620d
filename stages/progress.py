"""The progress bar the verbs share (encode, verify): one rate, the same in the bar and in the summary."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.text import Text


class RateColumn(ProgressColumn):
    """The one rate of encode (and verify): items done this run / seconds since the bar started; items found done
    already (the `reused` field) do not count. The encode summary prints the same number."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        return Text(f"{rate_text(mean_rate(task))} {self.unit}/s", style="cyan")


def rate_text(rate: float) -> str:
    """A rate that means something at any speed: whole numbers from 100 up (1,234), three significant digits below
    (42.2, 0.125: a large VAE on a CPU encodes 0.1 img/s, which whole numbers would show as 0)."""
    return f"{rate:,.0f}" if rate >= 100 else f"{rate:.3g}"


def mean_rate(task) -> float:
    seconds = task.finished_time or task.elapsed
    return (task.completed - task.fields.get("reused", 0)) / seconds if seconds else 0.0


def progress_bar(console: Console, unit: str = "img", disable: bool = False) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(unit),
                    TimeRemainingColumn(), console=console, transient=False, disable=disable)
