"""The OpenAI API: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``
(``/v1/embeddings``: embeddings_api.py).

Translation only: a request body becomes prompts and :class:`SamplingParams` (one engine request
per prompt and choice), and the engine's :class:`RequestOutput` deltas become OpenAI's JSON
objects or server-sent events ending in ``data: [DONE]``.

Logprobs of a completion with ``echo`` cover the prompt too, as OpenAI's legacy API and vLLM
give them (what lm-eval's loglikelihood tasks read): the prompt's tokens first, the first one
with a null logprob, then the answer's; ``max_tokens`` 0 with ``echo`` answers the prompt
alone. vLLM's ``prompt_logprobs`` comes back in vLLM's shape: per completion choice, at the top
of a chat completion.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask

from pagedserve.outputs import RequestOutput, TokenLogprobs
from pagedserve.sampling_params import MAX_SEED, SamplingParams
from pagedserve.server.errors import APIError
from pagedserve.server.generation import Generation, until_disconnected
from pagedserve.server.json_encoding import encode_json
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
        "max_model_len": served.max_model_len, "dtype": served.info.config.dtype,
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
    served.check_generates("The model does not support Completions API")
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
        if body.max_tokens == 0 and not body.echo:  # vLLM's answer too
            raise APIError.bad_request("max_tokens must be >= 1 unless echo is true (then 0 "
                                       "answers the prompt alone), got 0", param="max_tokens")
    if body.logprobs is not None:
        values["logprobs"] = body.logprobs
        if body.echo and body.prompt_logprobs is None:  # the echoed prompt's logprobs
            values["prompt_logprobs"] = body.logprobs
    _check_prompt_logprobs(body.prompt_logprobs, body.stream)
    constraint = openai_constraint(body)
    if constraint is not None:
        values["constraint"] = constraint
    params = served.sampling_params(values, api_defaults={"max_tokens": 16})
    call = _Call("cmpl", served.name, body.n, body.include_usage)
    shape = _CompletionShape(
        echo=[_prompt_text(served, p) for p in prompts] if body.echo else None,
        logprobs=body.logprobs is not None, token_text=_token_text(served))
    generation = await _start(served, prompts, params, body.n)
    if body.stream:
        return _sse(_stream_completion(call, generation, shape), generation)
    answer = await until_disconnected(request, _collect_completion(call, generation, shape))
    return JSONResponse(answer)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    served = served_model(request)
    body = await read_body(request, ChatCompletionRequest)
    served.check_model(body.model)
    served.check_generates("The model does not support Chat Completions API")
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
    if values.get("max_tokens") == 0:  # a chat has no echo: nothing to answer (vLLM: 400)
        name = renames.get("max_tokens", "max_tokens")
        raise APIError.bad_request(f"{name} must be >= 1, got 0", param=name)
    _check_prompt_logprobs(body.prompt_logprobs, body.stream)
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


def _check_prompt_logprobs(prompt_logprobs: int | None, stream: bool) -> None:
    if prompt_logprobs is not None and stream:  # as vLLM: a stream has no place for them
        raise APIError.bad_request("prompt_logprobs are not available when stream is true",
                                   param="prompt_logprobs")


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


def _token_text(served: ServedModel) -> Callable[[int], str]:
    tokenizer = served.tokenizer
    return tokenizer.token_text if tokenizer is not None else str


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
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    prompt_token_ids: list[int] | None = None


@dataclass(slots=True)
class _CompletionShape:
    """What a completion's choices show besides their text."""

    echo: list[str] | None  # per prompt: its text, shown before the answer
    logprobs: bool  # the client asked for logprobs (of the prompt too, with echo)
    token_text: Callable[[int], str]  # for a prompt's first token, which has no logprob

    def prefix(self, call: _Call, index: int) -> str:
        return self.echo[index // call.n] if self.echo else ""

    def first_logprobs(self, answer: list[TokenLogprobs] | None,
                       prompt: list[TokenLogprobs | None] | None, prompt_token_ids: list[int],
                       prefix: str) -> dict[str, list] | None:
        """A choice's first logprobs: the echoed prompt's (if any), then the answer's, whose
        text offsets count from the end of the echoed prompt."""
        if not self.logprobs:
            return None
        shown = _completion_logprobs(answer or [], len(prefix))
        if not self.echo or prompt is None:
            return shown
        echoed = _completion_logprobs(_prompt_entries(prompt, prompt_token_ids,
                                                      self.token_text), 0)
        return {key: echoed[key] + shown[key] for key in echoed}


async def _collect(call: _Call, generation: Generation) -> dict[int, _Choice]:
    choices = {i: _Choice() for i in range(len(generation))}
    async for index, output in generation:
        call.count(index, output)
        choice = choices[index]
        choice.text += output.delta_text
        if output.delta_logprobs is not None:
            choice.logprobs = (choice.logprobs or []) + output.delta_logprobs
        if output.prompt_logprobs is not None:
            choice.prompt_logprobs = output.prompt_logprobs
            choice.prompt_token_ids = output.prompt_token_ids
        if output.finished:
            choice.finish_reason = output.finish_reason
    return choices


async def _collect_completion(call: _Call, generation: Generation,
                              shape: _CompletionShape) -> dict:
    choices = await _collect(call, generation)
    out = []
    for index, choice in sorted(choices.items()):
        prefix = shape.prefix(call, index)
        logprobs = shape.first_logprobs(choice.logprobs, choice.prompt_logprobs,
                                        choice.prompt_token_ids, prefix)
        entry = {"index": index, "text": prefix + choice.text, "logprobs": logprobs,
                 "finish_reason": choice.finish_reason}
        if choice.prompt_logprobs is not None:
            entry["prompt_logprobs"] = _vllm_prompt_logprobs(choice.prompt_logprobs)
        out.append(entry)
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
    answer = {**call.envelope("chat.completion", out), "usage": call.usage()}
    prompt_logprobs = choices[0].prompt_logprobs if choices else None
    if prompt_logprobs is not None:  # vLLM's place: the prompt is the same for every choice
        answer["prompt_logprobs"] = _vllm_prompt_logprobs(prompt_logprobs)
    return answer


async def _stream_completion(call: _Call, generation: Generation,
                             shape: _CompletionShape) -> AsyncIterator[dict]:
    offsets = [0] * len(generation)
    started = [False] * len(generation)
    async for index, output in generation:
        call.count(index, output)
        text = output.delta_text
        if not started[index]:  # the echoed prompt, and its logprobs, come first
            prefix = shape.prefix(call, index)
            started[index], text, offsets[index] = True, prefix + text, len(prefix)
            logprobs = shape.first_logprobs(output.delta_logprobs, output.prompt_logprobs,
                                            output.prompt_token_ids, prefix)
        elif output.delta_logprobs is not None:
            logprobs = _completion_logprobs(output.delta_logprobs, offsets[index])
        else:
            logprobs = None
        offsets[index] += sum(len(lp.sampled.token) for lp in output.delta_logprobs or ())
        if not text and not output.finished and not output.delta_logprobs:
            continue
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


def _completion_logprobs(logprobs: Sequence[TokenLogprobs | str], offset: int
                         ) -> dict[str, list]:
    """OpenAI's legacy shape. Each position's top_logprobs holds its token and the top
    alternatives asked for (so up to logprobs + 1 entries, as OpenAI's); a ``str`` entry is a
    token that has no logprob (a prompt's first), shown with nulls."""
    tokens, token_logprobs, top, text_offset = [], [], [], []
    for lp in logprobs:
        if isinstance(lp, str):
            tokens.append(lp)
            token_logprobs.append(None)
            top.append(None)
        else:
            tokens.append(lp.sampled.token)
            token_logprobs.append(_finite(lp.sampled.logprob))
            top.append({alt.token: _finite(alt.logprob) for alt in (lp.sampled, *lp.top)})
        text_offset.append(offset)
        offset += len(tokens[-1])
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top,
            "text_offset": text_offset}


