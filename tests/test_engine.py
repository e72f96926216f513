"""The engine end to end on a tiny model: stops, aborts, preemption, limits and KV waste."""

from __future__ import annotations

import random

import pytest
from engine_drain import drain

from pagedserve.config import EngineConfig, ModelConfig
from pagedserve.engine import ContextLengthError, Engine
from pagedserve.llm import LLM
from pagedserve.loader import load_model
from pagedserve.sampling_params import SamplingParams
from pagedserve.worker.model_runner import kv_bytes_per_token

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tiny_llama_tokenized_dir):
    return load_model(tiny_llama_tokenized_dir)


def make_engine(loaded, num_blocks: int = 256, **kw) -> Engine:
    per_block = kv_bytes_per_token(loaded.config, "float32") * kw.get("block_size", 16)
    return Engine.from_model(loaded, EngineConfig(kv_cache_memory=num_blocks * per_block,
                                                  dtype="float32", **kw))


def run(engine: Engine, prompts, params=GREEDY) -> dict[str, dict]:
    ids = [engine.add_request(p, params) for p in prompts]
    return drain(engine, ids)


def prompts(n: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(4, 300) for _ in range(length)] for _ in range(n)]


def test_stop_string_ends_the_request_and_never_leaks(tiny):
    [free] = run(make_engine(tiny), ["hello world"], GREEDY)
    text = free["text"]
    assert len(text) > 6
    stop = text[3:6]  # a string the greedy output is known to reach
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop])
    [stopped] = run(make_engine(tiny), ["hello world"], params)
    assert stopped["reason"] == "stop"
    assert stopped["stop"] == stop
    assert stopped["text"] == text[: text.index(stop)]


def test_stop_token_ids_and_length_finish_reasons(tiny):
    [free] = run(make_engine(tiny), ["hello"], GREEDY)
    assert free["reason"] == "length" and len(free["tokens"]) == 24
    stop_token = free["tokens"][5]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                            stop_token_ids=[stop_token])
    [stopped] = run(make_engine(tiny), ["hello"], params)
    first = free["tokens"].index(stop_token)
    assert stopped["tokens"] == free["tokens"][: first + 1]
    assert (stopped["reason"], stopped["stop"]) == ("stop", stop_token)


def test_preemption_under_a_tiny_cache_gives_exactly_the_same_output(tiny):
    batch = prompts(6, 40)
    roomy = run(make_engine(tiny, num_blocks=256), batch)
    # 12 blocks of 16 tokens: two 64-token sequences at most, six are asked for at once
    tight_engine = make_engine(tiny, num_blocks=12)
    tight = run(tight_engine, batch)
    assert tight_engine.scheduler.num_preemptions > 0
    assert [r["tokens"] for r in tight] == [r["tokens"] for r in roomy]


def test_abort_frees_blocks_at_once_and_reports_abort(tiny):
    engine = make_engine(tiny)
    a = engine.add_request(prompts(1, 50)[0], GREEDY)
    b = engine.add_request(prompts(1, 50, seed=1)[0], GREEDY)
    engine.step()
    engine.step()
    free_before = engine.kv.num_free_blocks
    out = engine.abort_request(a)
    assert out.finished and out.finish_reason == "abort"
    assert engine.kv.num_free_blocks == free_before + 4  # 50 + 2 tokens in 4 blocks
    engine.check_integrity()
    assert engine.abort_request(a) is None  # already gone
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.kv.all_free()
    assert b not in engine.core.request_ids()


def test_a_request_that_cannot_fit_is_rejected_at_submission(tiny):
    engine = make_engine(tiny, num_blocks=4)  # 64 tokens of KV in all
    assert engine.max_model_len == 64
    with pytest.raises(ContextLengthError, match="maximum context length is 64 tokens"):
        engine.add_request(prompts(1, 60)[0], SamplingParams(max_tokens=10))
    with pytest.raises(ContextLengthError):
        engine.add_request(prompts(1, 64)[0], SamplingParams(max_tokens=None))
    with pytest.raises(ValueError, match="prompt"):
        engine.add_request([], SamplingParams())
    with pytest.raises(ValueError, match="prompt token ids"):
        engine.add_request([1, 2, 10**6], SamplingParams())
    assert not engine.has_unfinished_requests()
    assert engine.kv.all_free()


