"""The OpenAI API of a real `pagedserve serve` process, driven by the official `openai` client."""

from __future__ import annotations

import httpx
import openai
import pytest

from pagedserve.bench.server_process import ServerProcess

pytestmark = pytest.mark.slow

MODEL = "smollm2:135m"
SERVER_ARGS = ["--served-model-name", MODEL, "--kv-cache-memory", "128MiB",
               "--max-model-len", "1024"]


@pytest.fixture(scope="module")
def server(smollm_gguf):
    with ServerProcess(str(smollm_gguf), SERVER_ARGS) as proc:
        yield proc


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
                         timeout=120)


def test_models_lists_the_served_model(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].owned_by == "pagedserve"


def test_chat_completion(client):
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=8, temperature=0)
    assert reply.object == "chat.completion"
    assert reply.model == MODEL
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens > 5
    assert 1 <= reply.usage.completion_tokens <= 8
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_chat_completion_streamed_matches_non_streamed(client):
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Count to five."}],
                  max_tokens=10, temperature=0)
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(
        **kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    finals = [c.choices[0].finish_reason for c in chunks if c.choices
              and c.choices[0].finish_reason]
    assert finals in (["stop"], ["length"])
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens <= 10


def test_completion(client):
    reply = client.completions.create(model=MODEL, prompt="The capital of France is",
                                      max_tokens=6, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert reply.object == "text_completion"
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 6
    assert reply.choices[0].text


def test_completion_streamed(client):
    stream = client.completions.create(model=MODEL, prompt="Once upon a time",
                                       max_tokens=8, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks)
    assert text
    assert chunks[-1].choices[0].finish_reason == "length"
    whole = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8,
                                      temperature=0, extra_body={"ignore_eos": True})
    assert whole.choices[0].text == text


def test_completion_n2_seeded(client):
    reply = client.completions.create(model=MODEL, prompt="My favourite colour is", n=2,
                                      max_tokens=8, temperature=1.0, seed=7,
                                      extra_body={"ignore_eos": True})
    assert sorted(c.index for c in reply.choices) == [0, 1]
    assert reply.usage.completion_tokens == 16
    again = client.completions.create(model=MODEL, prompt="My favourite colour is", n=2,
                                      max_tokens=8, temperature=1.0, seed=7,
                                      extra_body={"ignore_eos": True})
    assert [c.text for c in again.choices] == [c.text for c in reply.choices]


def test_chat_n2_streamed(client):
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Name a fruit."}], n=2,
        max_tokens=6, temperature=0.8, seed=1, stream=True))
    texts = {0: "", 1: ""}
    finished = set()
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished.add(choice.index)
    assert finished == {0, 1}
    assert all(texts.values())


def test_chat_logprobs(client):
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
        temperature=0, logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0
        assert len(entry.top_logprobs) == 3
        # greedy: the sampled token is the most likely one
        assert entry.token == entry.top_logprobs[0].token
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-4)
        assert entry.bytes == list(entry.token.encode())


def test_completion_logprobs(client):
    reply = client.completions.create(model=MODEL, prompt="1, 2, 3,", max_tokens=4,
                                      temperature=0, logprobs=2,
                                      extra_body={"ignore_eos": True})
    lp = reply.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert all(len(top) <= 2 for top in lp.top_logprobs)
    assert lp.text_offset[0] == 0
    assert all(x <= 0 for x in lp.token_logprobs)


def test_stop_string_ends_with_stop(client):
    reply = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=12,
                                      temperature=0, stop=[","])
    choice = reply.choices[0]
    assert choice.finish_reason == "stop"
    assert "," not in choice.text


def test_max_completion_tokens(client):
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Write a long story."}],
        max_completion_tokens=3, temperature=0, extra_body={"ignore_eos": True})
    assert reply.usage.completion_tokens == 3
    assert reply.choices[0].finish_reason == "length"


def test_context_overflow_is_a_400(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="hello " * 1200, max_tokens=4)
    assert "maximum context length is 1024 tokens" in str(info.value)


def test_unknown_model_is_a_404(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model",
                                       messages=[{"role": "user", "content": "Hi"}])


def test_tokenize_round_trip(server):
    tokens = httpx.post(f"{server.url}/tokenize",
                        json={"model": MODEL, "prompt": "Hello world"}).json()
    assert tokens["count"] == len(tokens["tokens"]) > 0
    assert tokens["max_model_len"] == 1024
    text = httpx.post(f"{server.url}/detokenize", json={"tokens": tokens["tokens"]}).json()
    assert text["prompt"].endswith("Hello world")


def test_health_version_and_root(server):
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/version").json()["version"]
    root = httpx.get(f"{server.url}/")
    assert root.status_code == 200 and "is running" in root.text
