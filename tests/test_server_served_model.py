"""The policy both APIs share, without a model: names, defaults under request values, the
system prompt, and admission control."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from pagedserve.errors import EngineDeadError
from pagedserve.sampling_params import SamplingParams
from pagedserve.server.errors import APIError
from pagedserve.server.limits import ServerLimits
from pagedserve.server.served_model import ModelCard, ServedModel


class FakeStream:
    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True


class FakeAsyncEngine:
    def __init__(self, queued: int = 0, reject_after: int | None = None) -> None:
        self.queued = queued
        self.reject_after = reject_after
        self.made = 0
        self.prompts: list = []  # as make_request got them
        self.streams: list[FakeStream] = []
        self.error: BaseException | None = None

    def num_queued(self) -> int:
        return self.queued

    def check_alive(self) -> None:
        if self.error is not None:
            raise EngineDeadError(str(self.error))

    def make_request(self, prompt, params: SamplingParams) -> SimpleNamespace:
        if self.reject_after is not None and self.made >= self.reject_after:
            raise ValueError("prompt must not be empty")
        self.made += 1
        self.prompts.append(prompt)
        ids = [ord(c) for c in prompt] if isinstance(prompt, str) else list(prompt)
        return SimpleNamespace(request_id=f"r{self.made}", prompt_token_ids=ids, params=params)

    def enqueue(self, request: SimpleNamespace) -> FakeStream:
        self.streams.append(FakeStream(request.request_id))
        return self.streams[-1]


def start(model: ServedModel, prompts, params):
    return asyncio.run(model.start(prompts, params))


def served(**card) -> ServedModel:
    card = {"name": "smol:latest", "path": "/m.gguf", **card}
    return ServedModel(ModelCard(**card), FakeAsyncEngine())


def test_names_with_and_without_the_latest_tag():
    model = served(aliases=frozenset({"/m.gguf"}))
    assert model.answers_to("smol") and model.answers_to("smol:latest")
    assert model.answers_to("/m.gguf") and model.answers_to(None) and model.answers_to("")
    assert not model.answers_to("smol:7b")
    with pytest.raises(APIError) as info:
        model.check_model("other")
    assert (info.value.status, info.value.code) == (404, "model_not_found")


def test_request_values_over_model_defaults_over_api_defaults():
    model = served(sampling_defaults={"temperature": 0.3, "stop": ["User:"], "top_k": 20,
                                      "num_gpu": 1})
    params = model.sampling_params({"temperature": 0.9}, api_defaults={"top_k": 40, "top_p": 0.9})
    assert (params.temperature, params.stop, params.top_k, params.top_p) == (
        0.9, ["User:"], 20, 0.9)
    assert "num_gpu" not in model.sampling_defaults  # not a SamplingParams field


def test_bad_values_name_the_wire_field():
    model = served()
    with pytest.raises(APIError) as info:
        model.sampling_params({"repetition_penalty": -1},
                              renames={"repetition_penalty": "repeat_penalty"})
    assert info.value.status == 400
    assert info.value.message.startswith("repeat_penalty must be > 0")
    assert info.value.param == "repeat_penalty"


def test_system_prompt():
    model = served(system="Be brief.")
    user = [{"role": "user", "content": "Hi"}]
    assert model.with_system_prompt(user)[0] == {"role": "system", "content": "Be brief."}
    assert model.with_system_prompt(user, system="Be long.")[0]["content"] == "Be long."
    own = [{"role": "system", "content": "Mine."}, *user]
    assert model.with_system_prompt(own) == own
    assert served().with_system_prompt(user) == user


def test_queue_limit_answers_503_with_retry_after():
    model = ServedModel(ModelCard("m", "/m"), FakeAsyncEngine(queued=2),
                        ServerLimits(max_queue=3))
    params = SamplingParams()
    assert len(start(model, ["a"], [params])) == 1
    with pytest.raises(APIError) as info:
        start(model, ["a", "b"], [params, params])  # 2 queued + 2 > 3
    assert info.value.status == 503 and info.value.headers == {"Retry-After": "1"}


def test_a_dead_engine_admits_nothing():
    engine = FakeAsyncEngine()
    engine.error = RuntimeError("boom")
    with pytest.raises(EngineDeadError):
        start(ServedModel(ModelCard("m", "/m"), engine), ["a"], [SamplingParams()])
    assert engine.streams == []


def test_a_rejected_prompt_leaves_nothing_behind():
    engine = FakeAsyncEngine(reject_after=1)
    model = ServedModel(ModelCard("m", "/m"), engine)
    with pytest.raises(APIError) as info:
        start(model, ["a", ""], [SamplingParams(), SamplingParams()])
    assert info.value.status == 400 and info.value.param == "prompt"
    assert engine.streams == []  # every request is made before any is queued


def test_choices_per_call_are_bounded():
    model = ServedModel(ModelCard("m", "/m"), FakeAsyncEngine(), ServerLimits(max_n=8))
    model.check_choices(2, 4)
    for prompts, n in [(1, 9), (3, 3), (1, 0)]:
        with pytest.raises(APIError) as info:
            model.check_choices(prompts, n)
        assert info.value.status == 400 and info.value.param == "n"


def test_a_text_repeated_for_n_choices_is_tokenized_once():
    engine = FakeAsyncEngine()
    model = ServedModel(ModelCard("m", "/m"), engine)
    start(model, ["ab", "ab", "cd", [7, 8]], [SamplingParams()] * 4)
    assert engine.prompts == ["ab", [97, 98], "cd", [7, 8]]


def test_abort_all_ends_live_generations():
    engine = FakeAsyncEngine()
    model = ServedModel(ModelCard("m", "/m"), engine)
    generation = start(model, ["a", "b"], [SamplingParams(), SamplingParams()])
    model.abort_all()
    assert [s.aborted for s in engine.streams] == [True, True]
    del generation
