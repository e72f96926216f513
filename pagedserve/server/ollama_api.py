"""The Ollama API: ``/api/generate``, ``/api/chat``, ``/api/tags``, ``/api/show``, ``/api/ps``,
``/api/version``.

Translation only. Answers stream as newline-delimited JSON unless ``"stream": false``; the last
object carries ``done: true``, ``done_reason`` and Ollama's timings in nanoseconds:

    total_duration        handler entry -> answer complete
    load_duration         handler entry -> request queued (the model is always loaded)
    prompt_eval_duration  first scheduled -> first token (prefill)
    eval_duration         first token -> last token (decode)
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from pagedserve.outputs import RequestOutput, TokenLogprobs
from pagedserve.server.errors import APIError, parse_model
from pagedserve.server.generation import Generation, until_disconnected
from pagedserve.server.ollama_protocol import (
    FIELD_OPTIONS,
    OLLAMA_DEFAULTS,
    OPTION_FIELDS,
    ChatRequest,
    GenerateRequest,
    ShowRequest,
)
from pagedserve.server.served_model import ServedModel
from pagedserve.server.version import __version__

logger = logging.getLogger(__name__)

router = APIRouter()

_MAX_SHOWN_ARRAY = 64  # longer metadata arrays (the vocabulary) only with "verbose": true


def served_model(request: Request) -> ServedModel:
    return request.app.state.served


def _check_model(served: ServedModel, name: str | None) -> str:
    if not name:
        raise APIError.bad_request("model is required", param="model")
    if not served.answers_to(name):
        raise APIError(404, f'model "{name}" not found, try pulling it first', param="model")
    return name


# -- generation --------------------------------------------------------------------------------


@router.post("/api/generate")
async def generate(request: Request):
    started = time.monotonic()
    served = served_model(request)
    body: GenerateRequest = parse_model(await request.body(), GenerateRequest)
    name = _check_model(served, body.model)
    if not body.prompt:
        return _loaded(name, body.keep_alive, {"response": ""})
    if body.raw:
        prompt = body.prompt
    else:
        messages = served.with_system_prompt([{"role": "user", "content": body.prompt}],
                                             system=body.system)
        prompt = served.render_chat(messages)
    generation = _start(served, prompt, body.sampling_values())
    reply = _Reply(name, started, lambda text: {"response": text})
    if body.stream:
        return _ndjson(reply.stream(generation))
    return JSONResponse(await until_disconnected(request, reply.collect(generation)))


@router.post("/api/chat")
async def chat(request: Request):
    started = time.monotonic()
    served = served_model(request)
    body: ChatRequest = parse_model(await request.body(), ChatRequest)
    name = _check_model(served, body.model)
    if not body.messages:
        return _loaded(name, body.keep_alive,
                       {"message": {"role": "assistant", "content": ""}})
    messages = served.with_system_prompt(
        [{"role": m.role, "content": m.content or ""} for m in body.messages])
    generation = _start(served, served.render_chat(messages), body.sampling_values())
    reply = _Reply(name, started,
                   lambda text: {"message": {"role": "assistant", "content": text}})
    if body.stream:
        return _ndjson(reply.stream(generation))
    return JSONResponse(await until_disconnected(request, reply.collect(generation)))


def _start(served: ServedModel, prompt: str, values: dict[str, Any]) -> Generation:
    params = served.sampling_params(values, api_defaults=OLLAMA_DEFAULTS, renames=FIELD_OPTIONS)
    return served.start([prompt], [params], FIELD_OPTIONS)


def _loaded(name: str, keep_alive: Any, content: dict) -> dict:
    """Ollama's answer to a request without a prompt: the model is loaded (or 'unloaded')."""
    reason = "unload" if keep_alive in (0, "0", "0s", "0m") else "load"
    return {"model": name, "created_at": _now(), **content, "done": True, "done_reason": reason}


@dataclass(slots=True)
class _Reply:
    """Builds one answer's objects: the model name as asked, the content, the final timings."""

    model: str
    started: float  # time.monotonic() at handler entry
    content: Callable[[str], dict]

    def chunk(self, text: str, logprobs: list[TokenLogprobs] | None = None) -> dict:
        obj = {"model": self.model, "created_at": _now(), **self.content(text), "done": False}
        if logprobs is not None:
            obj["logprobs"] = _logprobs(logprobs)
        return obj

    def final(self, text: str, last: RequestOutput,
              logprobs: list[TokenLogprobs] | None = None) -> dict:
        obj = self.chunk(text, logprobs)
        obj.update(done=True, done_reason=last.finish_reason or "stop",
                   **self.timings(last))
        return obj

    def timings(self, last: RequestOutput) -> dict[str, int]:
        now = time.monotonic()
        m = last.metrics
        arrival = m.arrival_time if m else self.started
        scheduled = (m.first_scheduled_time if m else None) or arrival
        first = (m.first_token_time if m else None) or scheduled
        final = (m.last_token_time if m else None) or first
        return {
            "total_duration": _ns(now - self.started),
            "load_duration": _ns(arrival - self.started),
            "prompt_eval_count": last.num_prompt_tokens,
            "prompt_eval_duration": _ns(first - scheduled),
            "eval_count": last.num_output_tokens,
            "eval_duration": _ns(final - first),
        }

    async def stream(self, generation: Generation) -> AsyncIterator[dict]:
        async for _, output in generation:
            if output.finished:
                yield self.final(output.delta_text, output, output.delta_logprobs)
            elif output.delta_text or output.delta_logprobs:
                yield self.chunk(output.delta_text, output.delta_logprobs)

    async def collect(self, generation: Generation) -> dict:
        text, logprobs, last = "", None, None
        async for _, output in generation:
            text += output.delta_text
            if output.delta_logprobs is not None:
                logprobs = (logprobs or []) + output.delta_logprobs
            last = output
        if last is None:
            raise APIError(500, "the engine ended the request without an answer")
        return self.final(text, last, logprobs)


