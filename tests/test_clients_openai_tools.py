"""Tools through the ``openai`` client against ``pagedserve serve`` on the bundled model, whose
chat template cannot take tools (the generic format: docs/server.md).

The 135M model is weak: under ``"auto"`` what is asserted is what the grammar guarantees (the
answer is text, or calls that parse and validate), never what the model chooses; under
``"required"`` and a named function, calls validate against the tool's schema exactly.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest
from client_tools import ARGS, ASK, MODEL

from pagedserve.bench.server_process import ServerProcess

pytestmark = pytest.mark.slow

# parameters as pydantic writes them: no word on other keys
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "minLength": 1, "maxLength": 20},
        "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}}}
NOW = {"type": "function", "function": {"name": "get_time", "description": "The time now"}}
# what calls must validate against: the tools' schemas, taking no keys they do not define
EXACT = {"get_weather": {**WEATHER["function"]["parameters"], "additionalProperties": False},
         "get_time": {"type": "object", "properties": {}, "additionalProperties": False}}


@pytest.fixture(scope="module")
def client(smollm_gguf):
    with ServerProcess(str(smollm_gguf), ARGS) as server:
        yield openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0,
                            timeout=600)


def answer(client: openai.OpenAI, stream: bool, **kwargs) -> tuple[str, list, str]:
    """(content, [(id, name, arguments text)], finish_reason), assembled from the stream as
    OpenAI's clients do when ``stream``."""
    kwargs = {"model": MODEL, "messages": ASK, "tools": [WEATHER, NOW], **kwargs}
    if not stream:
        choice = client.chat.completions.create(**kwargs).choices[0]
        calls = [(c.id, c.function.name, c.function.arguments)
                 for c in choice.message.tool_calls or []]
        return choice.message.content or "", calls, choice.finish_reason
    content, found, reason = "", {}, None
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        reason = chunk.choices[0].finish_reason or reason
        for d in delta.tool_calls or []:
            if d.id is not None:  # the call's first delta: id and name, once
                assert d.index not in found and d.function.name
                found[d.index] = [d.id, d.function.name, ""]
            found[d.index][2] += d.function.arguments or ""
    return content, [tuple(found[i]) for i in sorted(found)], reason


def assert_valid(calls: list, complete: int | None = None) -> None:
    """The first ``complete`` calls (all by default) have arguments that validate exactly."""
    for call_id, name, arguments in calls[:complete]:
        assert call_id.startswith("call_")
        jsonschema.validate(json.loads(arguments), EXACT[name])


def in_parallel(jobs):
    with ThreadPoolExecutor(len(jobs)) as pool:  # one batch on the server
        return list(pool.map(lambda job: job(), jobs))


def test_tools_reach_the_prompt(client):
    def prompt_tokens(**kwargs) -> int:
        return client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=1,
                                              **kwargs).usage.prompt_tokens

    plain = prompt_tokens()
    assert prompt_tokens(tools=[WEATHER, NOW]) > plain + 50  # the tools, their schemas
    assert prompt_tokens(tools=[WEATHER, NOW], tool_choice="none") == plain


def test_required_and_named_calls_validate_exactly(client):
    named = {"type": "function", "function": {"name": "get_weather"}}
    jobs = [lambda c=choice, s=seed, st=stream: answer(
                client, st, tool_choice=c, seed=s, temperature=0.8, max_tokens=64,
                parallel_tool_calls=False)
            for choice, seed, stream in [("required", 0, False), ("required", 1, True),
                                         (named, 2, False), (named, 3, True)]]
    for index, (content, calls, reason) in enumerate(in_parallel(jobs)):
        assert reason == "tool_calls" and len(calls) == 1 and not content
        assert_valid(calls)
        if index >= 2:
            assert calls[0][1] == "get_weather"


def test_auto_answers_text_or_calls_that_validate(client):
    jobs = [lambda s=seed, st=stream: answer(client, st, seed=s, temperature=1.0,
                                              max_tokens=24)
            for seed in range(2) for stream in (False, True)]
    for content, calls, reason in in_parallel(jobs):
        assert "<tool_call>" not in content  # markup is never content
        if reason == "tool_calls":
            assert calls
            assert_valid(calls)
        elif reason == "stop":
            assert not calls
        else:  # cut off: the calls before the last are complete
            assert reason == "length"
            assert_valid(calls, complete=-1)


