"""The Ollama API's model routes: ``/api/tags``, ``/api/show``, ``/api/ps``, ``/api/version``.

The server has one model, loaded for the life of the process: ``/api/ps`` shows it as never
expiring, and ``/api/tags`` lists it first, then the models of pagedserve's own store (what
``/api/pull`` brings there; serving one takes a server started with its name). ``/api/show``
gives the served file's metadata (GGUF keys, or the Hugging Face equivalent) as ``model_info``,
and the model's capabilities as Ollama names them: ``completion`` and ``tools`` for a
generative model, ``embedding`` for an embedding-only one.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request

from pagedserve.hub import registry
from pagedserve.hub.store import ModelName, own_store
from pagedserve.server.ollama_api import check_model, served_model
from pagedserve.server.ollama_protocol import FIELD_OPTIONS, OPTION_FIELDS, ShowRequest
from pagedserve.server.request_body import read_body
from pagedserve.server.served_model import ServedModel
from pagedserve.version import __version__

logger = logging.getLogger(__name__)

router = APIRouter()

_MAX_SHOWN_ARRAY = 64  # longer metadata arrays (the vocabulary) only with "verbose": true


@router.get("/api/tags")
async def tags(request: Request) -> dict:
    served = served_model(request)
    listed = [{
        "name": served.name, "model": served.name, "modified_at": _file_time(served),
        "size": _size(served), "digest": _digest(served), "details": _details(served),
    }]
    listed += await asyncio.to_thread(_store_models, served)  # reads files: off the loop
    return {"models": listed}


def _store_models(served: ServedModel) -> list[dict]:
    """The models of pagedserve's own store but the served one, as Ollama lists its store:
    the digest is the manifest's sha256, the time the manifest's."""
    store = own_store()
    listed = []
    for entry in registry.store_models():
        if entry.problem or served.answers_to(entry.name):
            continue
        manifest = store.manifest_path(ModelName.parse(entry.name))
        try:
            digest = hashlib.sha256(manifest.read_bytes()).hexdigest()
            stamp = manifest.stat().st_mtime
        except OSError as exc:  # removed since it was listed
            logger.debug("not listing %s: %s", entry.name, exc)
            continue
        family = entry.family if entry.family != "?" else ""
        listed.append({
            "name": entry.name, "model": entry.name,
            "modified_at": dt.datetime.fromtimestamp(stamp, dt.UTC).isoformat(),
            "size": entry.size, "digest": digest,
            "details": {"parent_model": "", "format": entry.format, "family": family,
                        "families": [family] if family else [],
                        "parameter_size": _parameter_size(entry.parameter_count or 0),
                        "quantization_level": entry.quantization},
        })
    return listed


@router.post("/api/show")
async def show(request: Request) -> dict:
    served = served_model(request)
    body = await read_body(request, ShowRequest)
    check_model(served, body.model or body.name)
    info = served.info.model_info
    answer = {
        "license": "",
        "modelfile": _modelfile(served),
        "parameters": _parameters(served),
        "template": served.card.template or served.tokenizer.chat_template or "",
        "details": _details(served),
        "model_info": _model_info(info, verbose=body.verbose),
        "capabilities": _capabilities(served),
        "modified_at": _file_time(served),
    }
    if served.card.system:
        answer["system"] = served.card.system
    return answer


@router.get("/api/ps")
async def ps(request: Request) -> dict:
    served = served_model(request)
    on_gpu = served.info.config.device != "cpu"
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


def _capabilities(served: ServedModel) -> list[str]:
    """What Ollama's clients may ask of the model: chat and generate, and tools on any model
    with a tokenizer (its template's own format, or the generic one: docs/server.md); only
    embeddings for an embedding-only model (a generative model embeds too, but Ollama does not
    list it for that). Never thinking, vision or insert: those are refused (ollama_api.py)."""
    if not served.info.generates:
        return ["embedding"]
    if served.tokenizer is None:
        return ["completion"]
    return ["completion", "tools"]


def _details(served: ServedModel) -> dict:
    info = served.info.model_info
    config = served.info.model_config  # None for an embedding-only model
    family = info.family or info.architecture or (config.architecture if config else "")
    return {
        "parent_model": "",
        "format": info.format,
        "family": family,
        "families": [family],
        "parameter_size": _parameter_size(info.parameter_count
                                          or (config.num_parameters if config else 0)),
        "quantization_level": info.quantization or served.info.config.dtype.upper(),
        "dtype": served.info.config.dtype,  # pagedserve's: what the weights compute in
    }


def _parameter_size(count: int) -> str:
    if not count:
        return ""
    if count >= 1e9:
        return f"{count / 1e9:.1f}B"
    return f"{count / 1e6:.2f}M"


def _size(served: ServedModel) -> int:
    return int(served.info.model_info.file_size or 0)


def _digest(served: ServedModel) -> str:
    """A stable identifier of the file (path, size, time), not a hash of its bytes."""
    info = served.info.model_info
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
