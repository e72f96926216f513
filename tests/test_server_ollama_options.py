"""Ollama request options -> SamplingParams: Ollama's defaults under the model's under the
request's, without a server (tests/test_server_ollama.py drives a real one)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from pagedserve.sampling_params import SamplingParams
from pagedserve.server.errors import APIError
from pagedserve.server.ollama_api import _start
from pagedserve.server.ollama_protocol import ChatRequest, GenerateRequest
from pagedserve.server.served_model import ModelCard, ServedModel


class RecordingEngine:
    """The AsyncEngine's door, recording what a request would have been made with."""

    def __init__(self) -> None:
        self.params: list[SamplingParams] = []

    def check_alive(self) -> None:
        pass

    def num_queued(self) -> int:
        return 0

    def make_request(self, prompt, params: SamplingParams) -> SimpleNamespace:
        self.params.append(params)
        return SimpleNamespace(request_id="r", prompt_token_ids=[1], params=params)

    def enqueue(self, request) -> SimpleNamespace:
        return SimpleNamespace(request_id=request.request_id, abort=lambda: None)


def submitted(body: dict, model_defaults: dict | None = None,
              request_type: type = GenerateRequest) -> SamplingParams:
    engine = RecordingEngine()
    card = ModelCard("smol:latest", "/m.gguf", sampling_defaults=model_defaults or {})
    values = request_type.model_validate(body).sampling_values()
    asyncio.run(_start(ServedModel(card, engine), "Hi", values, None))
    [params] = engine.params
    return params


def test_ollama_defaults_apply_when_nothing_is_set():
    p = submitted({"prompt": "Hi"})
    assert (p.temperature, p.top_k, p.top_p) == (0.8, 40, 0.9)
    assert (p.repetition_penalty, p.repeat_last_n) == (1.1, 64)
    assert p.max_tokens is None
    chat = submitted({"messages": [{"role": "user", "content": "Hi"}]},
                     request_type=ChatRequest)
    assert (chat.repetition_penalty, chat.repeat_last_n) == (1.1, 64)


@pytest.mark.parametrize(("options", "expected"), [
    ({"repeat_last_n": 0}, {"repeat_last_n": 0, "repetition_penalty": 1.1}),
    ({"repeat_last_n": -1}, {"repeat_last_n": None}),  # -1: the whole context
    ({"num_predict": 0}, {"max_tokens": None}),  # Ollama's runner: no limit, as -1
    ({"num_predict": 7}, {"max_tokens": 7}),
    ({"seed": -1}, {"seed": None}),  # llama.cpp's -1: a random seed
    ({"seed": 42}, {"seed": 42}),
    ({"repeat_last_n": 256, "repeat_penalty": 1.3}, {"repeat_last_n": 256,
                                                      "repetition_penalty": 1.3}),
    ({"repeat_penalty": 1.0, "temperature": 0, "top_k": 5}, {"repetition_penalty": 1.0,
                                                             "temperature": 0, "top_k": 5}),
])
def test_explicit_options_override_the_defaults(options, expected):
    p = submitted({"prompt": "Hi", "options": options})
    assert {name: getattr(p, name) for name in expected} == expected


def test_model_defaults_sit_between_ollamas_and_the_request():
    model = {"repetition_penalty": 1.2, "repeat_last_n": 32}
    p = submitted({"prompt": "Hi"}, model)
    assert (p.repetition_penalty, p.repeat_last_n, p.top_k) == (1.2, 32, 40)
    p = submitted({"prompt": "Hi", "options": {"repeat_last_n": 8}}, model)
    assert (p.repetition_penalty, p.repeat_last_n) == (1.2, 8)


def test_a_bad_window_names_the_option():
    with pytest.raises(APIError) as info:
        submitted({"prompt": "Hi", "options": {"repeat_last_n": -2}})
    assert info.value.status == 400
    assert info.value.message.startswith("repeat_last_n must be >= 0")
    assert info.value.param == "repeat_last_n"
