"""Request bodies: bytes -> JSON -> a pydantic model, or a 400 that names what is wrong.

Before a body reaches a model it must be JSON an honest client could send: an object, nested at
most ``max_json_depth`` levels, every string valid Unicode (JSON's ``\\ud800`` escape can smuggle
in a lone surrogate, which no tokenizer, template or response encoder accepts). The checks walk
the parsed value only when the raw bytes say they could fail (more brackets than the depth
limit, a surrogate escape), so a typical body costs one ``json.loads``. Large bodies are parsed
off the event loop.

A client that closes its connection before its body has arrived makes ``request.body()`` raise
Starlette's ``ClientDisconnect``; errors.py logs it as one line, not as a failure.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from pagedserve.server.errors import APIError, validation_message

M = TypeVar("M", bound=BaseModel)

LARGE_BODY_BYTES = 64 << 10  # from this size on, parse in a worker thread
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


async def read_body(request: Request, model: type[M]) -> M:
    """The request's body as ``model``; 400 when it is not one, 413 beyond the size limit."""
    max_depth = request.app.state.limits.max_json_depth
    raw = await request.body()
    if len(raw) >= LARGE_BODY_BYTES:
        return await asyncio.to_thread(parse_body, raw, model, max_depth)
    return parse_body(raw, model, max_depth)


def parse_body(raw: bytes, model: type[M], max_depth: int) -> M:
    data = parse_json(raw, max_depth)
    if not isinstance(data, dict):
        raise APIError.bad_request("request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        message, field = validation_message(exc)
        raise APIError.bad_request(message, param=field) from exc


def parse_json(raw: bytes, max_depth: int) -> Any:
    try:
        data = json.loads(raw)
    except RecursionError as exc:
        raise _too_deep(max_depth, None) from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError.bad_request(f"Invalid JSON body: {exc}", code="invalid_json") from exc
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise APIError.bad_request(f"Invalid JSON body: {exc}", code="invalid_json") from exc
    deep = raw.count(b"[") + raw.count(b"{") > max_depth
    if deep or _SURROGATE_ESCAPE.search(raw):
        check_json(data, max_depth)
    return data


def check_json(data: Any, max_depth: int) -> None:
    """Depth and Unicode of a parsed JSON value, iteratively (no recursion limit to hit)."""
    stack: list[tuple[Any, int, tuple]] = [(data, 1, ())]
    while stack:
        value, depth, path = stack.pop()
        if isinstance(value, str):
            _check_text(value, path)
            continue
        if isinstance(value, dict):
            items: Any = value.items()
        elif isinstance(value, list):
            items = enumerate(value)
        else:
            continue
        if depth > max_depth:
            raise _too_deep(max_depth, path)
        for key, item in items:
            if isinstance(key, str):
                _check_text(key, path)
            if isinstance(item, str | list | dict):
                stack.append((item, depth + 1, (*path, key)))


def _check_text(text: str, path: tuple) -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        field = _dotted(path) or "request body"
        code_point = ord(text[exc.start])
        raise APIError.bad_request(
            f"{field}: text is not valid Unicode: a lone surrogate U+{code_point:04X} at "
            f"character {exc.start}", param=_dotted(path) or None) from None


def _too_deep(max_depth: int, path: tuple | None) -> APIError:
    where = f" at {_dotted(path)}" if path else ""
    return APIError.bad_request(
        f"request body: JSON nested deeper than {max_depth} levels{where}",
        code="json_too_deep")


def _dotted(path: tuple) -> str:
    return ".".join(str(part) for part in path)
