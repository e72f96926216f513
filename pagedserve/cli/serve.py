"""`pagedserve serve [MODEL]`: the OpenAI and Ollama APIs and /metrics on one port."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from pathlib import Path

from pagedserve.arg_types import parse_bytes
from pagedserve.engine_args import add_engine_args, add_grammar_limit_args, engine_config_from_args
from pagedserve.server.limits import (
    DEFAULT_LIMIT_CONCURRENCY,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_EMBEDDING_INPUTS,
    DEFAULT_MAX_JSON_DEPTH,
    DEFAULT_MAX_N,
    DEFAULT_MAX_QUEUE,
    DEFAULT_MIN_UPLOAD_RATE,
    DEFAULT_SHUTDOWN_TIMEOUT_S,
    DEFAULT_TIMEOUT_KEEP_ALIVE_S,
    DEFAULT_TIMEOUT_REQUEST_READ_S,
)
from pagedserve.server.startup import connection_limits_from_args, install

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
SERVE_ENGINE_FLAGS = ("max_num_seqs", "max_num_batched_tokens", "kv_cache_memory", "max_model_len",
                      "block_size", "enable_prefix_caching", "kv_layout", "max_parallel",
                      "num_ctx", "dtype", "kv_cache_dtype", "device", "tensor_parallel_size",
                      "num_threads", "seed",
                      "async_scheduling", "enforce_eager", "gpu_memory_utilization")
DEFAULT_PORT = 11434  # Ollama's, so that Ollama clients work with no configuration

EPILOG = """examples:
  pagedserve serve                                 the bundled smollm2:135m on 127.0.0.1:11434
  pagedserve serve llama3.2:1b --port 8000         a model from ~/.ollama/models
  pagedserve serve model.gguf --max-queue 64 --api-key s3cret
  pagedserve serve --max-request-body 2MiB --max-n 16   tighter limits for a public endpoint
  pagedserve serve --shutdown-timeout 120          SIGTERM lets answers run 2 minutes more

probes: GET /health (liveness: 503 while loading or once the engine died), GET /ready
(readiness: 200 while taking requests, 503 while loading or draining)
  pagedserve serve --kv-layout static --max-parallel 4 --num-ctx 2048   Ollama's KV layout

environment:
  PAGEDSERVE_API_KEY    the API key, when --api-key is not given
