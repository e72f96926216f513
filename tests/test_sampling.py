"""SamplingParams validation, and per-request sampling behaviour inside one batch."""

from __future__ import annotations

import math

import pytest
import torch

from pagedserve.core.request import Request
from pagedserve.outputs import RequestMetrics
from pagedserve.sampling_params import SamplingParams
from pagedserve.worker.penalties import penalized
from pagedserve.worker.sampler import Sampler


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"prompt_logprobs": 21}, "prompt_logprobs"),
        ({"prompt_logprobs": -1}, "prompt_logprobs"),
        ({"logit_bias": {5: 100.5}}, "logit_bias"),
        ({"logit_bias": {5: float("-inf")}}, "logit_bias"),
        ({"logit_bias": {"five": 1}}, "logit_bias"),
        ({"logit_bias": {-5: 1}}, "logit_bias"),
        ({"logit_bias": {5: "1"}}, "logit_bias"),
        ({"logit_bias": [5, 1]}, "logit_bias"),
        ({"logit_bias": {i: 1 for i in range(301)}}, "logit_bias"),
        ({"max_tokens": -3}, "max_tokens"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"presence_penalty": 3.0}, "presence_penalty"),
        ({"frequency_penalty": -2.5}, "frequency_penalty"),
        ({"n": 0}, "n"),
        ({"logprobs": 50}, "logprobs"),
        ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
        ({"stop": [""]}, "stop"),
        ({"seed": 1.5}, "seed"),
        ({"temperature": "hot"}, "temperature"),
        ({"max_tokens": True}, "max_tokens"),
        ({"repeat_last_n": -1}, "repeat_last_n"),
        ({"repeat_last_n": 1.5}, "repeat_last_n"),
    ],
)
def test_bad_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError) as err:
        SamplingParams(**kwargs)
    assert str(err.value).startswith(field)


def test_good_sampling_params_normalize():
    p = SamplingParams(stop="###", top_k=-1, max_tokens=None)
    assert p.stop == ["###"]
    assert p.top_k == 0
    assert p.max_tokens is None
    assert SamplingParams().repeat_last_n is None
    assert SamplingParams(repeat_last_n=0).repeat_last_n == 0
    assert SamplingParams(repeat_last_n=64).repeat_last_n == 64
    assert SamplingParams(max_tokens=0).max_tokens == 0  # the prompt only
    assert SamplingParams(logit_bias={"7": 100, 9: -2.5}).logit_bias == {7: 100.0, 9: -2.5}
    assert SamplingParams(logit_bias={}).logit_bias is None


def req(params: SamplingParams, outputs=(), prompt=(1, 2, 3), eos=(0,)) -> Request:
    r = Request("r", list(prompt), params, frozenset(eos), 100, RequestMetrics(0.0))
    for t in outputs:
        r.append_output_token(t)
    return r


def logits_row(values: dict[int, float], vocab: int = 10) -> torch.Tensor:
    row = torch.full((vocab,), -10.0)
    for i, v in values.items():
        row[i] = v
    return row


def test_greedy_takes_the_argmax_per_row_whatever_the_neighbours():
    sampler = Sampler(seed=0)
    logits = torch.stack([logits_row({3: 5.0}), logits_row({7: 2.0, 8: 1.0})])
    greedy = SamplingParams(temperature=0)
    hot = SamplingParams(temperature=1.0, top_k=1)
    out = sampler(logits, [req(greedy), req(hot)])
    assert [t.token_id for t in out] == [3, 7]


def test_the_same_seed_gives_the_same_tokens_whatever_else_is_in_the_batch():
    vocab = 50
    base = torch.randn(vocab, generator=torch.Generator().manual_seed(3))
    seeded = SamplingParams(temperature=1.0, seed=1234)

    def draw(batch_size: int, steps: int = 20) -> list[int]:
        sampler = Sampler(seed=batch_size)  # a different global generator every time
        tokens = []
        r = req(seeded)
        for _ in range(steps):
            others = [req(SamplingParams(temperature=1.0)) for _ in range(batch_size - 1)]
            logits = torch.stack([base] * batch_size)
            out = sampler(logits, others + [r])
            tokens.append(out[-1].token_id)
            r.append_output_token(out[-1].token_id)
        return tokens

    alone, crowded = draw(1), draw(7)
    assert alone == crowded
    assert len(set(alone)) > 1  # it really samples


