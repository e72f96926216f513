"""Latency and throughput statistics over one load level's request timings.

Plain Python on lists of seconds, so the numbers can be checked by hand in tests. Percentiles
interpolate linearly between order statistics, as ``numpy.percentile`` does by default.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0 <= q <= 100) with linear interpolation between closest ranks.

    With the values sorted as v[0] <= ... <= v[n-1], the rank is r = q/100 * (n-1) and the
    result is v[floor(r)] + (v[ceil(r)] - v[floor(r)]) * (r - floor(r)).
    """
    if not values:
        raise ValueError("values must not be empty")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    ordered = sorted(values)
    rank = q / 100 * (len(ordered) - 1)
    lo = math.floor(rank)
    hi = math.ceil(rank)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


class Distribution(NamedTuple):
    """Summary of one latency series; every field in the unit of the input."""

    mean: float
    p50: float
    p90: float
    p99: float

    def scaled(self, factor: float) -> Distribution:
        return Distribution(*(value * factor for value in self))


EMPTY = Distribution(math.nan, math.nan, math.nan, math.nan)


def summarize(values: Sequence[float]) -> Distribution:
    """Mean and p50/p90/p99 of ``values``; all NaN when there are none (e.g. no request
    produced two tokens, so there is no inter-token latency)."""
    if not values:
        return EMPTY
    return Distribution(
        mean=sum(values) / len(values),
        p50=percentile(values, 50),
        p90=percentile(values, 90),
        p99=percentile(values, 99),
    )


def time_per_output_token(e2e: float, ttft: float, output_tokens: int) -> float | None:
    """Mean decode time per token after the first: (e2e - ttft) / (output_tokens - 1).

    None for a request with fewer than two output tokens, which has no decode phase.
    """
    if output_tokens < 2:
        return None
    return (e2e - ttft) / (output_tokens - 1)


def throughput(count: float, duration: float) -> float:
    """Items per second; 0 for an empty or instantaneous interval rather than a division error."""
    if duration <= 0:
        return 0.0
    return count / duration
