"""Prompt logprobs (``SamplingParams.prompt_logprobs``) and ``max_tokens`` 0 in the engine.

The reference is transformers' ``log_softmax`` over the same weights in float32: row p of the
prompt's logits predicts token p + 1. Checked whole, cut by chunked prefill, in row blocks,
after a prefix-cache hit, beside plain requests (whose tokens must not change), and through a
preemption.
"""

from __future__ import annotations

import pytest
import torch

from pagedserve.config import EngineConfig
from pagedserve.engine import Engine
from pagedserve.loader import load_model
from pagedserve.outputs import RequestOutput, TokenLogprobs
from pagedserve.sampling_params import SamplingParams
from pagedserve.worker import prompt_logprobs as prompt_logprobs_module

TOP = 3
TOL = 2e-4  # float32 on both sides: logits agree to ~1e-5 relative


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    return load_model(tiny_llama_dir), ref


def engine_for(loaded, **kw) -> Engine:
    kw.setdefault("kv_cache_memory", 16 << 20)
    kw.setdefault("dtype", "float32")
    return Engine.from_model(loaded, EngineConfig(**kw))


def random_ids(n: int, seed: int, vocab: int = 512) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def reference(model, ids: list[int]) -> torch.Tensor:
    """(n - 1, V) logprobs: row p is the distribution of prompt token p + 1."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return logits.log_softmax(dim=-1)[:-1]


def run(engine: Engine, requests: list[tuple[list[int], SamplingParams]]
        ) -> list[list[RequestOutput]]:
    """Every request's outputs, in the order given."""
    ids = [engine.add_request(prompt, params) for prompt, params in requests]
    outputs: dict[str, list[RequestOutput]] = {i: [] for i in ids}
    while engine.has_unfinished_requests():
        for out in engine.step():
            outputs[out.request_id].append(out)
    engine.check_integrity()
    return [outputs[i] for i in ids]


def prompt_logprobs_of(outputs: list[RequestOutput]) -> list[TokenLogprobs | None]:
    carrying = [o for o in outputs if o.prompt_logprobs is not None]
    assert len(carrying) == 1, "prompt logprobs come once"
    return carrying[0].prompt_logprobs


def assert_matches(got: list[TokenLogprobs | None], ids: list[int], ref: torch.Tensor,
                   top: int = TOP) -> None:
    assert len(got) == len(ids) and got[0] is None
    for p, entry in enumerate(got[1:]):
        row = ref[p]
        assert entry.sampled.token_id == ids[p + 1]
        assert entry.sampled.logprob == pytest.approx(float(row[ids[p + 1]]), abs=TOL)
        chosen = row[ids[p + 1]]  # rank: 1 + the tokens more likely (a near tie either way)
        assert int((row > chosen + TOL).sum()) < entry.sampled.rank \
            <= int((row > chosen - TOL).sum()) + 1
        assert len(entry.top) == top
        best = row.topk(top).values
        for rank, alt in enumerate(entry.top, 1):
            assert alt.rank == rank
            assert alt.logprob == pytest.approx(float(best[rank - 1]), abs=TOL)
            assert alt.logprob == pytest.approx(float(row[alt.token_id]), abs=TOL)


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_qwen2_dir"])
def test_prompt_logprobs_match_transformers(fixture, request):
    from transformers import AutoModelForCausalLM

    path = request.getfixturevalue(fixture)
    ref_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    engine = engine_for(load_model(path))
    ids = random_ids(70, seed=1)
    [outputs] = run(engine, [(ids, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True,
                                                  prompt_logprobs=TOP))])
    assert_matches(prompt_logprobs_of(outputs), ids, reference(ref_model, ids))
    assert outputs[0].prompt_logprobs is not None  # with the first token
    assert sum(len(o.delta_token_ids) for o in outputs) == 2


def test_chunked_prefill_yields_the_same_logprobs_in_pieces(tiny):
    loaded, ref_model = tiny
    engine = engine_for(loaded, max_num_batched_tokens=16)
    pieces = []
    step = engine.core.step

    def spy():
        outputs = step()
        pieces.extend(len(o.prompt_logprobs) for o in outputs.outputs if o.prompt_logprobs)
        return outputs

    engine.core.step = spy
    ids = random_ids(70, seed=2)
    [outputs] = run(engine, [(ids, SamplingParams(max_tokens=1, prompt_logprobs=TOP))])
    assert len(pieces) == 5 and sum(pieces) == 69  # 70 prompt rows in steps of <= 16
    assert_matches(prompt_logprobs_of(outputs), ids, reference(ref_model, ids))


def test_row_blocks_bound_the_logits_and_change_nothing(tiny, monkeypatch):
    loaded, ref_model = tiny
    ids = random_ids(70, seed=3)
    params = SamplingParams(max_tokens=1, prompt_logprobs=TOP)
    whole = prompt_logprobs_of(run(engine_for(loaded), [(ids, params)])[0])
    heads = []
    monkeypatch.setattr(prompt_logprobs_module, "BLOCK_ELEMENTS", 512 * 8)  # 8 rows a block
    engine = engine_for(loaded)
    lm_head = engine.runner.model.lm_head

    class Spy:
        def __call__(self, rows, small_step=None):
            heads.append(rows.shape[0])
            return lm_head(rows, small_step)

    engine.runner.model.lm_head = Spy()
    blocked = prompt_logprobs_of(run(engine, [(ids, params)])[0])
    assert max(heads) == 8 and sum(h for h in heads if h == 8) >= 64
    for b, w in zip(blocked[1:], whole[1:], strict=True):
        # MKL may round a row's last bits apart with the rows beside it
        assert b.sampled.logprob == pytest.approx(w.sampled.logprob, abs=1e-5)
        assert [t.token_id for t in b.top] == [t.token_id for t in w.top]


