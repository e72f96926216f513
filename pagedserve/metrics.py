"""Every Prometheus series pagedserve exposes, in one place.

Names mirror vLLM's with the prefix ``pagedserve:`` so that dashboards, alerts and KEDA triggers
written for vLLM port by renaming ``vllm:`` to ``pagedserve:``; every series carries the label
``model_name``. Two sources feed them:

- gauges and cumulative counters are read from :meth:`Engine.stats` at scrape time (a custom
  collector), so they are never stale and cost nothing between scrapes;
- histograms and the per-reason success counter are observed from the engine thread through the
  :class:`EngineObserver` hooks ``on_step`` and ``on_output``;
- a serving process adds prometheus_client's ``process_*`` series (CPU seconds, resident and
  virtual memory, open file descriptors, start time) for each process of the server, labelled
  by ``process``: ``frontend-N`` (each HTTP front end), ``core`` (the engine core's own
  process) and, with ``--api-server-count`` above 1, ``supervisor``.

Each :class:`ServerMetrics` owns its own :class:`CollectorRegistry`, so several servers (or tests)
in one process never collide on the global registry.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from pagedserve.outputs import RequestOutput

if TYPE_CHECKING:
    from pagedserve.engine.messages import EngineStats, StepStats

logger = logging.getLogger(__name__)

PREFIX = "pagedserve:"
CONTENT_TYPE = CONTENT_TYPE_LATEST
FINISHED_REASONS = ("stop", "length", "abort", "error")

# Latency buckets in seconds: fine below a second (GPU decode, queueing on an idle server),
# long tail for CPU prefill and requests that wait.
_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                    0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
_REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0,
                    30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


def token_buckets(max_tokens: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to the context length, which is the last bucket: a count
    can never exceed it, so buckets beyond it would only be empty series."""
    buckets, base = [], 1
    while base < max_tokens:
        buckets += [b for b in (base, 2 * base, 5 * base) if b < max_tokens]
        base *= 10
    return (*buckets, max_tokens)


