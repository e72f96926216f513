"""`pagedserve serve` with its engine core in a process of its own: the same answers as with
the core in a thread, overlap or not; a core that dies ends the server (503, exit 1); a server
that dies takes its core with it; a stop string found by the front end frees the core's
blocks; several front ends (--api-server-count) share one core and add up their metrics."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_thread import ServerThread

from pagedserve.bench.server_process import ServerProcess
from pagedserve.config import EngineConfig
from pagedserve.engine import Engine
from pagedserve.loader import load_model

pytestmark = pytest.mark.slow

ARGS = ["--served-model-name", "tiny", "--dtype", "float32", "--kv-cache-memory", "16MiB", "--max-model-len", "512"]
PROMPTS = ["Hello world", "The cat sat on", "def add(a, b):", "Numbers like 12"]


def greedy_texts(url: str) -> list[str]:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0, timeout=120)
    answer = client.completions.create(model="tiny", prompt=PROMPTS, max_tokens=16,
                                       temperature=0, extra_body={"ignore_eos": True})
    return [c.text for c in sorted(answer.choices, key=lambda c: c.index)]


def metrics(url: str) -> dict[str, float]:
    values = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for sample in family.samples:
            key = sample.name + "".join(f",{k}={v}" for k, v in sorted(sample.labels.items())
                                        if k != "model_name")
            values[key] = sample.value
    return values


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            found += [int(child), *children(int(child))]
    return found


def core_pid(server: ServerProcess) -> int:
    for pid in children(server.proc.pid):
        if b"pagedserve.engine.core_process" in Path(f"/proc/{pid}/cmdline").read_bytes():
            return pid
    raise AssertionError("no engine core process under the server")


def wait_exit(proc: subprocess.Popen, timeout: float) -> int:
    return proc.wait(timeout)


def test_the_same_greedy_answers_with_overlap_on_and_off_in_process_and_not(
        tiny_llama_tokenized_dir):
    answers = {}
    for overlap in ("--async-scheduling", "--no-async-scheduling"):
        with ServerProcess(str(tiny_llama_tokenized_dir), [*ARGS, overlap]) as server:
            answers[f"process {overlap}"] = greedy_texts(server.url)
    loaded = load_model(tiny_llama_tokenized_dir)
    for overlap in (True, False):
        engine = Engine.from_model(loaded, EngineConfig(
            dtype="float32", kv_cache_memory=16 << 20, max_model_len=512,
            async_scheduling=overlap))
        with ServerThread(engine) as server:
            answers[f"thread {overlap}"] = greedy_texts(server.url)
    first = next(iter(answers.values()))
    assert all(texts == first for texts in answers.values()), answers
    assert all(first)


def test_a_stop_string_found_by_the_front_end_frees_the_core(tiny_llama_tokenized_dir):
    with ServerProcess(str(tiny_llama_tokenized_dir), ARGS) as server:
        [text] = greedy_texts(server.url)[:1]
        stop = text.strip()[:3] or text[:2]
        body = {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 200, "temperature": 0,
                "ignore_eos": True, "stop": [stop]}
        answer = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()
        assert answer["choices"][0]["finish_reason"] == "stop"
        assert answer["usage"]["completion_tokens"] < 16
        deadline = time.monotonic() + 10
        while metrics(server.url)["pagedserve:num_requests_running"] > 0:
            assert time.monotonic() < deadline, "the core kept running a finished request"
            time.sleep(0.1)
        assert metrics(server.url)["pagedserve:kv_cache_usage_perc"] == 0


def test_a_dead_engine_core_ends_the_server_with_status_1(tiny_llama_tokenized_dir):
    server = ServerProcess(str(tiny_llama_tokenized_dir), ARGS).start()
    try:
        core = core_pid(server)
        long = {"model": "tiny", "prompt": "Hello", "max_tokens": 400, "ignore_eos": True,
                "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=long,
                          timeout=60) as resp:
            lines = resp.iter_lines()
            assert next(lines).startswith("data: ")
            os.kill(core, signal.SIGKILL)
            rest = [line for line in lines if line.startswith("data: ")]
        assert any("error" in line for line in rest), rest[-3:]
        after = httpx.post(f"{server.url}/v1/completions", timeout=10,
                           json={**long, "stream": False})
        assert after.status_code == 503 and "Retry-After" in after.headers
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 503
        assert wait_exit(server.proc, 30) == 1
    finally:
        server.stop()


def test_the_core_does_not_outlive_its_server(tiny_llama_tokenized_dir):
    server = ServerProcess(str(tiny_llama_tokenized_dir), ARGS).start()
    try:
        core = core_pid(server)
        server.proc.kill()
        server.proc.wait(10)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{core}").exists() and b"core_process" in Path(
                f"/proc/{core}/cmdline").read_bytes():
            assert time.monotonic() < deadline, "the engine core outlived its server"
            time.sleep(0.1)
    finally:
        server.stop()


def test_front_ends_and_core_do_not_outlive_a_killed_supervisor(tiny_llama_tokenized_dir):
    """SIGKILL (the OOM killer) leaves the supervisor no time to stop anyone: the front ends and
    the core watch it and exit, and the port is free again."""
    server = ServerProcess(str(tiny_llama_tokenized_dir),
                           [*ARGS, "--api-server-count", "2"]).start()
    try:
        processes = children(server.proc.pid)
        assert len(processes) == 3
        server.proc.kill()
        server.proc.wait(10)
        deadline = time.monotonic() + 15
        alive = processes
        while alive:
            assert time.monotonic() < deadline, f"outlived the supervisor: {alive}"
            time.sleep(0.1)
            alive = [p for p in processes if Path(f"/proc/{p}").exists()
                     and b"pagedserve" in Path(f"/proc/{p}/cmdline").read_bytes()]
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{server.url}/health", timeout=2)
    finally:
        server.stop()


def test_two_front_ends_share_one_core_and_add_up_their_metrics(tiny_llama_tokenized_dir):
    import ollama

    with ServerProcess(str(tiny_llama_tokenized_dir),
                       [*ARGS, "--api-server-count", "2"]) as server:
        processes = children(server.proc.pid)
        cmdlines = [Path(f"/proc/{p}/cmdline").read_bytes() for p in processes]
        assert sum(b"frontend_process" in c for c in cmdlines) == 2
        assert sum(b"core_process" in c for c in cmdlines) == 1
        texts = greedy_texts(server.url)  # 4 requests
        client = ollama.Client(host=server.url, timeout=60)
        for _ in range(4):
            reply = client.generate(model="tiny", prompt="Hello",
                                    options={"temperature": 0, "num_predict": 4})
            assert reply.done
        for _ in range(3):  # any front end answers the scrape with the sums over both
            counts = metrics(server.url)
            finished = sum(v for k, v in counts.items()
                           if k.startswith("pagedserve:request_success_total"))
            assert finished == 8, counts
        assert greedy_texts(server.url) == texts
        server.proc.send_signal(signal.SIGTERM)
        assert wait_exit(server.proc, 60) == 0


def test_requests_waiting_for_their_grammar_count_against_max_queue(tiny_llama_tokenized_dir):
    """A constraint that takes seconds to compile holds no seat yet, but it waits: with
    --max-queue 1 a second such request is turned away with 503 + Retry-After rather than
    admitted to wait outside the queue's count."""
    import concurrent.futures

    def slow_schema(prefix: str) -> dict:  # 5000 optional properties: seconds to compile
        return {"type": "object", "properties": {f"{prefix}{i:05d}": {"type": "string"}
                                                 for i in range(5000)}}

    def ask(url: str, prefix: str) -> httpx.Response:
        return httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
            "model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
            "response_format": {"type": "json_schema", "json_schema": {
                "name": "x", "schema": slow_schema(prefix)}}})

    with ServerProcess(str(tiny_llama_tokenized_dir),
                       [*ARGS, "--max-queue", "1", "--max-request-body", "16MiB"]) as server:
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            first = pool.submit(ask, server.url, "a")
            deadline = time.monotonic() + 30
            while metrics(server.url)["pagedserve:num_requests_waiting"] < 1:
                assert time.monotonic() < deadline, "the first request never waited"
                time.sleep(0.05)
            others = [pool.submit(ask, server.url, p).result() for p in ("b", "c")]
            # it was let in: it compiles (and may then be refused for the tiny vocabulary's
            # parser limits, a 400 that is not this test's business)
            assert first.result().status_code != 503, first.result().text
        assert [r.status_code for r in others] == [503, 503], [r.text for r in others]
        assert all(int(r.headers["Retry-After"]) >= 1 for r in others)
