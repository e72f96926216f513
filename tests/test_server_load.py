"""Continuous batching seen from outside: concurrent streams progress together, and a client
that goes away takes its request (and every KV block it held) with it."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pagedserve.bench.server_process import ServerProcess

pytestmark = pytest.mark.slow

MODEL = "smollm2:135m"
SERVER_ARGS = ["--served-model-name", MODEL, "--kv-cache-memory", "256MiB",
               "--max-model-len", "1024", "--max-num-seqs", "64"]


@pytest.fixture(scope="module")
def server(smollm_gguf):
    with ServerProcess(str(smollm_gguf), SERVER_ARGS) as proc:
        yield proc


def scrape(url: str) -> dict[str, float]:
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for sample in family.samples:
            key = sample.name
            if "finished_reason" in sample.labels:
                key += "{" + sample.labels["finished_reason"] + "}"
            values[key] = values.get(key, 0.0) + sample.value
    return values


def wait_idle(url: str, timeout: float = 30.0) -> dict[str, float]:
    """Metrics once nothing runs or waits and the KV cache is empty."""
    deadline = time.monotonic() + timeout
    while True:
        m = scrape(url)
        if (m["pagedserve:num_requests_running"] == 0
                and m["pagedserve:num_requests_waiting"] == 0
                and m["pagedserve:kv_cache_usage_perc"] == 0
                and m["pagedserve:kv_used_tokens"] == 0):
            return m
        assert time.monotonic() < deadline, f"server not idle: {m}"
        time.sleep(0.05)


def test_32_concurrent_streams_progress_together(server):
    n, max_tokens = 32, 12

    async def one(client: httpx.AsyncClient, i: int) -> tuple[float, float, int]:
        body = {"model": MODEL, "prompt": f"Story number {i}:", "max_tokens": max_tokens,
                "temperature": 0.7, "seed": i, "ignore_eos": True, "stream": True}
        first = None
        tokens = 0
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if event["choices"] and event["choices"][0]["text"]:
                    tokens += 1
                    first = first or time.monotonic()
        return first, time.monotonic(), tokens

    async def run() -> list[tuple[float, float, int]]:
        limits = httpx.Limits(max_connections=n + 4)
        async with httpx.AsyncClient(base_url=server.url, timeout=300, limits=limits) as client:
            return await asyncio.gather(*(one(client, i) for i in range(n)))

    results = asyncio.run(run())
    firsts = [r[0] for r in results]
    ends = [r[1] for r in results]
    assert all(f is not None for f in firsts)
    # every request, the last one submitted included, streams before any request finishes
    assert max(firsts) < min(ends)
    assert all(0 < r[2] <= max_tokens for r in results)
    m = wait_idle(server.url)
    assert m["pagedserve:request_success_total{length}"] >= n


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/api/chat"])
def test_disconnect_mid_stream_aborts_and_frees_kv(server, route):
    before = wait_idle(server.url)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": 500, "stream": True, "ignore_eos": True,
            "options": {"num_predict": 500, "ignore_eos": True}}
    with httpx.Client(base_url=server.url, timeout=60) as client:
        with client.stream("POST", route, json=body) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            for _ in range(8):  # a few tokens in (SSE has a blank line after each event)
                next(lines)
            # the request holds KV blocks while it runs
            during = scrape(server.url)
            assert during["pagedserve:num_requests_running"] == 1
            assert during["pagedserve:kv_cache_usage_perc"] > 0
        # leaving the block closes the connection mid-stream
    after = wait_idle(server.url, timeout=10)
    generated = (after["pagedserve:generation_tokens_total"]
                 - before["pagedserve:generation_tokens_total"])
    assert generated < 500, "the request ran to the end instead of being aborted"
    aborted = (after["pagedserve:request_success_total{abort}"]
               - before["pagedserve:request_success_total{abort}"])
    assert aborted == 1


def test_disconnect_before_a_non_streamed_answer_aborts(server):
    before = wait_idle(server.url)
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 500,
            "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=body, timeout=1.5)
    after = wait_idle(server.url, timeout=10)
    generated = (after["pagedserve:generation_tokens_total"]
                 - before["pagedserve:generation_tokens_total"])
    assert 0 < generated < 500


def test_sigint_ends_open_streams_and_exits(smollm_gguf):
    import threading

    proc = ServerProcess(str(smollm_gguf), SERVER_ARGS).start()
    lines: list[dict] = []

    def read() -> None:
        body = {"model": MODEL, "prompt": "Tell me a story", "stream": True,
                "options": {"num_predict": 500, "ignore_eos": True}}
        with httpx.stream("POST", f"{proc.url}/api/generate", json=body, timeout=60) as resp:
            for line in resp.iter_lines():
                if line:
                    lines.append(json.loads(line))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        deadline = time.monotonic() + 30
        while len(lines) < 3:
            assert time.monotonic() < deadline, "no tokens streamed"
            time.sleep(0.05)
        start = time.monotonic()
        proc.stop(grace=15)
        reader.join(15)
        assert not reader.is_alive()
        assert time.monotonic() - start < 10
    finally:
        proc.stop()
    assert proc.proc.returncode == 0, proc.log_tail()
    assert lines[-1]["done"] is True and lines[-1]["done_reason"] == "abort"
    assert "Traceback" not in proc.log_tail()
