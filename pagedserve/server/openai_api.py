"""The OpenAI API: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``.

Translation only: a request body becomes prompts and :class:`SamplingParams` (one engine request
per prompt and choice), and the engine's :class:`RequestOutput` deltas become OpenAI's JSON
objects or server-sent events ending in ``data: [DONE]``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask

from pagedserve.outputs import RequestOutput, TokenLogprobs
from pagedserve.sampling_params import MAX_SEED, SamplingParams
from pagedserve.server.errors import APIError
from pagedserve.server.generation import Generation, until_disconnected
from pagedserve.server.openai_protocol import ChatCompletionRequest, CompletionRequest
from pagedserve.server.request_body import read_body
from pagedserve.server.served_model import ServedModel
from pagedserve.server.structured_outputs import (
    ToolFormat,
    openai_constraint,
    openai_messages,
    openai_tool_plan,
)
from pagedserve.structured.tool_parsers import ToolCallDelta, ToolParser

logger = logging.getLogger(__name__)

router = APIRouter()


def served_model(request: Request) -> ServedModel:
    return request.app.state.served


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    served = served_model(request)
    return {"object": "list", "data": [{
        "id": served.name, "object": "model", "created": int(served.loaded_at),
        "owned_by": "pagedserve", "root": served.card.path, "parent": None,
        "max_model_len": served.max_model_len, "dtype": served.engine.config.dtype,
    }]}


@router.get("/v1/models/{model_id:path}")
async def retrieve_model(model_id: str, request: Request) -> dict:
    served = served_model(request)
    served.check_model(model_id)
    return {"id": served.name, "object": "model", "created": int(served.loaded_at),
            "owned_by": "pagedserve"}


@router.post("/v1/completions")
async def completions(request: Request):
    served = served_model(request)
    body = await read_body(request, CompletionRequest)
    served.check_model(body.model)
    _check_fields(body, request)
    prompts = _completion_prompts(body.prompt)
    served.check_choices(len(prompts), body.n)
    if body.best_of is not None and body.best_of != body.n:
        raise APIError.bad_request(
            f"best_of must equal n ({body.n}) or be left out, got {body.best_of}: this server "
            "does not rank extra candidates (vLLM's V1 engine does not either)", param="best_of")
    values = body.sampling_values()
    if "max_tokens" in body.model_fields_set:
        values["max_tokens"] = body.max_tokens
    if body.logprobs is not None:
        values["logprobs"] = body.logprobs
    constraint = openai_constraint(body)
    if constraint is not None:
        values["constraint"] = constraint
    params = served.sampling_params(values, api_defaults={"max_tokens": 16})
    call = _Call("cmpl", served.name, body.n, body.include_usage)
    echo = [_prompt_text(served, p) for p in prompts] if body.echo else None
    generation = await _start(served, prompts, params, body.n)
    if body.stream:
        return _sse(_stream_completion(call, generation, echo), generation)
    answer = await until_disconnected(request, _collect_completion(call, generation, echo))
    return JSONResponse(answer)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    served = served_model(request)
    body = await read_body(request, ChatCompletionRequest)
    served.check_model(body.model)
    _check_fields(body, request)
    served.check_choices(1, body.n)
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError.bad_request("top_logprobs requires logprobs to be true",
                                   param="top_logprobs")
    constraint = openai_constraint(body)
    tool_format = ToolFormat.of(served.tokenizer, served.tool_parser_name)
    plan = openai_tool_plan(body, tool_format, constraint)
    parser = plan.parser if plan else None
    if plan is not None and plan.constraint is not None:
        constraint = plan.constraint
    messages, tools = tool_format.chat(
        served.with_system_prompt(openai_messages(body.messages)), plan)
    prompt = await served.render_chat(messages, tools)
    values = body.sampling_values()
    if constraint is not None:
        values["constraint"] = constraint
    renames = {"logprobs": "top_logprobs"}
    if body.max_completion_tokens is not None:
        values["max_tokens"] = body.max_completion_tokens
        renames["max_tokens"] = "max_completion_tokens"
    elif "max_tokens" in body.model_fields_set:
        values["max_tokens"] = body.max_tokens
    if body.logprobs:
        values["logprobs"] = body.top_logprobs or 0
    params = served.sampling_params(values, api_defaults={"max_tokens": None}, renames=renames)
    call = _Call("chatcmpl", served.name, body.n, body.include_usage)
    generation = await _start(served, [prompt], params, body.n, renames,
                              prompt_field="messages")
    if body.stream:
        return _sse(_stream_chat(call, generation, parser), generation)
    return JSONResponse(await until_disconnected(request,
                                                 _collect_chat(call, generation, parser)))


# -- requests ----------------------------------------------------------------------------------


def _check_fields(body: CompletionRequest | ChatCompletionRequest, request: Request) -> None:
    """400 for a field that would change the answer and is not implemented; the fields that
    change nothing here go to the log, once per request."""
    refused = body.refused()
    if refused is not None:
        name, why = refused
        raise APIError.bad_request(f"{name}: {why}", param=name)
    ignored = body.ignored_fields()
    if ignored:
        logger.info("%s: fields ignored: %s", request.url.path, ", ".join(ignored))


def _completion_prompts(prompt: str | list) -> list[str | list[int]]:
    if isinstance(prompt, str):
        prompts: list = [prompt]
    elif prompt and all(isinstance(t, int) for t in prompt):
        prompts = [list(prompt)]
    else:
        prompts = list(prompt)
    if not prompts:
        raise APIError.bad_request("prompt must not be empty", param="prompt")
    return prompts


async def _start(served: ServedModel, prompts: Sequence[str | list[int]],
                 params: SamplingParams, n: int, renames: dict[str, str] | None = None,
                 prompt_field: str = "prompt") -> Generation:
    """One engine request per (prompt, choice); choice i of a seeded request uses seed + i
    (wrapping within the seed's 64-bit range)."""
    expanded_prompts, expanded_params = [], []
    for prompt in prompts:
        for i in range(n):
            seed = None if params.seed is None else _wrap_seed(params.seed + i)
            expanded_prompts.append(prompt)
            expanded_params.append(dataclasses.replace(params, n=1, seed=seed))
    return await served.start(expanded_prompts, expanded_params, renames, prompt_field)


def _wrap_seed(seed: int) -> int:
    return seed if seed <= MAX_SEED else seed - 2**64


def _prompt_text(served: ServedModel, prompt: str | list[int]) -> str:
    return prompt if isinstance(prompt, str) else served.tokenizer.decode(prompt)


# -- responses ---------------------------------------------------------------------------------


@dataclass(slots=True)
class _Call:
    """Identity and accounting of one API call's answer."""

    kind: str  # "cmpl" or "chatcmpl"
    model: str
    n: int
    include_usage: bool
    id: str = ""
    created: int = 0
    prompt_tokens: dict[int, int] = field(default_factory=dict)  # per prompt
    completion_tokens: dict[int, int] = field(default_factory=dict)  # per choice

    def __post_init__(self) -> None:
        self.id = f"{self.kind}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def count(self, index: int, output: RequestOutput) -> None:
        self.prompt_tokens[index // self.n] = output.num_prompt_tokens
        self.completion_tokens[index] = output.num_output_tokens

    def usage(self) -> dict[str, int]:
        prompt = sum(self.prompt_tokens.values())
        completion = sum(self.completion_tokens.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}

    def envelope(self, obj: str, choices: list[dict]) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": choices}


@dataclass(slots=True)
class _Choice:
    text: str = ""
    finish_reason: str | None = None
    logprobs: list[TokenLogprobs] | None = None


async def _collect(call: _Call, generation: Generation) -> dict[int, _Choice]:
    choices = {i: _Choice() for i in range(len(generation))}
    async for index, output in generation:
        call.count(index, output)
        choice = choices[index]
        choice.text += output.delta_text
        if output.delta_logprobs is not None:
            choice.logprobs = (choice.logprobs or []) + output.delta_logprobs
        if output.finished:
            choice.finish_reason = output.finish_reason
    return choices


async def _collect_completion(call: _Call, generation: Generation,
                              echo: list[str] | None) -> dict:
    choices = await _collect(call, generation)
    out = []
    for index, choice in sorted(choices.items()):
        prefix = echo[index // call.n] if echo else ""
        logprobs = (_completion_logprobs(choice.logprobs, len(prefix))
                    if choice.logprobs is not None else None)
        out.append({"index": index, "text": prefix + choice.text, "logprobs": logprobs,
                    "finish_reason": choice.finish_reason})
    return {**call.envelope("text_completion", out), "usage": call.usage()}


async def _collect_chat(call: _Call, generation: Generation,
                        parser: ToolParser | None) -> dict:
    choices = await _collect(call, generation)
    out = []
    for index, choice in sorted(choices.items()):
        logprobs = ({"content": _chat_logprobs(choice.logprobs)}
                    if choice.logprobs is not None else None)
        message: dict[str, Any] = {"role": "assistant", "content": choice.text}
        reason = choice.finish_reason
        if parser is not None:
            # as streamed: complete calls, and one cut off by max_tokens (reason "length")
            parsed = parser.parse(choice.text, cut=reason == "length")
            message["content"] = parsed.content
            if parsed.calls:
                message["content"] = parsed.content or None
                message["tool_calls"] = [
                    {"id": c.id, "type": "function",
                     "function": {"name": c.name, "arguments": c.arguments}}
                    for c in parsed.calls]
                reason = "tool_calls" if reason == "stop" else reason
        out.append({"index": index, "message": message, "logprobs": logprobs,
                    "finish_reason": reason})
    return {**call.envelope("chat.completion", out), "usage": call.usage()}


async def _stream_completion(call: _Call, generation: Generation,
                             echo: list[str] | None) -> AsyncIterator[dict]:
    offsets = [0] * len(generation)
    started = [False] * len(generation)
    async for index, output in generation:
        call.count(index, output)
        text = output.delta_text
        if echo and not started[index]:
            text = echo[index // call.n] + text
            offsets[index] = len(echo[index // call.n])
        started[index] = True
        if not text and not output.finished and not output.delta_logprobs:
            continue
        logprobs = None
        if output.delta_logprobs is not None:
            logprobs = _completion_logprobs(output.delta_logprobs, offsets[index])
            offsets[index] += sum(len(lp.sampled.token) for lp in output.delta_logprobs)
        yield call.envelope("text_completion", [{
            "index": index, "text": text, "logprobs": logprobs,
            "finish_reason": output.finish_reason if output.finished else None}])
    if call.include_usage:
        yield {**call.envelope("text_completion", []), "usage": call.usage()}


async def _stream_chat(call: _Call, generation: Generation,
                       parser: ToolParser | None) -> AsyncIterator[dict]:
    """Chunks in OpenAI's shape; with a tool parser, each call's id and name come once, then
    its arguments in fragments, and calls end the answer with ``finish_reason: tool_calls``."""
    tool_streams = {i: parser.stream() for i in range(len(generation))} if parser else {}
    for index in range(len(generation)):
        yield call.envelope("chat.completion.chunk", [{
            "index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
            "finish_reason": None}])
    async for index, output in generation:
        call.count(index, output)
        content, tool_deltas = output.delta_text, []
        reason = output.finish_reason if output.finished else None
        tools = tool_streams.get(index)
        if tools is not None:
            content, tool_deltas = tools.feed(output.delta_text)
            if output.finished:
                more, last = tools.finish(cut=reason == "length")
                content, tool_deltas = content + more, tool_deltas + last
                if tools.num_calls and reason == "stop":
                    reason = "tool_calls"
        if not content and not tool_deltas and not output.finished \
                and not output.delta_logprobs:
            continue
        delta: dict[str, Any] = {"content": content} if content else {}
        if tool_deltas:
            delta["tool_calls"] = [_tool_call_delta(d) for d in tool_deltas]
        logprobs = None
        if output.delta_logprobs is not None:
            logprobs = {"content": _chat_logprobs(output.delta_logprobs)}
        yield call.envelope("chat.completion.chunk", [{
            "index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}])
    if call.include_usage:
        yield {**call.envelope("chat.completion.chunk", []), "usage": call.usage()}


def _tool_call_delta(d: ToolCallDelta) -> dict[str, Any]:
    if d.name is None:
        return {"index": d.index, "function": {"arguments": d.arguments}}
    return {"index": d.index, "id": d.id, "type": "function",
            "function": {"name": d.name, "arguments": d.arguments}}


def _completion_logprobs(logprobs: list[TokenLogprobs], offset: int) -> dict[str, list]:
    tokens, token_logprobs, top, text_offset = [], [], [], []
    for lp in logprobs:
        tokens.append(lp.sampled.token)
        token_logprobs.append(lp.sampled.logprob)
        alternatives = lp.top or [lp.sampled]
        top.append({alt.token: alt.logprob for alt in alternatives})
        text_offset.append(offset)
        offset += len(lp.sampled.token)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top,
            "text_offset": text_offset}


def _chat_logprobs(logprobs: list[TokenLogprobs]) -> list[dict]:
    def entry(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return [{**entry(lp.sampled.token, lp.sampled.logprob),
             "top_logprobs": [entry(alt.token, alt.logprob) for alt in lp.top]}
            for lp in logprobs]


def _sse(events: AsyncIterator[dict], generation: Generation) -> StreamingResponse:
    """Server-sent events ending in ``[DONE]``; ``generation`` is aborted when the response
    ends, however it ends (a client gone before the first event never starts ``events``)."""

    async def body() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
        except APIError as exc:
            yield f"data: {json.dumps(_error_event(exc.status, exc.message))}\n\n"
        except Exception as exc:  # the status line is sent; the error goes in the stream
            logger.exception("stream failed")
            yield f"data: {json.dumps(_error_event(500, f'{type(exc).__name__}: {exc}'))}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"},
                             background=BackgroundTask(generation.abort))


def _error_event(status: int, message: str) -> dict:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": None, "code": status}}

