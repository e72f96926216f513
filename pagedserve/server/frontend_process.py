"""One front end of ``serve --api-server-count N``: HTTP on a socket shared with its siblings.

Started by :mod:`pagedserve.server.supervisor` with three inherited descriptors: a pipe with
its settings, a pipe on which the core's :class:`EngineInfo` (or why there is none) arrives once
the model has loaded, and the listening socket. It serves 503 "loading" until then, exactly as a
single server does, then talks to the engine core over its own output socket.
"""

from __future__ import annotations

import logging
import os
import pickle
import select
import socket
import sys
import threading
import time
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
        try:
            install(args, server, gate, limits, card, client, metrics_dir=metrics_dir)
        except Exception:  # noqa: BLE001 - a front end that cannot serve must not answer "loading"
            logger.exception("front end %d could not start serving", args.client_index)
            server.call_on_loop(server.fail, 0.0)
            return
        if gate.app is not None:  # serving: the others may report ready once all are
            (ready_dir / str(args.client_index)).touch()

    threading.Thread(target=load, name="pagedserve-load", daemon=True).start()
    threading.Thread(target=_exit_with_supervisor, args=(server,), name="pagedserve-parent",
                     daemon=True).start()
    return run_http_server(server, sock)


def _exit_with_supervisor(server) -> None:
    """A supervisor that is killed (SIGKILL, the OOM killer) cannot stop its front ends: each
    watches it through a pidfd and exits with status 1 when it is gone, freeing the port."""
    parent = os.getppid()
    try:
        fd = os.pidfd_open(parent)
    except (AttributeError, OSError):  # no pidfd: poll the parent's pid instead
        while os.getppid() == parent:
            time.sleep(1.0)
    else:
        select.select([fd], [], [])
        os.close(fd)
    logger.error("the supervisor (pid %d) is gone: this front end stops", parent)
    server.call_on_loop(server.fail, 0.0)


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])))
