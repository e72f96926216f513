"""Hostile inputs against a real server process: each gets the 4xx it deserves, in its API's
shape and naming the field, and the server stays healthy after every one of them.

The categories found by hand before any limit existed (a top_k past 2^63 and an out-of-vocab
stop id killed the engine; lone surrogates, 100,000-deep JSON, n=10^6 and 20 MB bodies gave
500s or stalls), plus their neighbours. Runs on the tiny random model: the point is the
server, not the text.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pagedserve.bench.server_process import ServerProcess

pytestmark = pytest.mark.slow

MODEL = "tiny"
ARGS = ["--served-model-name", MODEL, "--dtype", "float32", "--kv-cache-memory", "4MiB",
        "--max-model-len", "256", "--max-num-seqs", "8", "--max-request-body", "1MiB",
        "--max-n", "16", "--max-json-depth", "32"]
OK = {"model": MODEL, "prompt": "hello", "max_tokens": 4}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
GEN = {"model": MODEL, "prompt": "hello", "stream": False, "options": {"num_predict": 4}}
OLLAMA_CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
               "stream": False, "options": {"num_predict": 4}}
BIG_INT = 2**64
DEEP = b"[" * 100_000 + b"]" * 100_000


@pytest.fixture(scope="module")
def server(tiny_llama_tokenized_dir):
    with ServerProcess(str(tiny_llama_tokenized_dir), ARGS) as proc:
        yield proc


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def raw(body: str) -> bytes:
    return body.encode()


# (route, body as a dict or raw bytes, status, the field the error must name or None)
CASES = [
    # numbers past every range the engine's tensors hold
    ("/v1/completions", {**OK, "top_k": BIG_INT}, 400, "top_k"),
    ("/v1/completions", {**OK, "top_k": 2**63 - 1}, 200, None),  # means: no limit
    ("/v1/completions", {**OK, "seed": BIG_INT}, 400, "seed"),
    ("/v1/completions", {**OK, "seed": -(2**63) - 1}, 400, "seed"),
    ("/v1/completions", {**OK, "seed": BIG_INT - 1, "n": 2}, 200, None),
    ("/v1/completions", {**OK, "max_tokens": 2**70}, 400, "max_tokens"),
    ("/v1/completions", {**OK, "max_tokens": 10**6}, 400, "prompt"),  # cannot fit
    ("/v1/completions", raw('{"prompt": "hi", "max_tokens": ' + "9" * 5000 + "}"), 400, None),
    ("/v1/completions", {**OK, "logprobs": 10**9}, 400, "logprobs"),
    ("/v1/completions", {**OK, "min_tokens": BIG_INT}, 400, "min_tokens"),
    ("/v1/completions", {**OK, "frequency_penalty": 1e308}, 400, "frequency_penalty"),
    ("/v1/completions", raw('{"prompt": "hi", "temperature": Infinity}'), 400, "temperature"),
    ("/v1/completions", raw('{"prompt": "hi", "top_p": NaN}'), 400, "top_p"),
    ("/v1/completions", {**OK, "temperature": 1e-30}, 200, None),
    ("/v1/completions", {**OK, "top_p": 5e-324, "logprobs": 0, "echo": True}, 200, None),
    ("/v1/completions", {**OK, "repetition_penalty": 1e-300}, 200, None),
    ("/v1/chat/completions", {**CHAT, "top_k": BIG_INT}, 400, "top_k"),
    ("/api/generate", {**GEN, "options": {"top_k": BIG_INT}}, 400, None),
    ("/api/chat", {**OLLAMA_CHAT, "options": {"seed": BIG_INT}}, 400, None),
    # token ids against the vocabulary (512)
    ("/v1/completions", {**OK, "stop_token_ids": [512]}, 400, "stop_token_ids"),
    ("/v1/completions", {**OK, "stop_token_ids": [-1]}, 400, "stop_token_ids"),
    ("/v1/completions", {**OK, "stop_token_ids": [BIG_INT]}, 400, "stop_token_ids"),
    ("/v1/completions", {**OK, "stop_token_ids": list(range(300))}, 400, "stop_token_ids"),
    ("/v1/completions", {**OK, "prompt": [1, 2, 512]}, 400, "prompt"),
    ("/v1/completions", {**OK, "prompt": [[]]}, 400, "prompt"),
    ("/v1/completions", {**OK, "prompt": [1.5, 2]}, 400, "prompt"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
    ("/detokenize", {"tokens": [10**30]}, 400, "tokens"),
    # text that is not valid Unicode, wherever it hides
    ("/v1/completions", raw('{"prompt": "\\ud800"}'), 400, "prompt"),
    ("/v1/completions", raw('{"model": "\\ud800x", "prompt": "hi"}'), 400, "model"),
    ("/v1/completions", raw('{"prompt": "hi", "stop": ["\\udc00"]}'), 400, "stop.0"),
    ("/v1/chat/completions", raw('{"messages": [{"role": "user", "content": "\\udfff"}]}'),
     400, "messages.0.content"),
    ("/api/chat", raw('{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}'),
     400, None),
    ("/api/generate", raw('{"model": "tiny", "prompt": "a", "system": "\\ud800"}'), 400, None),
    ("/api/show", raw('{"model": "\\ud800"}'), 400, None),
    ("/tokenize", raw('{"prompt": "a\\ud800"}'), 400, "prompt"),
    # shapes: depth, size, counts
    ("/v1/completions", DEEP, 400, None),
    ("/api/chat", DEEP, 400, None),
    ("/v1/chat/completions", {**CHAT, "x": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]
                                                        ]]]]]]]]]]]]]]}, 400, None),
    ("/v1/completions", {**OK, "n": 10**6}, 400, "n"),
    ("/v1/completions", {**OK, "n": 17}, 400, "n"),
    ("/v1/completions", {**OK, "n": -1}, 400, "n"),
    ("/v1/completions", {**OK, "prompt": ["hi"] * 17}, 400, "n"),
    ("/v1/completions", {**OK, "best_of": 10**6}, 400, "best_of"),
    ("/v1/completions", {**OK, "n": 2, "best_of": 2}, 200, None),
    ("/v1/chat/completions", {**CHAT, "n": 10**6}, 400, "n"),
    ("/v1/completions", {**OK, "stop": ["x"] * 17}, 400, "stop"),
    ("/v1/completions", {**OK, "stop": ["x" * 300]}, 400, "stop"),
    ("/v1/completions", {**OK, "prompt": "word " * 120_000}, 400, "prompt"),  # 600k chars
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "a " * 300_000}]},
     400, "messages"),
    ("/api/generate", {**GEN, "prompt": "word " * 120_000}, 400, None),
    ("/tokenize", {"prompt": "word " * 120_000}, 400, "prompt"),
    ("/v1/completions", {**OK, "user": "x" * (2 << 20)}, 413, None),  # 2 MiB, unused field
    ("/api/generate", {**GEN, "images": ["A" * (2 << 20)]}, 413, None),
    # not what a body should be
    ("/v1/completions", raw('"just a string"'), 400, None),
    ("/v1/completions", raw("null"), 400, None),
    ("/v1/completions", b"\xff\xfe{}", 400, None),
    ("/api/generate", raw("[1, 2, 3]"), 400, None),
    ("/api/generate", {**GEN, "options": {"stop": 5}}, 400, None),
    ("/api/chat", {**OLLAMA_CHAT, "options": {"num_ctx": 10**9}}, 200, None),  # ignored
    ("/api/generate", {**GEN, "keep_alive": [1, 2]}, 400, None),
]


def post(http: httpx.Client, route: str, body) -> httpx.Response:
    if isinstance(body, bytes):
        return http.post(route, content=body, headers={"Content-Type": "application/json"})
    return http.post(route, json=body)


def check_alive(http: httpx.Client) -> None:
    assert http.get("/health").status_code == 200
    values = {s.name: s.value for f in text_string_to_metric_families(http.get("/metrics").text)
              for s in f.samples}
    assert values["pagedserve:engine_healthy"] == 1


@pytest.mark.parametrize(("route", "body", "status", "field"), CASES,
                         ids=[f"{i}-{c[0]}" for i, c in enumerate(CASES)])
def test_hostile_input_gets_its_status_and_the_server_stays_healthy(http, route, body, status,
                                                                    field):
    resp = post(http, route, body)
    assert resp.status_code == status, resp.text[:500]
    if status != 200:
        error = resp.json()["error"]
        if route.startswith("/api/"):
            assert isinstance(error, str) and error
        else:
            assert set(error) == {"message", "type", "param", "code"}
            if field is not None:
                assert error["param"] == field, error
                assert error["message"].startswith(field) or "context length" in \
                    error["message"], error
    check_alive(http)


def test_a_chunked_body_over_the_limit_is_cut_off(http):
    def chunks():
        for _ in range(20):
            yield b" " * (100 << 10)  # 2 MB in all, no Content-Length
    resp = http.post("/v1/completions", content=chunks(),
                     headers={"Content-Type": "application/json"})
    assert resp.status_code == 413
    assert resp.json()["error"]["code"] == "request_too_large"
    check_alive(http)


def test_unknown_paths_and_methods_stay_4xx(http):
    assert http.get("/v1/models/%ED%A0%80").status_code == 404
    assert http.get("/v1/models/" + "x" * 5000).status_code == 404
    assert http.put("/v1/completions", json=OK).status_code == 405
    assert http.post("/api/push", json={"model": "x"}).status_code == 404
    check_alive(http)


def test_after_everything_the_engine_is_empty(http):
    deadline = time.monotonic() + 30
    while True:
        values = {s.name: s.value
                  for f in text_string_to_metric_families(http.get("/metrics").text)
                  for s in f.samples}
        if (values["pagedserve:num_requests_running"] == 0
                and values["pagedserve:num_requests_waiting"] == 0
                and values["pagedserve:kv_cache_usage_perc"] == 0):
            break
        assert time.monotonic() < deadline, values
        time.sleep(0.1)


def test_a_long_text_is_tokenized_off_the_event_loop(tiny_llama_tokenized_dir):
    """/health answers promptly while a long text is tokenized (the tokenizer releases the
    GIL in its worker thread)."""
    args = [*ARGS[:-6], "--max-prompt-chars", "100000000", "--max-request-body", "16MiB"]
    with ServerProcess(str(tiny_llama_tokenized_dir), args) as proc, \
            httpx.Client(base_url=proc.url, timeout=120) as http:
        body = json.dumps({"prompt": "the cat sat on the mat. " * 300_000}).encode()  # 7 MB
        timings: dict[str, float] = {}

        def tokenize() -> None:
            start = time.monotonic()
            resp = http.post("/tokenize", content=body,
                             headers={"Content-Type": "application/json"})
            assert resp.status_code == 200 and resp.json()["count"] > 1_000_000
            timings["tokenize"] = time.monotonic() - start

        worker = threading.Thread(target=tokenize)
        worker.start()
        slowest = 0.0
        while worker.is_alive():
            start = time.monotonic()
            assert http.get("/health").status_code == 200
            slowest = max(slowest, time.monotonic() - start)
            time.sleep(0.05)
        worker.join()
        assert timings["tokenize"] > 1.0  # long enough to have blocked everyone before
        assert slowest < timings["tokenize"] / 3, (slowest, timings)


def test_max_queue_counts_only_what_cannot_start(tiny_llama_tokenized_dir):
    """A burst of 40 with 8 seats and --max-queue 2: the 8 that get a seat and the 2 that
    queue are admitted, not just 2 (the burst used to count as waiting before the engine saw
    it); the others get 503 with Retry-After."""
    args = [*ARGS, "--max-queue", "2"]
    body = {**OK, "max_tokens": 200, "ignore_eos": True}

    async def burst(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=120,
                                     limits=httpx.Limits(max_connections=64)) as client:
            return await asyncio.gather(*(client.post("/v1/completions", json=body)
                                          for _ in range(40)))

    with ServerProcess(str(tiny_llama_tokenized_dir), args) as proc:
        responses = asyncio.run(burst(proc.url))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503}
    assert statuses.count(200) >= 10, statuses
    assert statuses.count(503) >= 1, statuses
    for r in responses:
        if r.status_code == 503:
            assert int(r.headers["Retry-After"]) >= 1
            assert r.json()["error"]["code"] == "server_busy"
