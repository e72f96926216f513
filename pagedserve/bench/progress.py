"""What the user sees while a sweep runs and after: a rich progress bar per level and a
summary table per run."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from pagedserve.bench.results import LevelResult, RequestRecord

# Wide enough for any table here; rich would otherwise assume 80 columns for a pipe or a file
# and cut numbers short ("12…"). Tables keep their natural width either way.
_NOT_A_TERMINAL_WIDTH = 1000


def output_console(file: TextIO | None = None) -> Console:
    """The console results are printed on: a terminal's own width, else tables at full width
    (`bench serve | tee log`, or output redirected to a file)."""
    console = Console(file=file)
    if not console.is_terminal:
        console = Console(file=file, width=_NOT_A_TERMINAL_WIDTH)
    return console


class RichProgress:
    """A :class:`~pagedserve.bench.loadgen.SweepObserver` drawing one bar per level; use as a
    context manager around the sweep."""

    def __init__(self, console: Console, title: str):
        self.title = title
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[failed]} failed"), TimeElapsedColumn(),
            console=console, transient=False,
            refresh_per_second=2,  # the client shares the CPU with the server it measures
        )
        self._task: TaskID | None = None
        self._failed = 0

    def __enter__(self) -> RichProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def level_started(self, concurrency: int, num_prompts: int) -> None:
        self._failed = 0
        self._task = self.progress.add_task(
            f"{self.title} c={concurrency}", total=num_prompts, failed=0
        )

    def request_done(self, record: RequestRecord) -> None:
        if self._task is None:
            return
        self._failed += 0 if record.success else 1
        self.progress.update(self._task, advance=1, failed=self._failed)

    def level_finished(self, result: LevelResult) -> None:
        if self._task is not None:
            self.progress.update(
                self._task,
                description=f"{self.title} c={result.concurrency}: "
                f"{result.output_throughput:.1f} tok/s, TTFT p99 {result.ttft_ms.p99:.0f} ms",
            )
        self._task = None


def summary_table(title: str, levels: Sequence[LevelResult]) -> Table:
    table = Table(title=title)
    for name in ("conc.", "ok", "failed", "s", "req/s", "out tok/s", "TTFT p50", "TTFT p99",
                 "TPOT p50", "ITL p99", "e2e p99", "KV waste"):
        table.add_column(name, justify="right")
    for lv in levels:
        waste = lv.kv.waste_perc
        table.add_row(
            str(lv.concurrency), str(lv.successful), str(lv.failed), f"{lv.duration_s:.1f}",
            f"{lv.request_throughput:.2f}", f"{lv.output_throughput:.1f}",
            f"{lv.ttft_ms.p50:.0f}", f"{lv.ttft_ms.p99:.0f}", f"{lv.tpot_ms.p50:.1f}",
            f"{lv.itl_ms.p99:.1f}", f"{lv.e2e_ms.p99:.0f}",
            "–" if waste is None else f"{100 * waste:.0f}%",
        )
    table.caption = "latencies in ms"
    return table
