"""The load generator against a small streaming server on loopback with known timings.

The server here is a stand-in with exact, controllable behaviour (token delays, failures,
in-flight counting); tests/test_bench_server.py runs the bench against the real pagedserve.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

from pagedserve.bench.clients import make_client
from pagedserve.bench.compare import parse_peer, sweep_run
from pagedserve.bench.loadgen import Workload
from pagedserve.bench.results import RunResult
from pagedserve.bench.server_process import free_port
from pagedserve.cli import main

TOKEN_DELAY = 0.01


class FakeServer:
    """Streams one word per TOKEN_DELAY; counts a BOS plus one token per prompt word."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.max_in_flight = 0
        self.bodies: list[dict] = []
        self.fail_every = 0  # answer every n-th generation request with HTTP 500
        self.done_delay = 0.0  # seconds between the last token and the closing message
        self.port = free_port()
        routes = [
            Route("/v1/completions", self.openai, methods=["POST"]),
            Route("/v1/chat/completions", self.openai, methods=["POST"]),
            Route("/api/generate", self.ollama, methods=["POST"]),
            Route("/v1/models", lambda r: JSONResponse({"data": [{"id": "fake-1"}]})),
            Route("/api/tags", lambda r: JSONResponse({"models": [{"name": "fake-1"}]})),
            Route("/metrics", self.metrics),
        ]
        config = uvicorn.Config(Starlette(routes=routes), host="127.0.0.1", port=self.port,
                                log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def reset(self) -> None:
        self.max_in_flight = 0
        self.bodies.clear()

    async def _admit(self, request: Request) -> tuple[dict, int, bool]:
        body = await request.json()
        self.bodies.append(body)
        failing = bool(self.fail_every) and len(self.bodies) % self.fail_every == 0
        text = body.get("prompt") or body["messages"][0]["content"]
        return body, len(text.split()) + 1, failing

    async def _tokens(self, count: int):
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            for i in range(count):
                await asyncio.sleep(TOKEN_DELAY)
                yield i
        finally:
            self.in_flight -= 1

    async def openai(self, request: Request):
        body, prompt_tokens, failing = await self._admit(request)
        if failing:
            return JSONResponse({"error": {"message": "boom"}}, status_code=500)
        chat = "messages" in body

        async def events():
            n = body["max_tokens"]
            async for _ in self._tokens(n):
                choice = {"delta": {"content": " w"}} if chat else {"text": " w"}
                yield f"data: {json.dumps({'choices': [choice]})}\n\n"
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n}
            await asyncio.sleep(self.done_delay)
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\ndata: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def ollama(self, request: Request):
        body, prompt_tokens, failing = await self._admit(request)
        if failing:
            return JSONResponse({"error": "boom"}, status_code=500)

        async def lines():
            n = body["options"]["num_predict"]
            async for _ in self._tokens(n):
                yield json.dumps({"response": " w", "done": False}) + "\n"
            await asyncio.sleep(self.done_delay)
            yield json.dumps({"response": "", "done": True, "prompt_eval_count": prompt_tokens,
                              "eval_count": n}) + "\n"

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    async def metrics(self, request: Request):
        running = self.in_flight
        return PlainTextResponse(
            "# TYPE pagedserve:num_requests_running gauge\n"
            f'pagedserve:num_requests_running{{model_name="m"}} {running}\n'
            "# TYPE pagedserve:kv_cache_waste_perc gauge\n"
            f'pagedserve:kv_cache_waste_perc{{model_name="m"}} {0.75 if running else 0.0}\n'
        )


@pytest.fixture(scope="module")
def fake_server():
    server = FakeServer()
    server.thread.start()
    deadline = time.monotonic() + 10
    while not server.server.started:
        assert time.monotonic() < deadline, "the fake server did not start"
        time.sleep(0.02)
    yield server
    server.server.should_exit = True
    server.thread.join(5)


@pytest.mark.parametrize("api", ["openai", "openai-chat", "ollama"])
def test_sweep_measures_every_level(fake_server, api):
    fake_server.reset()
    workload = Workload(input_len=20, output_len=4, num_prompts=6, seed=1)
    run = sweep_run(fake_server.url, label="fake", api=api, model=None, workload=workload,
                    concurrency=[1, 3])
    assert run.model == "fake-1" and [lv.concurrency for lv in run.levels] == [1, 3]
    # two warm-up requests, then 6 per level, all with distinct prompts
    prompts = [b.get("prompt") or (b.get("messages") or [{}])[0].get("content")
               for b in fake_server.bodies]
    assert len(prompts) == 14 and len(set(prompts)) == 14
    # calibrated against "BOS + 1 token per word": 19 words make 20 prompt tokens
    assert all(len(p.split()) == 19 for p in prompts[2:])
    for level in run.levels:
        assert (level.successful, level.failed) == (6, 0)
        assert level.total_output_tokens == 24 and level.total_input_tokens == 6 * 20
        assert level.ttft_ms.p50 >= TOKEN_DELAY * 1000
        assert level.itl_ms.p50 >= TOKEN_DELAY * 1000 * 0.9
        # every request has 4 tokens, so 3 gaps: with e2e taken at the last token, each TPOT is
        # the mean of its request's ITLs and the level's means agree up to rounding, under any load
        assert level.tpot_ms.mean == pytest.approx(level.itl_ms.mean, rel=1e-6)
        assert level.e2e_ms.p99 >= 4 * TOKEN_DELAY * 1000
        assert level.output_throughput == pytest.approx(24 / level.duration_s)
    if api != "ollama":
        assert fake_server.bodies[-1]["ignore_eos"] is True
        assert fake_server.bodies[-1]["stream_options"] == {"include_usage": True}
    else:
        assert fake_server.bodies[-1]["options"]["num_predict"] == 4
    assert fake_server.max_in_flight == 3
    # 3 at a time: the level lasts about a third of its requests' summed latencies (one at a
    # time, all of it), however slow a loaded machine makes each of them
    three = run.levels[1]
    assert three.duration_s < 0.75 * three.e2e_ms.mean / 1000 * three.successful