def test_llm_generate_and_chat_return_whole_completions(tiny_llama_tokenized_dir):
    llm = LLM(str(tiny_llama_tokenized_dir), kv_cache_memory=8 << 20)
    [a, b] = llm.generate(["one", "two"], SamplingParams(temperature=0, max_tokens=5,
                                                         ignore_eos=True, logprobs=2))
    assert a.num_output_tokens == 5 and len(a.token_ids) == 5 and a.finish_reason == "length"
    assert a.prompt == "one" and a.prompt_token_ids and len(a.logprobs) == 5
    assert len(a.logprobs[0].top) == 2
    many = llm.generate("three", SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=4))
    assert len(many) == 3
    [chat] = llm.chat([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=3))
    assert chat.num_prompt_tokens > 3
    streamed = list(llm.stream("one", SamplingParams(temperature=0, max_tokens=5,
                                                     ignore_eos=True)))
    assert "".join(o.delta_text for o in streamed) == a.text
    assert streamed[-1].finished and llm.engine.kv.all_free()


def test_paged_waste_stays_under_four_percent_in_a_steady_mixed_workload():
    """Prompts of 100-1000 tokens, outputs of 16-128, 16 requests running at a time."""
    config = ModelConfig("llama", vocab_size=256, hidden_size=32, intermediate_size=64,
                         num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
                         max_position_embeddings=4096)
    loaded = load_model(None, load_format="dummy", config=config)
    engine = make_engine(loaded, num_blocks=4096, max_num_seqs=16, max_num_batched_tokens=2048)
    rng = random.Random(0)
    for _ in range(64):
        n = rng.randrange(100, 1000)
        engine.add_request([rng.randrange(256) for _ in range(n)],
                           SamplingParams(max_tokens=rng.randrange(16, 128), ignore_eos=True))
    wastes = []
    while engine.has_unfinished_requests():
        engine.step()
        stats = engine.stats()
        if stats.num_running == 16:  # steady state: a full batch
            wastes.append(stats.kv_waste_perc)
    assert len(wastes) > 30
    assert max(wastes) < 4.0
    assert engine.kv.all_free()


def test_static_layout_reserves_whole_slots_and_wastes_most_of_them(tiny):
    engine = make_engine(tiny, kv_layout="static", max_parallel=2, num_ctx=256)
    assert engine.max_model_len == 256
    for p in prompts(4, 30):
        engine.add_request(p, GREEDY)
    engine.step()
    stats = engine.stats()
    assert stats.num_running == 2 and stats.num_waiting == 2
    assert stats.kv_reserved_tokens == 512
    assert stats.kv_used_tokens == 60
    assert stats.kv_waste_perc > 60
    while engine.has_unfinished_requests():
        engine.step()
        assert engine.stats().num_running <= 2
    assert engine.kv.all_free()


def test_a_models_num_ctx_sets_the_context_unless_given():
    config = EngineConfig()
    assert config.with_model_defaults({"num_ctx": 2048}).max_model_len == 2048
    assert EngineConfig(max_model_len=512).with_model_defaults({"num_ctx": 2048}).max_model_len \
        == 512
    assert config.with_model_defaults({"temperature": 0.3}) is config


def test_llm_default_params_answer_until_eos_unless_limited(tiny_llama_tokenized_dir):
    llm = LLM(str(tiny_llama_tokenized_dir), kv_cache_memory=8 << 20)
    assert llm.default_params().max_tokens is None
    assert llm.default_params(max_tokens=7, temperature=0).max_tokens == 7


def test_kv_cache_sized_for_a_few_sequences_of_full_context(tiny):
    """`run` asks for room for N sequences (Ollama's num_ctx x num_parallel) instead of the
    server's share of free memory; an explicit size still wins."""
    two = Engine.from_model(tiny, EngineConfig(kv_cache_sequences=2, dtype="float32"))
    assert (two.max_model_len, two.kv.capacity_tokens) == (512, 1024)
    short = Engine.from_model(tiny, EngineConfig(kv_cache_sequences=2, max_model_len=100,
                                                 dtype="float32"))
    assert short.kv.capacity_tokens == 224  # 2 x 100 tokens, each in whole 16-token blocks
    per_token = kv_bytes_per_token(tiny.config, "float32")
    sized = Engine.from_model(tiny, EngineConfig(kv_cache_sequences=2, dtype="float32",
                                                 kv_cache_memory=64 * 16 * per_token))
    assert sized.kv.capacity_tokens == 64 * 16
    with pytest.raises(ValueError, match="kv_cache_sequences"):
        EngineConfig(kv_cache_sequences=0)