def test_a_call_cut_off_is_reported_alike_streamed_or_not(client):
    """A call cut by max_tokens: finish_reason "length", the call with the arguments written
    so far (as OpenAI reports it), never its markup as content; complete calls are kept."""
    greedy = {"tool_choice": "required", "temperature": 0, "parallel_tool_calls": False}
    whole_call = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, NOW],
                                                max_tokens=64, **greedy)
    length = whole_call.usage.completion_tokens  # up to "</tool_call>"
    name = whole_call.choices[0].message.tool_calls[0].function.name
    cut = {**greedy, "max_tokens": length - 10}  # inside the arguments
    # room for the whole first call and a few tokens of any next one
    more = {**greedy, "parallel_tool_calls": True, "max_tokens": length + 4}
    jobs = [lambda kw=kwargs, st=stream: answer(client, st, **kw)
            for kwargs in (cut, more) for stream in (False, True)]
    (content, calls, reason), streamed, *with_more = in_parallel(jobs)
    assert reason == "length" and not content
    assert [n for _, n, _ in calls] == [name]
    with pytest.raises(ValueError):
        json.loads(calls[0][2])  # what was written of the arguments
    assert streamed[0] == "" and streamed[2] == "length"
    assert [(n, a) for _, n, a in streamed[1]] == [(n, a) for _, n, a in calls]
    for content, calls, reason in with_more:
        assert "<tool_call>" not in content
        assert_valid(calls[:1])
        assert reason in ("length", "tool_calls")


def test_a_tool_result_round_trip(client):
    reply = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER, NOW], max_tokens=64, seed=3,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    message = reply.choices[0].message
    call = message.tool_calls[0]
    messages = ASK + [message.model_dump(exclude_none=True),
                      {"role": "tool", "tool_call_id": call.id, "content": "18 C, dry"}]
    jobs = [lambda st=stream: answer(client, st, messages=messages, seed=4, temperature=0.8,
                                     max_tokens=16)
            for stream in (False, True)]
    for content, calls, reason in in_parallel(jobs):
        assert "<tool_call>" not in content
        if reason == "tool_calls":
            assert_valid(calls)
    # the call and its result are in the prompt (the template has no place for them)
    plain = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=1)
    followed = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1)
    assert followed.usage.prompt_tokens > plain.usage.prompt_tokens + 20


@pytest.mark.parametrize("kwargs, param, words", [
    ({"tools": [{"type": "function", "function": {"name": "</tool_call>"}}],
      "tool_choice": "required"}, "tools.0.function.name", "letters, digits"),
    ({"tools": [{"type": "function", "function": {"name": "x" * 65}}]},
     "tools.0.function.name", "1 to 64"),
    ({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]},
     "messages.0.content", "image_url is only supported by certain models"),
    ({"functions": [{"name": "f", "parameters": {"type": "object"}}]}, "functions",
     "send tools"),
    ({"reasoning_effort": "high"}, "reasoning_effort", "no reasoning"),
    ({"modalities": ["text", "audio"]}, "modalities", "text only"),
    ({"tools": [WEATHER], "extra_body": {"structured_outputs": {"regex": "[a-z]+"}}},
     "structured_outputs.regex", "cannot be combined with a regex"),
])
def test_what_is_not_implemented_is_refused(client, kwargs, param, words):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**{"model": MODEL, "messages": ASK, "max_tokens": 1,
                                          **kwargs})
    error = caught.value.body
    assert error["param"] == param and error["message"].startswith(param), error
    assert words in error["message"]


def test_what_changes_nothing_is_accepted(client):
    reply = client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=1, user="u1", store=False,
        metadata={"k": "v"}, modalities=["text"], reasoning_effort="none",
        extra_body={"some_future_field": 1})
    assert reply.choices[0].finish_reason == "length"
