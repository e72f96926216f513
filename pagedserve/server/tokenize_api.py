"""vLLM's tokenizer routes: ``POST /tokenize`` and ``POST /detokenize``.

``/tokenize`` takes a ``prompt`` or chat ``messages`` (rendered with the model's chat template,
as ``/v1/chat/completions`` would) and answers the token ids, their count and the context size.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request

from pagedserve.server.errors import APIError
from pagedserve.server.openai_protocol import DetokenizeRequest, TokenizeRequest
from pagedserve.server.request_body import read_body
from pagedserve.server.served_model import LONG_TEXT_CHARS, ServedModel

router = APIRouter()


@router.post("/tokenize")
async def tokenize(request: Request) -> dict:
    served: ServedModel = request.app.state.served
    body = await read_body(request, TokenizeRequest)
    served.check_model(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise APIError.bad_request("prompt: give either prompt or messages", param="prompt")
    if body.messages is not None:
        messages = served.with_system_prompt(
            [{"role": m.role, "content": m.text()} for m in body.messages])
        text = await served.render_chat(messages)
    else:
        text = body.prompt
    tokens = await served.tokenize(text, body.add_special_tokens,
                                   "messages" if body.messages is not None else "prompt")
    return {"tokens": tokens, "count": len(tokens), "max_model_len": served.max_model_len}


@router.post("/detokenize")
async def detokenize(request: Request) -> dict:
    served: ServedModel = request.app.state.served
    body = await read_body(request, DetokenizeRequest)
    served.check_model(body.model)
    vocab = served.tokenizer.vocab_size
    bad = [t for t in body.tokens if not 0 <= t < vocab]
    if bad:
        raise APIError.bad_request(f"tokens: ids must be in [0, {vocab}), got {bad[:5]}",
                                   param="tokens")
    if len(body.tokens) < LONG_TEXT_CHARS:
        text = served.tokenizer.decode(body.tokens, skip_special_tokens=False)
    else:
        text = await asyncio.to_thread(served.tokenizer.decode, body.tokens, False)
    return {"prompt": text}
