"""Fault injection through HTTP: a request the engine fails on gets a 5xx in its API's shape
while the others finish; a dead engine loop turns every request away with 503 + Retry-After,
says so on /health and /metrics, and makes the server exit with status 1."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_thread import ServerThread

from pagedserve.config import EngineConfig
from pagedserve.engine import Engine
from pagedserve.loader import load_model
from pagedserve.server import http_server
from pagedserve.worker.model_runner import kv_bytes_per_token

POISON = 299  # a prompt holding this token id makes the model fail (see poison_the_runner)


@pytest.fixture(scope="module")
def tiny(tiny_llama_tokenized_dir):
    return load_model(tiny_llama_tokenized_dir)


def make_engine(loaded) -> Engine:
    per_block = kv_bytes_per_token(loaded.config, "float32") * 16
    return Engine.from_model(loaded, EngineConfig(kv_cache_memory=64 * per_block,
                                                  dtype="float32"))


def poison_the_runner(engine: Engine) -> None:
    launch = engine.runner.launch

    def faulty(scheduled):
        if any(POISON in s.request.prompt_token_ids for s in scheduled):
            raise RuntimeError("injected fault")
        return launch(scheduled)

    engine.runner.launch = faulty


def metric(url: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for sample in family.samples:
            if sample.name == f"pagedserve:{name}" and labels.items() <= sample.labels.items():
                return sample.value
    raise AssertionError(f"no {name} {labels} in /metrics")


def sse_events(resp: httpx.Response) -> list:
    return [json.loads(line[6:]) for line in resp.iter_lines()
            if line.startswith("data: ") and line != "data: [DONE]"]


def test_a_failing_request_gets_a_5xx_and_the_others_finish(tiny):
    engine = make_engine(tiny)
    poison_the_runner(engine)
    good = {"model": "tiny", "prompt": [5, 6, 7, 8], "max_tokens": 40, "ignore_eos": True,
            "temperature": 0}
    bad = {**good, "prompt": [5, 6, POISON]}
    with ServerThread(engine) as server, httpx.Client(base_url=server.url, timeout=60) as http:
        results: dict[str, object] = {}

        def good_stream(i: int) -> None:
            with http.stream("POST", "/v1/completions", json={**good, "stream": True}) as resp:
                results[f"good{i}"] = (resp.status_code, sse_events(resp))

        threads = [threading.Thread(target=good_stream, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        failed = http.post("/v1/completions", json=bad)
        with http.stream("POST", "/v1/completions", json={**bad, "stream": True}) as resp:
            streamed = (resp.status_code, sse_events(resp))
        for t in threads:
            t.join(60)

        assert failed.status_code == 500
        error = failed.json()["error"]
        assert error["code"] == "engine_error" and "injected fault" in error["message"]
        assert streamed[0] == 200 and "injected fault" in streamed[1][-1]["error"]["message"]
        for i in range(3):
            status, events = results[f"good{i}"]
            assert status == 200
            assert events[-1]["choices"][0]["finish_reason"] == "length"
            assert "".join(e["choices"][0]["text"] for e in events)
        assert http.get("/health").status_code == 200
        assert metric(server.url, "engine_healthy") == 1
        assert metric(server.url, "request_success_total", finished_reason="error") == 2
        assert metric(server.url, "request_success_total", finished_reason="length") == 3
        deadline = time.monotonic() + 10
        while not engine.kv.all_free():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        engine.check_integrity()


def test_ollama_gets_its_error_shape(tiny):
    engine = make_engine(tiny)
    poison_the_runner(engine)
    poisoned_text = engine.tokenizer.decode([POISON], skip_special_tokens=False)
    assert POISON in engine.tokenizer.encode(poisoned_text)
    body = {"model": "tiny", "prompt": poisoned_text, "raw": True, "stream": False}
    with ServerThread(engine) as server, httpx.Client(base_url=server.url, timeout=60) as http:
        resp = http.post("/api/generate", json=body)
        assert resp.status_code == 500
        assert set(resp.json()) == {"error"} and "injected fault" in resp.json()["error"]
        lines = [json.loads(line) for line in
                 http.post("/api/generate", json={**body, "stream": True}).text.splitlines()]
        assert "injected fault" in lines[-1]["error"]
        assert http.post("/api/generate", json={**body, "prompt": "hello",
                                                 "options": {"num_predict": 3}}).status_code == 200


def test_a_dead_engine_loop_fails_everything_and_the_server_exits_1(tiny, monkeypatch):
    monkeypatch.setattr(http_server, "DEAD_ENGINE_GRACE_S", 5.0)
    engine = make_engine(tiny)
    long = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 400, "ignore_eos": True,
            "stream": True}
    with ServerThread(engine) as server, httpx.Client(base_url=server.url, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json=long) as resp:
            lines = resp.iter_lines()
            assert next(lines).startswith("data: ")  # the stream is under way

            def broken_schedule():
                raise RuntimeError("scheduler bug")

            engine.scheduler.schedule = broken_schedule
            rest = [json.loads(line[6:]) for line in lines
                    if line.startswith("data: ") and line != "data: [DONE]"]
        assert "engine" in rest[-1]["error"]["message"]

        openai = http.post("/v1/completions", json={**long, "stream": False})
        assert openai.status_code == 503 and int(openai.headers["Retry-After"]) >= 1
        assert openai.json()["error"]["code"] == "engine_dead"
        ollama = http.post("/api/chat", json={"model": "tiny",
                                              "messages": [{"role": "user", "content": "hi"}]})
        assert ollama.status_code == 503 and set(ollama.json()) == {"error"}
        assert http.get("/health").status_code == 503
        assert metric(server.url, "engine_healthy") == 0
        assert server.wait_stopped(30) == 1
