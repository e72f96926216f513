"""The embedding routes: Ollama's ``/api/embed`` and ``/api/embeddings``, OpenAI's
``/v1/embeddings``.

Translation only: :meth:`ServedModel.embed` admits the request, tokenizes its inputs and hands
them to the engine core, which embeds them in batches with other requests' between its steps.
The three routes differ in what they return:

    /api/embed        unit vectors, cut to ``dimensions`` first (as Ollama normalizes), and
                      Ollama's timings in nanoseconds: total_duration (handler entry -> answer),
                      load_duration (handler entry -> request checked; the model is always
                      loaded), prompt_eval_count (tokens of every input)
    /api/embeddings   one vector, pooled and not normalized, as Ollama's older route returns
                      the runner's vector untouched
    /v1/embeddings    unit vectors, as OpenAI's are; ``encoding_format: base64`` sends each as
                      the base64 of its little-endian float32 bytes, as OpenAI does

Ollama answers a call without input (nothing, ``""`` or ``[]``) with no vectors: it loads the
model. OpenAI refuses one (400).
"""

from __future__ import annotations

import base64
import time

from fastapi import APIRouter, Request

from pagedserve.server.embeddings_protocol import (
    EmbeddingRequest,
    OllamaEmbeddingsRequest,
    OllamaEmbedRequest,
)
from pagedserve.server.errors import APIError
from pagedserve.server.generation import until_disconnected
from pagedserve.server.ollama_api import check_model
from pagedserve.server.request_body import read_body
from pagedserve.server.served_model import ServedModel

router = APIRouter()


def served_model(request: Request) -> ServedModel:
    return request.app.state.served


@router.post("/api/embed")
async def ollama_embed(request: Request) -> dict:
    started = time.monotonic()
    served = served_model(request)
    body = await read_body(request, OllamaEmbedRequest)
    name = check_model(served, body.model)
    if isinstance(body.input, str):
        texts = [body.input] if body.input else []
    else:
        texts = list(body.input or [])
    if not texts:
        return {"model": name, "embeddings": []}
    checked = time.monotonic()
    result = await until_disconnected(request, served.embed(
        texts, truncate=body.truncate, normalize=True, dimensions=body.dimensions))
    return {"model": name, "embeddings": result.vectors(),
            "total_duration": _ns(time.monotonic() - started),
            "load_duration": _ns(checked - started), "prompt_eval_count": result.num_tokens}


@router.post("/api/embeddings")
async def ollama_embeddings(request: Request) -> dict:
    served = served_model(request)
    body = await read_body(request, OllamaEmbeddingsRequest)
    check_model(served, body.model)
    if not body.prompt:
        return {"embedding": []}
    result = await until_disconnected(request, served.embed(
        [body.prompt], normalize=False, input_field="prompt"))
    return {"embedding": result.vectors()[0]}


@router.post("/v1/embeddings")
async def openai_embeddings(request: Request) -> dict:
    served = served_model(request)
    body = await read_body(request, EmbeddingRequest)
    served.check_model(body.model)
    inputs = _openai_inputs(body.input)
    result = await until_disconnected(request, served.embed(
        inputs, truncate=False, normalize=True, dimensions=body.dimensions))
    if body.encoding_format == "base64":
        vectors: list = [base64.b64encode(row).decode("ascii") for row in result.rows()]
    else:
        vectors = result.vectors()
    return {"object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": vector}
                     for i, vector in enumerate(vectors)],
            "model": served.name,
            "usage": {"prompt_tokens": result.num_tokens, "total_tokens": result.num_tokens}}


def _openai_inputs(value: str | list) -> list[str] | list[list[int]]:
    """Texts or lists of token ids, one per input; OpenAI refuses empty ones."""
    if isinstance(value, str):
        value = [value]
    elif value and isinstance(value[0], int):  # one list of token ids
        value = [value]
    if not value:
        raise APIError.bad_request("input must not be empty", param="input")
    for i, item in enumerate(value):
        if not item:
            what = "an empty string" if isinstance(item, str) else "an empty list"
            raise APIError.bad_request(f"input[{i}] must not be {what}", param="input")
    return value


def _ns(seconds: float) -> int:
    return max(0, int(seconds * 1e9))
