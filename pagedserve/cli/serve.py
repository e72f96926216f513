"""`pagedserve serve [MODEL]`: the OpenAI and Ollama APIs and /metrics on one port."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Any

from pagedserve.arg_types import parse_bytes
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
    lim.add_argument("--max-prompt-chars", type=int, metavar="N",
                     help="answer 400 to longer prompt texts before tokenizing them (default: "
                     "what the context can hold at the vocabulary's longest token)")

    _add_grammar_limits(p)
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

    e = p.add_argument_group("engine")
    e.add_argument("--max-num-seqs", type=int, help="most requests in one batch (default 128)")
    e.add_argument("--max-num-batched-tokens", type=int,
                   help="most tokens computed in one step (default 1024)")
    e.add_argument("--kv-cache-memory", type=parse_bytes, metavar="BYTES",
                   help="memory for the KV cache, e.g. 512MiB or 2GiB "
                   "(default: a share of free memory)")
    e.add_argument("--max-model-len", type=int, help="context length (default: the model's, "
                   "capped by the KV cache)")
    e.add_argument("--block-size", type=int, help="tokens per KV block (default 16)")
    e.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                   default=None, help="reuse the KV blocks of shared prompt prefixes (default on)")
    e.add_argument("--kv-layout", choices=["paged", "static"],
                   help="paged blocks (default), or static slots as Ollama/llama.cpp reserve them")
    e.add_argument("--max-parallel", type=int,
                   help="static layout: number of slots, like OLLAMA_NUM_PARALLEL (default 4)")
    e.add_argument("--num-ctx", type=int,
                   help="static layout: tokens reserved per slot, like num_ctx (default 4096)")
    e.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="compute dtype (the KV cache's: --kv-cache-dtype); auto: bfloat16 where the CPU computes it "
                   "natively (AVX-512 BF16, AMX), else float32 (default: auto)")
    e.add_argument("--kv-cache-dtype", choices=["auto", "float32", "bfloat16", "float16"],
                   default="auto", help="K and V in the cache; auto: as --dtype, but float16 "
                   "where auto chose float32 on a CPU, as llama.cpp (half the memory and of "
                   "attention's reads) (default: auto)")
    e.add_argument("--device", help="cpu (default) or cuda, which needs a CUDA build of "
                   "torch (README: 'With a GPU')")
    e.add_argument("--threads", type=int, help="torch CPU threads")
    e.add_argument("--seed", type=int, help="engine seed for requests that bring none "
                   "(default: random at each start, so answers vary between runs)")
    e.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="schedule and prepare each step while the device runs the one before "
                   "(its tokens are read one step late; vLLM's flag); default: on CUDA only")
    e.add_argument("--enforce-eager", action="store_true", default=None,
                   help="CUDA: run decode steps eagerly, without CUDA graphs")
    e.add_argument("--gpu-memory-utilization", type=float, metavar="FRACTION",
                   help="CUDA: share of the GPU's memory this process may use; the KV cache "
                   "gets what the weights and activations leave (default 0.9)")
    p.set_defaults(func=cmd_serve)


def _add_grammar_limits(p: argparse.ArgumentParser) -> None:
    from pagedserve.structured.limits import GrammarLimits

    d = GrammarLimits()
    g = p.add_argument_group(
        "structured outputs (what one client's grammar may cost; over a limit is a 400)")
    g.add_argument("--grammar-compile-timeout", type=float, metavar="SECONDS",
                   default=d.compile_seconds,
                   help=f"most time a grammar may take to compile, queueing included "
                   f"(default {d.compile_seconds:g})")
    g.add_argument("--grammar-compile-threads", type=int, metavar="N",
                   default=d.compile_threads,
                   help=f"grammars compiled at once (default {d.compile_threads})")
    g.add_argument("--grammar-compile-queue", type=int, metavar="N", default=d.compile_queue,
                   help=f"grammars that may wait for a compile thread; more are a 503 "
                   f"(default {d.compile_queue})")
    g.add_argument("--grammar-cache-size", type=int, metavar="N", default=d.cache_entries,
                   help=f"compiled grammars kept for reuse (default {d.cache_entries})")
    g.add_argument("--grammar-cache-memory", type=parse_bytes, metavar="BYTES",
                   default=d.cache_memory,
                   help=f"memory the kept grammars may hold, e.g. 256MiB (default "
                   f"{d.cache_memory >> 20}MiB); one over a quarter of it is not kept")
    g.add_argument("--grammar-mask-budget", type=float, metavar="SECONDS",
                   default=d.mask_seconds,
                   help="most time one request's token mask may take in a step; over it the "
                   f"request ends with an error (default {d.mask_seconds:g})")
    g.add_argument("--grammar-max-schema-properties", type=int, metavar="N",
                   default=d.max_schema_properties,
                   help=f"object properties in one JSON schema (default "
                   f"{d.max_schema_properties}, OpenAI's limit)")
    g.add_argument("--grammar-max-regex-repeat", type=int, metavar="N",
                   default=d.max_regex_repeat,
                   help=f"characters a regex's counted repetitions may spell: (a{{100}}){{300}} "
                   f"spells 30000 (default {d.max_regex_repeat})")
    g.add_argument("--grammar-lexer-fuel", type=int, metavar="N", default=d.lexer_fuel,
                   help=f"llguidance's initial_lexer_fuel: building the lexer and the first "
                   f"token mask (default {d.lexer_fuel})")
    g.add_argument("--grammar-step-fuel", type=int, metavar="N", default=d.step_lexer_fuel,
                   help=f"llguidance's step_lexer_fuel: one token mask's lexer work "
                   f"(default {d.step_lexer_fuel})")
    g.add_argument("--grammar-step-items", type=int, metavar="N", default=d.step_max_items,
                   help=f"llguidance's step_max_items: one token mask's parser items "
                   f"(default {d.step_max_items})")
    g.add_argument("--grammar-lexer-states", type=int, metavar="N", default=d.max_lexer_states,
                   help=f"llguidance's max_lexer_states, 1-2 KB each (default "
                   f"{d.max_lexer_states})")
    g.add_argument("--grammar-max-symbols", type=int, metavar="N",
                   default=d.max_grammar_symbols,
                   help=f"llguidance's max_grammar_size, in symbols (default "
                   f"{d.max_grammar_symbols})")


def grammar_limits_from_args(args: argparse.Namespace):
    """The :class:`GrammarLimits` the flags ask for (ValueError names a bad one)."""
    from pagedserve.structured.limits import GrammarLimits

    flags = {  # GrammarLimits field -> the flag's dest
        "compile_seconds": "grammar_compile_timeout",
        "compile_threads": "grammar_compile_threads",
        "compile_queue": "grammar_compile_queue",
        "cache_entries": "grammar_cache_size",
        "cache_memory": "grammar_cache_memory",
        "mask_seconds": "grammar_mask_budget",
        "max_schema_properties": "grammar_max_schema_properties",
        "max_regex_repeat": "grammar_max_regex_repeat",
        "lexer_fuel": "grammar_lexer_fuel",
        "step_lexer_fuel": "grammar_step_fuel",
        "step_max_items": "grammar_step_items",
        "max_lexer_states": "grammar_lexer_states",
        "max_grammar_symbols": "grammar_max_symbols",
    }
    try:
        return GrammarLimits(**{name: getattr(args, dest) for name, dest in flags.items()})
    except ValueError as exc:  # "compile_seconds must be ..." -> "--grammar-compile-timeout ..."
        name, _, rest = str(exc).partition(" ")
        flag = "--" + flags.get(name, name).replace("_", "-")
        raise ValueError(f"{flag} {rest}") from None


def engine_config_from_args(args: argparse.Namespace):
    from pagedserve.config import EngineConfig

    knobs: dict[str, Any] = {
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "kv_cache_memory": args.kv_cache_memory,
        "max_model_len": args.max_model_len,
        "block_size": args.block_size,
        "enable_prefix_caching": args.enable_prefix_caching,
        "kv_layout": args.kv_layout,
        "max_parallel": args.max_parallel,
        "num_ctx": args.num_ctx,
        "dtype": args.dtype,
        "kv_cache_dtype": args.kv_cache_dtype,
        "device": args.device,
        "num_threads": args.threads,
        "seed": args.seed,
        "max_prompt_chars": getattr(args, "max_prompt_chars", None),
        "enforce_eager": args.enforce_eager,
        "async_scheduling": args.async_scheduling,
        "gpu_memory_utilization": args.gpu_memory_utilization,
        "grammar_limits": (grammar_limits_from_args(args)
                           if hasattr(args, "grammar_compile_timeout") else None),
    }
    return EngineConfig(**{k: v for k, v in knobs.items() if v is not None})


def resolve_model(ref: str | None, served_name: str | None):
    """The registry's entry for MODEL as a :class:`ModelCard`."""
    from pagedserve.bundled import BUNDLED_ALIASES
    from pagedserve.registry import resolve
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
    install(args, server, gate, limits, card, client)
