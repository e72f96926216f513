"""The load generator: a sweep of load levels against one server, streaming every request.

A level sends ``num_prompts`` requests, at most ``concurrency`` in flight at once. Without a
request rate every request is ready at t=0, so the level is a closed loop: each finished request
is replaced at once, holding ``concurrency`` in flight. With a rate, requests become ready at
Poisson arrival times (exponential gaps, seeded) and the concurrency is a cap (open loop).

Each level gets prompts no other level sends, so a prefix cache cannot carry over between levels.
Before the sweep, two requests warm the server up and calibrate the prompt length from the
prompt token counts it reports.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import httpx

from pagedserve.bench.clients import ApiClient
from pagedserve.bench.http_stream import StreamingHTTP
from pagedserve.bench.prompts import PromptSet
from pagedserve.bench.results import LevelResult, RequestRecord
from pagedserve.bench.server_metrics import KVProbe

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Workload:
    """What every level sends: prompt and output lengths, prompts per level, arrivals."""

    input_len: int = 128
    output_len: int = 64
    num_prompts: int | Sequence[int] = 32  # per level; a sequence gives one count per level
    seed: int = 0
    shared_prefix_len: int = 0
    request_rate: float | None = None  # requests/s, Poisson; None: closed loop

    def __post_init__(self) -> None:
        if self.output_len < 1:
            raise ValueError(f"output_len must be >= 1, got {self.output_len}")
        if self.request_rate is not None and self.request_rate <= 0:
            raise ValueError(f"request_rate must be > 0, got {self.request_rate}")

    def prompts_per_level(self, concurrency: Sequence[int]) -> list[int]:
        if isinstance(self.num_prompts, int):
            counts = [self.num_prompts] * len(concurrency)
        else:
            counts = list(self.num_prompts)
        if len(counts) != len(concurrency):
            raise ValueError(
                f"num_prompts must be one count or one per concurrency level "
                f"({len(concurrency)}), got {len(counts)}"
            )
        if any(n < 1 for n in counts):
            raise ValueError(f"num_prompts must be >= 1, got {counts}")
        return counts


class SweepObserver(Protocol):
    """Progress hooks (a rich progress bar in the CLI); all optional to act upon."""

    def level_started(self, concurrency: int, num_prompts: int) -> None: ...
    def request_done(self, record: RequestRecord) -> None: ...
    def level_finished(self, result: LevelResult) -> None: ...


class QuietObserver:
    def level_started(self, concurrency: int, num_prompts: int) -> None:
        log.info("level: concurrency %d, %d prompts", concurrency, num_prompts)

    def request_done(self, record: RequestRecord) -> None:
        pass

    def level_finished(self, result: LevelResult) -> None:
        log.info("concurrency %d: %.1f output tok/s, TTFT p99 %.0f ms, %d failed",
                 result.concurrency, result.output_throughput, result.ttft_ms.p99, result.failed)


class LoadGenerator:
    """Drives one server through a :class:`ApiClient`; one instance per server."""

    def __init__(self, url: str, client: ApiClient, *, timeout: float = 600.0,
                 metrics_interval: float = 0.25):
        self.url = url.rstrip("/")
        self.client = client
        self.timeout = timeout
        self.metrics_interval = metrics_interval

    def _http(self, connections: int) -> httpx.AsyncClient | StreamingHTTP:
        """The requests' client: the lean one over plain http (a benchmark's client must cost
        the machine little), httpx for https."""
        if self.url.startswith("http://"):
            return StreamingHTTP(self.url, timeout=self.timeout)
        return httpx.AsyncClient(
            base_url=self.url,
            timeout=httpx.Timeout(self.timeout, connect=30.0),
            limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
        )

    async def sweep(self, workload: Workload, concurrency: Sequence[int],
                    observer: SweepObserver | None = None) -> list[LevelResult]:
        observer = observer or QuietObserver()
        counts = workload.prompts_per_level(concurrency)
        prompt_set = PromptSet(sum(counts), workload.input_len, seed=workload.seed,
                               shared_prefix_len=workload.shared_prefix_len)
        metrics = httpx.AsyncClient(base_url=self.url, timeout=httpx.Timeout(30.0))
        async with self._http(max(concurrency) + 2) as http, metrics as metrics_http:
            await self.calibrate(http, prompt_set)
            prompts = prompt_set.prompts()
            probe = KVProbe(metrics_http, self.metrics_interval)
            results = []
            for level, (c, n) in enumerate(zip(concurrency, counts, strict=True)):
                first = sum(counts[:level])
                observer.level_started(c, n)
                result = await self.run_level(
                    http, probe, prompts[first:first + n], workload.output_len, c,
                    request_rate=workload.request_rate, seed=workload.seed + level,
                    on_done=observer.request_done,
                )
                observer.level_finished(result)
                results.append(result)
        return results

    async def calibrate(self, http: httpx.AsyncClient, prompt_set: PromptSet) -> None:
        """Warm the server up with two short requests and fit the prompt length model to the
        prompt token counts they report."""
        points = []
        base = prompt_set.num_words(prompt_set.input_len)
        for words in (base, 2 * base):
            record = await self.client.send(http, prompt_set.sample(words), 1)
            if not record.success:
                raise RuntimeError(f"warm-up request to {self.url} failed: {record.error}")
            points.append((words, record.prompt_tokens or 0))
        prompt_set.calibrate(points[0], points[1])
        log.info("calibrated prompts: %.2f tokens per word + %.0f tokens overhead (from %s)",
                 prompt_set.tokens_per_word, prompt_set.overhead_tokens, points)

    async def run_level(self, http: httpx.AsyncClient, probe: KVProbe | None,
                        prompts: Sequence[str], output_len: int, concurrency: int, *,
                        request_rate: float | None = None, seed: int = 0,
                        on_done=None) -> LevelResult:
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        gate = asyncio.Semaphore(concurrency)
        arrivals = poisson_arrivals(len(prompts), request_rate, seed)

        async def one(prompt: str, ready_at: float) -> RequestRecord:
            await asyncio.sleep(max(0.0, ready_at - (time.perf_counter() - t0)))
            async with gate:
                record = await self.client.send(http, prompt, output_len)
            if on_done is not None:
                on_done(record)
            return record

        load_average = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        if probe is not None:
            probe.start()
        t0 = time.perf_counter()
        records = await asyncio.gather(*(one(p, a) for p, a in zip(prompts, arrivals, strict=True)))
        duration = time.perf_counter() - t0
        kv = await probe.stop() if probe is not None else None
        for record in records:
            if not record.success:
                log.warning("request failed at concurrency %d: %s", concurrency, record.error)
                break
        return LevelResult.from_records(
            list(records), concurrency=concurrency, duration_s=duration,
            request_rate=request_rate, kv=kv, load_average=load_average,
        )


def poisson_arrivals(count: int, rate: float | None, seed: int) -> list[float]:
    """Seconds after the level's start at which each request becomes ready: all at 0 without a
    rate, else the running sum of exponential gaps with mean 1/rate (the first at 0)."""
    if rate is None:
        return [0.0] * count
    rng = random.Random(seed)
    times, t = [], 0.0
    for _ in range(count):
        times.append(t)
        t += rng.expovariate(rate)
    return times