def _prompt_entries(prompt_logprobs: list[TokenLogprobs | None], prompt_token_ids: list[int],
                    token_text: Callable[[int], str]) -> list[TokenLogprobs | str]:
    """A prompt's logprobs for :func:`_completion_logprobs`: a token without one by its text."""
    return [token_text(prompt_token_ids[i]) if lp is None else lp
            for i, lp in enumerate(prompt_logprobs)]


def _vllm_prompt_logprobs(prompt_logprobs: list[TokenLogprobs | None]
                          ) -> list[dict[str, dict] | None]:
    """vLLM's ``prompt_logprobs``: per prompt token, null for the first, else {token id:
    {logprob, rank, decoded_token}} for the token itself and then its top alternatives."""
    out: list[dict[str, dict] | None] = []
    for lp in prompt_logprobs:
        if lp is None:
            out.append(None)
            continue
        entry: dict[str, dict] = {}
        for alt in (lp.sampled, *lp.top):
            entry.setdefault(str(alt.token_id), {"logprob": _finite(alt.logprob),
                                                 "rank": alt.rank, "decoded_token": alt.token})
        out.append(entry)
    return out


def _finite(logprob: float) -> float:
    """-inf (a token the model rules out) as -9999.0, which JSON can carry (vLLM's clamp)."""
    return max(logprob, -9999.0)


def _chat_logprobs(logprobs: list[TokenLogprobs]) -> list[dict]:
    def entry(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return [{**entry(lp.sampled.token, lp.sampled.logprob),
             "top_logprobs": [entry(alt.token, alt.logprob) for alt in lp.top]}
            for lp in logprobs]


def _sse(events: AsyncIterator[dict], generation: Generation) -> StreamingResponse:
    """Server-sent events ending in ``[DONE]``; ``generation`` is aborted when the response
    ends, however it ends (a client gone before the first event never starts ``events``)."""

    async def body() -> AsyncIterator[bytes]:
        try:
            async for event in events:
                yield b"data: " + encode_json(event) + b"\n\n"
        except APIError as exc:
            yield b"data: " + encode_json(_error_event(exc.status, exc.message)) + b"\n\n"
        except Exception as exc:  # the status line is sent; the error goes in the stream
            logger.exception("stream failed")
            error = _error_event(500, f"{type(exc).__name__}: {exc}")
            yield b"data: " + encode_json(error) + b"\n\n"
        yield b"data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"},
                             background=BackgroundTask(generation.abort))


def _error_event(status: int, message: str) -> dict:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": None, "code": status}}

