"""Issue 11's acceptance on the bundled model, through the official clients.

Five schemas (nested objects, arrays, enums, required fields, numbers with bounds), 20
answers each at temperature 0.8, sent at once: 7 through ``openai`` (``response_format``), 7
through ``client.beta.chat.completions.parse`` with the pydantic model, 6 through ``ollama``
(``format=Model.model_json_schema()``): every one parses and validates (``jsonschema``).
Tool calls forced by ``tool_choice="required"`` and by a named function validate against the
tool's parameters, streamed and not. A greedy request answers the same with or without
constrained neighbours in its batch.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from enum import StrEnum
from typing import Literal

import jsonschema
import ollama
import openai
import pytest
from pydantic import BaseModel, Field

from pagedserve.bench.server_process import ServerProcess
from pagedserve.config import EngineConfig
from pagedserve.engine import Engine
from pagedserve.sampling_params import SamplingParams
from pagedserve.structured import Constraint

pytestmark = pytest.mark.slow

MODEL = "smollm2:135m"
ARGS = ["--served-model-name", MODEL, "--kv-cache-memory", "256MiB", "--max-model-len", "1024",
        "--max-num-seqs", "64"]
PER_CLIENT = {"response_format": 7, "parse": 7, "ollama": 6}  # 20 answers per schema
Text = Field(min_length=1, max_length=24)


class Address(BaseModel):
    street: str = Text
    city: str = Text
    postcode: str = Field(pattern=r"^[0-9]{5}$")


class Company(BaseModel):  # nested objects
    name: str = Text
    address: Address
    employees: int = Field(ge=1, le=100000)


class Item(BaseModel):
    sku: str = Field(pattern=r"^[A-Z]{3}-[0-9]{3}$")
    quantity: int = Field(ge=1, le=20)


class Order(BaseModel):  # arrays of objects
    order_id: int = Field(ge=1, le=999999)
    items: list[Item] = Field(min_length=1, max_length=4)
    gift: bool


class Status(StrEnum):
    open = "open"
    closed = "closed"
    blocked = "blocked"


class Ticket(BaseModel):  # enums
    title: str = Text
    status: Status
    priority: Literal["low", "medium", "high"]
    labels: list[Literal["bug", "feature", "docs"]] = Field(max_length=3)


class Person(BaseModel):  # required and optional fields
    name: str = Text
    email: str = Field(pattern=r"^[a-z]{1,12}@[a-z]{1,12}\.(com|org)$")
    nickname: str | None = Field(default=None, max_length=16)
    age: int = Field(ge=0, le=120)


class Weather(BaseModel):  # numbers with bounds
    temperature_c: float = Field(ge=-60, le=60)
    humidity_percent: int = Field(ge=0, le=100)
    wind_kmh: float = Field(ge=0, le=300)
    raining: bool


SCHEMAS = [Company, Order, Ticket, Person, Weather]
PROMPT = "Reply with one {name} as JSON, with realistic values."
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "minLength": 1, "maxLength": 24},
        "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
TIME_TOOL = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a timezone",
    "parameters": {"type": "object", "properties": {
        "timezone": {"type": "string", "pattern": "^[A-Z][a-z]{1,10}/[A-Z][a-z]{1,10}$"}},
        "required": ["timezone"], "additionalProperties": False}}}
TOOL_SCHEMAS = {t["function"]["name"]: t["function"]["parameters"]
                for t in (WEATHER_TOOL, TIME_TOOL)}


@pytest.fixture(scope="module")
def server(smollm_gguf):
    with ServerProcess(str(smollm_gguf), ARGS) as proc:
        yield proc


@pytest.fixture(scope="module")
def clients(server):
    return (openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0,
                          timeout=600),
            ollama.Client(host=server.url, timeout=600))


def _messages(model: type[BaseModel]) -> list[dict]:
    return [{"role": "user", "content": PROMPT.format(name=model.__name__.lower())}]


@pytest.mark.parametrize("model", SCHEMAS, ids=[m.__name__ for m in SCHEMAS])
def test_every_answer_validates_through_both_clients(clients, model):
    client, ollama_client = clients
    schema = model.model_json_schema()

    def with_response_format() -> list[str]:
        reply = client.chat.completions.create(
            model=MODEL, messages=_messages(model), n=PER_CLIENT["response_format"],
            temperature=0.8, max_tokens=300,
            response_format={"type": "json_schema", "json_schema": {
                "name": model.__name__, "schema": schema, "strict": True}})
        assert {c.finish_reason for c in reply.choices} == {"stop"}
        return [c.message.content for c in reply.choices]

    def with_parse() -> list[str]:
        reply = client.beta.chat.completions.parse(
            model=MODEL, messages=_messages(model), n=PER_CLIENT["parse"], temperature=0.8,
            max_tokens=300, response_format=model)
        for choice in reply.choices:
            assert isinstance(choice.message.parsed, model)
        return [c.message.content for c in reply.choices]

    def with_ollama(seed: int) -> str:
        reply = ollama_client.chat(model=MODEL, messages=_messages(model), format=schema,
                                   options={"temperature": 0.8, "seed": seed,
                                            "num_predict": 300})
        assert reply.done_reason == "stop"
        return reply.message.content

    with ThreadPoolExecutor(2 + PER_CLIENT["ollama"]) as pool:  # all in one batch
        futures = [pool.submit(with_response_format), pool.submit(with_parse)]
        futures += [pool.submit(with_ollama, seed) for seed in range(PER_CLIENT["ollama"])]
        texts = futures[0].result() + futures[1].result() + [f.result() for f in futures[2:]]
    assert len(texts) == sum(PER_CLIENT.values()) == 20
    for text in texts:
        jsonschema.validate(json.loads(text), schema)
        model.model_validate_json(text)


def _tool_calls(client, choice, stream: bool, seed: int) -> tuple[str, list[tuple[str, dict]]]:
    kwargs = dict(model=MODEL, temperature=0.8, max_tokens=300, seed=seed,
                  messages=[{"role": "user", "content": "What's the weather in Paris?"}],
                  tools=[WEATHER_TOOL, TIME_TOOL], tool_choice=choice)
    if not stream:
        reply = client.chat.completions.create(**kwargs)
        calls = reply.choices[0].message.tool_calls or []
        return reply.choices[0].finish_reason, [
            (c.function.name, json.loads(c.function.arguments)) for c in calls]
    found: dict[int, list] = {}
    reason = None
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        if not chunk.choices:
            continue
        reason = chunk.choices[0].finish_reason or reason
        for d in chunk.choices[0].delta.tool_calls or []:
            if d.id is not None:
                found[d.index] = [d.function.name, ""]
            found[d.index][1] += d.function.arguments or ""
    return reason, [(name, json.loads(args)) for name, args in found.values()]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_required_and_named_tool_calls_validate(clients, stream):
    client, _ = clients
    named = {"type": "function", "function": {"name": "get_time"}}
    jobs = [(choice, seed) for choice in ("required", named) for seed in range(3)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda job: (job[0], _tool_calls(client, job[0], stream,
                                                                  job[1])), jobs))
    for choice, (reason, calls) in results:
        assert reason == "tool_calls" and calls
        for name, arguments in calls:
            if choice is named:
                assert name == "get_time"
            jsonschema.validate(arguments, TOOL_SCHEMAS[name])


def test_unconstrained_greedy_requests_ignore_constrained_neighbours(smollm_gguf):
    engine = Engine.from_model(str(smollm_gguf), EngineConfig(dtype="float32",
                                                              kv_cache_memory=64 << 20))
    greedy = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    prompts = ["The capital of France is", "def fibonacci(n):"]

    def run(requests):
        ids = [engine.add_request(p, params) for p, params in requests]
        tokens = {i: [] for i in ids}
        while engine.has_unfinished_requests():
            for out in engine.step():
                tokens[out.request_id] += out.delta_token_ids
        return [tokens[i] for i in ids]

    alone = run([(p, greedy) for p in prompts])
    constraint = Constraint.json_schema(Weather.model_json_schema(), "response_format")
    neighbours = [("Weather as JSON:", SamplingParams(temperature=0.8, seed=s, max_tokens=32,
                                                      constraint=constraint))
                  for s in range(3)]
    mixed = run([neighbours[0], (prompts[0], greedy), neighbours[1], (prompts[1], greedy),
                 neighbours[2]])
    assert [mixed[1], mixed[3]] == alone
