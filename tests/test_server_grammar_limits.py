"""Issue 27's acceptance, against real server processes: hostile grammars are 400s naming the
field with no matcher internals, cost no memory that stays, do not hold up other clients'
grammars, and a bomb met midway ends its own stream while the others flow.

Two servers on the tiny random model (the point is the server, not the text): one with the
default limits, one with the prechecks lifted so that the bombs reach llguidance itself."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest

from pagedserve.bench.server_process import ServerProcess

pytestmark = pytest.mark.slow

MODEL = "tiny"
# the tiny model's whole context: its template cannot take tools, so a tool's schema travels
# in the generic tool prompt (docs/server.md "Tools on any model"), some 450 tokens
ARGS = ["--served-model-name", MODEL, "--dtype", "float32", "--kv-cache-memory", "4MiB",
        "--max-model-len", "512", "--max-num-seqs", "8"]
LIFTED = ["--grammar-max-regex-repeat", "1000000000"]
CHAT = [{"role": "user", "content": "hi"}]
BOMB = "^(a{1000}){1000}$"
INTERNALS = ("<state>", "<grammar>", "Parser", "Tokens:", "lexer_cost", "Traceback",
             "a{1000}", "(a{", "%json", "\\n")
SMALL = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}


@pytest.fixture(scope="module")
def server(tiny_llama_tokenized_dir):
    with ServerProcess(str(tiny_llama_tokenized_dir), ARGS) as proc:
        yield proc


@pytest.fixture(scope="module")
def lifted(tiny_llama_tokenized_dir):
    with ServerProcess(str(tiny_llama_tokenized_dir), [*ARGS, *LIFTED]) as proc:
        yield proc


def chat(extra: dict, stream: bool = False, max_tokens: int = 8) -> dict:
    return {"model": MODEL, "messages": CHAT, "max_tokens": max_tokens, "stream": stream,
            **extra}


def tool(parameters: dict) -> dict:
    return {"tools": [{"type": "function", "function": {"name": "f", "parameters": parameters}}],
            "tool_choice": {"type": "function", "function": {"name": "f"}}}


def schema(s: dict) -> dict:
    return {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": s}}}


def properties(n: int, prefix: str = "property_number_") -> dict:
    return {"type": "object", "properties": {f"{prefix}{i:05d}": {"type": "string"}
                                             for i in range(n)}}


OBJECT_BOMB = {"type": "object", "properties": {"x": {"type": "string", "pattern": BOMB}},
               "required": ["x"]}
OPENAI = [  # (extra body, the field the 400 names)
    ({"structured_outputs": {"regex": "(a{1000}){3000}"}}, "structured_outputs.regex"),
    ({"structured_outputs": {"regex": "a{1000000}"}}, "structured_outputs.regex"),
    (schema({"type": "string", "pattern": BOMB}), "response_format.json_schema.schema"),
    ({"structured_outputs": {"json": OBJECT_BOMB}}, "structured_outputs.json"),
    ({"structured_outputs": {"grammar": "start: A\nA: /(a{1000}){1000}/"}},
     "structured_outputs.grammar"),
    (tool(OBJECT_BOMB), "tools"),
    (schema(properties(10_000)), "response_format.json_schema.schema"),
]
# what reaches llguidance (prechecks lifted): the bombs that start the answer
LLGUIDANCE = [OPENAI[0], OPENAI[1], OPENAI[2], OPENAI[4]]


def assert_clean(message: str) -> None:
    assert len(message) < 400, message
    assert not any(word in message for word in INTERNALS), message


def post_openai(url: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("extra, field", OPENAI)
def test_hostile_openai_constraints_are_400s_without_internals(server, extra, field, stream):
    resp = post_openai(server.url, chat(extra, stream))
    assert resp.status_code == 400, resp.text[:500]
    error = resp.json()["error"]
    assert error["param"] == field and error["message"].startswith(field + ": "), error
    assert_clean(error["message"])


@pytest.mark.parametrize("route", ["/api/chat", "/api/generate"])
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("fmt", [OBJECT_BOMB, {"type": "string", "pattern": BOMB},
                                 properties(10_000)])
def test_hostile_ollama_formats_are_400s_without_internals(server, route, stream, fmt):
    body = {"model": MODEL, "stream": stream, "format": fmt, "options": {"num_predict": 8}}
    body.update({"messages": CHAT} if route == "/api/chat" else {"prompt": "hi"})
    resp = httpx.post(f"{server.url}{route}", json=body, timeout=120)
    assert resp.status_code == 400, resp.text[:500]
    message = resp.json()["error"]
    assert message.startswith("format: "), message
    assert_clean(message)


@pytest.mark.parametrize("extra, field", LLGUIDANCE)
def test_llguidance_refuses_the_bombs_it_meets_with_a_400(lifted, extra, field):
    resp = post_openai(lifted.url, chat(extra))
    assert resp.status_code == 400, resp.text[:500]
    message = resp.json()["error"]["message"]
    assert message.startswith(f"{field}: the grammar is too complex"), message
    assert_clean(message)


def rss_mib(proc: ServerProcess) -> float:
    """The server's resident memory: the front end and its children (the engine core, where
    grammars compile)."""
    total, pids = 0.0, [proc.proc.pid]
    while pids:
        pid = pids.pop()
        try:
            with open(f"/proc/{pid}/status") as status:
                total += next(int(line.split()[1]) for line in status
                              if line.startswith("VmRSS:")) / 1024
            for task in Path(f"/proc/{pid}/task").iterdir():
                pids += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue  # a child that just ended
    assert total, "no VmRSS"
    return total


def hostile(i: int) -> dict:
    """The i-th of 50 distinct hostile grammars: bombs llguidance meets (which used to keep
    ~150 MiB each), 10,000-property schemas, and heavy grammars it accepts (9 MiB each)."""
    kind = i % 5
    if kind == 0:
        return {"structured_outputs": {"regex": f"(a{{1000}}){{{3000 + i}}}"}}
    if kind == 1:
        return schema({"type": "string", "pattern": f"^(a{{1000}}){{{1000 + i}}}$"})
    if kind == 2:
        return {"structured_outputs": {"grammar": f"start: A\nA: /(a{{{1000 + i}}}){{1000}}/"}}
    if kind == 3:
        return schema(properties(10_000, f"p{i}_"))
    return {"structured_outputs": {"regex": f"b{{{i}}}a{{19000}}"}}


def test_fifty_distinct_hostile_grammars_leave_rss_where_it_was(lifted):
    post_openai(lifted.url, chat(schema(SMALL)))  # the vocabulary, prepared once
    start = peak = rss_mib(lifted)
    statuses = []
    for i in range(50):
        statuses.append(post_openai(lifted.url, chat(hostile(i), max_tokens=2)).status_code)
        peak = max(peak, rss_mib(lifted))
    end = rss_mib(lifted)
    print(f"RSS {start:.0f} MiB -> {end:.0f} MiB after 50 hostile grammars (peak {peak:.0f})")
    assert statuses.count(400) == 40 and statuses.count(200) == 10, statuses
    assert end - start < 200, (start, peak, end)


def test_a_bomb_met_midway_ends_its_stream_and_the_others_flow(server):
    """Behind a choice, neither the prechecks nor the first mask see the bomb: the answer
    meets it at its second token, and that mask is over its budget or out of fuel."""
    plain = {"model": MODEL, "prompt": "hello", "max_tokens": 60, "stream": True,
             "ignore_eos": True, "stream_options": {"include_usage": True}}
    assert httpx.post(f"{server.url}/v1/completions", json={**plain, "stream": False},
                      timeout=120).status_code == 200  # the first forward passes, done
    chunks: dict[int, list[float]] = {}
    tokens: dict[int, int] = {}

    def stream(i: int) -> None:
        with httpx.stream("POST", f"{server.url}/v1/completions", json=plain,
                          timeout=120) as resp:
            for line in resp.iter_lines():
                if line.startswith("data: {"):
                    chunks.setdefault(i, []).append(time.perf_counter())
                    usage = json.loads(line[6:]).get("usage")
                    if usage:
                        tokens[i] = usage["completion_tokens"]

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    grammar = 'start: ("x" | "y") A\nA: "a"~1000000'
    body = chat({"structured_outputs": {"grammar": grammar}}, stream=True, max_tokens=30)
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body,
                      timeout=120) as resp:
        assert resp.status_code == 200
        events = [json.loads(line[6:]) for line in resp.iter_lines()
                  if line.startswith("data: {")]
    for t in threads:
        t.join(120)
    errors = [e["error"] for e in events if "error" in e]
    assert len(errors) == 1, events
    message = errors[0]["message"]
    assert "structured_outputs.grammar: " in message, message
    assert "budget" in message or "too complex" in message, message
    assert_clean(message)
    assert tokens == {0: 60, 1: 60, 2: 60}, tokens  # the other streams ran to their end
    # the stall is what the bomb's one mask cost the engine thread (reported, not asserted:
    # on a machine shared with other jobs, gaps of seconds come and go without any bomb)
    stall = max(b - a for times in chunks.values() for a, b in zip(times, times[1:], strict=False))
    print(f"longest gap between two chunks of the other streams: {stall * 1e3:.0f} ms")


def test_a_slow_compile_does_not_hold_up_a_small_schema(lifted):
    """5000 optional properties (the most a schema may have) take seconds in llguidance's
    JSON compiler, quadratic in them, on a compile thread of its own: a small schema sent a
    second later is answered as fast as alone. 10,000 are refused before they start."""
    def small(i: int) -> dict:  # a schema of its own each time: compiled, not cached
        return chat(schema({"type": "object", "properties": {f"ok_{i}": {"type": "boolean"}},
                            "required": [f"ok_{i}"]}), max_tokens=4)

    alone = []
    for i in range(3):
        start = time.perf_counter()
        assert post_openai(lifted.url, small(i)).status_code == 200
        alone.append(time.perf_counter() - start)
    big: dict[str, object] = {}

    def send_big() -> None:
        start = time.perf_counter()
        resp = post_openai(lifted.url, chat(schema(properties(5000, "slow_")), max_tokens=4))
        big.update(status=resp.status_code, seconds=time.perf_counter() - start)

    thread = threading.Thread(target=send_big)
    thread.start()
    time.sleep(1.0)
    start = time.perf_counter()
    assert post_openai(lifted.url, small(3)).status_code == 200
    meanwhile = time.perf_counter() - start
    thread.join(120)
    start = time.perf_counter()
    refused = post_openai(lifted.url, chat(schema(properties(10_000, "huge_"))))
    huge = time.perf_counter() - start
    print(f"small schema alone {min(alone):.2f}-{max(alone):.2f} s, during the big compile "
          f"{meanwhile:.2f} s; the big one: {big}; 10,000 properties refused in {huge:.2f} s")
    assert big["seconds"] > meanwhile + 1.0, big  # it was still compiling
    assert meanwhile < max(alone) + 1.0
    assert refused.status_code == 400 and huge < 2.0
    assert "10000 object properties, over the limit of 5000" in refused.json()["error"]["message"]
