"""The Ollama API of a real `pagedserve serve` process, driven by the official `ollama` client."""

from __future__ import annotations

import json

import httpx
import ollama
import pytest

from pagedserve.bench.server_process import ServerProcess

pytestmark = pytest.mark.slow

MODEL = "smollm2:135m"
SERVER_ARGS = ["--served-model-name", MODEL, "--kv-cache-memory", "128MiB",
               "--max-model-len", "1024"]
OPTIONS = {"num_predict": 8, "temperature": 0, "seed": 3}


@pytest.fixture(scope="module")
def server(smollm_gguf):
    with ServerProcess(str(smollm_gguf), SERVER_ARGS) as proc:
        yield proc


@pytest.fixture(scope="module")
def client(server) -> ollama.Client:
    return ollama.Client(host=server.url, timeout=120)


def _check_final(reply, max_eval: int = 8) -> None:
    assert reply.done is True
    assert reply.done_reason in ("stop", "length")
    assert reply.prompt_eval_count > 0
    assert 1 <= reply.eval_count <= max_eval
    assert reply.total_duration >= reply.eval_duration > 0
    assert reply.prompt_eval_duration > 0
    assert reply.load_duration >= 0


def test_generate(client):
    reply = client.generate(model=MODEL, prompt="Why is the sky blue?", options=OPTIONS)
    assert reply.model == MODEL
    assert reply.response
    _check_final(reply)


def test_generate_streamed_matches_non_streamed(client):
    whole = client.generate(model=MODEL, prompt="Name three colours.", options=OPTIONS)
    chunks = list(client.generate(model=MODEL, prompt="Name three colours.", options=OPTIONS,
                                  stream=True))
    assert all(not c.done for c in chunks[:-1])
    _check_final(chunks[-1])
    assert "".join(c.response for c in chunks) == whole.response


def test_generate_raw_and_system(client):
    raw = client.generate(model=MODEL, prompt="1, 2, 3, 4,", raw=True,
                          options={**OPTIONS, "num_predict": 4, "ignore_eos": True})
    assert raw.eval_count == 4 and raw.done_reason == "length"
    plain = client.generate(model=MODEL, prompt="Hi", options=OPTIONS)
    with_system = client.generate(model=MODEL, prompt="Hi", system="Answer in French.",
                                  options=OPTIONS)
    assert with_system.prompt_eval_count != plain.prompt_eval_count


def test_generate_without_prompt_loads(client):
    reply = client.generate(model=MODEL)
    assert reply.done and reply.done_reason == "load"


def test_chat(client):
    reply = client.chat(model=MODEL, messages=[{"role": "user", "content": "Hello!"}],
                        options=OPTIONS)
    assert reply.message.role == "assistant"
    assert reply.message.content
    _check_final(reply)


def test_chat_streamed(client):
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "What is 2+2?"}]
    whole = client.chat(model=MODEL, messages=messages, options=OPTIONS)
    chunks = list(client.chat(model=MODEL, messages=messages, options=OPTIONS, stream=True))
    _check_final(chunks[-1])
    assert "".join(c.message.content for c in chunks) == whole.message.content


def test_num_predict_and_stop(client):
    reply = client.generate(model=MODEL, prompt="1, 2, 3, 4,", raw=True,
                            options={"num_predict": 12, "temperature": 0, "stop": [","]})
    assert reply.done_reason == "stop"
    assert "," not in reply.response


def test_list(client):
    models = client.list().models
    assert [m.model for m in models] == [MODEL]
    assert models[0].size > 50_000_000
    assert models[0].details.format == "gguf"
    assert models[0].details.quantization_level == "Q4_1"
    assert models[0].details.family == "llama"


def test_the_dtype_is_logged_and_shown(server):
    """The dtype `auto` chose: in the start-up log, /api/show, /api/ps and /v1/models."""
    from pagedserve.config import EngineConfig
    from pagedserve.worker.execution_plan import resolve_config_dtype

    dtype = resolve_config_dtype(EngineConfig())  # float32 where the CPU kernels run
    assert f"computing in {dtype} on cpu (dtype auto: " in server.log_path.read_text()
    show = httpx.post(f"{server.url}/api/show", json={"model": MODEL}).json()
    assert show["details"]["dtype"] == dtype
    assert httpx.get(f"{server.url}/api/ps").json()["models"][0]["details"]["dtype"] == dtype
    assert httpx.get(f"{server.url}/v1/models").json()["data"][0]["dtype"] == dtype


def test_show(client):
    info = client.show(MODEL)
    assert info.details.format == "gguf"
    assert "im_start" in info.template
    assert info.modelinfo["general.architecture"] == "llama"
    assert info.modelinfo["llama.context_length"] == 8192
    assert info.capabilities == ["completion", "tools"]  # tools: on any model


def test_ps(client):
    running = client.ps().models
    assert [m.model for m in running] == [MODEL]
    assert running[0].context_length == 1024
    assert running[0].size_vram == 0


def test_unknown_model(client):
    with pytest.raises(ollama.ResponseError) as info:
        client.generate(model="no-such-model", prompt="Hi")
    assert info.value.status_code == 404
    assert "not found" in info.value.error


def test_bad_option_names_the_option(server):
    resp = httpx.post(f"{server.url}/api/generate", json={
        "model": MODEL, "prompt": "Hi", "stream": False, "options": {"repeat_penalty": -1}})
    assert resp.status_code == 400
    assert resp.json()["error"].startswith("repeat_penalty")


def test_repeat_last_n_window(client, server):
    """Ollama's defaults penalize the last 64 tokens; -1 (whole context) and 0 (off) are
    accepted from the official client, and a window below -1 is refused naming the option."""
    for window in (-1, 0, 8):
        reply = client.generate(model=MODEL, prompt="Count: 1 1 1 1", options={
            **OPTIONS, "repeat_last_n": window, "repeat_penalty": 1.5})
        _check_final(reply)
    resp = httpx.post(f"{server.url}/api/generate", json={
        "model": MODEL, "prompt": "Hi", "stream": False, "options": {"repeat_last_n": -2}})
    assert resp.status_code == 400
    assert resp.json()["error"].startswith("repeat_last_n")


def test_version_and_root(server):
    assert httpx.get(f"{server.url}/api/version").json()["version"]
    assert httpx.get(f"{server.url}/").text == "Ollama is running"
    assert httpx.head(f"{server.url}/").status_code == 200


def test_stream_is_ndjson(server):
    with httpx.stream("POST", f"{server.url}/api/chat", json={
            "model": "SmolLM2-135M-Instruct.Q4_1", "messages": [{"role": "user", "content": "Hi"}],
            "options": OPTIONS}) as resp:
        assert resp.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in resp.iter_lines() if line]
    assert lines[-1]["done"] is True
    assert lines[-1]["model"] == "SmolLM2-135M-Instruct.Q4_1"  # echoed as asked
