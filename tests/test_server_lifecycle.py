"""How a server starts and stops, through a real process: it answers while the model loads;
SIGTERM drains (no new requests, /ready fails, requests in flight finish, exit 0); a second
signal or the --shutdown-timeout ends what is left with a final event."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from pagedserve.bench.server_process import ServerProcess, free_port

pytestmark = pytest.mark.slow

MODEL = "tiny"
ARGS = ["--served-model-name", MODEL, "--dtype", "float32", "--kv-cache-memory", "8MiB",
        "--max-model-len", "512"]


def stream_to_the_end(url: str, max_tokens: int, results: dict, key: int,
                      started: threading.Event) -> None:
    body = {"model": MODEL, "prompt": f"Story {key}:", "max_tokens": max_tokens,
            "ignore_eos": True, "stream": True, "logprobs": 0}
    tokens, finish = 0, None
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as resp:
        for line in resp.iter_lines():
            if not line.startswith("data: {"):
                continue
            started.set()
            choice = json.loads(line[6:])["choices"][0]
            tokens += len(choice["logprobs"]["tokens"]) if choice["logprobs"] else 0
            finish = choice["finish_reason"] or finish
    results[key] = (resp.status_code, tokens, finish)


def start_streams(url: str, count: int, max_tokens: int) -> tuple[list, dict]:
    results: dict = {}
    threads = []
    for i in range(count):
        started = threading.Event()
        thread = threading.Thread(target=stream_to_the_end,
                                  args=(url, max_tokens, results, i, started))
        thread.start()
        assert started.wait(60), "a stream never started"
        threads.append(thread)
    return threads, results


def waiting_requests(url: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("pagedserve:num_requests_waiting{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def wait_exit(proc: subprocess.Popen, timeout: float) -> int:
    return proc.wait(timeout)


def test_the_port_answers_while_the_model_loads(tiny_llama_tokenized_dir):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pagedserve", "serve",
                             str(tiny_llama_tokenized_dir), "--port", str(port), *ARGS],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    seen: dict[str, httpx.Response] = {}
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                health = httpx.get(f"{url}/health", timeout=5)
            except httpx.TransportError:
                time.sleep(0.02)
                continue
            if health.status_code == 200:
                break
            seen.setdefault("health", health)
            seen.setdefault("ready", httpx.get(f"{url}/ready", timeout=5))
            seen.setdefault("root", httpx.get(f"{url}/", timeout=5))
            seen.setdefault("openai", httpx.post(f"{url}/v1/completions", json={"prompt": "x"}))
            seen.setdefault("ollama", httpx.post(f"{url}/api/generate", json={"model": MODEL}))
            time.sleep(0.02)
        assert health.status_code == 200
        assert seen, "the model loaded before the first probe: no loading phase was seen"
        assert (seen["health"].status_code, seen["health"].text) == (503, "loading model")
        assert seen["ready"].status_code == 503
        assert (seen["root"].status_code, seen["root"].text) == (200, "Ollama is running")
        for name in ("openai", "ollama"):
            assert seen[name].status_code == 503 and int(seen[name].headers["Retry-After"]) > 0
        assert seen["openai"].json()["error"]["code"] == "model_loading"
        assert set(seen["ollama"].json()) == {"error"}
        assert httpx.get(f"{url}/ready").status_code == 200
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0


def test_sigterm_drains_what_is_in_flight_and_exits_0(tiny_llama_tokenized_dir):
    with ServerProcess(str(tiny_llama_tokenized_dir),
                       [*ARGS, "--shutdown-timeout", "120"]) as server:
        # long enough that the drain outlasts the four probes below
        threads, results = start_streams(server.url, 4, max_tokens=400)
        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        ready = httpx.get(f"{server.url}/ready")
        late = httpx.post(f"{server.url}/v1/completions", json={"model": MODEL, "prompt": "x"})
        ollama = httpx.post(f"{server.url}/api/chat", json={
            "model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
        health = httpx.get(f"{server.url}/health")
        for thread in threads:
            thread.join(150)
        assert wait_exit(server.proc, 60) == 0
        took = time.monotonic() - signalled
    assert ready.status_code == 503 and ready.text == "draining"
    assert health.status_code == 200  # alive: liveness must not restart a draining server
    assert late.status_code == 503 and int(late.headers["Retry-After"]) >= 1
    assert late.json()["error"]["code"] == "server_shutting_down"
    assert ollama.status_code == 503 and "shutting down" in ollama.json()["error"]
    # every stream in flight ran to its end
    assert results == {i: (200, 400, "length") for i in range(4)}, results
    assert took < 120  # they finished: the timeout did not have to end them


def test_the_shutdown_timeout_ends_what_is_left_with_a_final_event(tiny_llama_tokenized_dir):
    with ServerProcess(str(tiny_llama_tokenized_dir),
                       [*ARGS, "--shutdown-timeout", "1", "--max-num-seqs", "1"]) as server:
        # one seat: the second and third stream wait behind a long first one
        threads, results = start_streams(server.url, 1, max_tokens=490)
        more = {}
        waiting = [threading.Thread(target=stream_to_the_end,
                                    args=(server.url, 490, more, i, threading.Event()))
                   for i in (1, 2)]
        for thread in waiting:
            thread.start()
        deadline = time.monotonic() + 60
        while waiting_requests(server.url) < 2:
            assert time.monotonic() < deadline, "the two requests never queued"
            time.sleep(0.05)
        server.proc.send_signal(signal.SIGTERM)
        for thread in threads + waiting:
            thread.join(120)
        assert wait_exit(server.proc, 60) == 0
    finishes = [r[2] for r in {**results, **more}.values()]
    assert "abort" in finishes, (results, more)
    assert all(r[0] == 200 for r in {**results, **more}.values())


def test_a_second_signal_stops_at_once(tiny_llama_tokenized_dir):
    with ServerProcess(str(tiny_llama_tokenized_dir),
                       [*ARGS, "--shutdown-timeout", "600", "--max-num-seqs", "1"]) as server:
        threads, results = start_streams(server.url, 1, max_tokens=490)
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        server.proc.send_signal(signal.SIGTERM)
        assert wait_exit(server.proc, 30) == 0
        for thread in threads:
            thread.join(30)
    assert results[0][0] == 200 and results[0][2] in ("abort", "length")
