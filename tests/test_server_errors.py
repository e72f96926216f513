"""Error answers over raw HTTP: status, body shape and message, and the server serves on after.

One server with an API key, one sequence per batch and a queue of one, so that 401 and 503 can
be provoked alongside the 400s and 404s.
"""

from __future__ import annotations

import time

import httpx
import pytest

from pagedserve.bench.server_process import ServerProcess

pytestmark = pytest.mark.slow

MODEL = "smollm2:135m"
KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
SERVER_ARGS = ["--served-model-name", MODEL, "--kv-cache-memory", "64MiB",
               "--max-model-len", "512", "--max-num-seqs", "1", "--max-queue", "1",
               "--api-key", KEY]
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
COMPLETION = {"model": MODEL, "prompt": "Hello", "max_tokens": 4}


@pytest.fixture(scope="module")
def server(smollm_gguf):
    with ServerProcess(str(smollm_gguf), SERVER_ARGS) as proc:
        yield proc


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as client:
        yield client


def openai_error(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    return error


def ollama_error(resp: httpx.Response, status: int) -> str:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and isinstance(body["error"], str)
    return body["error"]


# -- 401 ----------------------------------------------------------------------------------------


def test_api_key_required_on_v1_and_api(server):
    error = openai_error(httpx.get(f"{server.url}/v1/models"), 401)
    assert error["type"] == "authentication_error"
    openai_error(httpx.get(f"{server.url}/v1/models",
                           headers={"Authorization": "Bearer wrong"}), 401)
    ollama_error(httpx.post(f"{server.url}/api/generate", json={"model": MODEL}), 401)
    ollama_error(httpx.get(f"{server.url}/api/tags"), 401)


def test_health_and_metrics_stay_open(server):
    assert httpx.get(f"{server.url}/health").status_code == 200
    metrics = httpx.get(f"{server.url}/metrics")
    assert metrics.status_code == 200
    assert "pagedserve:num_requests_running" in metrics.text


def test_api_key_accepted(http):
    assert http.get("/v1/models").status_code == 200
    assert http.get("/api/tags").status_code == 200


# -- 400 ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
def test_invalid_json(http, route):
    resp = http.post(route, content=b"{not json", headers={"Content-Type": "application/json"})
    error = openai_error(resp, 400)
    assert error["type"] == "invalid_request_error"
    assert "JSON" in error["message"]


def test_invalid_json_ollama(http):
    message = ollama_error(http.post("/api/chat", content=b"[1, 2"), 400)
    assert "JSON" in message


@pytest.mark.parametrize(("body", "field"), [
    ({**CHAT, "temperature": "hot"}, "temperature"),
    ({**CHAT, "temperature": -0.5}, "temperature"),
    ({**CHAT, "top_p": 1.5}, "top_p"),
    ({**CHAT, "max_tokens": 0}, "max_tokens"),
    ({**CHAT, "max_completion_tokens": -3}, "max_completion_tokens"),
    ({**CHAT, "presence_penalty": 3}, "presence_penalty"),
    ({**CHAT, "n": 0}, "n"),
    ({**CHAT, "logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    ({**CHAT, "seed": "abc"}, "seed"),
    ({**CHAT, "stop": 5}, "stop"),
    ({**CHAT, "messages": []}, "messages"),
    ({"model": MODEL}, "messages"),
    ({**CHAT, "messages": [{"role": "wizard", "content": "Hi"}]}, "messages"),
    ({**CHAT, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:,"}}]}]}, "messages"),
])
def test_chat_bad_field_names_the_field(http, body, field):
    error = openai_error(http.post("/v1/chat/completions", json=body), 400)
    assert error["message"].startswith(field), error
    assert error["param"].startswith(field)


@pytest.mark.parametrize(("body", "field"), [
    ({**COMPLETION, "logprobs": 21}, "logprobs"),
    ({**COMPLETION, "top_k": -5}, "top_k"),
    ({**COMPLETION, "min_p": 2}, "min_p"),
    ({**COMPLETION, "repetition_penalty": 0}, "repetition_penalty"),
    ({**COMPLETION, "min_tokens": 10}, "min_tokens"),
    ({**COMPLETION, "prompt": []}, "prompt"),
    ({**COMPLETION, "prompt": [10**9]}, "prompt"),
    ({"model": MODEL}, "prompt"),
])
def test_completion_bad_field_names_the_field(http, body, field):
    error = openai_error(http.post("/v1/completions", json=body), 400)
    assert error["message"].startswith(field), error


def test_body_must_be_an_object(http):
    openai_error(http.post("/v1/completions", json=[1, 2, 3]), 400)


def test_context_too_long(http):
    resp = http.post("/v1/completions", json={**COMPLETION, "prompt": "word " * 600})
    error = openai_error(resp, 400)
    assert "maximum context length is 512 tokens" in error["message"]
    assert "input tokens" in error["message"]
    assert error["code"] == "context_length_exceeded"
    assert error["param"] == "prompt"
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "word " * 600}]}
    assert openai_error(http.post("/v1/chat/completions", json=chat), 400)["param"] == "messages"
    # the prompt fits but prompt + max_tokens does not
    resp = http.post("/v1/completions", json={**COMPLETION, "prompt": "word " * 200,
                                              "max_tokens": 400})
    assert "maximum context length is 512 tokens" in openai_error(resp, 400)["message"]


def test_context_too_long_ollama(http):
    resp = http.post("/api/generate", json={"model": MODEL, "prompt": "word " * 600,
                                            "raw": True, "stream": False})
    assert "maximum context length" in ollama_error(resp, 400)


def test_ollama_bad_option_types(http):
    resp = http.post("/api/generate", json={"model": MODEL, "prompt": "Hi",
                                            "options": {"temperature": "warm"}})
    assert "temperature" in ollama_error(resp, 400)
    resp = http.post("/api/chat", json={"model": MODEL, "messages": "Hi"})
    assert "messages" in ollama_error(resp, 400)
    resp = http.post("/api/generate", json={"prompt": "Hi"})
    assert ollama_error(resp, 400) == "model is required"


# -- 404 / 405 ----------------------------------------------------------------------------------


def test_unknown_model(http):
    error = openai_error(http.post("/v1/chat/completions", json={**CHAT, "model": "gpt-9"}),
                         404)
    assert error["code"] == "model_not_found" and error["param"] == "model"
    message = ollama_error(http.post("/api/chat", json={**CHAT, "model": "llama9"}), 404)
    assert message == 'model "llama9" not found, try pulling it first'
    ollama_error(http.post("/api/show", json={"model": "llama9"}), 404)


def test_unknown_route_and_method(http):
    openai_error(http.get("/v1/nothing"), 404)
    ollama_error(http.get("/api/nothing"), 404)
    openai_error(http.get("/v1/completions"), 405)


# -- 503 ----------------------------------------------------------------------------------------


def _long_stream(http: httpx.Client, route: str, body: dict):
    return http.stream("POST", route, json={**body, "stream": True})


def _waiting(http: httpx.Client) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith("pagedserve:num_requests_waiting{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no num_requests_waiting gauge")


def test_queue_full_is_a_503_with_retry_after(http):
    long = {**COMPLETION, "max_tokens": 400, "ignore_eos": True}
    with _long_stream(http, "/v1/completions", long) as running, \
            _long_stream(http, "/v1/completions", long) as waiting:
        assert running.status_code == waiting.status_code == 200
        deadline = time.monotonic() + 30
        while _waiting(http) < 1:
            assert time.monotonic() < deadline, "the second request never queued"
            time.sleep(0.05)
        resp = http.post("/v1/completions", json=COMPLETION)
        error = openai_error(resp, 503)
        assert int(resp.headers["Retry-After"]) >= 1
        resp = http.post("/api/generate", json={"model": MODEL, "prompt": "Hi"})
        assert "busy" in ollama_error(resp, 503)
        assert "retry" in error["message"]
    # both streams were closed: their requests are aborted and the queue drains
    deadline = time.monotonic() + 30
    while _waiting(http) > 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_server_still_serves(http):
    reply = http.post("/v1/chat/completions", json=CHAT)
    assert reply.status_code == 200
    assert reply.json()["choices"][0]["message"]["content"]
    reply = http.post("/api/generate", json={"model": MODEL, "prompt": "Hi", "stream": False,
                                             "options": {"num_predict": 4}})
    assert reply.status_code == 200 and reply.json()["done"] is True