def _logprobs(logprobs: list[TokenLogprobs]) -> list[dict]:
    return [{"token": lp.sampled.token, "logprob": lp.sampled.logprob,
             "top_logprobs": [{"token": t.token, "logprob": t.logprob} for t in lp.top]}
            for lp in logprobs]


def _ndjson(objects: AsyncIterator[dict]) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        try:
            async for obj in objects:
                yield json.dumps(obj, ensure_ascii=False) + "\n"
        except APIError as exc:
            yield json.dumps({"error": exc.message}) + "\n"
        except Exception as exc:  # the status line is sent; the error goes in the stream
            logger.exception("stream failed")
            yield json.dumps({"error": f"{type(exc).__name__}: {exc}"}) + "\n"

    return StreamingResponse(body(), media_type="application/x-ndjson")


# -- model information -------------------------------------------------------------------------


@router.get("/api/tags")
async def tags(request: Request) -> dict:
    served = served_model(request)
    return {"models": [{
        "name": served.name, "model": served.name, "modified_at": _file_time(served),
        "size": _size(served), "digest": _digest(served), "details": _details(served),
    }]}


@router.post("/api/show")
async def show(request: Request) -> dict:
    served = served_model(request)
    body: ShowRequest = parse_model(await request.body(), ShowRequest)
    _check_model(served, body.model or body.name)
    info = served.engine.model_info
    answer = {
        "license": "",
        "modelfile": _modelfile(served),
        "parameters": _parameters(served),
        "template": served.card.template or served.tokenizer.chat_template or "",
        "details": _details(served),
        "model_info": _model_info(info, verbose=body.verbose),
        "capabilities": ["completion"],
        "modified_at": _file_time(served),
    }
    if served.card.system:
        answer["system"] = served.card.system
    return answer


@router.get("/api/ps")
async def ps(request: Request) -> dict:
    served = served_model(request)
    on_gpu = served.engine.config.device != "cpu"
    size = _size(served)
    return {"models": [{
        "name": served.name, "model": served.name, "size": size, "digest": _digest(served),
        "details": _details(served),
        # loaded for the life of the process
        "expires_at": (dt.datetime.now(dt.UTC) + dt.timedelta(days=365 * 100)).isoformat(),
        "size_vram": size if on_gpu else 0,
        "context_length": served.max_model_len,
    }]}


@router.get("/api/version")
async def version() -> dict:
    return {"version": __version__}


def _details(served: ServedModel) -> dict:
    info = served.engine.model_info
    family = info.family or info.architecture or served.engine.model_config.architecture
    return {
        "parent_model": "",
        "format": info.format,
        "family": family,
        "families": [family],
        "parameter_size": _parameter_size(info.parameter_count
                                          or served.engine.model_config.num_parameters),
        "quantization_level": info.quantization or served.engine.config.dtype.upper(),
    }


def _parameter_size(count: int) -> str:
    if count >= 1e9:
        return f"{count / 1e9:.1f}B"
    return f"{count / 1e6:.2f}M"


def _size(served: ServedModel) -> int:
    return int(served.engine.model_info.file_size or 0)


def _digest(served: ServedModel) -> str:
    """A stable identifier of the file (path, size, time), not a hash of its bytes."""
    info = served.engine.model_info
    key = f"{info.path}:{info.file_size}:{_file_time(served)}"
    return hashlib.sha256(key.encode()).hexdigest()


def _file_time(served: ServedModel) -> str:
    try:
        stamp = Path(served.card.path).stat().st_mtime
    except OSError:
        stamp = served.loaded_at
    return dt.datetime.fromtimestamp(stamp, dt.UTC).isoformat()


def _modelfile(served: ServedModel) -> str:
    lines = ["# Modelfile generated by pagedserve", f"FROM {served.card.path}"]
    if served.card.system:
        lines.append(f'SYSTEM """{served.card.system}"""')
    for line in _parameters(served).splitlines():
        lines.append(f"PARAMETER {line}")
    return "\n".join(lines) + "\n"


def _parameters(served: ServedModel) -> str:
    """The model's sampling defaults as Ollama's ``name value`` lines."""
    lines = []
    for name, value in sorted(served.sampling_defaults.items()):
        option = FIELD_OPTIONS.get(name, name)
        if option not in OPTION_FIELDS:
            continue
        for item in value if isinstance(value, list) else [value]:
            lines.append(f"{option} {json.dumps(item) if isinstance(item, str) else item}")
    return "\n".join(lines)


def _model_info(info: Any, verbose: bool) -> dict[str, Any]:
    """The GGUF metadata (or its Hugging Face equivalent) as JSON values."""
    meta = dict(getattr(info, "metadata", None) or {})
    meta.setdefault("general.architecture", info.architecture)
    if info.parameter_count:
        meta.setdefault("general.parameter_count", info.parameter_count)
    return {key: _json_value(value, verbose) for key, value in sorted(meta.items())}


def _json_value(value: Any, verbose: bool) -> Any:
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        value = value.tolist()
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, list | tuple):
        if len(value) > _MAX_SHOWN_ARRAY and not verbose:
            return None
        return [_json_value(v, verbose) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_value(v, verbose) for k, v in value.items()}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def _ns(seconds: float) -> int:
    return max(0, int(seconds * 1e9))


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")