def test_top_k_top_p_and_min_p_restrict_the_candidates():
    sampler = Sampler(seed=0)
    row = logits_row({1: 3.0, 2: 2.9, 3: 2.8, 4: 0.0})
    for params, allowed in [
        (SamplingParams(temperature=1.0, top_k=2), {1, 2}),
        (SamplingParams(temperature=1.0, top_p=0.5), {1, 2}),  # 1 has ~36%: needs 2
        (SamplingParams(temperature=1.0, min_p=0.5), {1, 2, 3}),  # 4 is e^-3 of the max
    ]:
        seen = {sampler(row.unsqueeze(0), [req(params)])[0].token_id for _ in range(200)}
        assert seen == allowed, params


def test_penalties_move_probability_away_from_seen_tokens():
    sampler = Sampler(seed=0)
    row = logits_row({1: 2.0, 2: 1.9})
    rep = SamplingParams(temperature=0, repetition_penalty=1.5)
    assert sampler(row.unsqueeze(0), [req(rep, prompt=(1,))])[0].token_id == 2
    presence = SamplingParams(temperature=0, presence_penalty=0.5)
    assert sampler(row.unsqueeze(0), [req(presence, outputs=(1,))])[0].token_id == 2
    freq = SamplingParams(temperature=0, frequency_penalty=0.06)
    assert sampler(row.unsqueeze(0), [req(freq, outputs=(1, 1))])[0].token_id == 2
    assert sampler(row.unsqueeze(0), [req(freq, outputs=(1,))])[0].token_id == 1


def test_min_tokens_suppresses_eos_and_stop_tokens_until_reached():
    sampler = Sampler(seed=0)
    row = logits_row({0: 5.0, 4: 4.0, 5: 1.0})  # 0 is EOS, 4 a stop token
    params = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[4])
    assert sampler(row.unsqueeze(0), [req(params)])[0].token_id == 5
    assert sampler(row.unsqueeze(0), [req(params, outputs=(5, 5))])[0].token_id == 0


def test_logprobs_are_the_raw_distribution_with_top_alternatives():
    sampler = Sampler(seed=0)
    row = logits_row({1: 2.0, 2: 1.0, 3: 0.5})
    [tok] = sampler(row.unsqueeze(0), [req(SamplingParams(temperature=0, logprobs=2))])
    expected = torch.log_softmax(row, -1)
    assert tok.token_id == 1
    assert math.isclose(tok.logprob, float(expected[1]), rel_tol=1e-6)
    assert [t for t, _ in tok.top] == [1, 2]
    assert math.isclose(tok.top[1][1], float(expected[2]), rel_tol=1e-6)


def test_logit_bias_forces_and_bans_tokens_and_leaves_logprobs_raw():
    sampler = Sampler(seed=0)
    logits = random_logits(6, vocab=50, seed=1)
    best = logits.argmax(dim=-1).tolist()
    forced = SamplingParams(temperature=0, logit_bias={13: 100}, logprobs=1)
    out = sampler(logits, [req(forced) for _ in range(6)])
    assert [t.token_id for t in out] == [13] * 6
    raw = logits.log_softmax(dim=-1)
    for i, token in enumerate(out):
        assert math.isclose(token.logprob, float(raw[i, 13]), rel_tol=1e-5)
        assert token.top[0][0] == best[i]  # the raw distribution's best
    banned = [req(SamplingParams(temperature=0, logit_bias={best[i]: -100}))
              for i in range(6)]
    second = logits.topk(2, dim=-1).indices[:, 1].tolist()
    assert [t.token_id for t in sampler(logits, banned)] == second
    hot = SamplingParams(temperature=1.0, logit_bias={b: -100 for b in set(best)} | {7: 10})
    drawn = [t.token_id for _ in range(50) for t in sampler(logits, [req(hot)] * 6)]
    assert not set(drawn) & set(best) and drawn.count(7) > len(drawn) // 2
    # rows without a bias, beside biased ones, are untouched
    mixed = sampler(logits, [req(SamplingParams(temperature=0)), req(forced)] * 3)
    assert [t.token_id for t in mixed] == [best[0], 13, best[2], 13, best[4], 13]


