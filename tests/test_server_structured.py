"""Structured outputs and tool calls over HTTP, on a tiny random model in a server thread:
whatever the weights say, a constrained answer matches; bad constraints are 400s naming the
field before anything is queued; tool calls come in each API's shape. The model's chat
template renders tools (the native path; tests/test_clients_*.py run the generic one)."""

from __future__ import annotations

import json
import logging
import shutil

import httpx
import jsonschema
import ollama
import openai
import pytest
from server_thread import ServerThread

from pagedserve.config import EngineConfig
from pagedserve.engine import Engine
from pagedserve.loader import load_model
from pagedserve.outputs import RequestOutput
from pagedserve.server.generation import Generation
from pagedserve.server.served_model import ServedModel

SMALL = {"type": "object",
         "properties": {"ok": {"type": "boolean"}, "level": {"enum": ["low", "high"]},
                        "n": {"type": "integer", "minimum": 0, "maximum": 9}},
         "required": ["ok", "level", "n"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"enum": ["Paris", "Oslo"]}, "days": {"type": "integer", "minimum": 1,
                                                       "maximum": 7}},
        "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {
        "utc": {"type": "boolean"}}, "required": ["utc"], "additionalProperties": False}}}
CHAT = [{"role": "user", "content": "What is the weather?"}]


# ChatML that shows the tools' names, in hermes' format: the tiny model's context (512) has
# no room for full schemas
TOOLS_CHATML = (
    "{% if tools %}<|im_start|>system\nTools:{% for t in tools %} {{ t.function.name }}"
    "{% endfor %}; call one as <tool_call>{json}</tool_call><|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def server(tiny_llama_tokenized_dir, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("tools") / "model"
    shutil.copytree(tiny_llama_tokenized_dir, model_dir)
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    (model_dir / "tokenizer_config.json").write_text(
        json.dumps({**config, "chat_template": TOOLS_CHATML}))
    loaded = load_model(model_dir)
    engine = Engine.from_model(loaded, EngineConfig(dtype="float32", kv_cache_memory=4 << 20))
    with ServerThread(engine) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=120)


def test_response_format_json_schema_and_json_object(client):
    for seed in range(3):
        reply = client.chat.completions.create(
            model="tiny", messages=CHAT, max_tokens=200, seed=seed, temperature=1.0,
            response_format={"type": "json_schema",
                             "json_schema": {"name": "small", "schema": SMALL, "strict": True}})
        assert reply.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(reply.choices[0].message.content), SMALL)
    reply = client.chat.completions.create(
        model="tiny", messages=CHAT, max_tokens=100, seed=1, temperature=1.0,
        response_format={"type": "json_object"})
    text = reply.choices[0].message.content
    assert text.startswith("{")  # random weights may not close it in 100 tokens
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


def test_structured_outputs_extra_on_both_routes(client):
    reply = client.completions.create(
        model="tiny", prompt="Answer:", max_tokens=20, temperature=1.0, seed=2,
        extra_body={"structured_outputs": {"choice": ["red", "green", "blue"]}})
    assert reply.choices[0].text in ("red", "green", "blue")
    assert reply.choices[0].finish_reason == "stop"
    reply = client.chat.completions.create(
        model="tiny", messages=CHAT, max_tokens=20, temperature=1.0, seed=3,
        extra_body={"structured_outputs": {"regex": "[0-9]{2}:[0-9]{2}"}})
    text = reply.choices[0].message.content
    assert len(text) == 5 and text[2] == ":" and text.replace(":", "").isdigit()
    chunks = list(client.chat.completions.create(
        model="tiny", messages=CHAT, max_tokens=200, temperature=1.0, seed=4, stream=True,
        extra_body={"structured_outputs": {"json": SMALL}}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), SMALL)


