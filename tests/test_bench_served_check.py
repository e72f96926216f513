"""The served check (scripts/gpu-check --served) end to end on a CPU with a tiny shape: the
engine offline, `serve` at two levels, a Poisson run, mixed sampling and the static layout,
every row reported, no request failing; and the mixed client really sends its mix."""

from __future__ import annotations

import itertools

import pytest

from pagedserve.bench import served_check

pytestmark = pytest.mark.slow


def test_the_served_check_runs_every_section_on_a_cpu():
    rows: list[tuple[str, bool | None, str]] = []
    check = served_check.ServedCheck(
        model="dummy:tiny-llama-32k", device="cpu", levels=[1, 2], input_len=8, output_len=8,
        request_rate=20.0, poisson_prompts=4, mixed_level=2, min_served_share=None,
        min_served_tok_s={}, max_tpot_excess=None, max_ttft_p99_s=None, max_mixed_loss=None)
    numbers = served_check.run(check, lambda *row: rows.append(row))
    names = [name for name, _, _ in rows]
    for expected in ("offline 1 seq", "offline 2 seq", "served 1 users", "served 2 users",
                     "served poisson 20/s", "served mixed sampling 2", "static N=4, 2 users",
                     "served / offline at 2", "paged vs static N=4 at 2 users"):
        assert expected in names, names
    assert all(ok is not False for _, ok, _ in rows), rows
    for key in ("served 1", "served 2", "served poisson", "served mixed", "static"):
        level = numbers[key]
        assert level.failed == 0 and level.total_output_tokens == 8 * level.num_prompts


def test_the_mixed_client_cycles_through_its_sampling_mix():
    client = served_check.MixedSampling("m")
    bodies = [client.body("p", 4) for _ in range(8)]
    assert [b.get("top_p") for b in bodies] == [0.9, 0.9, None, None] * 2
    assert [b.get("logprobs") for b in bodies] == [None, None, None, 5] * 2
    assert all(b["stream"] and b["max_tokens"] == 4 for b in bodies)
    assert list(itertools.islice(itertools.cycle(served_check.MixedSampling.MIX), 4)) == \
        list(served_check.MixedSampling.MIX)
