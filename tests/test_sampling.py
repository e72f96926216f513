"""SamplingParams validation, and per-request sampling behaviour inside one batch."""

from __future__ import annotations

import math

import pytest
import torch

from pagedserve.outputs import RequestMetrics
from pagedserve.request import Request
from pagedserve.sampler import Sampler
from pagedserve.sampling_params import SamplingParams


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
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
