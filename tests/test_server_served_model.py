"""The policy both APIs share, without a model: names, defaults under request values, the
system prompt, and admission control."""

from __future__ import annotations

import pytest

from pagedserve.sampling_params import SamplingParams
from pagedserve.server.errors import APIError
from pagedserve.server.served_model import ModelCard, ServedModel


class FakeStream:
    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True


class FakeAsyncEngine:
    def __init__(self, waiting: int = 0, reject_after: int | None = None) -> None:
        self.waiting = waiting
        self.reject_after = reject_after
        self.streams: list[FakeStream] = []

    def num_waiting(self) -> int:
        return self.waiting

    def submit(self, prompt, params: SamplingParams) -> FakeStream:
        if self.reject_after is not None and len(self.streams) >= self.reject_after:
            raise ValueError("prompt must not be empty")
        self.streams.append(FakeStream(f"r{len(self.streams)}"))
        return self.streams[-1]


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
    model = ServedModel(ModelCard("m", "/m"), FakeAsyncEngine(waiting=2), max_queue=3)
    params = SamplingParams()
    assert len(model.start(["a"], [params])) == 1
    with pytest.raises(APIError) as info:
        model.start(["a", "b"], [params, params])  # 2 waiting + 2 > 3
    assert info.value.status == 503 and info.value.headers == {"Retry-After": "1"}


def test_a_rejected_prompt_leaves_nothing_behind():
    engine = FakeAsyncEngine(reject_after=1)
    model = ServedModel(ModelCard("m", "/m"), engine)
    with pytest.raises(APIError) as info:
        model.start(["a", ""], [SamplingParams(), SamplingParams()])
    assert info.value.status == 400 and info.value.param == "prompt"
    assert [s.aborted for s in engine.streams] == [True]


def test_abort_all_ends_live_generations():
    engine = FakeAsyncEngine()
    model = ServedModel(ModelCard("m", "/m"), engine)
    generation = model.start(["a", "b"], [SamplingParams(), SamplingParams()])
    model.abort_all()
    assert [s.aborted for s in engine.streams] == [True, True]
    del generation
