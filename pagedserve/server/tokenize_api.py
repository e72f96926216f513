"""vLLM's tokenizer routes: ``POST /tokenize`` and ``POST /detokenize``.

``/tokenize`` takes a ``prompt`` or chat ``messages`` (rendered with the model's chat template,
as ``/v1/chat/completions`` would) and answers the token ids, their count and the context size.
``/detokenize`` takes ``tokens`` and answers their text.

They cost the server what a prompt costs before it is computed, so they are bounded like the
generation routes: behind the API key when one is set (app.py), bodies up to
``--max-request-body``, texts up to the prompt character limit, at most a context's worth of
ids. A request with a long body holds one of the app's :class:`WorkSlots` slots and does its
work (parsing, tokenizing or detokenizing, encoding the answer) in their threads: a flood of
them neither stalls the streams on the event loop nor piles up memory, and is answered 503
once the slots and their backlog are taken.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from fastapi import APIRouter, Request, Response

from pagedserve.server.errors import APIError
from pagedserve.server.openai_protocol import DetokenizeRequest, TokenizeRequest
from pagedserve.server.request_body import parse_body
from pagedserve.server.served_model import LONG_TEXT_CHARS, ServedModel
from pagedserve.server.work_slots import WorkSlots

router = APIRouter()

T = TypeVar("T")
Call = Callable[..., Awaitable[Any]]  # runs a function here or in a WorkSlots thread

LONG_BODY_BYTES = LONG_TEXT_CHARS  # a body this large may hold a text worth a worker thread
_IDS_PER_SLICE = 8192  # about a millisecond of json.dumps


@router.post("/tokenize", response_class=Response)
async def tokenize(request: Request) -> Response:
    return await _sized(request, _tokenize)


@router.post("/detokenize", response_class=Response)
async def detokenize(request: Request) -> Response:
    return await _sized(request, _detokenize)


async def _sized(request: Request, handler) -> Response:
    """A short body's work on the event loop; a long one's in a work slot (a thread)."""
    raw = await request.body()
    if len(raw) < LONG_BODY_BYTES:
        return await handler(request, raw, _here)
    slots: WorkSlots = request.app.state.text_work
    async with slots.slot():
        return await handler(request, raw, slots.call)


async def _here(fn: Callable[..., T], *args: Any) -> T:
    """A short call's work, done on the event loop."""
    return fn(*args)


async def _tokenize(request: Request, raw: bytes, call: Call) -> Response:
    served: ServedModel = request.app.state.served
    body = await call(parse_body, raw, TokenizeRequest, request.app.state.limits.max_json_depth)
    served.check_model(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise APIError.bad_request("prompt: give either prompt or messages", param="prompt")
    if body.messages is not None:
        messages = served.with_system_prompt(
            [{"role": m.role, "content": m.text()} for m in body.messages])
        text = await served.render_chat(messages)  # bounded by the prompt character limit
        field = "messages"
    else:
        text, field = body.prompt, "prompt"
    _check_length(served, text, field)
    tokens = await call(served.tokenizer.encode, text, body.add_special_tokens)
    answer = await call(_ids_answer, tokens, served.max_model_len)
    return Response(answer, media_type="application/json")


async def _detokenize(request: Request, raw: bytes, call: Call) -> Response:
    served: ServedModel = request.app.state.served
    body = await call(parse_body, raw, DetokenizeRequest,
                      request.app.state.limits.max_json_depth)
    served.check_model(body.model)
    limit = served.max_model_len
    if len(body.tokens) > limit:
        raise APIError.bad_request(
            f"tokens: at most {limit} ids (the model's context length), got "
            f"{len(body.tokens)}", param="tokens", code="context_length_exceeded")
    answer = await call(_text_answer, served, body.tokens)
    return Response(answer, media_type="application/json")


def _check_length(served: ServedModel, text: str, field: str) -> None:
    """The generation routes' bound: what the context could hold at the longest token."""
    limit = served.info.max_prompt_chars
    if len(text) > limit:
        raise APIError(400, f"{field}: {len(text)} characters cannot fit in this model's "
                       f"context length of {served.max_model_len} tokens (at most {limit} "
                       "characters; pagedserve serve --max-prompt-chars)", param=field,
                       code="context_length_exceeded")


def _text_answer(served: ServedModel, tokens: Sequence[int]) -> bytes:
    return _dumps({"prompt": _decode(served, tokens)})


def _decode(served: ServedModel, tokens: Sequence[int]) -> str:
    vocab = served.tokenizer.vocab_size
    bad = [t for t in tokens if not 0 <= t < vocab]
    if bad:
        raise APIError.bad_request(f"tokens: ids must be in [0, {vocab}), got {bad[:5]}",
                                   param="tokens")
    return served.tokenizer.decode(tokens, skip_special_tokens=False)


def _ids_answer(tokens: list[int], max_model_len: int) -> bytes:
    """/tokenize's answer. FastAPI's own encoder would walk the ids one by one on the event
    loop; json.dumps holds the GIL throughout, so the ids go in slices, between which the
    event loop gets its turn."""
    ids = ",".join(json.dumps(tokens[start:start + _IDS_PER_SLICE], separators=(",", ":"))[1:-1]
                   for start in range(0, len(tokens), _IDS_PER_SLICE))
    return (f'{{"tokens":[{ids}],"count":{len(tokens)},"max_model_len":{max_model_len}}}'
            .encode())


def _dumps(content: Any) -> bytes:
    return json.dumps(content, ensure_ascii=False, allow_nan=False,
                      separators=(",", ":")).encode("utf-8")