class _EngineStatsCollector(Collector):
    """Gauges and counters read from ``engine.stats()`` at each scrape."""

    def __init__(self, model_name: str, stats: Callable[[], EngineStats],
                 alive: Callable[[], bool]) -> None:
        self._model_name = model_name
        self._stats = stats
        self._alive = alive

    def collect(self) -> Iterator[Metric]:
        # Runs on the HTTP thread while the engine steps: Engine.stats reads only counters and
        # running totals, never a container the engine thread is changing.
        s = self._stats()
        labels = ["model_name"]
        value = [self._model_name]

        def gauge(name: str, doc: str, v: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(PREFIX + name, doc, labels=labels)
            family.add_metric(value, v)
            return family

        def counter(name: str, doc: str, v: float) -> CounterMetricFamily:
            family = CounterMetricFamily(PREFIX + name, doc, labels=labels)
            family.add_metric(value, v)
            return family

        yield gauge("engine_healthy",
                    "1 while the engine loop runs; 0 once it has died (the server then exits "
                    "for its supervisor to restart it, and the other series stop moving).",
                    1.0 if self._alive() else 0.0)
        yield gauge("num_requests_running", "Requests in the running batch.", s.num_running)
        yield gauge("num_requests_waiting", "Requests waiting to be scheduled.", s.num_waiting)
        yield gauge("kv_cache_usage_perc",
                    "Fraction of KV cache blocks in use by requests (1 = full).",
                    s.kv_cache_usage)
        yield gauge("kv_reserved_tokens",
                    "KV cache token slots held by requests (allocated blocks or static slots).",
                    s.kv_reserved_tokens)
        yield gauge("kv_used_tokens",
                    "KV cache token slots holding a computed token.", s.kv_used_tokens)
        reserved = s.kv_reserved_tokens
        yield gauge("kv_cache_waste_perc",
                    "Fraction of reserved KV cache token slots that hold no token, 0..1 like "
                    "kv_cache_usage_perc (paged: partly filled tail blocks; static: the unused "
                    "context of each slot).",
                    (reserved - s.kv_used_tokens) / reserved if reserved else 0.0)
        yield counter("prefix_cache_queries",
                      "Prompt tokens looked up in the prefix cache.", s.prefix_cache_queries)
        yield counter("prefix_cache_hits",
                      "Prompt tokens found in the prefix cache.", s.prefix_cache_hits)
        yield counter("num_preemptions", "Requests preempted to free KV cache.",
                      s.num_preemptions)
        yield counter("prompt_tokens", "Prompt tokens processed (prefill).",
                      s.prompt_tokens_total)
        yield counter("generation_tokens", "Tokens generated.", s.generation_tokens_total)
        yield counter("constrained_requests",
                      "Requests with structured outputs or forced tool calls (a grammar that compiled).",
                      s.constrained_requests_total)
        yield counter("grammar_cache_hits",
                      "Constrained requests whose grammar was already compiled (or refused).",
                      s.grammar_cache_hits_total)
        yield counter("embedding_requests",
                      "Embedding requests answered (/api/embed, /api/embeddings, "
                      "/v1/embeddings).", s.embedding_requests_total)
        yield counter("embedding_inputs", "Texts (or token-id lists) embedded.",
                      s.embedding_inputs_total)
        yield counter("embedding_tokens", "Tokens of the embedded inputs.",
                      s.embedding_tokens_total)
        yield counter("embedding_batches",
                      "Batches of embedding inputs the engine core ran, each between two "
                      "steps (concurrent requests share them).", s.embedding_batches_total)


@dataclass(slots=True)
class ServingProcesses:
    """Who this front end is and where the engine core runs: what ``process_*`` covers."""

    frontend_index: int = 0
    core_pid: int | None = None  # None: the core runs in this process


class _ProcessCollector(Collector):
    """prometheus_client's process series for each process of the server, one ``process``
    label value each. Several front ends (multiprocess mode) find each other through a pid file
    each writes into the shared metrics directory, so that a scrape answered by any of them
    reports all of them, each under its own label (not whichever process answered)."""

    def __init__(self, processes: ServingProcesses, multiprocess_dir: str | None) -> None:
        self._core_pid = processes.core_pid
        self._dir = Path(multiprocess_dir) if multiprocess_dir else None
        self._own = {f"frontend-{processes.frontend_index}": os.getpid()}
        if self._dir is not None:  # whole or absent for a reader: written aside, then renamed
            pid_file = self._dir / f"frontend-{processes.frontend_index}.pid"
            partial = pid_file.with_suffix(".pid.partial")
            partial.write_text(str(os.getpid()))
            os.replace(partial, pid_file)
        self._readers: dict[int, ProcessCollector] = {}

    def _processes(self) -> dict[str, int]:
        roles = dict(self._own)
        if self._dir is not None:
            for pid_file in self._dir.glob("frontend-*.pid"):
                try:
                    roles[pid_file.stem] = int(pid_file.read_text())
                except (OSError, ValueError):  # not there yet, or gone: it is not reported
                    continue
            roles["supervisor"] = os.getppid()
        if self._core_pid is not None:
            roles["core"] = self._core_pid
        return roles

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for role, pid in sorted(self._processes().items()):
            reader = self._readers.get(pid)
            if reader is None:
                reader = self._readers[pid] = ProcessCollector(pid=lambda pid=pid: pid,
                                                               registry=None)
            for metric in reader.collect():  # nothing for a process that has gone
                family = families.get(metric.name)
                if family is None:
                    family = families[metric.name] = Metric(metric.name, metric.documentation,
                                                            metric.type)
                for sample in metric.samples:
                    family.add_sample(sample.name, {**sample.labels, "process": role},
                                      sample.value)
        yield from families.values()


class ServerMetrics:
    """The server's Prometheus registry, and an engine observer that feeds its histograms.

    ``on_step`` and ``on_output`` run on the front end's event loop, as the core's outputs
    arrive. With several front ends (``--api-server-count``), each process writes its counters
    and histograms to ``multiprocess_dir`` (prometheus_client's multiprocess mode, switched on
    by ``PROMETHEUS_MULTIPROC_DIR`` before it is imported) and any of them answers a scrape
    with the sums over all of them; the engine's gauges come from each one's latest news of
    the core, which is the same core. ``processes`` adds the ``process_*`` series of this
    server's processes.
    """

    def __init__(self, model_name: str, stats: Callable[[], EngineStats],
                 alive: Callable[[], bool] = lambda: True, max_model_len: int = 131072,
                 multiprocess_dir: str | None = None,
                 processes: ServingProcesses | None = None) -> None:
        self.model_name = model_name
        engine_stats = _EngineStatsCollector(model_name, stats, alive)
        if multiprocess_dir is None:
            self.registry = CollectorRegistry(auto_describe=True)
            self.registry.register(engine_stats)
            self._exposed = self.registry
        else:  # the metrics below write to files; the exposition reads every process's
            from prometheus_client import multiprocess

            self.registry = CollectorRegistry()
            self._exposed = CollectorRegistry(auto_describe=True)
            multiprocess.MultiProcessCollector(self._exposed, path=multiprocess_dir)
            self._exposed.register(engine_stats)
        if processes is not None:  # a serving process, not an embedded engine or a test
            self._exposed.register(_ProcessCollector(processes, multiprocess_dir))
        labels = ["model_name"]

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(PREFIX + name, doc, labels, buckets=buckets, registry=self.registry)

        self.request_success = Counter(
            PREFIX + "request_success", "Finished requests, by finish reason.",
            ["model_name", "finished_reason"], registry=self.registry)
        for reason in FINISHED_REASONS:
            self.request_success.labels(model_name, reason)
        self.time_to_first_token = histogram(
            "time_to_first_token_seconds", "Time from arrival to the first output token.",
            _LATENCY_BUCKETS).labels(model_name)
        self.inter_token_latency = histogram(
            "inter_token_latency_seconds", "Time between consecutive output tokens.",
            _LATENCY_BUCKETS).labels(model_name)
        self.e2e_request_latency = histogram(
            "e2e_request_latency_seconds", "Time from arrival to the last output.",
            _REQUEST_BUCKETS).labels(model_name)
        self.request_queue_time = histogram(
            "request_queue_time_seconds", "Time from arrival to the first scheduling.",
            _LATENCY_BUCKETS).labels(model_name)
        self.time_per_output_token = histogram(
            "time_per_output_token_seconds",
            "Per finished request: decode time over its output tokens after the first.",
            _LATENCY_BUCKETS).labels(model_name)
        self.request_prefill_time = histogram(
            "request_prefill_time_seconds",
            "Per finished request: from its first scheduling to its first token.",
            _REQUEST_BUCKETS).labels(model_name)
        self.request_decode_time = histogram(
            "request_decode_time_seconds",
            "Per finished request: from its first token to its last.",
            _REQUEST_BUCKETS).labels(model_name)
        self.request_inference_time = histogram(
            "request_inference_time_seconds",
            "Per finished request: from its first scheduling to its last token.",
            _REQUEST_BUCKETS).labels(model_name)
        tokens = token_buckets(max_model_len)
        self.request_prompt_tokens = histogram(
            "request_prompt_tokens", "Prompt tokens per finished request.",
            tokens).labels(model_name)
        self.request_generation_tokens = histogram(
            "request_generation_tokens", "Generated tokens per finished request.",
            tokens).labels(model_name)
        self.iteration_tokens = histogram(
            "iteration_tokens_total", "Tokens scheduled per engine step (prompt + generation).",
            token_buckets(max(max_model_len, 8192))).labels(model_name)
        self.grammar_compile_time = histogram(
            "grammar_compile_seconds",
            "Time to compile one grammar (JSON schema, regex, choice, grammar, tool calls), in "
            "the compiler's thread.", _LATENCY_BUCKETS).labels(model_name)
        self.http_requests = Counter(
            PREFIX + "http_requests", "HTTP requests answered, by route and status code.",
            ["model_name", "handler", "status"], registry=self.registry)
        # request id -> time of its latest token, for the inter-token latency
        self._last_token_time: dict[str, float] = {}

    # -- EngineObserver ------------------------------------------------------------------------

    def on_step(self, stats: StepStats) -> None:
        if stats.num_scheduled_tokens:
            self.iteration_tokens.observe(stats.num_scheduled_tokens)

    def on_output(self, output: RequestOutput) -> None:
        m = output.metrics
        if m is not None and output.delta_token_ids and m.last_token_time is not None:
            self._observe_tokens(output.request_id, len(output.delta_token_ids), m)
        if output.finished:
            self._observe_finished(output)

    def forget(self, request_id: str) -> None:
        """Drop bookkeeping for a request that ended without a finished output."""
        self._last_token_time.pop(request_id, None)

    def render(self, names: Iterable[str] = ()) -> bytes:
        """The exposition; with ``names`` (full sample names, as Prometheus' ``name[]`` query
        parameter gives them) only the families that have them: a poller of a few gauges does
        not pay for rendering every histogram."""
        names = list(names)
        registry = self._exposed.restricted_registry(names) if names else self._exposed
        return generate_latest(registry)

    # -- helpers -------------------------------------------------------------------------------

    def _observe_tokens(self, request_id: str, num_tokens: int, m) -> None:
        previous = self._last_token_time.get(request_id)
        if previous is None:
            if m.first_token_time is not None:
                self.time_to_first_token.observe(m.first_token_time - m.arrival_time)
            if m.first_scheduled_time is not None:
                self.request_queue_time.observe(m.first_scheduled_time - m.arrival_time)
            # tokens after the first one in this delta arrived in the same step
            num_gaps = num_tokens - 1
            span = 0.0
        else:
            num_gaps = num_tokens
            span = m.last_token_time - previous
        for _ in range(num_gaps):
            self.inter_token_latency.observe(span / num_gaps)
        self._last_token_time[request_id] = m.last_token_time

    def _observe_finished(self, output: RequestOutput) -> None:
        self._last_token_time.pop(output.request_id, None)
        reason = output.finish_reason or "abort"
        self.request_success.labels(self.model_name, reason).inc()
        m = output.metrics
        if m is not None:
            end = m.finished_time or m.last_token_time
            if end is not None:
                self.e2e_request_latency.observe(end - m.arrival_time)
            self._observe_phases(m, output.num_output_tokens)
        self.request_prompt_tokens.observe(output.num_prompt_tokens)
        self.request_generation_tokens.observe(output.num_output_tokens)

    def _observe_phases(self, m, num_output_tokens: int) -> None:
        """Prefill, decode and inference time of a request that produced tokens."""
        first, last = m.first_token_time, m.last_token_time
        if first is None or last is None:
            return
        if m.first_scheduled_time is not None:
            self.request_prefill_time.observe(first - m.first_scheduled_time)
            self.request_inference_time.observe(last - m.first_scheduled_time)
        self.request_decode_time.observe(last - first)
        if num_output_tokens > 1:
            self.time_per_output_token.observe((last - first) / (num_output_tokens - 1))

    def observe_http(self, handler: str, status: int) -> None:
        self.http_requests.labels(self.model_name, handler, str(status)).inc()