def test_a_cached_prefix_still_gets_every_position(tiny):
    loaded, ref_model = tiny
    engine = engine_for(loaded)
    ids = random_ids(70, seed=4)
    [plain] = run(engine, [(ids, SamplingParams(max_tokens=1))])
    [again] = run(engine, [(ids, SamplingParams(max_tokens=1))])
    assert again[-1].num_cached_tokens == 64  # the prefix is cached
    [outputs] = run(engine, [(ids, SamplingParams(max_tokens=1, prompt_logprobs=TOP))])
    assert outputs[-1].num_cached_tokens == 0  # not taken: its hidden states are needed
    assert_matches(prompt_logprobs_of(outputs), ids, reference(ref_model, ids))
    assert plain[-1].num_cached_tokens == 0


def test_plain_requests_beside_them_are_unchanged(tiny):
    loaded, ref_model = tiny
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    plain_prompts = [random_ids(n, seed=10 + n) for n in (5, 37, 64)]
    alone = [sum((o.delta_token_ids for o in outs), [])
             for outs in run(engine_for(loaded), [(p, greedy) for p in plain_prompts])]
    wanting = [random_ids(n, seed=20 + n) for n in (2, 50)]
    mixed = run(engine_for(loaded, max_num_batched_tokens=48),
                [(p, greedy) for p in plain_prompts]
                + [(p, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True,
                                      prompt_logprobs=TOP)) for p in wanting])
    for outs, expected in zip(mixed[:3], alone, strict=True):
        assert sum((o.delta_token_ids for o in outs), []) == expected
        assert all(o.prompt_logprobs is None for o in outs)
    for outs, ids in zip(mixed[3:], wanting, strict=True):
        assert_matches(prompt_logprobs_of(outs), ids, reference(ref_model, ids))


def test_max_tokens_zero_computes_the_prompt_and_ends(tiny):
    loaded, ref_model = tiny
    engine = engine_for(loaded, max_num_batched_tokens=32)
    free = engine.kv.num_free_blocks
    ids = random_ids(70, seed=5)
    [outputs] = run(engine, [(ids, SamplingParams(max_tokens=0, prompt_logprobs=0))])
    last = outputs[-1]
    assert (last.finished, last.finish_reason, last.num_output_tokens) == (True, "length", 0)
    assert all(not o.delta_token_ids and not o.delta_text for o in outputs)
    assert last.prompt_token_ids == ids and last.num_prompt_tokens == 70
    assert_matches(prompt_logprobs_of(outputs), ids, reference(ref_model, ids), top=0)
    assert engine.kv.num_free_blocks == free
    stats = engine.stats()
    assert (stats.prompt_tokens_total, stats.generation_tokens_total) == (70, 0)
    # a one-token prompt: nothing predicts its token
    [one] = run(engine, [([7], SamplingParams(max_tokens=0, prompt_logprobs=2))])
    assert one[-1].prompt_logprobs == [None] and one[-1].finish_reason == "length"
    # without prompt logprobs too: the prompt is computed, nothing comes back
    [bare] = run(engine, [(ids, SamplingParams(max_tokens=0))])
    assert [o.finish_reason for o in bare] == ["length"] and bare[0].prompt_logprobs is None


def test_preempted_mid_prompt_sends_each_logprob_once(tiny):
    loaded, ref_model = tiny
    # 6 blocks of 16: two 40-token prompts cannot both grow; the newer one is preempted
    engine = engine_for(loaded, kv_cache_memory=6 * 16 * 2 * 2 * 2 * 16 * 4,
                        max_num_batched_tokens=16)
    assert engine.kv.num_blocks == 6
    a, b = random_ids(40, seed=6), random_ids(40, seed=7)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, prompt_logprobs=1)
    outs = run(engine, [(a, params), (b, params)])
    assert engine.scheduler.num_preemptions > 0
    for outputs, ids in zip(outs, (a, b), strict=True):
        assert_matches(prompt_logprobs_of(outputs), ids, reference(ref_model, ids), top=1)


def test_a_step_that_fails_and_runs_again_sends_each_logprob_once(tiny):
    """The sampler fails after the prompt rows were scored: the engine runs each request
    alone, and the one that did not fail scores its prompt again, whole."""
    loaded, ref_model = tiny
    engine = engine_for(loaded)
    sampler = engine.runner.sampler
    poison = 2  # in no random_ids prompt

    class Faulty:
        def launch(self, logits, requests):
            if any(poison in r.prompt_token_ids for r in requests):
                raise RuntimeError("injected fault")
            return sampler.launch(logits, requests)

    engine.runner.sampler = Faulty()
    ids = random_ids(40, seed=8)
    params = SamplingParams(max_tokens=2, prompt_logprobs=TOP)
    good, bad = run(engine, [(ids, params), (ids[:10] + [poison], params)])
    assert bad[-1].finish_reason == "error" and "injected fault" in bad[-1].error
    assert good[-1].finish_reason == "length"
    assert_matches(prompt_logprobs_of(good), ids, reference(ref_model, ids))
