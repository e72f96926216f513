"""PNG plots of one or more runs against concurrency, one line per run.

Concurrency doubles from level to level, so the x axis is log2 with a tick at every measured
level. A y axis whose values span more than ``LOG_Y_SPAN`` times is drawn log-scaled too: the
static layout's TTFT grows by orders of magnitude while the paged one's stays low.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter  # noqa: E402

from pagedserve.bench.results import LevelResult, RunResult  # noqa: E402

log = logging.getLogger(__name__)

LOG_Y_SPAN = 20.0
MARKERS = ("o", "s", "^", "D", "v", "P", "X")


def _plot(runs: Sequence[RunResult], value: Callable[[LevelResult], float], ylabel: str,
          title: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    xs_all: set[int] = set()
    ys_all: list[float] = []
    for i, run in enumerate(runs):
        points = [(lv.concurrency, value(lv)) for lv in run.levels if lv.successful]
        points = [(x, y) for x, y in points if y is not None and not math.isnan(y)]
        if not points:
            continue
        xs, ys = zip(*sorted(points), strict=True)
        xs_all.update(xs)
        ys_all.extend(ys)
        ax.plot(xs, ys, marker=MARKERS[i % len(MARKERS)], linewidth=2, label=run.label)
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(sorted(xs_all)))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(ScalarFormatter())
    positive = [y for y in ys_all if y > 0]
    if positive and max(positive) / min(positive) > LOG_Y_SPAN:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ScalarFormatter())
    else:
        ax.set_ylim(bottom=0)
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    log.info("wrote %s", path)
    return path


def plot_runs(runs: Sequence[RunResult], out_dir: str | Path, *,
              prefix: str = "bench") -> list[Path]:
    """Write ``{prefix}_throughput.png`` and ``{prefix}_ttft_p99.png`` into ``out_dir``."""
    if not runs:
        raise ValueError("runs must not be empty")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    first = runs[0]
    workload = f"~{first.input_len} tokens in, {first.output_len} out"
    return [
        _plot(runs, lambda lv: lv.output_throughput, "output tokens / s",
              f"Output throughput vs concurrency ({workload})", out / f"{prefix}_throughput.png"),
        _plot(runs, lambda lv: lv.ttft_ms.p99, "time to first token, p99 (ms)",
              f"TTFT p99 vs concurrency ({workload})", out / f"{prefix}_ttft_p99.png"),
    ]
