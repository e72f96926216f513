"""`pagedserve serve --tensor-parallel-size 2` on a CPU: its engine core (rank 0) drives one
worker process; both APIs answer as a single process does, and a worker killed mid-stream ends
the open stream with an error and the server with status 1, leaving no process behind."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest
from server_thread import ServerThread
from test_server_engine_core import ARGS, children, core_pid, greedy_texts

from pagedserve.bench.server_process import ServerProcess
from pagedserve.config import EngineConfig
from pagedserve.engine import Engine
from pagedserve.loader import load_model

pytestmark = pytest.mark.slow

TP_ARGS = [*ARGS, "--tensor-parallel-size", "2"]


def worker_pids(server: ServerProcess) -> list[int]:
    core = core_pid(server)
    return [pid for pid in children(core)
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]


def alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def fault_while_streaming(server: ServerProcess, worker: int, sig: signal.Signals) -> None:
    """Send `sig` to the worker once a long stream has begun: the stream ends with an error
    event and the server with status 1, within 30 s of the fault."""
    long = {"model": "tiny", "prompt": "Hello", "max_tokens": 400, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=long, timeout=60) as resp:
        lines = resp.iter_lines()
        assert next(lines).startswith("data: ")
        os.kill(worker, sig)
        start = time.monotonic()
        rest = [line for line in lines if line.startswith("data: ")]
    assert any("error" in line for line in rest), rest[-3:]
    assert server.proc.wait(30) == 1
    assert time.monotonic() - start < 30


def test_both_apis_answer_as_one_process_does(tiny_llama_tokenized_dir):
    import ollama

    engine = Engine.from_model(load_model(tiny_llama_tokenized_dir), EngineConfig(
        dtype="float32", kv_cache_memory=16 << 20, max_model_len=512))
    with ServerThread(engine) as server:
        expected = greedy_texts(server.url)
    with ServerProcess(str(tiny_llama_tokenized_dir), TP_ARGS) as server:
        assert len(worker_pids(server)) == 1
        assert greedy_texts(server.url) == expected
        assert all(expected)
        client = ollama.Client(host=server.url, timeout=60)
        reply = client.generate(model="tiny", prompt="Hello",
                                options={"temperature": 0, "num_predict": 4})
        assert reply.done and reply.response
        chat = client.chat(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                           options={"temperature": 0, "num_predict": 4})
        assert chat.done


def test_a_killed_worker_ends_the_stream_and_the_server(tiny_llama_tokenized_dir):
    server = ServerProcess(str(tiny_llama_tokenized_dir), TP_ARGS).start()
    try:
        core = core_pid(server)
        [worker] = worker_pids(server)
        fault_while_streaming(server, worker, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while alive(core):
            assert time.monotonic() < deadline, "the engine core outlived its server"
            time.sleep(0.1)
    finally:
        server.stop()


def test_a_hung_worker_ends_the_server_at_the_collective_timeout(tiny_llama_tokenized_dir,
                                                                 monkeypatch):
    monkeypatch.setenv("PAGEDSERVE_TP_TIMEOUT", "3")
    server = ServerProcess(str(tiny_llama_tokenized_dir), TP_ARGS).start()
    [worker] = worker_pids(server)
    try:
        fault_while_streaming(server, worker, signal.SIGSTOP)
        deadline = time.monotonic() + 10
        while alive(worker):  # the core killed it on its way out
            assert time.monotonic() < deadline, "the stopped worker was left behind"
            time.sleep(0.1)
    finally:
        if alive(worker):
            os.kill(worker, signal.SIGKILL)
        server.stop()