# -- the batched device sampler ------------------------------------------------------------------

V = 300


def ids_of(out) -> list[int]:
    return [t.token_id for t in out]


def random_logits(rows: int, vocab: int = V, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


MIXED = [
    SamplingParams(temperature=0),
    SamplingParams(temperature=0, repetition_penalty=1.3, logprobs=3),
    SamplingParams(temperature=0.7, seed=1),
    SamplingParams(temperature=1.0, top_k=5, seed=2),
    SamplingParams(temperature=1.0, top_k=1, seed=3),
    SamplingParams(temperature=0.8, top_p=0.8, seed=4),
    SamplingParams(temperature=0.8, top_k=40, top_p=0.9, seed=5, repetition_penalty=1.1,
                   repeat_last_n=8),
    SamplingParams(temperature=1.2, min_p=0.1, seed=6),
    SamplingParams(temperature=1.0, presence_penalty=1.5, frequency_penalty=0.7, seed=7),
    SamplingParams(temperature=1.0, seed=8, min_tokens=3, stop_token_ids=[4, V + 10]),
    SamplingParams(temperature=1.0, seed=9, logprobs=5),
    SamplingParams(temperature=1.0, top_k=2**63 - 1, seed=10, logprobs=0),
    SamplingParams(temperature=1e-7, seed=11),
    SamplingParams(temperature=0.9, top_p=0.5, top_k=V - 1, seed=12, min_p=0.05),
    SamplingParams(temperature=1.0, seed=13, logit_bias={5: 8.0, 9: -100.0}, logprobs=2),
    SamplingParams(temperature=0, repetition_penalty=1.2, logit_bias={6: 2.5, V + 3: 1.0}),
]


def test_every_knob_batched_equals_each_row_alone():
    requests = [req(p, prompt=(5, 6, 7, 5), eos=(0, 1, 2, 3)) for p in MIXED]
    for step in range(12):
        logits = random_logits(len(MIXED), seed=step)
        logits[:, :4] += 4.0  # EOS ids are likely, so that min_tokens has something to stop
        batched = Sampler(seed=100 + step)(logits, requests)
        for i, r in enumerate(requests):
            [alone] = Sampler(seed=step)(logits[i:i + 1].clone(), [r])
            assert alone.token_id == batched[i].token_id, (step, MIXED[i])
            if r.params.logprobs is None:
                assert alone.logprob is None and batched[i].logprob is None
                continue
            assert math.isclose(alone.logprob, batched[i].logprob, rel_tol=1e-6, abs_tol=1e-6)
            assert [t for t, _ in alone.top] == [t for t, _ in batched[i].top]
            assert len(alone.top) == r.params.logprobs
        for i, r in enumerate(requests):
            if step < 3 and MIXED[i].min_tokens:
                assert batched[i].token_id not in (0, 1, 2, 3, 4)
            r.append_output_token(batched[i].token_id)
    assert len({t for r in requests[2:] for t in r.output_token_ids}) > 20  # they do sample


def test_seeded_tokens_survive_preemption_and_any_companions():
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=77)
    r = req(params)
    for step in range(10):
        companions = [req(p) for p in MIXED[step % 3:]]
        out = Sampler(seed=step)(random_logits(len(companions) + 1, seed=step),
                                 companions + [r])
        r.append_output_token(out[-1].token_id)
    # recomputed after preemption: a new Request with the tokens so far, a new sampler
    for n in range(10):
        again = req(params)
        for t in r.output_token_ids[:n]:
            again.append_output_token(t)
        logits = random_logits(len(MIXED[n % 3:]) + 1, seed=n)[-1:]
        assert ids_of(Sampler(seed=999)(logits, [again])) == [r.output_token_ids[n]]


