"""Tools through LangChain (``ChatOpenAI``, ``ChatOllama``) against ``pagedserve serve`` on the
bundled model, whose chat template cannot take tools (the generic format).

What LangChain makes of our answers: ``AIMessage.tool_calls`` with arguments as dicts that
validate exactly when a call is forced, whole or streamed; a tool result sent back as a
``ToolMessage``; ``with_structured_output`` by function calling. Under ``"auto"`` (and on
Ollama) what is asserted is what the grammar guarantees, not what the 135M model chooses.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import jsonschema
import pytest
from pydantic import BaseModel, Field

from pagedserve.bench.server_process import ServerProcess

pytestmark = pytest.mark.slow

MODEL = "smollm2:135m"
ARGS = ["--served-model-name", MODEL, "--kv-cache-memory", "128MiB", "--max-model-len", "2048",
        "--max-num-seqs", "16"]
ASK = "What's the weather in Paris?"


class GetWeather(BaseModel):
    """Current weather in a city."""

    city: str = Field(min_length=1, max_length=20)
    unit: Literal["celsius", "fahrenheit"] = "celsius"


EXACT = {"GetWeather": {**GetWeather.model_json_schema(), "additionalProperties": False}}


@pytest.fixture(scope="module")
def url(smollm_gguf):
    with ServerProcess(str(smollm_gguf), ARGS) as server:
        yield server.url


@pytest.fixture(scope="module")
def chat_openai(url):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(model=MODEL, base_url=f"{url}/v1", api_key="x", max_retries=0,
                      timeout=600, temperature=0.8, max_tokens=64, seed=1)


def assert_valid(message) -> None:
    """Every call LangChain read validates exactly; only an answer cut off by max_tokens may
    end in one whose arguments do not parse (LangChain's ``invalid_tool_calls``)."""
    metadata = message.response_metadata
    cut = "length" in (metadata.get("finish_reason"), metadata.get("done_reason"))
    assert len(message.invalid_tool_calls) <= int(cut)
    for call in message.tool_calls:
        assert call["id"].startswith("call_")
        jsonschema.validate(call["args"], EXACT[call["name"]])


def streamed(runnable, prompt):
    """The chunks added up, as LangChain's agents do."""
    total = None
    for chunk in runnable.stream(prompt):
        total = chunk if total is None else total + chunk
    return total


@pytest.fixture(scope="module")
def chat_ollama(url):
    from langchain_ollama import ChatOllama

    return ChatOllama(model=MODEL, base_url=url, temperature=1.0, num_predict=24, seed=2)


def test_bound_tools_reach_the_prompt(chat_openai, chat_ollama):
    for model, one_token in ((chat_openai, {"max_tokens": 1}),
                             (chat_ollama, {"options": {"num_predict": 1}})):
        plain = model.invoke(ASK, **one_token).usage_metadata["input_tokens"]
        bound = model.bind_tools([GetWeather]).invoke(ASK, **one_token)
        assert bound.usage_metadata["input_tokens"] > plain + 50


def test_chat_openai_forced_calls_validate_whole_and_streamed(chat_openai):
    required = chat_openai.bind_tools([GetWeather], tool_choice="any",
                                      parallel_tool_calls=False)
    named = chat_openai.bind_tools([GetWeather], tool_choice="GetWeather")
    jobs = [lambda: required.invoke(ASK), lambda: streamed(required, ASK),
            lambda: named.invoke(ASK), lambda: streamed(named, ASK)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        messages = list(pool.map(lambda job: job(), jobs))
    for message in messages:
        assert [c["name"] for c in message.tool_calls][:1] == ["GetWeather"]
        assert_valid(message)


def test_chat_openai_auto_and_a_tool_result_round_trip(chat_openai):
    from langchain_core.messages import HumanMessage, ToolMessage

    auto = chat_openai.bind_tools([GetWeather]).invoke(ASK)
    assert "<tool_call>" not in auto.content
    assert_valid(auto)
    forced = chat_openai.bind_tools([GetWeather], tool_choice="GetWeather")
    call = forced.invoke(ASK)
    messages = [HumanMessage(ASK), call,
                ToolMessage("18 C, dry", tool_call_id=call.tool_calls[0]["id"])]
    answer = chat_openai.bind_tools([GetWeather]).invoke(messages, max_tokens=16)
    assert "<tool_call>" not in answer.content
    assert_valid(answer)


def test_chat_openai_structured_output_by_function_calling(chat_openai):
    weather = chat_openai.with_structured_output(GetWeather, method="function_calling")
    assert isinstance(weather.invoke(ASK), GetWeather)


def test_chat_ollama_tools_answer_text_or_calls_that_validate(chat_ollama):
    from langchain_core.messages import AIMessage, HumanMessage, ToolMessage

    with_tools = chat_ollama.bind_tools([GetWeather])
    call = {"name": "GetWeather", "args": {"city": "Paris"}, "id": "call_1"}
    round_trip = [HumanMessage(ASK), AIMessage("", tool_calls=[call]),
                  ToolMessage("18 C, dry", tool_call_id="call_1")]
    jobs = [lambda: with_tools.invoke(ASK), lambda: streamed(with_tools, ASK),
            lambda: with_tools.invoke(round_trip)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        messages = list(pool.map(lambda job: job(), jobs))
    for message in messages:
        assert "<tool_call>" not in message.content
        assert_valid(message)
