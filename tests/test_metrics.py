"""Prometheus metrics: the observer's bookkeeping on synthetic outputs (fast), then the true
counts of a real server after known traffic."""

from __future__ import annotations

import time
from dataclasses import dataclass

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pagedserve.metrics import ServerMetrics
from pagedserve.outputs import RequestMetrics, RequestOutput

MODEL = "smollm2:135m"

SERIES = [
    "num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "kv_cache_waste_perc",
    "kv_reserved_tokens", "kv_used_tokens", "prefix_cache_queries_total",
    "prefix_cache_hits_total", "num_preemptions_total", "prompt_tokens_total",
    "generation_tokens_total", "request_success_total",
    "time_to_first_token_seconds_count", "inter_token_latency_seconds_count",
    "e2e_request_latency_seconds_count", "request_queue_time_seconds_count",
    "time_per_output_token_seconds_count", "request_prefill_time_seconds_count",
    "request_decode_time_seconds_count", "request_inference_time_seconds_count",
    "request_prompt_tokens_count", "request_generation_tokens_count",
    "iteration_tokens_total_count", "engine_healthy", "http_requests_total",
    "constrained_requests_total", "grammar_cache_hits_total", "grammar_compile_seconds_count",
    "embedding_requests_total", "embedding_inputs_total", "embedding_tokens_total",
    "embedding_batches_total",
]


@dataclass
class FakeStats:
    num_running: int = 2
    num_waiting: int = 1
    kv_cache_usage: float = 0.25
    prefix_cache_queries: int = 100
    prefix_cache_hits: int = 40
    num_preemptions: int = 3
    kv_reserved_tokens: int = 64
    kv_used_tokens: int = 50
    kv_waste_perc: float = 28.0
    prompt_tokens_total: int = 120
    generation_tokens_total: int = 30
    constrained_requests_total: int = 5
    grammar_cache_hits_total: int = 4
    embedding_requests_total: int = 6
    embedding_inputs_total: int = 9
    embedding_tokens_total: int = 70
    embedding_batches_total: int = 2


@dataclass
class FakeStep:
    num_scheduled_tokens: int
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0
    num_preempted: int = 0
    duration: float = 0.01