def test_the_engine_seed_repeats_unseeded_draws():
    logits = random_logits(8)
    params = [SamplingParams(temperature=1.0) for _ in range(8)]
    runs = []
    for seed in (1, 1, 2):
        sampler = Sampler(seed=seed)
        runs.append([ids_of(sampler(logits, [req(p) for p in params])) for _ in range(3)])
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


@pytest.mark.parametrize("limit", [
    {"top_k": 1}, {"top_p": 1e-9}, {"min_p": 1.0}, {"temperature": 1e-6},
    {"top_k": 1, "top_p": 1e-9, "min_p": 1.0},
    {"top_p": 5e-324}, {"top_k": 3, "top_p": 5e-324},  # round to 0 in float32 (the fuzzer's)
])
def test_filters_at_their_limit_are_greedy(limit):
    logits = random_logits(64, vocab=5000)
    values = {"temperature": 1.5, **limit}
    requests = [req(SamplingParams(seed=i, **values)) for i in range(64)]
    assert ids_of(Sampler()(logits, requests)) == logits.argmax(dim=-1).tolist()


P = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.03, 0.01])


@pytest.mark.parametrize(("values", "expected"), [
    ({}, P),
    ({"temperature": 0.5}, P**2 / (P**2).sum()),
    ({"top_k": 3}, torch.cat([P[:3], torch.zeros(4)]) / P[:3].sum()),
    ({"top_p": 0.7}, torch.cat([P[:3], torch.zeros(4)]) / P[:3].sum()),  # mass before 2: .65
    ({"min_p": 0.3}, torch.cat([P[:3], torch.zeros(4)]) / P[:3].sum()),  # >= 0.12
    ({"top_k": 4, "top_p": 0.8}, torch.cat([P[:3], torch.zeros(4)]) / P[:3].sum()),
])
@pytest.mark.parametrize("seeded", [True, False])
def test_sampling_frequencies_match_the_probabilities(values, expected, seeded):
    n = 10000
    requests = [req(SamplingParams(**{"temperature": 1.0, **values},
                                   seed=i if seeded else None)) for i in range(n)]
    out = Sampler(seed=3)(P.log().expand(n, -1).contiguous(), requests)
    counts = torch.bincount(torch.tensor(ids_of(out)), minlength=len(P)).double()
    sigma = (n * expected * (1 - expected)).sqrt()
    assert ((counts - n * expected).abs() <= 5 * sigma + 1e-9).all(), (counts / n, expected)


def test_consecutive_draws_of_one_seed_are_independent():
    n = 8000
    uniform = torch.zeros(n, 4)
    first = [req(SamplingParams(temperature=1.0, seed=s)) for s in range(n)]
    second = [req(SamplingParams(temperature=1.0, seed=s), outputs=(9,)) for s in range(n)]
    a = torch.tensor(ids_of(Sampler()(uniform, first)))
    b = torch.tensor(ids_of(Sampler()(uniform, second)))
    joint = torch.bincount(a * 4 + b, minlength=16).double()
    chi2 = float(((joint - n / 16) ** 2 / (n / 16)).sum())
    assert chi2 < 45  # 15 degrees of freedom: p < 1e-4 beyond this


@pytest.mark.parametrize("top_k", [2**63 - 1, 2**31, V + 1, V])
def test_a_top_k_beyond_the_vocabulary_means_no_limit(top_k):
    logits = random_logits(40)
    plain = [req(SamplingParams(temperature=1.0, seed=i)) for i in range(40)]
    huge = [req(SamplingParams(temperature=1.0, seed=i, top_k=top_k)) for i in range(40)]
    assert ids_of(Sampler()(logits, huge)) == ids_of(Sampler()(logits, plain))


