"""A soak: many clients for a while, both APIs, streamed and not, n > 1, clients that leave
mid-stream or give up waiting, prompts that cannot fit and bodies that are wrong; every answer
is checked (no 5xx, token counts that add up). Used by tests/test_server_soak.py against an
in-process server, and runnable against any server:

    python tests/soak_client.py http://127.0.0.1:11434 --model smollm2:135m --duration 120
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx


@dataclass(slots=True)
class SoakReport:
    statuses: Counter = field(default_factory=Counter)
    actions: Counter = field(default_factory=Counter)
    server_errors: list[str] = field(default_factory=list)  # any 5xx, with what caused it
    wrong: list[str] = field(default_factory=list)  # answers whose counts do not add up
    duration: float = 0.0

    def summary(self) -> str:
        return (f"{sum(self.actions.values())} requests in {self.duration:.0f} s: "
                f"{dict(self.actions)}; statuses {dict(self.statuses)}; "
                f"{len(self.server_errors)} 5xx, {len(self.wrong)} wrong counts")


class Soak:
    def __init__(self, url: str, model: str, max_tokens: int, long_prompt_words: int,
                 seed: int) -> None:
        self.url = url
        self.model = model
        self.max_tokens = max_tokens
        self.long_prompt = "word " * long_prompt_words
        self.rng = random.Random(seed)
        self.report = SoakReport()

    def prompt(self) -> str:
        words = ["the", "cat", "sat", "on", "a", "mat", "hello", "world", "quick", "fox"]
        return " ".join(self.rng.choice(words) for _ in range(self.rng.randrange(2, 40)))

    async def run(self, duration: float, concurrency: int) -> SoakReport:
        start = time.monotonic()
        limits = httpx.Limits(max_connections=concurrency + 8)
        async with httpx.AsyncClient(base_url=self.url, timeout=300, limits=limits) as client:
            deadline = start + duration
            await asyncio.gather(*(self.worker(client, deadline) for _ in range(concurrency)))
        self.report.duration = time.monotonic() - start
        return self.report

    async def worker(self, client: httpx.AsyncClient, deadline: float) -> None:
        actions = [self.openai_stream, self.openai_whole, self.chat_stream, self.ollama_whole,
                   self.ollama_stream, self.leave_mid_stream, self.give_up_waiting,
                   self.too_long, self.malformed]
        weights = [4, 3, 3, 3, 3, 2, 1, 1, 1]
        while time.monotonic() < deadline:
            action = self.rng.choices(actions, weights)[0]
            self.report.actions[action.__name__] += 1
            try:
                await action(client)
            except httpx.HTTPError as exc:
                self.report.server_errors.append(f"{action.__name__}: {exc!r}")

    # -- checks ------------------------------------------------------------------------------

    def status(self, action: str, resp: httpx.Response, expected: int = 200) -> bool:
        self.report.statuses[resp.status_code] += 1
        if resp.status_code >= 500:
            self.report.server_errors.append(f"{action}: {resp.status_code}")
        elif resp.status_code != expected:
            self.report.wrong.append(f"{action}: status {resp.status_code}, not {expected}")
        return resp.status_code == expected

    def count(self, action: str, got: int, finish: str | None, expected: int | None = None
              ) -> None:
        expected = self.max_tokens if expected is None else expected
        if finish != "length" or got != expected:
            self.report.wrong.append(f"{action}: {got} tokens, finish {finish}")

    # -- actions -----------------------------------------------------------------------------

    def openai_body(self, **extra) -> dict:
        return {"model": self.model, "max_tokens": self.max_tokens, "ignore_eos": True,
                "temperature": self.rng.choice([0, 0.8]), **extra}

    async def openai_stream(self, client: httpx.AsyncClient) -> None:
        n = self.rng.choice([1, 1, 2])
        body = self.openai_body(prompt=self.prompt(), n=n, stream=True, logprobs=0,
                                stream_options={"include_usage": True})
        tokens, finish, usage = Counter(), {}, None
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            if not self.status("openai_stream", resp):
                return
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    self.report.server_errors.append(f"openai_stream: {event['error']}")
                    return
                usage = event.get("usage") or usage
                for choice in event["choices"]:
                    if choice["logprobs"]:
                        tokens[choice["index"]] += len(choice["logprobs"]["tokens"])
                    finish[choice["index"]] = choice["finish_reason"] or finish.get(
                        choice["index"])
        for i in range(n):
            self.count("openai_stream", tokens[i], finish.get(i))
        if usage is None or usage["completion_tokens"] != n * self.max_tokens:
            self.report.wrong.append(f"openai_stream usage: {usage}")

    async def openai_whole(self, client: httpx.AsyncClient) -> None:
        n = self.rng.choice([1, 2, 3])
        resp = await client.post("/v1/completions",
                                 json=self.openai_body(prompt=self.prompt(), n=n))
        if self.status("openai_whole", resp):
            answer = resp.json()
            for choice in answer["choices"]:
                self.count("openai_whole", self.max_tokens, choice["finish_reason"])
            if answer["usage"]["completion_tokens"] != n * self.max_tokens:
                self.report.wrong.append(f"openai_whole usage: {answer['usage']}")

    async def chat_stream(self, client: httpx.AsyncClient) -> None:
        body = self.openai_body(messages=[{"role": "user", "content": self.prompt()}],
                                stream=True, logprobs=True)
        tokens, finish = 0, None
        async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
            if not self.status("chat_stream", resp):
                return
            async for line in resp.aiter_lines():
                if line.startswith("data: {"):
                    event = json.loads(line[6:])
                    if "error" in event:
                        self.report.server_errors.append(f"chat_stream: {event['error']}")
                        return
                    choice = event["choices"][0]
                    tokens += len((choice["logprobs"] or {}).get("content") or [])
                    finish = choice["finish_reason"] or finish
        self.count("chat_stream", tokens, finish)

    def ollama_body(self, chat: bool, stream: bool) -> dict:
        body = {"model": self.model, "stream": stream,
                "options": {"num_predict": self.max_tokens, "ignore_eos": True,
                            "temperature": self.rng.choice([0, 0.8])}}
        if chat:
            body["messages"] = [{"role": "user", "content": self.prompt()}]
        else:
            body["prompt"] = self.prompt()
        return body

    async def ollama_whole(self, client: httpx.AsyncClient) -> None:
        chat = self.rng.random() < 0.5
        resp = await client.post("/api/chat" if chat else "/api/generate",
                                 json=self.ollama_body(chat, stream=False))
        if self.status("ollama_whole", resp):
            answer = resp.json()
            self.count("ollama_whole", answer["eval_count"], answer["done_reason"])

    async def ollama_stream(self, client: httpx.AsyncClient) -> None:
        chat = self.rng.random() < 0.5
        route = "/api/chat" if chat else "/api/generate"
        last = None
        async with client.stream("POST", route, json=self.ollama_body(chat, True)) as resp:
            if not self.status("ollama_stream", resp):
                return
            async for line in resp.aiter_lines():
                if line:
                    last = json.loads(line)
                    if "error" in last:
                        self.report.server_errors.append(f"ollama_stream: {last['error']}")
                        return
        if last is None:
            self.report.wrong.append("ollama_stream: no final object")
        else:
            self.count("ollama_stream", last["eval_count"], last["done_reason"])

    async def leave_mid_stream(self, client: httpx.AsyncClient) -> None:
        body = self.openai_body(prompt=self.prompt(), stream=True, n=self.rng.choice([1, 2]))
        keep = self.rng.randrange(1, 6)
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            if not self.status("leave_mid_stream", resp):
                return
            async for _ in resp.aiter_lines():
                keep -= 1
                if keep == 0:
                    break  # closing the stream closes the connection: the server aborts

    async def give_up_waiting(self, client: httpx.AsyncClient) -> None:
        body = self.ollama_body(chat=False, stream=False)
        try:
            await asyncio.wait_for(client.post("/api/generate", json=body),
                                   self.rng.uniform(0.01, 0.5))
        except TimeoutError:
            return  # the client went away; the server must notice and abort

    async def too_long(self, client: httpx.AsyncClient) -> None:
        if self.rng.random() < 0.5:
            resp = await client.post("/v1/completions",
                                     json=self.openai_body(prompt=self.long_prompt))
        else:
            resp = await client.post("/api/generate", json={
                "model": self.model, "prompt": self.long_prompt, "raw": True, "stream": False})
        self.status("too_long", resp, expected=400)

    async def malformed(self, client: httpx.AsyncClient) -> None:
        both = [b"{", b'{"model": "m", "prompt": "\\ud800"}', b"[" * 5000 + b"]" * 5000]
        openai = [self.openai_body(prompt="x", top_k=2**64), self.openai_body(prompt="x", n=10**6)]
        ollama = [{"model": self.model, "prompt": "x", "options": {"top_k": 2**64}},
                  {"model": self.model, "prompt": "x", "options": {"temperature": "hot"}}]
        if self.rng.random() < 0.5:
            route, bodies = "/v1/completions", both + [json.dumps(b).encode() for b in openai]
        else:
            route, bodies = "/api/generate", both + [json.dumps(b).encode() for b in ollama]
        resp = await client.post(route, content=self.rng.choice(bodies),
                                 headers={"Content-Type": "application/json"})
        self.status("malformed", resp, expected=400)


def run_soak(url: str, model: str, duration: float, concurrency: int, max_tokens: int = 16,
             long_prompt_words: int = 5000, seed: int = 0) -> SoakReport:
    soak = Soak(url, model, max_tokens, long_prompt_words, seed)
    return asyncio.run(soak.run(duration, concurrency))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url")
    parser.add_argument("--model", default="smollm2:135m")
    parser.add_argument("--duration", type=float, default=120)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--long-prompt-words", type=int, default=20_000)
    args = parser.parse_args()
    report = run_soak(args.url, args.model, args.duration, args.concurrency, args.max_tokens,
                      args.long_prompt_words)
    print(report.summary())
    for line in (report.server_errors + report.wrong)[:20]:
        print("  ", line)


if __name__ == "__main__":
    main()
