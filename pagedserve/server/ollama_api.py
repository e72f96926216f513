"""The Ollama API's generation routes: ``/api/generate`` and ``/api/chat``.

Translation only; the model routes (``/api/tags`` and the like) are in ollama_models_api.py,
the embedding routes in embeddings_api.py. An embedding-only model answers both routes here
with Ollama's 400 ``"NAME" does not support generate`` (or ``chat``).
Answers stream as newline-delimited JSON unless ``"stream": false``; the last object carries
``done: true``, ``done_reason`` and Ollama's timings in nanoseconds:

    total_duration        handler entry -> answer complete
    load_duration         handler entry -> request queued (the model is always loaded)
    prompt_eval_duration  first scheduled -> first token (prefill)
    eval_duration         first token -> last token (decode)
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask

from pagedserve.outputs import RequestOutput, TokenLogprobs
from pagedserve.server.errors import APIError
from pagedserve.server.generation import Generation, until_disconnected
from pagedserve.server.json_encoding import encode_json
from pagedserve.server.ollama_protocol import (
    FIELD_OPTIONS,
    OLLAMA_DEFAULTS,
    ChatRequest,
    GenerateRequest,
)
from pagedserve.server.request_body import read_body
from pagedserve.server.served_model import ServedModel
from pagedserve.server.structured_outputs import (
    ToolFormat,
    ollama_constraint,
    ollama_messages,
    ollama_tool_plan,
)
from pagedserve.structured import Constraint
from pagedserve.structured.tool_parsers import ToolParser

logger = logging.getLogger(__name__)

router = APIRouter()

def served_model(request: Request) -> ServedModel:
    return request.app.state.served


def check_model(served: ServedModel, name: str | None) -> str:
    if not name:
        raise APIError.bad_request("model is required", param="model")
    if not served.answers_to(name):
        raise APIError(404, f'model "{name}" not found, try pulling it first', param="model")
    return name


@router.post("/api/generate")
async def generate(request: Request):
    started = time.monotonic()
    served = served_model(request)
    body = await read_body(request, GenerateRequest)
    name = check_model(served, body.model)
    served.check_generates(f"{json.dumps(name)} does not support generate")
    _check_fields(body, name, request)
    if not body.prompt:
        return _loaded(name, body.keep_alive, {"response": ""})
    if body.raw:
        prompt = body.prompt
    else:
        messages = served.with_system_prompt([{"role": "user", "content": body.prompt}],
                                             system=body.system)
        prompt = await served.render_chat(messages)
    generation = await _start(served, prompt, body.sampling_values(),
                              ollama_constraint(body.format))
    reply = _Reply(name, started, lambda text: {"response": text})
    if body.stream:
        return _ndjson(reply.stream(generation), generation)
    return JSONResponse(await until_disconnected(request, reply.collect(generation)))


@router.post("/api/chat")
async def chat(request: Request):
    started = time.monotonic()
    served = served_model(request)
    body = await read_body(request, ChatRequest)
    name = check_model(served, body.model)
    served.check_generates(f"{json.dumps(name)} does not support chat")
    _check_fields(body, name, request)
    if not body.messages:
        return _loaded(name, body.keep_alive,
                       {"message": {"role": "assistant", "content": ""}})
    constraint = ollama_constraint(body.format)
    tool_format = ToolFormat.of(served.tokenizer, served.tool_parser_name)
    plan = ollama_tool_plan(body, tool_format, constraint)
    if plan is not None and plan.constraint is not None:
        constraint = plan.constraint
    messages, tools = tool_format.chat(served.with_system_prompt(ollama_messages(body)), plan)
    prompt = await served.render_chat(messages, tools)
    generation = await _start(served, prompt, body.sampling_values(), constraint)
    reply = _Reply(name, started,
                   lambda text: {"message": {"role": "assistant", "content": text}},
                   plan.parser if plan else None)
    if body.stream:
        return _ndjson(reply.stream(generation), generation)
    return JSONResponse(await until_disconnected(request, reply.collect(generation)))


def _check_fields(body: GenerateRequest | ChatRequest, name: str, request: Request) -> None:
    """400, in Ollama's words, for what would change the answer and is not implemented; the
    fields that change nothing here go to the log, once per request."""
    model = json.dumps(name, ensure_ascii=False)
    if body.think not in (None, False, ""):
        raise APIError.bad_request(f"{model} does not support thinking", param="think")
    images = [body.images] if isinstance(body, GenerateRequest) else [
        m.images for m in body.messages or []]
    if any(images):
        raise APIError.bad_request(f"{model} does not support vision (images): it reads "
                                   "text only", param="images")
    if isinstance(body, GenerateRequest):
        if body.suffix:
            raise APIError.bad_request(f"{model} does not support insert (suffix)",
                                       param="suffix")
        if body.template:
            raise APIError.bad_request("template: not supported: the model's own chat "
                                       "template is used", param="template")
        if body.context:
            raise APIError.bad_request("context: not supported (deprecated by Ollama): send "
                                       "the conversation as messages to /api/chat",
                                       param="context")
    ignored = body.ignored_fields()
    if ignored:
        logger.info("%s: fields ignored: %s", request.url.path, ", ".join(ignored))


async def _start(served: ServedModel, prompt: str, values: dict[str, Any],
                 constraint: Constraint | None) -> Generation:
    if constraint is not None:
        values = {**values, "constraint": constraint}
    params = served.sampling_params(values, api_defaults=OLLAMA_DEFAULTS, renames=FIELD_OPTIONS)
    return await served.start([prompt], [params], FIELD_OPTIONS)


def _loaded(name: str, keep_alive: Any, content: dict) -> dict:
    """Ollama's answer to a request without a prompt: the model is loaded (or 'unloaded')."""
    reason = "unload" if keep_alive in (0, "0", "0s", "0m") else "load"
    return {"model": name, "created_at": _now(), **content, "done": True, "done_reason": reason}


