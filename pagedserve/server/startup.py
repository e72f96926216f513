"""The application over an engine core, handed to a listening server once the model loaded.

Shared by ``pagedserve serve`` (one front end: :mod:`pagedserve.cli.serve`) and each front end
of ``serve --api-server-count N`` (:mod:`pagedserve.server.frontend_process`); both read the
settings from the ``serve`` command's parsed arguments.
"""

from __future__ import annotations

import argparse
import logging

logger = logging.getLogger(__name__)


def connection_limits_from_args(args: argparse.Namespace):
    from pagedserve.server.limits import ConnectionLimits

    return ConnectionLimits(timeout_request_read=args.timeout_request_read,
                            min_upload_rate=args.min_upload_rate,
                            timeout_keep_alive=args.timeout_keep_alive,
                            limit_concurrency=args.limit_concurrency or None)


def install(args: argparse.Namespace, server, gate, limits, card, client,
            metrics_dir: str | None = None) -> None:
    """Hand the application over ``client``'s engine core to the server's event loop (from
    the loading thread); ``metrics_dir``: Prometheus' multiprocess directory, where several
    front ends add up their counters and histograms."""
    import prometheus_client

    from pagedserve.engine.async_engine import AsyncEngine
    from pagedserve.metrics import ServerMetrics, ServingProcesses
    from pagedserve.server.app import create_app
    from pagedserve.server.served_model import ServedModel

    # vLLM's habit: no "_created" timestamp series next to every counter and histogram
    prometheus_client.disable_created_metrics()
    async_engine = AsyncEngine(client, on_dead=server.engine_died,
                               client_index=getattr(args, "client_index", 0))
    served = ServedModel(card, async_engine, limits,
                         tool_call_parser=getattr(args, "tool_call_parser", "auto"))
    metrics = ServerMetrics(card.name, async_engine.stats, alive=lambda: async_engine.alive,
                            max_model_len=client.info.max_model_len, multiprocess_dir=metrics_dir,
                            processes=ServingProcesses(getattr(args, "client_index", 0),
                                                       client.info.core_pid))
    app = create_app(served, metrics, api_key=args.api_key)
    if server.run_on_loop(gate.install(app)):
        server.attach(served)
        _log_startup(args, served)
    else:  # a signal during the load: the server stopped; the core must not outlive it
        client.close_unstarted()


def _log_startup(args: argparse.Namespace, served) -> None:
    info = served.info
    capacity = info.kv_capacity_tokens
    max_len = info.max_model_len
    host = f"[{args.host}]" if ":" in args.host else args.host
    logger.info("serving %s on http://%s:%d (OpenAI /v1, Ollama /api, metrics /metrics)",
                served.name, host, args.port)
    logger.info("SIGTERM drains for up to %.0f s (--shutdown-timeout); Ctrl-C stops at once",
                args.shutdown_timeout)
    if info.generates:
        logger.info("model %s in %s: context %d tokens; KV cache (%s, %s) holds %d tokens: %d "
                    "requests at full context at once (max %d sequences per batch)",
                    served.card.path, info.config.dtype, max_len, info.config.kv_layout,
                    info.config.kv_cache_dtype, capacity,
                    capacity // max_len if max_len else 0, info.max_num_seqs)
    else:
        logger.info("embedding model %s in %s: inputs of up to %d tokens; it does not "
                    "generate (/api/embed, /api/embeddings and /v1/embeddings only)",
                    served.card.path, info.config.dtype, max_len)
    if args.api_key:
        logger.info("API key required on /v1/*, /api/*, /tokenize and /detokenize")
    limits = served.limits
    logger.info("limits: %d requests waiting for a seat (more get 503), bodies of %d bytes, "
                "n <= %d, JSON depth %d, prompts of %d characters, %d inputs per embedding "
                "request", limits.max_queue, limits.max_request_body, limits.max_n,
                limits.max_json_depth, info.max_prompt_chars, limits.max_embedding_inputs)
    cap = (f"503 past {args.limit_concurrency} connections" if args.limit_concurrency
           else "no connection limit")
    logger.info("connections: requests must arrive within %.0f s, bodies at %d bytes/s or "
                "more; idle ones close after %.0f s; %s", args.timeout_request_read,
                args.min_upload_rate, args.timeout_keep_alive, cap)