@pytest.mark.parametrize("body, field, words", [
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "nonsense"}}}}, "response_format", "nonsense"),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "not": {"required": ["a"]}}}}},
     "response_format", "not"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format", "schema is required"),
    ({"response_format": {"type": "xml"}}, "response_format", ""),
    ({"structured_outputs": {"regex": "(ab"}}, "structured_outputs", "regex"),
    ({"structured_outputs": {"grammar": "start: nothing_here"}}, "structured_outputs",
     "nothing_here"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs",
     "exactly one"),
    ({"structured_outputs": {"json_schema": {}}}, "structured_outputs", "json_schema"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs", "non-empty"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
     "structured_outputs", "send one"),
    ({"guided_json": {"type": "object"}}, "guided_json", "removed"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice", "'nope' is not in tools"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": [WEATHER], "tool_choice": "required",
      "response_format": {"type": "json_object"}}, "tool_choice", "cannot be combined"),
    ({"tools": [WEATHER, WEATHER]}, "tools", "unique"),
    ({"tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "not": {}}}}],
      "tool_choice": "required"}, "tools", "not"),
])
def test_bad_constraints_are_400s_naming_the_field_before_anything_is_queued(server, body,
                                                                             field, words):
    engine = server.engine
    before = engine.stats()
    resp = httpx.post(f"{server.url}/v1/chat/completions",
                      json={"model": "tiny", "messages": CHAT, "max_tokens": 5, **body})
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"].split(".")[0] == field, error
    assert error["message"].startswith(error["param"]), error
    assert words in error["message"]
    after = engine.stats()
    assert after.constrained_requests_total == before.constrained_requests_total
    assert after.prompt_tokens_total == before.prompt_tokens_total


@pytest.mark.parametrize("body, words", [
    ({"format": "xml"}, "format"),
    ({"format": {"type": "object", "properties": {"a": {"type": "integer", "not": {}}}}},
     "format: Unimplemented"),
])
def test_ollama_bad_formats_are_400s(server, body, words):
    resp = httpx.post(f"{server.url}/api/chat", json={"model": "tiny", "messages": CHAT,
                                                      "stream": False, **body})
    assert resp.status_code == 400 and words in resp.json()["error"], resp.text


def test_ollama_format_json_and_schema(server):
    client = ollama.Client(host=server.url, timeout=120)
    reply = client.generate(model="tiny", prompt="JSON please", format="json",
                            options={"num_predict": 200, "seed": 1})
    assert reply.response.startswith("{")  # random weights may not close it in 200 tokens
    if reply.done_reason == "stop":
        assert isinstance(json.loads(reply.response), dict)
    for stream in (False, True):
        reply = client.chat(model="tiny", messages=CHAT, format=SMALL, stream=stream,
                            options={"num_predict": 200, "seed": 2})
        if stream:
            reply = list(reply)
            text = "".join(c.message.content for c in reply)
        else:
            text = reply.message.content
        jsonschema.validate(json.loads(text), SMALL)


def _arguments(call) -> dict:
    return json.loads(call.function.arguments)


@pytest.mark.parametrize("stream", [False, True])
def test_required_and_named_tool_calls_validate(client, stream):
    params = WEATHER["function"]["parameters"]
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        kwargs = dict(model="tiny", messages=CHAT, max_tokens=300, temperature=1.0, seed=5,
                      tools=[WEATHER, TIME], tool_choice=choice, parallel_tool_calls=False)
        if not stream:
            reply = client.chat.completions.create(**kwargs)
            message, reason = reply.choices[0].message, reply.choices[0].finish_reason
            calls = [(c.id, c.function.name, _arguments(c)) for c in message.tool_calls]
        else:
            chunks = list(client.chat.completions.create(**kwargs, stream=True))
            reason = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
            calls = _assemble(chunks)
        assert reason == "tool_calls"
        assert len(calls) == 1
        call_id, name, arguments = calls[0]
        assert call_id.startswith("call_")
        if choice != "required":
            assert name == "get_weather"
        schema = {"get_weather": params, "get_time": TIME["function"]["parameters"]}[name]
        jsonschema.validate(arguments, schema)


def _assemble(chunks) -> list[tuple[str, str, dict]]:
    """Streamed tool-call deltas as OpenAI sends them: id and name once, then fragments."""
    calls: dict[int, list] = {}
    for chunk in chunks:
        for d in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            if d.id is not None:
                assert d.index not in calls and d.function.name
                calls[d.index] = [d.id, d.function.name, ""]
            else:
                assert d.function.name is None
            calls[d.index][2] += d.function.arguments or ""
    return [(i, n, json.loads(a)) for i, n, a in (calls[k] for k in sorted(calls))]


RECORDED = ('I will look it up.\n<tool_call>\n{"name": "get_weather", "arguments": '
            '{"city": "Oslo", "days": 2}}\n</tool_call>')


class _Recorded:
    """An engine stream that replays a recorded answer in small pieces."""

    def __init__(self, text: str) -> None:
        self.request_id, self.text, self.finished = "recorded", text, False

    def abort(self) -> None:
        self.finished = True

    async def __aiter__(self):
        pieces = [self.text[i:i + 5] for i in range(0, len(self.text), 5)]
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            yield RequestOutput("recorded", piece, [0], finished=last,
                                finish_reason="stop" if last else None, num_prompt_tokens=3,
                                num_output_tokens=i + 1)