@dataclass(slots=True)
class _Reply:
    """Builds one answer's objects: the model name as asked, the content, the final timings."""

    model: str
    started: float  # time.monotonic() at handler entry
    content: Callable[[str], dict]
    tool_parser: ToolParser | None = None  # /api/chat with tools: calls read from the text

    def chunk(self, text: str, logprobs: list[TokenLogprobs] | None = None,
              tool_calls: list[dict] | None = None) -> dict:
        obj = {"model": self.model, "created_at": _now(), **self.content(text), "done": False}
        if tool_calls:
            obj["message"]["tool_calls"] = tool_calls
        if logprobs is not None:
            obj["logprobs"] = _logprobs(logprobs)
        return obj

    def final(self, text: str, last: RequestOutput,
              logprobs: list[TokenLogprobs] | None = None) -> dict:
        obj = self.chunk(text, logprobs)
        obj.update(done=True, done_reason=last.finish_reason or "stop",
                   **self.timings(last))
        return obj

    def timings(self, last: RequestOutput) -> dict[str, int]:
        now = time.monotonic()
        m = last.metrics
        arrival = m.arrival_time if m else self.started
        scheduled = (m.first_scheduled_time if m else None) or arrival
        first = (m.first_token_time if m else None) or scheduled
        final = (m.last_token_time if m else None) or first
        return {
            "total_duration": _ns(now - self.started),
            "load_duration": _ns(arrival - self.started),
            "prompt_eval_count": last.num_prompt_tokens,
            "prompt_eval_duration": _ns(first - scheduled),
            "eval_count": last.num_output_tokens,
            "eval_duration": _ns(final - first),
        }

    async def stream(self, generation: Generation) -> AsyncIterator[dict]:
        """Chunks of text; tool calls come whole (Ollama's shape), in a chunk of their own
        before the last one; a call cut off by ``num_predict`` is left out (its arguments
        are no object), and the answer ends with ``done_reason: "length"``."""
        tools = self.tool_parser.stream() if self.tool_parser else None
        async for _, output in generation:
            text = output.delta_text
            if tools is not None:
                text, _ = tools.feed(text)
                if output.finished:
                    more, _ = tools.finish(cut=output.finish_reason == "length")
                    text += more
            if output.finished:
                calls = [_tool_call(c.name, c.arguments)
                         for c in (tools.calls if tools else []) if c.complete]
                if calls:
                    yield self.chunk("", tool_calls=calls)
                yield self.final(text, output, output.delta_logprobs)
            elif text or output.delta_logprobs:
                yield self.chunk(text, output.delta_logprobs)

    async def collect(self, generation: Generation) -> dict:
        text, logprobs, last = "", None, None
        async for _, output in generation:
            text += output.delta_text
            if output.delta_logprobs is not None:
                logprobs = (logprobs or []) + output.delta_logprobs
            last = output
        if last is None:
            raise APIError(500, "the engine ended the request without an answer")
        if self.tool_parser is not None:  # as streamed: the complete calls
            parsed = self.tool_parser.parse(text, cut=last.finish_reason == "length")
            final = self.final(parsed.content, last, logprobs)
            calls = [_tool_call(c.name, c.arguments) for c in parsed.calls if c.complete]
            if calls:
                final["message"]["tool_calls"] = calls
            return final
        return self.final(text, last, logprobs)


def _tool_call(name: str, arguments: str) -> dict:
    """Ollama's shape: arguments as an object, not JSON text."""
    try:
        value = json.loads(arguments)
    except ValueError:
        value = arguments
    return {"function": {"name": name, "arguments": value}}


def _logprobs(logprobs: list[TokenLogprobs]) -> list[dict]:
    return [{"token": lp.sampled.token, "logprob": lp.sampled.logprob,
             "top_logprobs": [{"token": t.token, "logprob": t.logprob} for t in lp.top]}
            for lp in logprobs]


def _ndjson(objects: AsyncIterator[dict], generation: Generation) -> StreamingResponse:
    """Newline-delimited JSON; ``generation`` is aborted when the response ends, however it
    ends (a client gone before the first chunk never starts ``objects``)."""

    async def body() -> AsyncIterator[bytes]:
        try:
            async for obj in objects:
                yield encode_json(obj) + b"\n"
        except APIError as exc:
            yield encode_json({"error": exc.message}) + b"\n"
        except Exception as exc:  # the status line is sent; the error goes in the stream
            logger.exception("stream failed")
            yield encode_json({"error": f"{type(exc).__name__}: {exc}"}) + b"\n"

    return StreamingResponse(body(), media_type="application/x-ndjson",
                             background=BackgroundTask(generation.abort))


def _ns(seconds: float) -> int:
    return max(0, int(seconds * 1e9))


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")