def test_ties_at_the_kth_logit_are_all_kept_whatever_the_companions():
    row = torch.zeros(1, V)
    row[0, 0], row[0, 10:20] = 5.0, 3.0  # top_k=2: token 0 and all ten tokens tied second
    params = [SamplingParams(temperature=3.0, top_k=2, seed=s) for s in range(150)]
    alone = [Sampler()(row, [req(p)])[0].token_id for p in params]
    assert set(alone) == {0, *range(10, 20)}
    companion = req(SamplingParams(temperature=1.0, top_k=60))
    crowded = [Sampler()(torch.cat([random_logits(1), row]), [companion, req(p)])[1].token_id
               for p in params]
    assert crowded == alone


def test_the_nucleus_found_among_candidates_equals_the_full_sort():
    vocab = 6000
    logits = torch.zeros(3, vocab)
    logits[0] = torch.linspace(0, -120, vocab)  # nucleus of ~115 tokens: 256 settle it
    logits[1, :1000] = 5.0  # a thousand equal tokens: the 4096-wide candidates settle it
    logits[1] += torch.linspace(0, -1e-3, vocab)
    # row 2 stays flat: every candidate width falls short, the full sort decides
    for top_p, seed in [(0.9, s) for s in range(15)] + [(0.3, 7)]:
        params = SamplingParams(temperature=1.0, top_p=top_p, seed=seed)
        batched = ids_of(Sampler()(logits, [req(params) for _ in range(3)]))
        for i in range(3):
            assert batched[i] in _nucleus(logits[i], top_p)
            assert ids_of(Sampler()(logits[i:i + 1], [req(params)])) == [batched[i]]


def _nucleus(row: torch.Tensor, top_p: float) -> set[int]:
    """Reference: the old sampler's top-p over a full sort."""
    values, order = row.sort(descending=True, stable=True)
    probs = values.softmax(dim=-1)
    kept = (probs.cumsum(dim=-1) - probs) < top_p
    return set(order[kept].tolist())


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0), SamplingParams(temperature=1.0, seed=1),
    SamplingParams(temperature=1.0, top_k=3), SamplingParams(temperature=1.0, top_p=0.5),
    SamplingParams(temperature=0.5, min_p=0.5, seed=2), SamplingParams(temperature=1e-3),
    SamplingParams(temperature=0, logprobs=2), SamplingParams(temperature=1.0, logprobs=2),
], ids=["greedy", "seeded", "top_k", "top_p", "min_p", "cold", "greedy-logprobs",
        "logprobs"])
def test_non_finite_logits_never_crash(params):
    nan, inf = float("nan"), float("inf")
    logits = torch.randn(6, V)
    logits[0, ::2] = nan  # NaN beside finite values: never chosen
    logits[1] = nan
    logits[2] = -inf
    logits[3, 17] = inf
    logits[4, :] = 3e38  # finite, but inf once divided by a small temperature
    logits[4, 5] = nan
    logits[5, 40], logits[5, 41], logits[5, ::3] = inf, nan, -inf
    out = Sampler()(logits, [req(params) for _ in range(6)])
    tokens = ids_of(out)
    assert all(0 <= t < V for t in tokens)
    assert tokens[0] % 2 == 1
    assert tokens[3] == 17 and tokens[5] == 40
    assert tokens[4] != 5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits_sample_as_their_float32_values(dtype):
    logits = random_logits(len(MIXED)).to(dtype)
    requests = [req(p, outputs=(7, 8)) for p in MIXED]
    half = Sampler(seed=5)(logits, requests)
    full = Sampler(seed=5)(logits.float(), requests)
    assert ids_of(half) == ids_of(full)
    assert [t.logprob for t in half] == [t.logprob for t in full]


def test_the_callers_logits_are_left_alone():
    logits = random_logits(len(MIXED))
    before = logits.clone()
    Sampler()(logits, [req(p, outputs=(5, 5, 6)) for p in MIXED])
    assert torch.equal(logits, before)


