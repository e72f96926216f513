"""HTTP errors: one exception for every API, rendered in the shape of the API that was called.

Handlers raise :class:`APIError` (or let a ``ValueError`` from the engine through, whose message
names the offending field); the exception handlers installed by :func:`install_error_handlers`
render it as OpenAI's ``{"error": {"message", "type", "param", "code"}}`` or, under ``/api/``,
as Ollama's ``{"error": "..."}``.

A client that closes its connection while sending its body is not a failure of the server: it
is logged as one info line, with no traceback, so that clients cannot flood the log with them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from pagedserve.errors import EngineDeadError
from pagedserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

OLLAMA_PREFIX = "/api/"

_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    """An error answer: status, message, and what OpenAI's error object calls param and code."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers

    @classmethod
    def bad_request(cls, message: str, param: str | None = None,
                    code: str | None = None) -> APIError:
        return cls(400, message, param=param, code=code)

    @classmethod
    def engine_dead(cls, exc: BaseException) -> APIError:
        return cls(503, f"The engine is not running ({exc}); the server is restarting, "
                   "please retry.", code="engine_dead", headers={"Retry-After": "5"})

    @classmethod
    def from_value_error(cls, exc: ValueError, renames: dict[str, str] | None = None) -> APIError:
        """A 400 for a ``ValueError`` whose message starts with the field's name.

        ``renames`` maps internal field names (``SamplingParams``'s) to the wire names the client
        used, so that the message names what the client sent.
        """
        message = str(exc)
        field = _leading_field(message)
        if field and renames and field in renames:
            message = renames[field] + message[len(field):]
            field = renames[field]
        code = getattr(exc, "code", None)
        return cls(400, message, param=field, code=code)


def _leading_field(message: str) -> str | None:
    match = re.match(r"[a-z_][a-z0-9_]*\b", message)
    if match is None or match.group(0) not in _KNOWN_FIELDS:
        return None
    return match.group(0)


# the names a ValueError from SamplingParams or the engine may start with
_KNOWN_FIELDS = frozenset(f.name for f in dataclasses.fields(SamplingParams)) | {
    "prompt", "messages", "model", "tokens", "response_format", "structured_outputs", "format",
    "tools", "tool_choice", "input", "dimensions"}


def is_ollama_path(path: str) -> bool:
    return path.startswith(OLLAMA_PREFIX)


class ErrorJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped: an error may quote a client's text, even invalid text."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def error_response(path: str, error: APIError) -> JSONResponse:
    if is_ollama_path(path):
        body: dict[str, Any] = {"error": error.message}
    else:
        body = {"error": {
            "message": error.message,
            "type": _OPENAI_TYPES.get(error.status, "server_error"),
            "param": error.param,
            "code": error.code if error.code is not None else error.status,
        }}
    return ErrorJSONResponse(body, status_code=error.status, headers=error.headers)


# what pydantic writes in a location for the member of a union it tried, e.g. list[int] or
# constrained-str: noise to a client, who named the field and nothing else
_UNION_MEMBER = re.compile(r"(list|str|int|float|dict)\[.*\]|(str|int|float|bool|list|dict)|"
                           r"constrained-\w+")


def validation_message(exc: ValidationError | RequestValidationError) -> tuple[str, str | None]:
    """The first validation problem as ``"field: what is wrong"``, and the field's dotted name."""
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    # pydantic puts the union member's type in the location; it is noise to a client
    loc = [part for part in loc if not _UNION_MEMBER.fullmatch(part)]
    field = ".".join(loc) or None
    message = first.get("msg", "invalid value")
    if field:
        return f"{field}: {message}", field
    return message, None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(request.url.path, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, field = validation_message(exc)
        return error_response(request.url.path, APIError.bad_request(message, param=field))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(request.url.path, APIError(exc.status_code, str(exc.detail),
                                                         headers=exc.headers))

    @app.exception_handler(ClientDisconnect)
    async def _client_disconnected(request: Request, exc: ClientDisconnect) -> Response:
        client = f"{request.client.host}:{request.client.port}" if request.client else "a client"
        logger.info("%s %s: %s closed its connection before its request body arrived",
                    request.method, request.url.path, client)
        return Response(status_code=499)  # nobody reads it; nginx's "client closed request"

    @app.exception_handler(EngineDeadError)
    async def _engine_dead(request: Request, exc: EngineDeadError) -> JSONResponse:
        return error_response(request.url.path, APIError.engine_dead(exc))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("internal error on %s %s", request.method, request.url.path)
        return error_response(request.url.path,
                              APIError(500, f"internal error: {type(exc).__name__}: {exc}"))
