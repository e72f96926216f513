"""Tools through the ``ollama`` client against ``pagedserve serve`` on the bundled model, whose
chat template cannot take tools (the generic format: docs/server.md), and the fields
refused in Ollama's words.

Ollama's tools are OpenAI's ``"auto"``: what is asserted is what the grammar guarantees (text,
or calls whose arguments validate exactly), never what the 135M model chooses.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import ollama
import pytest
from client_tools import ARGS, ASK, EXACT, MODEL, WEATHER

from pagedserve.bench.server_process import ServerProcess

pytestmark = pytest.mark.slow

REPORT = {"type": "object", "properties": {"summary": {"type": "string", "maxLength": 40}},
          "required": ["summary"], "additionalProperties": False}


@pytest.fixture(scope="module")
def client(smollm_gguf):
    with ServerProcess(str(smollm_gguf), ARGS) as server:
        yield ollama.Client(host=server.url, timeout=600)


def chat(client: ollama.Client, stream: bool, **kwargs) -> tuple[str, list, str]:
    """(content, [(name, arguments)], done_reason), chunks joined as Ollama's clients do."""
    kwargs = {"model": MODEL, "messages": ASK, "tools": [WEATHER], **kwargs}
    if not stream:
        reply = client.chat(**kwargs)
        return (reply.message.content or "",
                [(c.function.name, dict(c.function.arguments))
                 for c in reply.message.tool_calls or []], reply.done_reason)
    content, calls, reason = "", [], None
    for chunk in client.chat(**kwargs, stream=True):
        content += chunk.message.content or ""
        calls += [(c.function.name, dict(c.function.arguments))
                  for c in chunk.message.tool_calls or []]
        reason = chunk.done_reason or reason
    return content, calls, reason


def in_parallel(jobs):
    with ThreadPoolExecutor(len(jobs)) as pool:  # one batch on the server
        return list(pool.map(lambda job: job(), jobs))


def test_show_says_tools(client):
    capabilities = client.show(MODEL).capabilities
    assert "tools" in capabilities and "completion" in capabilities
    assert not {"thinking", "vision", "insert"} & set(capabilities)


def test_tools_reach_the_prompt(client):
    def prompt_tokens(**kwargs) -> int:
        return client.chat(model=MODEL, messages=ASK, options={"num_predict": 1},
                           **kwargs).prompt_eval_count

    assert prompt_tokens(tools=[WEATHER]) > prompt_tokens() + 50


def test_tools_answer_text_or_calls_that_validate(client):
    jobs = [lambda s=seed, st=stream: chat(client, st, options={
                "seed": s, "temperature": 1.0, "num_predict": 24})
            for seed in range(2) for stream in (False, True)]
    jobs.append(lambda: chat(client, False, format=REPORT, options={
        "seed": 5, "temperature": 1.0, "num_predict": 40}))
    for index, (content, calls, reason) in enumerate(in_parallel(jobs)):
        assert "<tool_call>" not in content  # markup is never content
        for name, arguments in calls:  # whole calls only, arguments as objects
            jsonschema.validate(arguments, EXACT[name])
        if index == len(jobs) - 1 and not calls and reason == "stop":
            jsonschema.validate(json.loads(content), REPORT)  # format, or calls


def test_a_tool_result_round_trip(client):
    messages = ASK + [
        {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_name": "get_weather", "content": "18 C, dry"}]
    content, calls, reason = chat(client, False, messages=messages,
                                  options={"seed": 1, "num_predict": 16})
    assert "<tool_call>" not in content
    for name, arguments in calls:
        jsonschema.validate(arguments, EXACT[name])
    plain = client.chat(model=MODEL, messages=ASK, options={"num_predict": 1})
    followed = client.chat(model=MODEL, messages=messages, options={"num_predict": 1})
    assert followed.prompt_eval_count > plain.prompt_eval_count + 20  # call and result


@pytest.mark.parametrize("call, words", [
    (lambda c: c.chat(model=MODEL, messages=ASK, think=True), "does not support thinking"),
    (lambda c: c.chat(model=MODEL, messages=ASK, think="high"), "does not support thinking"),
    (lambda c: c.generate(model=MODEL, prompt="Hi", think=True), "does not support thinking"),
    (lambda c: c.chat(model=MODEL, messages=[
        {"role": "user", "content": "What is this?", "images": ["iVBORw0KGgo="]}]),
     "does not support vision"),
    (lambda c: c.generate(model=MODEL, prompt="What is this?", images=["iVBORw0KGgo="]),
     "does not support vision"),
    (lambda c: c.generate(model=MODEL, prompt="def f(", suffix="return 1"),
     "does not support insert"),
    (lambda c: c.chat(model=MODEL, messages=ASK, tools=[
        {"type": "function", "function": {"name": "</tool_call>"}}]),
     "tools.0.function.name"),
])
def test_what_is_not_implemented_is_refused(client, call, words):
    with pytest.raises(ollama.ResponseError) as caught:
        call(client)
    assert caught.value.status_code == 400 and words in caught.value.error
    if "support" in words:  # Ollama's words, quoting the model as asked
        assert caught.value.error.startswith(f'"{MODEL}" does not support')


def test_what_changes_nothing_is_accepted(client):
    reply = client.chat(model=MODEL, messages=ASK, think=False, keep_alive="5m",
                        options={"num_predict": 1, "num_ctx": 4096, "num_gpu": 1})
    assert reply.done_reason == "length"