"""

def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve", help="serve a model over the OpenAI and Ollama APIs",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Serve MODEL (a name such as smollm2:135m or llama3.2, ORG/NAME from the "
        "Hugging Face cache, or a path; default: the bundled smollm2:135m) over the OpenAI API "
        "(/v1), the Ollama API (/api) and Prometheus metrics (/metrics), from one engine with "
        "continuous batching.",
        epilog=EPILOG,
    )
    p.add_argument("model", nargs="?", metavar="MODEL", help="model name or path")
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST})")
    p.add_argument("--port", type=int, default=DEFAULT_PORT,
                   help=f"port to bind (default {DEFAULT_PORT})")
    p.add_argument("--served-model-name", metavar="NAME",
                   help="the name clients use (default: the registry's name for MODEL)")
    p.add_argument("--api-key", metavar="KEY", default=os.environ.get("PAGEDSERVE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/*, /api/*, /tokenize "
                   "and /detokenize (default: $PAGEDSERVE_API_KEY; none: open)")

    p.add_argument("--api-server-count", type=int, default=1, metavar="N",
                   help="front-end processes sharing the port and one engine core (HTTP, "
                   "tokenizing, detokenizing and streaming spread over N processes; vLLM's "
                   "flag); default 1")
    p.add_argument("--tool-call-parser", choices=["auto", "hermes", "llama3_json"],
                   default="auto",
                   help="how tool calls are read from answers (tool_choice auto, Ollama's "
                   "tools): hermes (<tool_call> JSON, Qwen2.5) or llama3_json; auto: the "
                   "format the chat template uses, else hermes")
    lim = p.add_argument_group("limits (what one client may ask of the server)")
    lim.add_argument("--max-queue", type=int, metavar="N", default=DEFAULT_MAX_QUEUE,
                     help="answer 503 (with Retry-After) when more than N requests would wait "
                     f"for a seat in the batch, like OLLAMA_MAX_QUEUE (default "
                     f"{DEFAULT_MAX_QUEUE})")
    lim.add_argument("--max-request-body", type=parse_bytes, metavar="BYTES",
                     default=DEFAULT_MAX_BODY_BYTES,
                     help="answer 413 to larger request bodies, e.g. 2MiB (default 8MiB)")
    lim.add_argument("--max-n", type=int, metavar="N", default=DEFAULT_MAX_N,
                     help=f"most choices one request may ask for: n x prompts "
                     f"(default {DEFAULT_MAX_N})")
    lim.add_argument("--max-embedding-inputs", type=int, metavar="N",
                     default=DEFAULT_MAX_EMBEDDING_INPUTS,
                     help="most texts (or token lists) one embedding request may bring "
                     f"(default {DEFAULT_MAX_EMBEDDING_INPUTS}, OpenAI's)")
    lim.add_argument("--max-json-depth", type=int, metavar="N", default=DEFAULT_MAX_JSON_DEPTH,
                     help=f"answer 400 to JSON nested deeper (default {DEFAULT_MAX_JSON_DEPTH})")
    p.add_argument("--shutdown-timeout", type=float, metavar="SECONDS",
                   default=DEFAULT_SHUTDOWN_TIMEOUT_S,
                   help="on SIGTERM, stop admitting and let requests in flight finish for up "
                   "to this long, then abort the rest and exit 0; 0 aborts at once. SIGINT "
                   f"(Ctrl-C) and a second signal always stop at once "
                   f"(default {DEFAULT_SHUTDOWN_TIMEOUT_S:.0f})")
    add_engine_args(lim, ("max_prompt_chars",))

    add_grammar_limit_args(p)
    c = p.add_argument_group("connections (slow or too many clients)")
    c.add_argument("--timeout-request-read", type=float, metavar="SECONDS",
                   default=DEFAULT_TIMEOUT_REQUEST_READ_S,
                   help="close a connection whose request headers have not all arrived this "
                   "long after its first byte, or whose body, this long after the headers "
                   "plus a second per --min-upload-rate bytes received (answers then have "
                   f"no time limit) (default {DEFAULT_TIMEOUT_REQUEST_READ_S:.0f})")
    c.add_argument("--min-upload-rate", type=parse_bytes, metavar="BYTES",
                   default=DEFAULT_MIN_UPLOAD_RATE,
                   help="the slowest a request body may come on average, bytes a second "
                   "(default 16KiB: an 8 MiB body may take 9 minutes)")
    c.add_argument("--timeout-keep-alive", type=float, metavar="SECONDS",
                   default=DEFAULT_TIMEOUT_KEEP_ALIVE_S,
                   help="close a connection idle this long between requests (uvicorn's; "
                   f"default {DEFAULT_TIMEOUT_KEEP_ALIVE_S:.0f})")
    c.add_argument("--limit-concurrency", type=int, metavar="N",
                   default=DEFAULT_LIMIT_CONCURRENCY,
                   help="answer 503 (with Retry-After) to new requests while more than N "
                   "connections are open or N requests run, except /health, /ready, "
                   "/metrics, /version and / (uvicorn's flag; 0: no limit; default "
                   f"{DEFAULT_LIMIT_CONCURRENCY})")

    add_engine_args(p.add_argument_group("engine"), SERVE_ENGINE_FLAGS)
    p.set_defaults(func=cmd_serve)


def resolve_model(ref: str | None, served_name: str | None):
    """The registry's entry for MODEL as a :class:`ModelCard`."""
    from pagedserve.hub.bundled import BUNDLED_ALIASES
    from pagedserve.hub.registry import resolve
    from pagedserve.server.served_model import ModelCard

    resolved = resolve(ref)
    name, path, source = resolved.name, str(resolved.path), resolved.source
    defaults, system, template = (dict(resolved.sampling_defaults), resolved.system,
                                  resolved.template)
    aliases = {name}
    if ref:
        aliases.add(ref)
    if source == "bundled":
        aliases.update(BUNDLED_ALIASES)
    if source == "path":
        aliases.update({Path(path).name, Path(path).stem})
    if served_name:
        aliases.add(name)
        name = served_name
    return ModelCard(name=name, path=path, source=source, aliases=frozenset(aliases - {name}),
                     sampling_defaults=defaults, system=system, template=template)


