"""A pagedserve server in a child process, for the comparison and the tests.

``with ServerProcess(model, ["--kv-layout", "static"]) as server:`` picks a free loopback port,
runs ``python -m pagedserve serve``, waits until /health answers 200 and, on exit, stops the
child (SIGINT, then SIGKILL if it lingers). The child's output goes to a log file whose tail is
quoted when it fails to start. ``ServerProcess(None, command=[...])`` runs another server the same
way (a peer such as llama.cpp's ``llama-server``): ``{port}`` and ``{host}`` in its arguments are
filled in, and it must answer ``/health`` with 200 once it is ready, as llama.cpp's does.
"""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

log = logging.getLogger(__name__)

LOG_TAIL_CHARS = 3000


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on now (another process could take it before we do, rarely)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class ServerStartError(RuntimeError):
    pass


class ServerProcess:
    def __init__(self, model: str | None, extra_args: list[str] | None = None, *,
                 host: str = "127.0.0.1", port: int | None = None,
                 startup_timeout: float = 300.0, log_path: str | Path | None = None,
                 command: list[str] | None = None):
        self.model = model
        self.extra_args = list(extra_args or [])
        self.command = list(command) if command else None
        self.host = host
        self.port = port or free_port(host)
        self.startup_timeout = startup_timeout
        self.log_path = Path(log_path) if log_path else Path(
            tempfile.mkstemp(prefix="pagedserve-serve-", suffix=".log")[1]
        )
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def argv(self) -> list[str]:
        if self.command:
            return [arg.format(host=self.host, port=self.port) for arg in self.command]
        model = [self.model] if self.model else []
        return [sys.executable, "-m", "pagedserve", "serve", *model, "--host", self.host,
                "--port", str(self.port), *self.extra_args]

    def start(self) -> ServerProcess:
        shown = self.argv if self.command else self.argv[1:]
        log.info("starting %s (log: %s)", " ".join(shown), self.log_path)
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT)
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerStartError(
                    f"the server exited with code {self.proc.returncode} before it was healthy; "
                    f"its log ends:\n{self.log_tail()}"
                )
            try:
                if httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200:
                    log.info("server healthy at %s", self.url)
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise ServerStartError(
            f"the server was not healthy after {self.startup_timeout:.0f} s; its log ends:\n"
            f"{self.log_tail()}"
        )

    def stop(self, grace: float = 20.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            log.warning("server %s ignored SIGINT for %.0f s; killing it", self.url, grace)
            self.proc.kill()
            self.proc.wait()

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:]
        except OSError:
            return "(no log)"

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
