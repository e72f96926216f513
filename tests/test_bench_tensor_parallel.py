"""`bench offline --tensor-parallel-size 2` on a dummy shape: per-rank weights and the share of
the batch's time spent in the collectives."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def test_bench_offline_reports_weights_per_rank_and_the_all_reduce_share(tmp_path):
    out = tmp_path / "results.json"
    subprocess.run(
        [sys.executable, "-m", "pagedserve", "bench", "offline", "dummy:tiny-llama",
         "--tensor-parallel-size", "2", "--num-prompts", "4", "--input-len", "16",
         "--output-len", "8", "--dtype", "float32", "--kv-cache-memory", "16MiB",
         "--out", str(out)], check=True, timeout=120, env=os.environ.copy(),
        capture_output=True)
    [result] = json.loads(out.read_text())
    assert result["tensor_parallel_size"] == 2
    assert result["output_tokens"] == 32
    first, second = result["weight_bytes_per_rank"]
    assert first == second > 0
    assert 0 < result["collective_share"] < 1
