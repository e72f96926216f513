"""The server's KV-cache gauges, scraped from its Prometheus /metrics while a level runs.

Series are found by the end of their name, so pagedserve's ``pagedserve:kv_cache_usage_perc``
and vLLM's ``vllm:kv_cache_usage_perc`` (or the older ``gpu_cache_usage_perc``) both count. A
server without /metrics, or without a series, simply leaves that field None.

Waste is the share of reserved KV token slots that hold no token: 1 - used / reserved, from the
``kv_reserved_tokens`` and ``kv_used_tokens`` gauges when exported, else a ``kv_waste_perc``
gauge. Over the samples taken while requests were running (an idle server has nothing to waste), it is
sum(reserved - used) / sum(reserved): the share of reserved token-seconds that held no token, so a
sample with one request mid-prefill (reserved, not yet computed) weighs as little as it holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import httpx
from prometheus_client.parser import text_string_to_metric_families

from pagedserve.bench.results import KVSnapshot

log = logging.getLogger(__name__)

USAGE_SUFFIXES = ("kv_cache_usage_perc", "gpu_cache_usage_perc", "cpu_cache_usage_perc")
WASTE_SUFFIXES = ("kv_waste_perc", "kv_cache_waste_perc")
RESERVED_SUFFIXES = ("kv_reserved_tokens",)
USED_SUFFIXES = ("kv_used_tokens",)
RUNNING_SUFFIXES = ("num_requests_running",)


def parse_gauges(text: str) -> dict[str, float]:
    """Sum of every series' samples per metric name (labels collapsed: one engine per server)."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return values


def pick(values: dict[str, float], suffixes: tuple[str, ...]) -> float | None:
    for name, value in values.items():
        if name.endswith(suffixes):
            return value
    return None


GAUGE_SUFFIXES = (USAGE_SUFFIXES + WASTE_SUFFIXES + RESERVED_SUFFIXES + USED_SUFFIXES
                  + RUNNING_SUFFIXES)


class KVProbe:
    """Samples /metrics every ``interval`` seconds between :meth:`start` and :meth:`stop`.

    The first scrape reads everything and finds the gauges' full names; later ones ask for just
    those (Prometheus' ``name[]`` parameter, which pagedserve and prometheus_client's exporters
    honour and others ignore): on a 2-core machine the whole exposition, rendered and parsed
    four times a second, took CPU from the server being measured."""

    def __init__(self, http: httpx.AsyncClient, interval: float = 0.25):
        self.http = http
        self.interval = interval
        self.available = True
        self._names: list[str] = []
        self._samples: list[dict[str, float]] = []
        self._task: asyncio.Task | None = None

    async def scrape(self) -> dict[str, float] | None:
        if not self.available:
            return None
        try:
            resp = await self.http.get("/metrics", params=[("name[]", n) for n in self._names])
        except httpx.HTTPError as exc:
            log.debug("metrics scrape failed: %s", exc)
            return None
        if resp.status_code != 200:
            log.info("no KV gauges: %s answered %s on /metrics", self.http.base_url,
                     resp.status_code)
            self.available = False
            return None
        values = parse_gauges(resp.text)
        if not self._names:
            self._names = sorted(name for name in values if name.endswith(GAUGE_SUFFIXES))
        return values

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)  # not at once: the level's requests are not in yet
            values = await self.scrape()
            if values is not None:
                self._samples.append(values)

    def start(self) -> None:
        self._samples = []
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> KVSnapshot:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        return summarize_samples(self._samples)


def summarize_samples(samples: list[dict[str, float]]) -> KVSnapshot:
    """Reduce gauge samples to a snapshot; waste is averaged over busy samples only."""

    def series(suffixes: tuple[str, ...], rows: list[dict[str, float]]) -> list[float]:
        return [v for row in rows if (v := pick(row, suffixes)) is not None]

    def fractions(suffixes: tuple[str, ...], rows: list[dict[str, float]]) -> list[float]:
        # "_perc" gauges are fractions in vLLM; a server exporting 0..100 is rescaled
        return [v / 100 if v > 1 else v for v in series(suffixes, rows)]

    busy = [row for row in samples if _busy(row)]
    # Prefer the token counts: a waste gauge may be relative to used rather than reserved slots.
    slots = [
        (reserved, used)
        for row in busy
        if (reserved := pick(row, RESERVED_SUFFIXES))
        and (used := pick(row, USED_SUFFIXES)) is not None
    ]
    if slots:
        # weighted by what was reserved: the share of reserved token-seconds that held nothing
        waste = sum(r - u for r, u in slots) / sum(r for r, _ in slots)
        waste_max = max(1 - u / r for r, u in slots)
    else:
        gauge = fractions(WASTE_SUFFIXES, busy)
        waste = sum(gauge) / len(gauge) if gauge else None
        waste_max = max(gauge) if gauge else None
    usage = fractions(USAGE_SUFFIXES, samples)
    reserved = series(RESERVED_SUFFIXES, samples)
    used = series(USED_SUFFIXES, samples)
    return KVSnapshot(
        samples=len(samples),
        usage_perc_max=max(usage) if usage else None,
        waste_perc=waste,
        waste_perc_max=waste_max,
        reserved_tokens_max=max(reserved) if reserved else None,
        used_tokens_max=max(used) if used else None,
    )


def _busy(row: dict[str, float]) -> bool:
    """A sample taken while requests ran: by the running gauge, else by reserved KV slots."""
    running = pick(row, RUNNING_SUFFIXES)
    if running is not None:
        return running > 0
    reserved = pick(row, RESERVED_SUFFIXES)
    if reserved is not None:
        return reserved > 0
    return True  # nothing tells: count every sample
