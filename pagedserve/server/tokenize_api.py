"""vLLM's tokenizer routes: ``POST /tokenize`` and ``POST /detokenize``.

``/tokenize`` takes a ``prompt`` or chat ``messages`` (rendered with the model's chat template,
as ``/v1/chat/completions`` would) and answers the token ids, their count and the context size.
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from pagedserve.server.errors import APIError, parse_model
from pagedserve.server.openai_protocol import DetokenizeRequest, TokenizeRequest
from pagedserve.server.served_model import ServedModel

router = APIRouter()


@router.post("/tokenize")
async def tokenize(request: Request) -> dict:
    served: ServedModel = request.app.state.served
    body: TokenizeRequest = parse_model(await request.body(), TokenizeRequest)
    served.check_model(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise APIError.bad_request("prompt: give either prompt or messages", param="prompt")
    if body.messages is not None:
        messages = served.with_system_prompt(
            [{"role": m.role, "content": m.text()} for m in body.messages])
        text = served.render_chat(messages)
    else:
        text = body.prompt
    tokens = served.tokenizer.encode(text, add_special_tokens=body.add_special_tokens)
    return {"tokens": tokens, "count": len(tokens), "max_model_len": served.max_model_len}


@router.post("/detokenize")
async def detokenize(request: Request) -> dict:
    served: ServedModel = request.app.state.served
    body: DetokenizeRequest = parse_model(await request.body(), DetokenizeRequest)
    served.check_model(body.model)
    vocab = served.tokenizer.vocab_size
    bad = [t for t in body.tokens if not 0 <= t < vocab]
    if bad:
        raise APIError.bad_request(f"tokens: ids must be in [0, {vocab}), got {bad[:5]}",
                                   param="tokens")
    return {"prompt": served.tokenizer.decode(body.tokens, skip_special_tokens=False)}
