"""A short soak against an in-process server with a small KV cache: both APIs, streamed and
not, n > 1, clients leaving mid-stream and giving up, prompts that cannot fit, bodies that are
wrong, and preemption throughout. Afterwards: no 5xx, every count right, the scheduler empty,
every KV block free and the block manager's invariants intact, memory not run away."""

from __future__ import annotations

import time

import pytest
from server_thread import ServerThread
from soak_client import run_soak

from pagedserve.config import EngineConfig
from pagedserve.engine import Engine
from pagedserve.loader import load_model
from pagedserve.worker.model_runner import kv_bytes_per_token

pytestmark = pytest.mark.slow

DURATION_S = 30
MAX_TOKENS = 16


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_soak_ends_clean(tiny_llama_tokenized_dir):
    loaded = load_model(tiny_llama_tokenized_dir)
    per_block = kv_bytes_per_token(loaded.config, "float32") * 16
    # 20 blocks = 320 tokens: far less than 24 clients x (prompt + 16 tokens) x up to 3 choices
    engine = Engine.from_model(loaded, EngineConfig(
        kv_cache_memory=20 * per_block, max_model_len=160, max_num_seqs=16, dtype="float32"))
    with ServerThread(engine) as server:
        rss_before = rss_mib()
        report = run_soak(server.url, "tiny", DURATION_S, concurrency=24,
                          max_tokens=MAX_TOKENS, long_prompt_words=400)
        rss_after = rss_mib()
        deadline = time.monotonic() + 30
        while engine.has_unfinished_requests() or server.async_engine.num_waiting():
            assert time.monotonic() < deadline, "the engine never went idle"
            time.sleep(0.05)
        time.sleep(0.2)  # let the loop settle into its wait
        engine.check_integrity()
        assert engine.kv.all_free()
        assert not engine.scheduler.running and not engine.scheduler.waiting
        stats = engine.stats()
    print(report.summary(), f"RSS {rss_before:.0f} -> {rss_after:.0f} MiB",
          f"preemptions {stats.num_preemptions}")
    assert not report.server_errors, report.server_errors[:10]
    assert not report.wrong, report.wrong[:10]
    assert sum(report.actions.values()) > 200
    assert report.actions["leave_mid_stream"] and report.actions["give_up_waiting"]
    assert stats.num_preemptions > 0
    assert rss_after - rss_before < 300
