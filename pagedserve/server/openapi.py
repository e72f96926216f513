"""The OpenAPI document (``/openapi.json``), told true.

Handlers read their bodies themselves (request_body.py checks size, depth and Unicode before
pydantic sees them), so FastAPI cannot infer what they take. This module declares it: each
route's request body is the JSON schema of the same pydantic model that validates it, with the
ranges SamplingParams enforces (its ``RANGES`` table, under each API's field names) and the
server's limits; and each route lists the answers it can give, with their content types (JSON,
or server-sent events and NDJSON when streamed) and the error body of its API's shape.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from pagedserve.sampling_params import LIST_LIMITS, MAX_INT, RANGES, Range
from pagedserve.server.embeddings_protocol import (
    EmbeddingRequest,
    OllamaEmbeddingsRequest,
    OllamaEmbedRequest,
)
from pagedserve.server.errors import OLLAMA_PREFIX
from pagedserve.server.ollama_protocol import (
    OPTION_FIELDS,
    ChatRequest,
    CopyRequest,
    DeleteRequest,
    GenerateRequest,
    PullRequest,
    ShowRequest,
)
from pagedserve.server.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)

_REF = "#/components/schemas/{model}"
_EMBEDDING_BODIES = {"OllamaEmbedRequest", "EmbeddingRequest"}
PROTECTED = ("/v1/", "/api/", "/tokenize", "/detokenize")  # app.py's APIKeyMiddleware guards

# (path, method) -> (body model, what a streamed answer is sent as)
BODIES: dict[tuple[str, str], tuple[type[BaseModel], str | None]] = {
    ("/v1/completions", "post"): (CompletionRequest, "text/event-stream"),
    ("/v1/chat/completions", "post"): (ChatCompletionRequest, "text/event-stream"),
    ("/api/generate", "post"): (GenerateRequest, "application/x-ndjson"),
    ("/api/chat", "post"): (ChatRequest, "application/x-ndjson"),
    ("/api/show", "post"): (ShowRequest, None),
    ("/api/pull", "post"): (PullRequest, "application/x-ndjson"),
    ("/api/delete", "delete"): (DeleteRequest, None),
    ("/api/copy", "post"): (CopyRequest, None),
    ("/api/embed", "post"): (OllamaEmbedRequest, None),
    ("/api/embeddings", "post"): (OllamaEmbeddingsRequest, None),
    ("/v1/embeddings", "post"): (EmbeddingRequest, None),
    ("/tokenize", "post"): (TokenizeRequest, None),
    ("/detokenize", "post"): (DetokenizeRequest, None),
}
# routes that look the model up by name (404), and those that queue engine work (503)
NAMES_A_MODEL = {path for path, _ in BODIES} | {"/v1/models/{model_id}"}
QUEUES_WORK = {"/v1/completions", "/v1/chat/completions", "/api/generate", "/api/chat",
               "/api/embed", "/api/embeddings", "/v1/embeddings"}
# the store's routes: their own failures, and Ollama's empty answer to a delete or a copy
STORE_STATUSES = {"/api/pull": [500, 502], "/api/delete": [409], "/api/copy": [409]}
EMPTY_ANSWERS = {"/api/delete", "/api/copy"}
BUSY = QUEUES_WORK | {"/tokenize", "/detokenize"}  # long texts wait for a worker thread

# wire name -> SamplingParams field, where they differ
_WIRE_FIELDS = {"max_completion_tokens": "max_tokens", "top_logprobs": "logprobs",
                **{option: name for option, name in OPTION_FIELDS.items() if option != name}}
# Ollama options whose wire values go below the field's range: -1 means "no limit" or
# "the whole context" (num_predict also takes -2: fill the context)
_WIRE_RANGES = {"num_predict": Range(-2, MAX_INT, integer=True),
                "repeat_last_n": Range(-1, MAX_INT, integer=True)}

_ERROR_SCHEMAS: dict[str, dict[str, Any]] = {
    "OpenAIError": {
        "type": "object", "required": ["error"],
        "properties": {"error": {
            "type": "object", "required": ["message", "type"],
            "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                           "param": {"type": ["string", "null"]},
                           "code": {"type": ["string", "integer", "null"]}}}},
    },
    "OllamaError": {
        "type": "object", "required": ["error"],
        "properties": {"error": {"type": "string"}},
    },
}
_WHY = {
    400: "Invalid request: the message names the field.",
    401: "Missing or wrong API key (only when the server has one).",
    404: "Unknown model.",
    409: "The model this server serves: it cannot be deleted or replaced while served.",
    413: "Request body larger than the server's limit.",
    500: "The server failed on this request (other requests are not affected).",
    502: "The registry could not be reached, or sent something wrong (a blob that does not "
         "match its digest).",
    503: "Busy (too many requests waiting) or the engine is down; see Retry-After.",
}


def install_openapi(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def build_openapi(app: FastAPI) -> dict[str, Any]:
    schema = get_openapi(title=app.title, version=app.version, routes=app.routes,
                         description="The OpenAI API (/v1), the Ollama API (/api), vLLM's "
                         "tokenizer routes and Prometheus metrics, over one engine.")
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.update(_ERROR_SCHEMAS)
    served = app.state.served
    ranges = {**RANGES, "n": Range(1, served.limits.max_n, integer=True),
              "max_tokens": Range(1, served.max_model_len, integer=True)}
    embedding = served.info.embedding
    if embedding is not None:
        ranges["dimensions"] = Range(1, embedding.spec.dimensions, integer=True)
    token_id = Range(0, served.info.vocab_size - 1, integer=True).json_schema()
    for model, _ in BODIES.values():
        for name, model_schema in _model_schemas(model).items():
            _add_ranges(model_schema, ranges)
            _add_token_ids(model_schema, token_id)
            if name in _EMBEDDING_BODIES:
                _add_input_limit(model_schema, served.limits.max_embedding_inputs)
            components[name] = model_schema
    for name in ("HTTPValidationError", "ValidationError"):  # we answer 400, never 422
        components.pop(name, None)
    for path, item in schema.get("paths", {}).items():
        for method, operation in item.items():
            _describe(path, method, operation)
    return schema


def _model_schemas(model: type[BaseModel]) -> dict[str, Any]:
    schema = model.model_json_schema(ref_template=_REF, mode="validation")
    defs = schema.pop("$defs", {})
    return {**defs, model.__name__: schema}


def _add_ranges(schema: dict[str, Any], ranges: dict[str, Range]) -> None:
    """Minimum, maximum, item counts and lengths on the properties SamplingParams checks."""
    for wire_name, prop in schema.get("properties", {}).items():
        name = _WIRE_FIELDS.get(wire_name, wire_name)
        allowed = _WIRE_RANGES.get(wire_name) or ranges.get(name)
        branches = prop.get("anyOf", [prop])
        for branch in branches:
            kind = branch.get("type")
            if allowed is not None and kind in ("integer", "number"):
                branch.update(allowed.json_schema())
            if name in LIST_LIMITS:
                most, longest = LIST_LIMITS[name]
                if kind == "array":
                    branch["maxItems"] = most
                    items = branch.get("items", {})
                    if name in ranges and items.get("type") == "integer":
                        items.update(ranges[name].json_schema())
                    if longest is not None and items.get("type") == "string":
                        items.update(minLength=1, maxLength=longest)
                elif kind == "string" and longest is not None:
                    branch.update(minLength=1, maxLength=longest)


def _add_input_limit(schema: dict[str, Any], most: int) -> None:
    """An embedding call's list of inputs holds at most the server's limit."""
    prop = schema.get("properties", {}).get("input")
    for branch in prop.get("anyOf", [prop]) if prop else ():
        items = branch.get("items", {})
        if branch.get("type") == "array" and (items.get("type") != "integer"):
            branch["maxItems"] = most


def _add_token_ids(schema: dict[str, Any], token_id: dict[str, float]) -> None:
    """Token ids (a completion's prompt, an embedding's input, /detokenize's tokens) lie
    inside the vocabulary."""
    for name in ("prompt", "tokens", "input"):
        prop = schema.get("properties", {}).get(name)
        for branch in prop.get("anyOf", [prop]) if prop else ():
            items = branch.get("items", {})
            for inner in [items, items.get("items", {})]:
                if inner.get("type") == "integer":
                    inner.update(token_id)


def _describe(path: str, method: str, operation: dict[str, Any]) -> None:
    responses = operation.setdefault("responses", {})
    responses.pop("422", None)
    error = "OllamaError" if path.startswith(OLLAMA_PREFIX) else "OpenAIError"
    statuses = []
    body = BODIES.get((path, method))
    if body is not None:
        model, streamed = body
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": _REF.format(model=model.__name__)}}},
        }
        content: dict[str, Any] = {"application/json": {"schema": {"type": "object"}}}
        if streamed:
            content[streamed] = {"schema": {"type": "string"}}
        responses["200"] = {"description": "The answer (streamed when the request asks).",
                            "content": content}
        if path in EMPTY_ANSWERS:
            responses["200"] = {"description": "Done (no body, as Ollama answers)."}
        statuses += [400, 413]
    if path.startswith(PROTECTED):
        statuses.append(401)
    if path in NAMES_A_MODEL:
        statuses.append(404)
    if path in QUEUES_WORK:
        statuses += [500, 503]
    if path in BUSY:
        statuses.append(503)
    statuses += STORE_STATUSES.get(path, [])
    if path == "/v1/models/{model_id}":
        statuses.append(400)
    for status in sorted(set(statuses)):
        responses[str(status)] = {
            "description": _WHY[status],
            "content": {"application/json": {"schema": {"$ref": _REF.format(model=error)}}},
        }
