"""The model against transformers on the same weights: logits, greedy text, batching invariance."""

from __future__ import annotations

import pytest
import torch

from pagedserve.config import EngineConfig
from pagedserve.engine import Engine
from pagedserve.loader import load_model
from pagedserve.sampling_params import SamplingParams

PROMPTS = [
    "Why is the sky blue?",
    "Write a haiku about the sea.",
    "What is 17 times 23?",
    "List three uses of a paperclip.",
    "Explain recursion to a child.",
]
SYSTEM = "You are a careful assistant. Answer briefly and precisely, in plain English."


def max_rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).abs().max() / ref.abs().max())


def hf_greedy(model, prompt_ids: list[int], n: int) -> list[int]:
    """Plain greedy decoding with transformers' own KV cache, EOS ignored."""
    ids = torch.tensor([prompt_ids])
    out, past = [], None
    with torch.no_grad():
        for _ in range(n):
            res = model(ids, past_key_values=past, use_cache=True)
            past = res.past_key_values
            token = int(res.logits[0, -1].argmax())
            out.append(token)
            ids = torch.tensor([[token]])
    return out


@pytest.fixture(scope="module")
def hf_smollm(smollm_gguf):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(smollm_gguf.parent), gguf_file=smollm_gguf.name, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="module")
def smollm_loaded(smollm_gguf):
    return load_model(smollm_gguf)


def engine_for(loaded, **kw) -> Engine:
    kw.setdefault("kv_cache_memory", 64 << 20)
    kw.setdefault("dtype", "float32")
    return Engine.from_model(loaded, EngineConfig(**kw))


def chat_ids(loaded, question: str, system: str | None = None) -> list[int]:
    messages = [{"role": "user", "content": question}]
    if system:
        messages.insert(0, {"role": "system", "content": system})
    text = loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return loaded.tokenizer.encode(text, add_special_tokens=False)


def our_prompt_logits(engine: Engine, ids: list[int]) -> torch.Tensor:
    blocks = list(range(engine.kv.blocks_needed(len(ids))))
    return engine.runner.prompt_logits(ids, blocks)


@pytest.mark.slow
def test_prompt_logits_match_transformers_on_the_bundled_gguf(smollm_loaded, hf_smollm):
    engine = engine_for(smollm_loaded)
    for question in PROMPTS[:2]:
        ids = chat_ids(smollm_loaded, question)
        with torch.no_grad():
            ref = hf_smollm(torch.tensor([ids])).logits[0]
        assert max_rel_err(our_prompt_logits(engine, ids), ref) < 1e-3


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_qwen2_dir"])
def test_prompt_logits_match_transformers_on_tiny_safetensors_models(fixture, request):
    from transformers import AutoModelForCausalLM

    path = request.getfixturevalue(fixture)
    ref_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    engine = engine_for(load_model(path))
    ids = torch.randint(0, 512, (70,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        ref = ref_model(torch.tensor([ids])).logits[0]
    assert max_rel_err(our_prompt_logits(engine, ids), ref) < 1e-3


@pytest.mark.slow
def test_greedy_generation_equals_transformers(smollm_loaded, hf_smollm):
    engine = engine_for(smollm_loaded)
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    prompts = [chat_ids(smollm_loaded, q) for q in PROMPTS]
    for ids in prompts:
        engine.add_request(ids, params)
    ours = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            ours.setdefault(out.request_id, []).extend(out.delta_token_ids)
    for i, ids in enumerate(prompts):
        assert ours[f"req-{i}"] == hf_greedy(hf_smollm, ids, 32), PROMPTS[i]
    assert engine.kv.all_free()


@pytest.mark.slow
def test_batched_chunked_prefix_shared_equals_each_alone(smollm_loaded):
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    prompts = [chat_ids(smollm_loaded, q, SYSTEM) for q in PROMPTS]

    alone = []
    for ids in prompts:
        engine = engine_for(smollm_loaded, enable_prefix_caching=False)
        [out] = _run(engine, [ids], params)
        alone.append(out)

    # Together: a 24-token budget forces chunked prefill mixed with decodes, and the shared
    # system prompt is served from the prefix cache after the first request.
    engine = engine_for(smollm_loaded, max_num_batched_tokens=24)
    together = _run(engine, prompts, params)
    assert together == alone
    assert engine.kv.prefix_hits > 0
    assert engine.kv.all_free()
    engine.check_integrity()


def _run(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    ids = [engine.add_request(p, params) for p in prompts]
    tokens: dict[str, list[int]] = {i: [] for i in ids}
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens[out.request_id].extend(out.delta_token_ids)
        engine.check_integrity()
    return [tokens[i] for i in ids]
