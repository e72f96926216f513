"""Streaming API clients: send one prompt, time every chunk, return a :class:`RequestRecord`.

One class per wire format; each knows its route, its request body and how to read its stream.
They work against any server that speaks the format: pagedserve, vLLM, llama.cpp's server,
Ollama (its /v1 routes for ``openai``, /api/generate for ``ollama``).

A token's arrival is a chunk that carries output text. Output tokens are counted from the usage
the server reports at the end; a server that reports none is credited one token per such chunk.
As in vLLM's benchmark, a request ends at its last such chunk: the trailing usage, ``[DONE]`` or
``"done": true`` message carries no token, so neither its delay nor the wait to read it counts in
the end-to-end latency, and TPOT = (e2e - TTFT) / (tokens - 1) spans the same gaps as the ITLs.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, ClassVar

import httpx

from pagedserve.bench.results import RequestRecord

if TYPE_CHECKING:
    from pagedserve.bench.http_stream import StreamingHTTP

MAX_ERROR_CHARS = 300


class ChunkClock:
    """Turns the arrival times of output chunks into TTFT, inter-token gaps and latency."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.last: float | None = None
        self.ttft: float | None = None
        self.itl: list[float] = []
        self.chunks = 0

    def output_chunk(self) -> None:
        now = time.perf_counter()
        if self.last is None:
            self.ttft = now - self.start
        else:
            self.itl.append(now - self.last)
        self.last = now
        self.chunks += 1

    def record(self, prompt_tokens: int | None, output_tokens: int | None) -> RequestRecord:
        if self.last is None or self.ttft is None:
            return RequestRecord(start=self.start, e2e=time.perf_counter() - self.start,
                                 error="the stream carried no output")
        return RequestRecord(
            success=True, start=self.start, ttft=self.ttft, itl=self.itl,
            e2e=self.last - self.start,  # the last token's arrival, not the stream's close
            prompt_tokens=prompt_tokens,
            output_tokens=output_tokens if output_tokens is not None else self.chunks,
        )


class ApiClient:
    """Base: subclasses set ``name`` and ``route`` and implement :meth:`body` and :meth:`_read`."""

    name: ClassVar[str]
    route: ClassVar[str]

    def __init__(self, model: str, *, temperature: float = 0.0):
        self.model = model
        self.temperature = temperature

    def body(self, prompt: str, output_len: int) -> dict:
        raise NotImplementedError

    async def _read(self, lines: AsyncIterator[str], clock: ChunkClock) -> RequestRecord:
        raise NotImplementedError

    async def send(self, http: httpx.AsyncClient | StreamingHTTP, prompt: str,
                   output_len: int) -> RequestRecord:
        """Stream one completion; never raises for a failed request, records the error."""
        clock = ChunkClock()
        try:
            async with http.stream("POST", self.route, json=self.body(prompt, output_len)) as resp:
                if resp.status_code != 200:
                    text = (await resp.aread()).decode(errors="replace")[:MAX_ERROR_CHARS]
                    return RequestRecord(
                        start=clock.start, error=f"HTTP {resp.status_code}: {text}"
                    )
                return await self._read(resp.aiter_lines(), clock)
        except (httpx.HTTPError, ValueError, KeyError) as exc:  # transport, bad JSON, odd shape
            error = f"{type(exc).__name__}: {exc}"
            return RequestRecord(start=clock.start, error=error[:MAX_ERROR_CHARS])


class OpenAICompletions(ApiClient):
    """POST /v1/completions with ``stream`` and ``stream_options.include_usage``; the vLLM
    extras ``ignore_eos`` and ``min_tokens`` fix the output length where the server has them."""

    name = "openai"
    route = "/v1/completions"

    def body(self, prompt: str, output_len: int) -> dict:
        return {
            "model": self.model, "prompt": prompt, "max_tokens": output_len,
            "temperature": self.temperature, "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": True, "min_tokens": output_len,
        }

    @staticmethod
    def _text(choice: dict) -> str:
        return choice.get("text") or ""

    async def _read(self, lines: AsyncIterator[str], clock: ChunkClock) -> RequestRecord:
        usage: dict = {}
        async for line in lines:
            if not line.startswith("data:"):
                continue  # blank separators, comments, event names
            data = line[len("data:"):].strip()
            if data == "[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                return RequestRecord(start=clock.start, error=str(event["error"])[:MAX_ERROR_CHARS])
            if any(self._text(choice) for choice in event.get("choices") or []):
                clock.output_chunk()
            usage = event.get("usage") or usage
        return clock.record(usage.get("prompt_tokens"), usage.get("completion_tokens"))


class OpenAIChat(OpenAICompletions):
    """POST /v1/chat/completions: the prompt is one user message; text arrives as deltas."""

    name = "openai-chat"
    route = "/v1/chat/completions"

    def body(self, prompt: str, output_len: int) -> dict:
        body = super().body(prompt, output_len)
        del body["prompt"]
        body["messages"] = [{"role": "user", "content": prompt}]
        return body

    @staticmethod
    def _text(choice: dict) -> str:
        return (choice.get("delta") or {}).get("content") or ""


class OllamaGenerate(ApiClient):
    """POST /api/generate, newline-delimited JSON. Ollama has no ignore_eos; ``num_predict``
    caps the output and the ``ignore_eos`` option is honoured by pagedserve (Ollama ignores it),
    so against Ollama itself a request may end early: the report counts what came back."""

    name = "ollama"
    route = "/api/generate"

    def body(self, prompt: str, output_len: int) -> dict:
        return {
            "model": self.model, "prompt": prompt, "stream": True,
            "options": {
                "num_predict": output_len, "temperature": self.temperature, "ignore_eos": True,
            },
        }

    async def _read(self, lines: AsyncIterator[str], clock: ChunkClock) -> RequestRecord:
        final: dict = {}
        async for line in lines:
            if not line.strip():
                continue
            event = json.loads(line)
            if "error" in event:
                return RequestRecord(start=clock.start, error=str(event["error"])[:MAX_ERROR_CHARS])
            if event.get("response"):
                clock.output_chunk()
            if event.get("done"):
                final = event
                break
        return clock.record(final.get("prompt_eval_count"), final.get("eval_count"))


CLIENTS: dict[str, type[ApiClient]] = {
    cls.name: cls for cls in (OpenAICompletions, OpenAIChat, OllamaGenerate)
}


def make_client(api: str, model: str) -> ApiClient:
    try:
        return CLIENTS[api](model)
    except KeyError:
        raise ValueError(f"api must be one of {', '.join(CLIENTS)}, got {api!r}") from None