def test_llm_picks_its_dtype_like_run_and_serve(tiny_llama_tokenized_dir, monkeypatch):
    """LLM() asks for "auto" (bf16 where native and the CPU kernels do not run), as run, serve
    and vLLM do; float32 is one argument away."""
    import pagedserve.worker.execution_plan as execution_plan

    native = {"auto": "bfloat16"}  # as on a CPU with AVX-512 BF16 and no CPU kernels
    monkeypatch.setattr(execution_plan, "resolve_dtype",
                        lambda d, device="cpu", native_kernels=False, hardware=None:
                        native.get(d, d))
    assert EngineConfig().dtype == "auto"
    assert LLM(str(tiny_llama_tokenized_dir), kv_cache_memory=8 << 20).engine.config.dtype == (
        "bfloat16")
    exact = LLM(str(tiny_llama_tokenized_dir), kv_cache_memory=8 << 20, dtype="float32")
    assert exact.engine.config.dtype == "float32"


def test_a_max_model_len_beyond_the_models_context_is_capped_to_it(tiny):
    engine = make_engine(tiny, max_model_len=4096)  # the tiny model has 512 positions
    assert engine.max_model_len == 512
    with pytest.raises(ContextLengthError):  # refused at submission, not crashed mid-step
        engine.add_request(prompts(1, 600)[0], SamplingParams(max_tokens=4))


def _greedy_logprobs(engine: Engine, prompt: list[int]) -> tuple[list[float], int]:
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=0)
    request_id = engine.add_request(prompt, params)
    logprobs, cached = [], 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id == request_id
            logprobs += [lp.sampled.logprob for lp in out.delta_logprobs or []]
            cached = out.num_cached_tokens
    return logprobs, cached


@pytest.mark.parametrize("dtype, low_bit", [("bfloat16", None), ("float32", None),
                                            ("float32", True)],  # the last: auto without bf16
                         ids=["bf16", "float32", "float32-low-bit"])
def test_a_repeated_greedy_request_repeats_its_logprobs(tiny, dtype, low_bit):
    """The second time, a prompt's full blocks come from the prefix cache and only its tail is
    computed: the runner computes that tail alike both times (its own attention chunk, dense
    weights, and in float32 a pass of its own, since float32 CPU matmuls round a row by how
    many rows share it), so the repeat gives the same logprobs, not just nearly the same."""
    engine = Engine.from_model(tiny, EngineConfig(kv_cache_memory=8 << 20, dtype=dtype,
                                                  low_bit_small_steps=low_bit))
    rng = random.Random(0)
    for n in (20, 33, 37, 41, 47, 60):  # tails of 1 to 15 tokens after the cached blocks
        prompt = [rng.randrange(4, 300) for _ in range(n)]
        first, cached_first = _greedy_logprobs(engine, prompt)
        again, cached_again = _greedy_logprobs(engine, prompt)
        assert (cached_first, cached_again) == (0, (n - 1) // 16 * 16)
        assert again == first, n
    assert engine.kv.all_free()


def test_unseeded_sampling_differs_between_engines_and_a_seed_repeats(tiny):
    """Each engine start seeds its generator at random (Ollama and vLLM vary too); a request's
    seed, or the engine's, makes the answer repeat."""
    hot = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
    seeded = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True, seed=5)
    prompt = prompts(1, 10)[0]
    answers = [run(make_engine(tiny), [prompt, prompt], hot) for _ in range(2)]
    assert answers[0][0]["tokens"] != answers[1][0]["tokens"]
    assert run(make_engine(tiny), [prompt], seeded) == run(make_engine(tiny), [prompt], seeded)
    assert (run(make_engine(tiny, seed=3), [prompt], hot)
            == run(make_engine(tiny, seed=3), [prompt], hot))


def test_an_answer_cut_inside_an_emoji_ends_before_it(tiny):
    """The runner is scripted to emit "ok 🎉 done" token by token; max_tokens stops it inside
    the emoji's bytes: the text ends before the emoji, not with U+FFFD, streamed or whole."""
    from pagedserve.worker.model_runner import LaunchedStep
    from pagedserve.worker.sampler import SampledToken

    engine = make_engine(tiny)
    script = engine.tokenizer.encode("ok 🎉 done", add_special_tokens=False)
    emoji_end = next(i for i in range(len(script))
                     if engine.tokenizer.decode(script[:i + 1]).endswith("🎉"))
    assert engine.tokenizer.decode(script[:emoji_end]).endswith("\ufffd")

    def launch(scheduled):
        return LaunchedStep.done([SampledToken(script[s.request.num_output_tokens])
                                  if s.samples else None for s in scheduled])

    engine.runner.launch = launch
    for max_tokens in (emoji_end, len(script)):
        [out] = run(engine, ["hello"], SamplingParams(max_tokens=max_tokens, ignore_eos=True))
        assert out["reason"] == "length" and len(out["tokens"]) == max_tokens
        expected = engine.tokenizer.decode(script[:max_tokens]).rstrip("\ufffd")
        assert out["text"] == expected and "\ufffd" not in out["text"]
    assert out["text"] == "ok 🎉 done"