def cmd_serve(args: argparse.Namespace) -> int:
    from pagedserve.server.http_server import bind_socket
    from pagedserve.server.limits import ServerLimits

    try:
        limits = ServerLimits(max_request_body=args.max_request_body,
                              max_json_depth=args.max_json_depth, max_n=args.max_n,
                              max_queue=args.max_queue,
                              max_embedding_inputs=args.max_embedding_inputs)
        connection_limits_from_args(args)
    except ValueError as exc:
        field, _, rest = str(exc).partition(" ")
        logger.error("--%s %s", field.replace("_", "-"), rest)
        return 2
    if args.api_server_count < 1:
        logger.error("--api-server-count must be >= 1, got %s", args.api_server_count)
        return 2
    if args.shutdown_timeout < 0:
        logger.error("--shutdown-timeout must be >= 0 seconds, got %s", args.shutdown_timeout)
        return 2
    if args.kv_layout != "static" and (args.max_parallel or args.num_ctx):
        logger.warning("--max-parallel and --num-ctx only apply to --kv-layout static")
    try:
        config = engine_config_from_args(args)
        card = resolve_model(args.model, args.served_model_name)
        config = config.with_model_defaults(card.sampling_defaults)
    except (ValueError, LookupError, OSError) as exc:
        logger.error("%s", exc)
        return 1
    try:
        sock = bind_socket(args.host, args.port)  # a port in use fails now, not after loading
    except OSError as exc:
        logger.error("%s", exc.strerror or exc)
        return 1
    with sock:
        if args.api_server_count > 1:
            from pagedserve.server.supervisor import serve_many

            return serve_many(args, sock, limits, card, config)
        return _serve(args, sock, limits, card, config)


def _serve(args: argparse.Namespace, sock, limits, card, config) -> int:
    """Listen at once (answering 503 "loading" meanwhile) and load the model in a thread."""
    from pagedserve.server.http_server import make_http_server, run_http_server
    from pagedserve.server.loading_app import LoadingApp

    gate = LoadingApp()
    server = make_http_server(gate, args.host, args.port, shutdown_timeout=args.shutdown_timeout,
                              access_log=getattr(args, "verbose", False),
                              connections=connection_limits_from_args(args))
    threading.Thread(target=_load, args=(args, server, gate, limits, card, config),
                     name="pagedserve-load", daemon=True).start()
    return run_http_server(server, sock)


def _load(args: argparse.Namespace, server, gate, limits, card, config) -> None:
    """The engine core (its own process, which loads the model), then the application over
    it, handed to the server's event loop. A model that cannot load ends the server: exit 1
    with the reason in one line."""
    from pagedserve.engine.core_client import MPClient
    from pagedserve.engine.core_process import EngineCoreStartError

    host = f"[{args.host}]" if ":" in args.host else args.host
    logger.info("listening on http://%s:%d; loading %s from %s (%s)", host, args.port,
                card.name, card.path, card.source)
    try:
        client = MPClient.launch(card.path, config, card.name, progress=sys.stderr.isatty())
    except BaseException as exc:  # noqa: BLE001 - whatever it was, the server must not hang
        if isinstance(exc, EngineCoreStartError):
            logger.error("%s", exc)
        else:
            logger.error("starting the engine core failed: %s: %s", type(exc).__name__, exc)
            logger.debug("starting the engine core failed", exc_info=True)
        server.call_on_loop(server.fail, 0.0)
        return
    try:
        install(args, server, gate, limits, card, client)
    except Exception:  # noqa: BLE001 - a server that cannot serve must not answer "loading"
        logger.exception("the server could not start serving the loaded model")
        client.close_unstarted()
        server.call_on_loop(server.fail, 0.0)
