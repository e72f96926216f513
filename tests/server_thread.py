"""A pagedserve server in a thread of the test process, wired as `pagedserve serve` wires it
(AsyncEngine -> ServedModel -> create_app -> HTTPServer, engine death -> exit status) but with
the engine core in a thread (InprocClient) rather than a process, so that a test can reach into
the engine: inject faults, check integrity, count blocks."""

from __future__ import annotations

import threading
import time

from pagedserve.bench.server_process import free_port
from pagedserve.engine import Engine
from pagedserve.engine.async_engine import AsyncEngine
from pagedserve.engine.core_client import InprocClient
from pagedserve.server.app import create_app
from pagedserve.server.http_server import make_http_server, run_http_server
from pagedserve.server.limits import ServerLimits
from pagedserve.server.served_model import ModelCard, ServedModel


class ServerThread:
    def __init__(self, engine: Engine, name: str = "tiny", limits: ServerLimits | None = None,
                 api_key: str | None = None) -> None:
        self.engine = engine
        self.async_engine = AsyncEngine(InprocClient(engine.core))
        card = ModelCard(name=name, path=str(engine.model_info.path if engine.model_info
                                             else name))
        self.served = ServedModel(card, self.async_engine, limits)
        app = create_app(self.served, api_key=api_key)
        self.port = free_port()
        self.server = make_http_server(app, "127.0.0.1", self.port)
        self.server.attach(self.served)
        self.async_engine.on_dead = self.server.engine_died
        self.exit_code: int | None = None
        self.thread = threading.Thread(target=self._run, name="test-server", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self) -> None:
        self.exit_code = run_http_server(self.server)

    def wait_stopped(self, timeout: float = 30.0) -> int | None:
        self.thread.join(timeout)
        return self.exit_code

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive(), "the server thread ended before it started"
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