@pytest.mark.parametrize("api", ["openai", "openai-chat", "ollama"])
def test_latency_ends_at_the_last_token(fake_server, api):
    """The closing message (usage and [DONE], or Ollama's "done": true) carries no token: it
    comes 5 token delays late here, and neither e2e nor TPOT may include that wait."""

    async def send():
        async with httpx.AsyncClient(base_url=fake_server.url) as http:
            return await make_client(api, "fake-1").send(http, "one two three", 4)

    fake_server.done_delay = 5 * TOKEN_DELAY
    try:
        record = asyncio.run(send())
    finally:
        fake_server.done_delay = 0.0
    assert record.success and record.output_tokens == 4 and len(record.itl) == 3
    assert record.ttft >= TOKEN_DELAY and record.e2e >= 4 * TOKEN_DELAY
    assert record.e2e == pytest.approx(record.ttft + sum(record.itl), rel=1e-6)
    assert record.tpot == pytest.approx(sum(record.itl) / 3, rel=1e-6)


def test_concurrency_caps_requests_in_flight(fake_server):
    fake_server.reset()
    workload = Workload(input_len=10, output_len=3, num_prompts=[5], seed=2)
    sweep_run(fake_server.url, label="fake", api="openai", model="fake-1", workload=workload,
              concurrency=[2])
    assert fake_server.max_in_flight == 2


def test_open_loop_poisson_arrivals(fake_server):
    fake_server.reset()
    workload = Workload(input_len=10, output_len=2, num_prompts=8, request_rate=50.0)
    run = sweep_run(fake_server.url, label="fake", api="openai", model="fake-1",
                    workload=workload, concurrency=[8])
    level = run.levels[0]
    assert level.request_rate == 50.0 and level.successful == 8


def test_failed_requests_are_counted_not_raised(fake_server):
    fake_server.reset()
    fake_server.fail_every = 3  # warm-up requests are the 1st and 2nd: they pass
    try:
        workload = Workload(input_len=10, output_len=2, num_prompts=6)
        run = sweep_run(fake_server.url, label="fake", api="openai", model="fake-1",
                        workload=workload, concurrency=[2])
    finally:
        fake_server.fail_every = 0
    level = run.levels[0]
    assert (level.successful, level.failed) == (4, 2)
    assert level.errors[0].startswith("HTTP 500")
    assert level.total_output_tokens == 8


def test_kv_waste_is_read_from_metrics(fake_server):
    fake_server.reset()
    workload = Workload(input_len=10, output_len=100, num_prompts=2)  # 1 s: 2+ samples
    run = sweep_run(fake_server.url, label="fake", api="openai", model="fake-1",
                    workload=workload, concurrency=[2])
    kv = run.levels[0].kv
    assert kv.samples >= 1
    assert kv.waste_perc == pytest.approx(0.75)


def test_cli_serve_writes_json_and_plots(fake_server, tmp_path):
    out = tmp_path / "fake.json"
    rc = main(["bench", "serve", "--url", fake_server.url, "--concurrency", "1,2",
               "--num-prompts", "3", "--input-len", "12", "--output-len", "3",
               "--label", "fake", "--out", str(out)])
    assert rc == 0
    run = RunResult.load(out)
    assert run.label == "fake" and run.machine["cores"] >= 1
    assert [lv.num_prompts for lv in run.levels] == [3, 3]
    assert (tmp_path / "fake_throughput.png").stat().st_size > 0
    rc = main(["bench", "plot", str(out), str(out), "--out", str(tmp_path / "plots")])
    assert rc == 0
    assert (tmp_path / "plots" / "bench_ttft_p99.png").is_file()


def test_parse_peer():
    peer = parse_peer("http://10.0.0.2:11434=ollama")
    assert (peer.url, peer.label) == ("http://10.0.0.2:11434", "ollama")
    assert parse_peer("http://h:8000").label == "h:8000"
    with pytest.raises(ValueError, match="peer"):
        parse_peer("h:8000")
