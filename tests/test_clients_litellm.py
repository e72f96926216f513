"""Tools through ``litellm`` (its ``openai/`` and ``ollama_chat/`` providers) against
``pagedserve serve`` on the bundled model, whose chat template cannot take tools (the generic
format): forced calls validate exactly, whole and streamed; under Ollama's tools the answer
is text or calls that validate (the grammar's guarantee, not the 135M model's choice)."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import pytest
from client_tools import ARGS, ASK, EXACT, MODEL, WEATHER

from pagedserve.bench.server_process import ServerProcess

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def url(smollm_gguf):
    with ServerProcess(str(smollm_gguf), ARGS) as server:
        yield server.url


@pytest.fixture(scope="module")
def litellm():
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no download at import
    import litellm

    return litellm


def reply(litellm, url: str, provider: str, stream: bool = False, **kwargs):
    """litellm's answer; streamed chunks rebuilt with its own ``stream_chunk_builder``."""
    base = url + ("/v1" if provider == "openai" else "")
    kwargs = {"model": f"{provider}/{MODEL}", "api_base": base, "api_key": "x",
              "messages": ASK, "max_tokens": 64, **kwargs}
    if stream:
        chunks = list(litellm.completion(**kwargs, stream=True))
        return litellm.stream_chunk_builder(chunks, messages=ASK)
    return litellm.completion(**kwargs)


def complete(litellm, url: str, provider: str, stream: bool, **kwargs
             ) -> tuple[str, list, str]:
    """(content, [(name, arguments dict)], finish_reason) of an answer offered WEATHER."""
    choice = reply(litellm, url, provider, stream, tools=[WEATHER], **kwargs).choices[0]
    calls = [(c.function.name, json.loads(c.function.arguments))
             for c in choice.message.tool_calls or []]
    return choice.message.content or "", calls, choice.finish_reason


@pytest.mark.parametrize("provider", ["openai", "ollama_chat"])
def test_tools_reach_the_prompt(litellm, url, provider):
    def prompt_tokens(**kwargs) -> int:
        return reply(litellm, url, provider, max_tokens=1, **kwargs).usage.prompt_tokens

    assert prompt_tokens(tools=[WEATHER]) > prompt_tokens() + 50


def test_openai_provider_forced_calls_validate(litellm, url):
    named = {"type": "function", "function": {"name": "get_weather"}}
    jobs = [(choice, stream) for choice in ("required", named) for stream in (False, True)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda job: complete(
            litellm, url, "openai", job[1], tool_choice=job[0], parallel_tool_calls=False,
            temperature=0.8, seed=3), jobs))
    for content, calls, reason in results:
        assert reason == "tool_calls" and len(calls) == 1 and not content
        name, arguments = calls[0]
        jsonschema.validate(arguments, EXACT[name])


def test_ollama_chat_provider_answers_text_or_calls_that_validate(litellm, url):
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda stream: complete(
            litellm, url, "ollama_chat", stream, max_tokens=24, temperature=1.0, seed=4),
            (False, True)))
    for content, calls, _ in results:
        assert "<tool_call>" not in content
        for name, arguments in calls:
            jsonschema.validate(arguments, EXACT[name])
