"""The Ollama API's routes that change pagedserve's own store: ``/api/pull``, ``/api/delete``,
``/api/copy``.

The server serves one model for the life of its process. These routes manage the store that
``pagedserve serve`` and ``run`` read from, as clients expect of an Ollama server (Open WebUI,
and the many setups that pull a model before using it): a model pulled here is listed by
``/api/tags`` and ``pagedserve list``; serving it takes a server started with its name.

A pull runs in a thread of its own (registry_client.py blocks on the network and the disk) and
hands its progress objects to the event loop through a queue, so the served model keeps
answering meanwhile. The HTTP status is chosen once the registry has answered for the
manifest: a model it does not have is a 404 and an unreachable registry a 502 before anything
is streamed; a failure after that (a blob cut off for good, a wrong digest) ends the stream
with ``{"error": ...}``, as Ollama's does. A client that goes away cancels its pull; the
partial blob stays, and the next pull resumes it.

Pulling the served model's own name answers ``success`` at once, without the network: it is
here, loaded. Deleting it, or copying another model over its name, is refused with a 409.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from pagedserve.hub import registry
from pagedserve.hub.registry_client import PullError, PullEvent, RegistryRef, pull_from_registry
from pagedserve.hub.store import ModelIntegrityError, ModelName, own_store
from pagedserve.server.errors import APIError
from pagedserve.server.generation import until_disconnected
from pagedserve.server.ollama_api import served_model
from pagedserve.server.ollama_protocol import CopyRequest, DeleteRequest, PullRequest
from pagedserve.server.request_body import read_body
from pagedserve.server.served_model import ServedModel

logger = logging.getLogger(__name__)

router = APIRouter()


@router.post("/api/pull")
async def pull(request: Request) -> Response:
    served = served_model(request)
    body = await read_body(request, PullRequest)
    name = _name(body.model or body.name, "model")
    if served.answers_to(name):
        logger.info("pull of %s: the served model, already here", name)
        return _answer([PullEvent("success")], stream=body.stream)
    try:
        target = RegistryRef.parse(name, insecure=body.insecure)
    except ValueError as exc:
        raise APIError.from_value_error(exc) from exc
    job = _PullJob(target)
    if not body.stream:
        try:
            final = await until_disconnected(request, job.last())
        finally:
            job.cancel.set()
        return JSONResponse(final.to_json())
    try:
        head = await job.head()
    except BaseException:
        job.cancel.set()
        raise
    return StreamingResponse(_ndjson(head, job), media_type="application/x-ndjson")


@router.delete("/api/delete")
async def delete(request: Request) -> Response:
    served = served_model(request)
    body = await read_body(request, DeleteRequest)
    name = _name(body.model or body.name, "model")
    _refuse_served(served, name, "model", "deleted")
    try:
        await asyncio.to_thread(registry.remove, name)
    except registry.ModelNotFoundError as exc:
        raise APIError(404, f"model '{name}' not found in pagedserve's store",
                       param="model") from exc
    return Response(status_code=200)  # Ollama's answer: no body


@router.post("/api/copy")
async def copy(request: Request) -> Response:
    served = served_model(request)
    body = await read_body(request, CopyRequest)
    source = _name(body.source, "source")
    destination = _name(body.destination, "destination")
    _refuse_served(served, destination, "destination", "replaced")
    try:
        await asyncio.to_thread(registry.copy, source, destination)
    except registry.ModelNotFoundError as exc:
        raise APIError(404, f"model '{source}' not found in pagedserve's store",
                       param="source") from exc
    return Response(status_code=200)


def _name(value: str | None, field: str) -> str:
    """A model name the client sent as ``field``; 400 naming the field when it is not one."""
    if not value:
        raise APIError.bad_request(f"{field} is required", param=field)
    try:
        ModelName.parse(value)
    except ValueError as exc:
        raise APIError.bad_request(field + str(exc).removeprefix("model"), param=field) from exc
    return value


def _refuse_served(served: ServedModel, name: str, field: str, verb: str) -> None:
    if served.answers_to(name):
        raise APIError(409, f"'{name}' is the model this server serves: it cannot be {verb} "
                       "while it is served; stop the server (or serve another model) first",
                       param=field)


class _PullJob:
    """One pull in a thread of its own; its events reach the event loop through a queue, and
    the pull's exception, if it fails, comes last."""

    def __init__(self, target: RegistryRef) -> None:
        self.target = target
        self.cancel = threading.Event()
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[PullEvent | Exception | None] = asyncio.Queue()
        threading.Thread(target=self._run, name=f"pull {target}", daemon=True).start()

    def _run(self) -> None:
        try:
            pull_from_registry(self.target, own_store(), on_event=self._put, cancel=self.cancel)
        except Exception as exc:  # handed to the handler, which answers with it
            if not isinstance(exc, PullError | OSError):
                logger.exception("pull of %s failed", self.target)
            self._put(exc)
        else:
            self._put(None)

    def _put(self, item: PullEvent | Exception | None) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: the server stopped
            self.cancel.set()

    async def next(self) -> PullEvent | None:
        """The next event; None once the pull succeeded; raises APIError once it failed."""
        item = await self._queue.get()
        if isinstance(item, Exception):
            raise _api_error(item) from item
        return item

    async def head(self) -> list[PullEvent]:
        """The events until the registry has answered for the manifest (the second event)."""
        events: list[PullEvent] = []
        while len(events) < 2 and (event := await self.next()) is not None:
            events.append(event)
        return events

    async def last(self) -> PullEvent:
        final = PullEvent("success")
        while (event := await self.next()) is not None:
            final = event
        return final


async def _ndjson(head: list[PullEvent], job: _PullJob) -> AsyncIterator[str]:
    """Newline-delimited progress objects; the status line is sent, so a failure is the last
    object. However the response ends (a client gone), the pull is cancelled."""
    try:
        for event in head:
            yield json.dumps(event.to_json()) + "\n"
        while (event := await job.next()) is not None:
            yield json.dumps(event.to_json()) + "\n"
    except APIError as exc:
        yield json.dumps({"error": exc.message}) + "\n"
    finally:
        job.cancel.set()


def _answer(events: list[PullEvent], stream: bool) -> Response:
    if not stream:
        return JSONResponse(events[-1].to_json())

    async def body() -> AsyncIterator[str]:
        for event in events:
            yield json.dumps(event.to_json()) + "\n"

    return StreamingResponse(body(), media_type="application/x-ndjson")


def _api_error(exc: Exception) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, PullError):
        return APIError(exc.status, str(exc), param="model")
    if isinstance(exc, ModelIntegrityError):  # a blob the registry sent was wrong
        return APIError(502, str(exc), param="model")
    if isinstance(exc, OSError):
        return APIError(500, f"cannot write to pagedserve's store: {exc}")
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}")
