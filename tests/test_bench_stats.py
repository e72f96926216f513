"""Benchmark statistics, results, prompts and reports from known timings: no server, no model."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pagedserve.bench.loadgen import Workload, poisson_arrivals
from pagedserve.bench.prompts import PromptSet
from pagedserve.bench.report import (
    BEGIN,
    END,
    best_rows,
    markers,
    ratio_rows,
    render,
    write_report,
)
from pagedserve.bench.results import KVSnapshot, LevelResult, RequestRecord, RunResult
from pagedserve.bench.server_metrics import parse_gauges, summarize_samples
from pagedserve.bench.stats import (
    Distribution,
    percentile,
    summarize,
    throughput,
    time_per_output_token,
)


def test_percentile_interpolates_linearly_between_ranks():
    values = [4.0, 1.0, 3.0, 2.0]  # sorted: 1 2 3 4, ranks 0..3
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 4.0
    assert percentile(values, 50) == 2.5  # rank 1.5
    assert percentile(values, 90) == pytest.approx(3.7)  # rank 2.7
    assert percentile(values, 99) == pytest.approx(3.97)  # rank 2.97
    assert percentile([7.0], 99) == 7.0


@pytest.mark.parametrize("q", [0, 1, 25, 50, 90, 99, 99.9, 100])
def test_percentile_matches_numpy(q):
    values = list(np.random.default_rng(0).exponential(1.0, size=37))
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_rejects_bad_input():
    with pytest.raises(ValueError, match="values"):
        percentile([], 50)
    with pytest.raises(ValueError, match="q must be"):
        percentile([1.0], 101)


def test_summarize_and_empty_series():
    assert summarize([1.0, 2.0, 3.0, 4.0, 5.0]) == Distribution(
        mean=3.0, p50=3.0, p90=pytest.approx(4.6), p99=pytest.approx(4.96)
    )
    assert all(math.isnan(v) for v in summarize([]))


def test_tpot_and_throughput():
    # 10 tokens: first at 0.5 s, the last at 2.3 s -> 9 gaps of 0.2 s
    assert time_per_output_token(2.3, 0.5, 10) == pytest.approx(0.2)
    assert time_per_output_token(1.0, 1.0, 1) is None
    assert throughput(300, 1.5) == 200.0
    assert throughput(5, 0.0) == 0.0


def _record(ttft, gaps, tokens=None, prompt=10):
    e2e = ttft + sum(gaps)
    return RequestRecord(success=True, ttft=ttft, itl=list(gaps), e2e=e2e, prompt_tokens=prompt,
                         output_tokens=len(gaps) + 1 if tokens is None else tokens)


def test_level_result_from_known_timings():
    records = [
        _record(0.1, [0.02, 0.02, 0.02]),  # e2e 0.16, 4 tokens, TPOT 0.02
        _record(0.3, [0.04, 0.04, 0.04]),  # e2e 0.42, 4 tokens, TPOT 0.04
        RequestRecord(error="HTTP 500: boom"),
    ]
    level = LevelResult.from_records(records, concurrency=2, duration_s=0.5)
    assert (level.num_prompts, level.successful, level.failed) == (3, 2, 1)
    assert level.errors == ["HTTP 500: boom"]
    assert level.total_output_tokens == 8
    assert level.total_input_tokens == 20
    assert level.output_throughput == pytest.approx(16.0)
    assert level.request_throughput == pytest.approx(4.0)
    assert level.ttft_ms.mean == pytest.approx(200.0)
    assert level.ttft_ms.p50 == pytest.approx(200.0)
    assert level.ttft_ms.p99 == pytest.approx(100 + 200 * 0.99)
    assert level.tpot_ms.mean == pytest.approx(30.0)
    assert level.itl_ms.p50 == pytest.approx(30.0)  # 20 20 20 40 40 40
    assert level.e2e_ms.p90 == pytest.approx(160 + 260 * 0.9)


def test_run_result_json_round_trip(tmp_path):
    level = LevelResult.from_records(
        [_record(0.1, [])], concurrency=1, duration_s=1.0,
        kv=KVSnapshot(samples=3, waste_perc=0.5),
    )
    assert math.isnan(level.tpot_ms.p50)  # one token: no decode phase
    run = RunResult(label="paged", url="http://x", api="openai", model="m", input_len=8,
                    output_len=1, seed=0, levels=[level], machine={"cores": 2})
    loaded = RunResult.load(run.save(tmp_path / "r.json"))
    assert '"p50": null' in (tmp_path / "r.json").read_text()
    assert loaded.levels[0].ttft_ms == level.ttft_ms
    assert math.isnan(loaded.levels[0].tpot_ms.p99)
    assert loaded.levels[0].kv.waste_perc == 0.5
    assert loaded.level(1) is not None and loaded.level(2) is None


def test_prompts_are_unique_reproducible_and_calibrated():
    prompts = PromptSet(20, 50, seed=3)
    first = prompts.prompts()
    assert first == PromptSet(20, 50, seed=3).prompts()
    assert len(set(first)) == 20
    assert all(len(p.split()) == 50 for p in first)
    # a server that counts 1 BOS + 2 tokens per word
    prompts.calibrate((50, 101), (100, 201))
    assert prompts.tokens_per_word == 2.0 and prompts.overhead_tokens == 1.0
    assert all(len(p.split()) == 24 for p in prompts.prompts())  # 1 + 2 * 24 = 49 ~ 50
    assert prompts.sample(7) not in prompts.prompts()


def test_shared_prefix_is_common_to_all_prompts():
    prompts = PromptSet(5, 40, seed=1, shared_prefix_len=30).prompts()
    heads = {" ".join(p.split()[:30]) for p in prompts}
    tails = {" ".join(p.split()[30:]) for p in prompts}
    assert len(heads) == 1 and len(tails) == 5


def test_poisson_arrivals():
    assert poisson_arrivals(3, None, 0) == [0.0, 0.0, 0.0]
    times = poisson_arrivals(2000, 10.0, seed=1)
    assert times[0] == 0.0 and times == sorted(times)
    assert times == poisson_arrivals(2000, 10.0, seed=1)
    assert 1 / np.mean(np.diff(times)) == pytest.approx(10.0, rel=0.1)


def test_workload_prompts_per_level():
    assert Workload(num_prompts=8).prompts_per_level([1, 2]) == [8, 8]
    assert Workload(num_prompts=[4, 9]).prompts_per_level([1, 2]) == [4, 9]
    with pytest.raises(ValueError, match="num_prompts"):
        Workload(num_prompts=[4]).prompts_per_level([1, 2])


METRICS = """# HELP pagedserve:kv_cache_waste_perc waste
# TYPE pagedserve:kv_cache_waste_perc gauge
pagedserve:kv_cache_waste_perc{{model_name="m"}} {waste}
# TYPE pagedserve:kv_reserved_tokens gauge
pagedserve:kv_reserved_tokens{{model_name="m"}} {reserved}
# TYPE pagedserve:num_requests_running gauge
pagedserve:num_requests_running{{model_name="m"}} {running}
# TYPE pagedserve:kv_cache_usage_perc gauge
pagedserve:kv_cache_usage_perc{{model_name="m"}} {usage}
"""


def test_kv_gauges_average_waste_over_busy_samples():
    rows = [
        parse_gauges(METRICS.format(waste=0.0, reserved=0, running=0, usage=0.0)),
        parse_gauges(METRICS.format(waste=0.9, reserved=16384, running=4, usage=1.0)),
        parse_gauges(METRICS.format(waste=0.7, reserved=16384, running=4, usage=1.0)),
    ]
    assert rows[1]["pagedserve:kv_reserved_tokens"] == 16384
    kv = summarize_samples(rows)
    assert kv.samples == 3
    assert kv.waste_perc == pytest.approx(0.8)
    assert kv.waste_perc_max == pytest.approx(0.9)
    assert kv.usage_perc_max == 1.0
    assert kv.reserved_tokens_max == 16384
    assert summarize_samples([]).waste_perc is None


def test_waste_derived_from_reserved_and_used_tokens():
    rows = [{"vllm:kv_reserved_tokens": 100.0, "vllm:kv_used_tokens": 75.0}]
    assert summarize_samples(rows).waste_perc == pytest.approx(0.25)
    # the token counts win over a waste gauge expressed relative to the used slots (33%)
    rows[0]["pagedserve:kv_cache_waste_perc"] = 33.3
    assert summarize_samples(rows).waste_perc == pytest.approx(0.25)
    # weighted by reserved slots: 25 of 400 reserved token-samples empty, not (25% + 0%) / 2
    rows.append({"vllm:kv_reserved_tokens": 300.0, "vllm:kv_used_tokens": 300.0})
    kv = summarize_samples(rows)
    assert kv.waste_perc == pytest.approx(25 / 400) and kv.waste_perc_max == pytest.approx(0.25)


def _run(label, tput, ttft_p99):
    def level(c, t, p99):
        lv = LevelResult.from_records([_record(0.1, [0.01])], concurrency=c, duration_s=1.0)
        lv.output_throughput = t
        lv.ttft_ms = Distribution(p99, p99, p99, p99)
        return lv

    return RunResult(label=label, url="u", api="openai", model="m", input_len=8, output_len=2,
                     seed=0, levels=[level(c, t, p) for c, t, p in zip([1, 16], tput, ttft_p99,
                                                                       strict=True)])


def test_report_ratios_and_markers(tmp_path):
    paged, static = _run("paged", [10, 80], [100, 200]), _run("static", [10, 20], [100, 3000])
    assert ratio_rows(paged, static) == [(1, 1.0, 1.0), (16, 4.0, 15.0)]
    section = render([paged, static], plots=[tmp_path / "x.png"], doc_dir=tmp_path)
    assert "| 16 | paged | 80.0 |" in section and "| 16 | 4.00x | 15.0x |" in section
    assert "![x](x.png)" in section
    path = tmp_path / "benchmarks.md"
    path.write_text(f"# Title\n\nintro\n\n{BEGIN}\nstale numbers\n{END}\n\n## Discussion\nkept\n")
    text = write_report(path, section).read_text()
    assert "stale numbers" not in text and "intro" in text and f"{END}\n\n## Discussion\nkept" in text
    assert text.count(BEGIN) == 1 and "| 16 | 4.00x | 15.0x |" in text


def test_a_peer_group_is_compared_by_its_best_configuration_per_measure(tmp_path):
    ours = _run("paged", [40, 400], [100, 1000])
    few = _run("llama.cpp -np 4", [80, 100], [50, 20000])  # fast alone, queues many
    many = _run("llama.cpp -np 64", [60, 120], [70, 8000])
    for run in (few, many):
        run.server = {"group": "llama.cpp"}
    # each measure from the configuration best at it: -np 4's speed at 1, -np 64's at 16
    assert best_rows(ours, [few, many]) == [(1, 80, 0.5, 50, 0.5), (16, 120, 400 / 120, 8000, 8.0)]
    section = render([ours, few, many])
    assert "| 16 | 400.0 | 120.0 | 3.33x | 1,000 / 8,000 | 8.0x |" in section
    assert "of `llama.cpp -np 4`, `llama.cpp -np 64`" in section
    assert "Ratios (paged over" not in section  # the group's table replaces the pairwise one


def test_named_sections_share_a_page_and_keep_the_unnamed_one(tmp_path):
    path = tmp_path / "benchmarks.md"
    write_report(path, "layouts v1\n")
    write_report(path, "llama v1\n", section="llama.cpp")
    write_report(path, "layouts v2\n")
    text = write_report(path, "llama v2\n", section="llama.cpp").read_text()
    begin, end = markers("llama.cpp")
    assert text.count(BEGIN) == 1 and text.count(begin) == 1 and text.count(end) == 1
    assert "v1" not in text and text.index("layouts v2") < text.index("llama v2")


def test_tables_keep_their_numbers_when_not_printed_to_a_terminal():
    """`bench serve | tee log`: rich would assume 80 columns and print "12…" for 12346."""
    import io

    from pagedserve.bench.progress import output_console, summary_table

    records = [_record(12.3456, [0.1234] * 63) for _ in range(100)]
    level = LevelResult.from_records(records, concurrency=128, duration_s=123.4)
    out = io.StringIO()
    console = output_console(out)
    console.print(summary_table("paged: smollm2:135m at http://127.0.0.1:11434", [level]))
    text = out.getvalue()
    assert "…" not in text
    for value in ("128", "123.4", "12346", "123.4", "TTFT p99", "KV waste"):
        assert value in text


def test_kv_probe_asks_for_its_gauges_by_name_after_the_first_scrape():
    import asyncio

    import httpx

    from pagedserve.bench.server_metrics import KVProbe

    asked: list[list[str]] = []
    full = METRICS.format(waste=0.5, reserved=64, running=2, usage=0.5) + (
        "# TYPE pagedserve:prompt_tokens_total counter\n"
        'pagedserve:prompt_tokens_total{model_name="m"} 9\n')

    def answer(request: httpx.Request) -> httpx.Response:
        names = request.url.params.get_list("name[]")
        asked.append(names)
        # as prometheus_client's exporters do: only the named families when names are given
        lines = full.splitlines()
        if names:
            lines = [line for i, line in enumerate(lines) if any(
                n in line or (i + 1 < len(lines) and n in lines[i + 1]) for n in names)]
        return httpx.Response(200, text="\n".join(lines) + "\n")

    async def scrape_twice():
        transport = httpx.MockTransport(answer)
        async with httpx.AsyncClient(transport=transport, base_url="http://server") as http:
            probe = KVProbe(http)
            return await probe.scrape(), await probe.scrape()

    first, second = asyncio.run(scrape_twice())
    gauges = ["pagedserve:kv_cache_usage_perc", "pagedserve:kv_cache_waste_perc",
              "pagedserve:kv_reserved_tokens", "pagedserve:num_requests_running"]
    assert asked == [[], gauges]  # the counter is not a gauge the probe reads
    assert first["pagedserve:prompt_tokens_total"] == 9
    assert second == {name: first[name] for name in gauges}