@pytest.fixture
def recorded(monkeypatch):
    seen = {}

    async def start(self, prompts, params, renames=None, prompt_field="prompt"):
        seen["prompt"], seen["params"] = prompts[0], params[0]
        return Generation([_Recorded(RECORDED)])

    monkeypatch.setattr(ServedModel, "start", start)
    return seen


@pytest.mark.parametrize("stream", [False, True])
def test_auto_tool_choice_reads_hermes_calls(client, recorded, stream):
    kwargs = dict(model="tiny", messages=CHAT, tools=[WEATHER], max_tokens=50)
    if stream:
        chunks = list(client.chat.completions.create(**kwargs, stream=True))
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        calls = _assemble(chunks)
        reason = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
    else:
        reply = client.chat.completions.create(**kwargs)
        message = reply.choices[0].message
        content, reason = message.content, reply.choices[0].finish_reason
        calls = [(c.id, c.function.name, _arguments(c)) for c in message.tool_calls]
    assert content == "I will look it up.\n"
    assert [(n, a) for _, n, a in calls] == [("get_weather", {"city": "Oslo", "days": 2})]
    assert reason == "tool_calls"
    assert recorded["params"].constraint is None  # auto constrains nothing


@pytest.mark.parametrize("stream", [False, True])
def test_ollama_tools_come_back_whole_with_arguments_as_objects(server, recorded, stream):
    client = ollama.Client(host=server.url, timeout=60)
    messages = CHAT + [
        {"role": "assistant", "content": "",
         "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris",
                                                                            "days": 1}}}]},
        {"role": "tool", "content": "Sunny, 21 C", "tool_name": "get_weather"},
        {"role": "user", "content": "And in Oslo?"}]
    reply = client.chat(model="tiny", messages=messages, tools=[WEATHER], stream=stream)
    if stream:
        chunks = list(reply)
        calls = [c for chunk in chunks for c in (chunk.message.tool_calls or [])]
        content = "".join(chunk.message.content for chunk in chunks)
        assert chunks[-1].done
    else:
        calls, content = reply.message.tool_calls, reply.message.content
    assert content == "I will look it up.\n"
    assert [(c.function.name, dict(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Oslo", "days": 2})]
    assert "Sunny, 21 C" in recorded["prompt"]  # the tool's answer reached the template


def test_openai_tool_messages_reach_the_template(client, recorded):
    client.chat.completions.create(model="tiny", max_tokens=20, tools=[WEATHER], messages=CHAT + [
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 1}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Rain, 12 C"}])
    assert "<|im_start|>tool\nRain, 12 C<|im_end|>" in recorded["prompt"]


def test_metrics_count_constrained_requests_and_compile_time(server, client):
    client.chat.completions.create(
        model="tiny", messages=CHAT, max_tokens=20, temperature=1.0, seed=9,
        extra_body={"structured_outputs": {"choice": ["only"]}})
    text = httpx.get(f"{server.url}/metrics").text
    counts = {line.split("{")[0]: float(line.split()[-1]) for line in text.splitlines()
              if line.startswith("pagedserve:") and "{" in line}
    assert counts["pagedserve:constrained_requests_total"] >= 1
    assert counts["pagedserve:grammar_compile_seconds_count"] >= 1
    assert "pagedserve:grammar_cache_hits_total" in counts


def test_fields_that_change_nothing_are_named_in_one_log_line(server, caplog):
    with caplog.at_level(logging.INFO, logger="pagedserve.server"):
        resp = httpx.post(f"{server.url}/v1/chat/completions", json={
            "model": "tiny", "messages": CHAT, "max_tokens": 1, "user": "u1", "store": True,
            "some_future_field": [1]})
        assert resp.status_code == 200, resp.text
        resp = httpx.post(f"{server.url}/api/chat", json={
            "model": "tiny", "messages": CHAT, "stream": False, "keep_alive": "5m",
            "think": False, "options": {"num_predict": 1, "num_ctx": 64, "num_gpu": 1}})
        assert resp.status_code == 200, resp.text
    lines = [r.getMessage() for r in caplog.records if "fields ignored" in r.getMessage()]
    assert lines == ["/v1/chat/completions: fields ignored: some_future_field, store, user",
                     "/api/chat: fields ignored: keep_alive, options.num_ctx, options.num_gpu"]
    resp = httpx.post(f"{server.url}/v1/completions", json={
        "model": "tiny", "prompt": "def f(", "suffix": "return 1", "max_tokens": 1})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "suffix"