def samples(text: str) -> dict[str, float]:
    """Sample values by name, with the finished_reason label folded into the name."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name.removeprefix("pagedserve:")
            if "finished_reason" in sample.labels:
                name += "{" + sample.labels["finished_reason"] + "}"
            if "le" in sample.labels:
                continue
            values[name] = values.get(name, 0.0) + sample.value
    return values


def test_gauges_and_counters_come_from_engine_stats():
    metrics = ServerMetrics("m", FakeStats)
    v = samples(metrics.render().decode())
    assert v["num_requests_running"] == 2
    assert v["num_requests_waiting"] == 1
    assert v["kv_cache_usage_perc"] == 0.25
    assert v["kv_cache_waste_perc"] == pytest.approx(14 / 64)  # a fraction, as usage is
    assert v["prefix_cache_queries_total"] == 100
    assert v["prefix_cache_hits_total"] == 40
    assert v["num_preemptions_total"] == 3
    assert v["prompt_tokens_total"] == 120
    assert v["generation_tokens_total"] == 30
    assert v["constrained_requests_total"] == 5
    assert v["grammar_cache_hits_total"] == 4
    assert (v["embedding_requests_total"], v["embedding_inputs_total"],
            v["embedding_tokens_total"], v["embedding_batches_total"]) == (6, 9, 70, 2)
    assert v["request_success_total{stop}"] == 0  # present before the first request ends


def test_every_series_is_labelled_with_the_model_name():
    metrics = ServerMetrics("smol", FakeStats)
    for family in text_string_to_metric_families(metrics.render().decode()):
        assert family.name.startswith("pagedserve:")
        for sample in family.samples:
            assert sample.labels["model_name"] == "smol"


def test_name_filter_renders_only_the_named_series():
    metrics = ServerMetrics("m", FakeStats)
    wanted = ["pagedserve:kv_used_tokens", "pagedserve:time_to_first_token_seconds_count"]
    families = {f.name: f for f in text_string_to_metric_families(metrics.render(wanted).decode())}
    assert set(families) == {"pagedserve:kv_used_tokens", "pagedserve:time_to_first_token_seconds"}
    assert families["pagedserve:kv_used_tokens"].samples[0].value == 50
    # a histogram asked for by one of its series gives that series only, not its buckets
    assert [s.name for s in families["pagedserve:time_to_first_token_seconds"].samples] == [
        "pagedserve:time_to_first_token_seconds_count"]
    assert metrics.render(["no_such_series"]) == b""
    assert len(metrics.render()) > 10 * len(metrics.render(wanted))


def test_observer_latencies_and_token_histograms():
    metrics = ServerMetrics("m", FakeStats)
    t0 = 1000.0
    m = RequestMetrics(arrival_time=t0, first_scheduled_time=t0 + 0.5)
    metrics.on_step(FakeStep(num_scheduled_tokens=7))
    # first token at +1.0, then one per 0.1 s, the last delta carrying two tokens
    m.first_token_time = m.last_token_time = t0 + 1.0
    metrics.on_output(RequestOutput("a", "x", [1], metrics=m))
    m.last_token_time = t0 + 1.1
    metrics.on_output(RequestOutput("a", "y", [2], metrics=m))
    m.last_token_time = t0 + 1.3
    m.finished_time = t0 + 1.3
    metrics.on_output(RequestOutput("a", "zz", [3, 4], finished=True, finish_reason="length",
                                    num_prompt_tokens=7, num_output_tokens=4, metrics=m))
    v = samples(metrics.render().decode())
    assert v["time_to_first_token_seconds_count"] == 1
    assert v["time_to_first_token_seconds_sum"] == pytest.approx(1.0)
    assert v["request_queue_time_seconds_sum"] == pytest.approx(0.5)
    assert v["inter_token_latency_seconds_count"] == 3
    assert v["inter_token_latency_seconds_sum"] == pytest.approx(0.3)
    assert v["e2e_request_latency_seconds_sum"] == pytest.approx(1.3)
    assert v["request_prefill_time_seconds_sum"] == pytest.approx(0.5)
    assert v["request_decode_time_seconds_sum"] == pytest.approx(0.3)
    assert v["request_inference_time_seconds_sum"] == pytest.approx(0.8)
    assert v["time_per_output_token_seconds_sum"] == pytest.approx(0.1)  # 0.3 s over 3 tokens
    assert v["request_prompt_tokens_sum"] == 7
    assert v["request_generation_tokens_sum"] == 4
    assert v["iteration_tokens_total_sum"] == 7
    assert v["request_success_total{length}"] == 1
    assert metrics._last_token_time == {}


def test_token_histograms_end_at_the_context_length():
    metrics = ServerMetrics("m", FakeStats, max_model_len=512)
    text = metrics.render().decode()
    buckets = [s.labels["le"] for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "pagedserve:request_prompt_tokens_bucket"]
    assert buckets == ["1.0", "2.0", "5.0", "10.0", "20.0", "50.0", "100.0", "200.0", "500.0",
                       "512.0", "+Inf"]


def test_abort_counts_and_forgets():
    metrics = ServerMetrics("m", FakeStats)
    m = RequestMetrics(arrival_time=0.0, first_scheduled_time=0.1)
    m.first_token_time = m.last_token_time = 0.2
    metrics.on_output(RequestOutput("a", "x", [1], metrics=m))
    metrics.on_output(RequestOutput("a", "", [], finished=True, finish_reason="abort",
                                    num_prompt_tokens=3, num_output_tokens=1, metrics=m))
    assert samples(metrics.render().decode())["request_success_total{abort}"] == 1
    assert metrics._last_token_time == {}


# -- a real server ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(smollm_gguf):
    from pagedserve.bench.server_process import ServerProcess

    args = ["--served-model-name", MODEL, "--kv-cache-memory", "64MiB", "--max-model-len", "512"]
    with ServerProcess(str(smollm_gguf), args) as proc:
        yield proc


@pytest.mark.slow
def test_metrics_after_known_traffic(server):
    url = server.url
    prompt = "The quick brown fox jumps over the lazy dog. " * 6  # several full KV blocks
    usages = []
    for _ in range(3):
        reply = httpx.post(f"{url}/v1/completions", timeout=120, json={
            "model": MODEL, "prompt": prompt, "max_tokens": 5, "temperature": 0,
            "ignore_eos": True}).json()
        usages.append(reply["usage"])
    streamed = httpx.post(f"{url}/api/generate", timeout=120, json={
        "model": MODEL, "prompt": "Hi", "stream": False,
        "options": {"num_predict": 3, "ignore_eos": True}}).json()
    time.sleep(0.2)  # the observer runs on the engine thread right after the last step
    text = httpx.get(f"{url}/metrics").text
    v = samples(text)
    narrowed = samples(httpx.get(f"{url}/metrics", params=[
        ("name[]", "pagedserve:generation_tokens_total"),
        ("name[]", "pagedserve:num_requests_running")]).text)
    assert narrowed == {"generation_tokens_total": v["generation_tokens_total"],
                        "num_requests_running": 0}
    for name in SERIES:
        assert name in v or any(k.startswith(name + "{") for k in v), name

    prompt_tokens = sum(u["prompt_tokens"] for u in usages) + streamed["prompt_eval_count"]
    assert v["request_success_total{length}"] == 4
    assert v["request_success_total{stop}"] == 0
    assert v["generation_tokens_total"] == 3 * 5 + 3
    assert v["prompt_tokens_total"] == prompt_tokens
    assert v["num_requests_running"] == v["num_requests_waiting"] == 0
    assert v["kv_cache_usage_perc"] == 0
    assert v["num_preemptions_total"] == 0
    # the same prompt three times: the second and third find its full blocks cached
    assert v["prefix_cache_queries_total"] >= prompt_tokens - 16
    assert v["prefix_cache_hits_total"] >= 2 * 16
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds",
                 "request_queue_time_seconds", "request_prompt_tokens",
                 "request_generation_tokens"):
        assert v[name + "_count"] == 4, name
    assert v["request_prompt_tokens_sum"] == prompt_tokens
    assert v["request_generation_tokens_sum"] == 18
    assert v["inter_token_latency_seconds_count"] == 3 * 4 + 2
    assert v["time_to_first_token_seconds_sum"] > 0
    # every scheduled token: uncached prompt tokens, plus each sampled token but the last
    assert v["iteration_tokens_total_sum"] == (prompt_tokens - v["prefix_cache_hits_total"]
                                               + 3 * 4 + 2)
    assert 'model_name="smollm2:135m"' in text
    http = {(s.labels["handler"], s.labels["status"]): s.value
            for f in text_string_to_metric_families(text) for s in f.samples
            if s.name == "pagedserve:http_requests_total"}
    assert http[("/v1/completions", "200")] == 3 and http[("/api/generate", "200")] == 1