def test_logprob_rows_with_different_counts_in_one_batch():
    logits = random_logits(4)
    params = [SamplingParams(temperature=0, logprobs=n) for n in (None, 0, 2, 5)]
    out = Sampler()(logits, [req(p) for p in params])
    expected = torch.log_softmax(logits, dim=-1)
    assert out[0].logprob is None and out[0].top is None
    assert out[1].top == [] and math.isclose(out[1].logprob, float(expected[1].max()),
                                             rel_tol=1e-6)
    for i, n in ((2, 2), (3, 5)):
        values, ids = expected[i].topk(n)
        assert [t for t, _ in out[i].top] == ids.tolist()
        assert all(math.isclose(a, b, rel_tol=1e-6)
                   for (_, a), b in zip(out[i].top, values.tolist(), strict=True))


# -- the penalty window (repeat_last_n) ----------------------------------------------------------

def test_a_token_outside_the_penalty_window_is_not_penalized():
    row = logits_row({1: 2.0, 2: 1.9}).unsqueeze(0)
    sampler = Sampler()

    def greedy(prompt, outputs=(), **penalties) -> int:
        params = SamplingParams(temperature=0, **penalties)
        return sampler(row, [req(params, prompt=prompt, outputs=outputs)])[0].token_id

    rep = {"repetition_penalty": 1.5}
    assert greedy((1, 5, 6), **rep) == 2  # None: the whole prompt
    assert greedy((1, 5, 6), **rep, repeat_last_n=2) == 1  # 1 is three tokens back
    assert greedy((1, 5, 6), **rep, repeat_last_n=3) == 2
    assert greedy((5, 6), outputs=(1, 7, 8), **rep, repeat_last_n=2) == 1
    assert greedy((1, 5, 6), **rep, repeat_last_n=0) == 1  # 0: penalties off
    # presence/frequency: the output only by default, the window over prompt + output when set
    presence = {"presence_penalty": 0.5}
    assert greedy((1, 5), **presence) == 1
    assert greedy((1, 5), **presence, repeat_last_n=2) == 2
    assert greedy((5,), outputs=(1, 6, 7), **presence, repeat_last_n=2) == 1
    freq = {"frequency_penalty": 0.06}  # one occurrence costs 0.06: not enough, two are
    assert greedy((5,), outputs=(1, 1, 6), **freq) == 2
    assert greedy((5,), outputs=(1, 1, 6), **freq, repeat_last_n=2) == 1
    assert greedy((5,), outputs=(1, 1, 6), **freq, repeat_last_n=3) == 2
    assert greedy((5,), outputs=(1, 1, 6), **freq, repeat_last_n=0) == 1


def test_penalties_follow_llama_cpp_over_the_window():
    """repetition first (divide positive, multiply negative), then count * frequency +
    presence subtracted, all from the same window's counts."""
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    params = SamplingParams(temperature=0, repetition_penalty=2.0,
                            presence_penalty=0.25, frequency_penalty=0.5, repeat_last_n=4)
    r = req(params, prompt=(3, 0, 1), outputs=(0, 1))  # window: 0 1 0 1 (3 is out)
    adjusted = penalized(logits, [r])[0].tolist()
    assert adjusted == [2.0 / 2 - 2 * 0.5 - 0.25, -1.0 * 2 - 2 * 0.5 - 0.25, 0.5, 3.0]


def test_the_common_path_reads_nothing_back_before_the_one_copy(monkeypatch):
    """On CUDA every bool()/int()/float()/item() of a tensor is a device sync: the usual
    step (no ties at the k-th logit, nuclei within the first candidates, no NaN) has none."""
    requests = [req(p, outputs=(5, 6)) for p in MIXED]
    logits = random_logits(len(MIXED), seed=1)
    reads = []
    for name in ("__bool__", "__int__", "__float__", "__index__", "item"):
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _name=name, _original=original):
            reads.append(_name)
            return _original(self, *args)

        monkeypatch.setattr(torch.Tensor, name, spy)
    Sampler()(logits, requests)
    assert reads == []
    logits[0, 3] = float("nan")  # a greedy row with NaN is settled after the copy
    Sampler()(logits, requests)
    assert reads
