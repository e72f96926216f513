"""One front end of ``serve --api-server-count N``: HTTP on a socket shared with its siblings.

Started by :mod:`pagedserve.server.supervisor` with three inherited descriptors: a pipe with
its settings, a pipe on which the core's :class:`EngineInfo` (or why there is none) arrives once
the model has loaded, and the listening socket. It serves 503 "loading" until then, exactly as a
single server does, then talks to the engine core over its own output socket.
"""

from __future__ import annotations

import logging
import pickle
import socket
import sys
import threading
from pathlib import Path

logger = logging.getLogger(__name__)


def main(config_fd: int, info_fd: int, socket_fd: int) -> int:
    from pagedserve.server.http_server import make_http_server, run_http_server
    from pagedserve.server.loading_app import LoadingApp
    from pagedserve.server.startup import connection_limits_from_args, install

    with open(config_fd, "rb") as pipe:
        args, limits, card, input_address, output_address, metrics_dir = pickle.load(pipe)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s [front end {args.client_index}] "
                        "%(name)s: %(message)s", datefmt="%H:%M:%S")
    sock = socket.socket(fileno=socket_fd)
    ready_dir = Path(metrics_dir) / "ready"
    gate = LoadingApp(peers_ready=lambda: len(list(ready_dir.iterdir())) >= args.api_server_count)
    server = make_http_server(gate, args.host, args.port, shutdown_timeout=args.shutdown_timeout,
                              access_log=args.verbose,
                              connections=connection_limits_from_args(args))

    def load() -> None:
        from pagedserve.engine.core_client import MPClient

        with open(info_fd, "rb") as pipe:
            try:
                kind, payload = pickle.load(pipe)
            except EOFError:  # the supervisor is gone
                kind, payload = "failed", "the supervisor exited"
        if kind != "ready":
            logger.error("%s", payload)
            server.call_on_loop(server.fail, 0.0)
            return
        client = MPClient(payload, input_address, output_address)
        install(args, server, gate, limits, card, client, metrics_dir=metrics_dir)
        if gate.app is not None:  # serving: the others may report ready once all are
            (ready_dir / str(args.client_index)).touch()

    threading.Thread(target=load, name="pagedserve-load", daemon=True).start()
    return run_http_server(server, sock)


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])))
