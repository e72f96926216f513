"""The bench against real `pagedserve serve` processes on the bundled model, tiny lengths."""

from __future__ import annotations

import pytest

from pagedserve.bench.compare import sweep_run
from pagedserve.bench.loadgen import Workload
from pagedserve.bench.report import BEGIN
from pagedserve.bench.results import RunResult
from pagedserve.bench.server_process import ServerProcess
from pagedserve.cli import main

pytestmark = pytest.mark.slow

# the static pool stays small: 2 slots of 256 tokens
STATIC = ["--max-parallel", "2", "--num-ctx", "256"]


def test_compare_runs_both_layouts_and_writes_the_report(tmp_path, smollm_gguf):
    # 32 output tokens: a level long enough that the /metrics samples (every 0.25 s) land on
    # running requests, not only in the gaps between one round of requests and the next (with
    # 16, both samples of the 3-user level once saw nothing reserved)
    rc = main(["bench", "compare", str(smollm_gguf), "--concurrency", "1,3", "--num-prompts", "9",
               "--input-len", "24", "--output-len", "32", *STATIC, "--out", str(tmp_path)])
    assert rc == 0
    paged = RunResult.load(tmp_path / "bench-paged.json")
    static = RunResult.load(tmp_path / "bench-static-n-2.json")
    for run in (paged, static):
        assert [lv.concurrency for lv in run.levels] == [1, 3]
        for level in run.levels:
            assert (level.successful, level.failed) == (9, 0), level.errors
            assert level.total_output_tokens == 9 * 32  # ignore_eos: exactly output-len
            assert 9 * 16 <= level.total_input_tokens <= 9 * 32  # calibrated to about 24
            assert level.ttft_ms.p50 > 0 and level.tpot_ms.p50 > 0
    # a running request holds a whole static slot of 256 positions, but only the blocks its
    # ~56 tokens need when paged (4 blocks of 16)
    static_kv, paged_kv = static.levels[1].kv, paged.levels[1].kv
    assert static_kv.reserved_tokens_max in (256, 512)
    assert 0 < paged_kv.reserved_tokens_max <= 3 * 4 * 16, paged_kv
    assert static_kv.waste_perc > 0.8
    assert paged_kv.waste_perc < static_kv.waste_perc
    report = (tmp_path / "benchmarks.md").read_text()
    assert BEGIN in report and "| 3 | static N=2 |" in report
    assert (tmp_path / "bench_throughput.png").is_file()
    assert (tmp_path / "bench_ttft_p99.png").is_file()


def test_ollama_api_against_the_static_layout(smollm_gguf):
    with ServerProcess(str(smollm_gguf), ["--kv-layout", "static", *STATIC]) as server:
        run = sweep_run(server.url, label="static", api="ollama", model=None,
                        workload=Workload(input_len=16, output_len=5, num_prompts=4),
                        concurrency=[4])
    level = run.levels[0]
    assert (level.successful, level.failed) == (4, 0), level.errors
    assert level.total_output_tokens == 4 * 5
    # two slots for four requests: the second pair waits for the first to finish
    assert level.ttft_ms.p99 > level.ttft_ms.p50


def test_compare_starts_a_peer_by_its_command_and_reports_its_best(tmp_path, smollm_gguf,
                                                                    monkeypatch):
    """The llama.cpp path without llama.cpp: a pagedserve server stands in for the peer binary,
    started by command with {host} and {port} filled in, two configurations, one group."""
    import sys

    from pagedserve.bench import compare as compare_module

    peer = tmp_path / "llama-server"
    peer.write_text("")  # the binary must exist; the command below replaces it
    real = compare_module.llama_cpp_targets

    def standin(binary, model_path, *, threads, configs):
        targets = real(binary, model_path, threads=threads, configs=configs)
        for t in targets:
            t.command = [sys.executable, "-m", "pagedserve", "serve", str(model_path),
                         "--host", "{host}", "--port", "{port}", "--threads", str(threads),
                         *t.command[t.command.index(str(threads)) + 1:]]
        return targets

    monkeypatch.setattr(compare_module, "llama_cpp_targets", standin)
    rc = main(["bench", "compare", str(smollm_gguf), "--layouts", "paged", "--threads", "1",
               "--llama-server", str(peer), "--llama-server-args", "--max-num-seqs 1",
               "--llama-server-args", "--max-num-seqs 4", "--section", "llama.cpp",
               "--concurrency", "1,3", "--num-prompts", "3", "--input-len", "24",
               "--output-len", "8", "--out", str(tmp_path)])
    assert rc == 0
    files = sorted(p.name for p in tmp_path.glob("bench-llama-cpp*"))
    assert files == ["bench-llama-cpp-llama-cpp---max-num-seqs-1.json",
                     "bench-llama-cpp-llama-cpp---max-num-seqs-4.json",
                     "bench-llama-cpp-paged.json", "bench-llama-cpp_throughput.png",
                     "bench-llama-cpp_ttft_p99.png"]
    peer_run = RunResult.load(tmp_path / "bench-llama-cpp-llama-cpp---max-num-seqs-4.json")
    assert peer_run.server["group"] == "llama.cpp" and "{port}" not in peer_run.server["argv"]
    assert all(lv.successful == 3 for lv in peer_run.levels)
    report = (tmp_path / "benchmarks.md").read_text()
    assert "<!-- bench:begin llama.cpp" in report and "llama.cpp's best configuration" in report
    assert BEGIN not in report  # only the named section was written
