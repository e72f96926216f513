"""``serve --api-server-count N`` (N > 1): N front-end processes and one engine core.

    supervisor (this process: no HTTP)       binds the port, starts the others, watches them
      |-- front end 0 .. N-1                 HTTP on the shared socket (the kernel spreads new
      |                                      connections over them); each its own event loop,
      |                                      tokenizer and detokenizers
      |-- engine core                        one scheduler, one KV cache, one model

Each front end listens at once (503 "loading" meanwhile, as one server does) and waits for the
supervisor to hand it the core's :class:`EngineInfo` once the model has loaded, or the reason
it did not (then every process exits 1). Prometheus counters and histograms of all front ends
add up in a private multiprocess directory, so a scrape that lands on any of them sees the sums.

How it ends: SIGTERM is passed to the front ends, which drain as one server does; Ctrl-C
reaches every process of the group at once. Once the front ends have exited, the core is told
to stop. A front end or the core that dies ends everything with status 1: the front ends see
the core go (503, then exit 1), and the supervisor stops the rest when a front end goes.
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

logger = logging.getLogger(__name__)

POLL_S = 0.2


def serve_many(args: argparse.Namespace, sock: socket.socket, limits, card, config) -> int:
    from pagedserve.engine import transport
    from pagedserve.engine.core_process import (
        CoreProcessConfig,
        EngineCoreStartError,
        start_core_process,
    )

    count = args.api_server_count
    metrics_dir = tempfile.mkdtemp(prefix="pagedserve-metrics-")
    os.mkdir(os.path.join(metrics_dir, "ready"))  # a file per front end serving (readiness)
    input_address, output_addresses = transport.ipc_addresses(count)
    sock.listen(2048)
    frontends = [_start_frontend(args, i, sock, limits, card, input_address,
                                 output_addresses[i], metrics_dir) for i in range(count)]
    stop = threading.Event()
    signals = _forward_signals(frontends, stop)
    core = None
    status = 1
    try:
        try:
            core, info = start_core_process(CoreProcessConfig(
                model=card.path, engine_config=config, model_name=card.name,
                input_address=input_address, output_addresses=output_addresses,
                progress=sys.stderr.isatty()))
        except EngineCoreStartError as exc:
            logger.error("%s", exc)
            _tell(frontends, ("failed", str(exc)))
        else:
            _tell(frontends, ("ready", info))
            status = _watch(frontends, core, stop)
    finally:
        for sig, handler in signals.items():
            signal.signal(sig, handler)
        for process, _ in frontends:
            _wait(process, 30.0)
        if core is not None:
            _stop_core(core, input_address)
        transport.remove_ipc_directory(input_address)
        shutil.rmtree(metrics_dir, ignore_errors=True)
    codes = [process.returncode for process, _ in frontends]
    return status if status else int(any(code for code in codes))


def _start_frontend(args, index: int, sock: socket.socket, limits, card, input_address: str,
                    output_address: str, metrics_dir: str) -> tuple[subprocess.Popen, int]:
    """A front-end process and the pipe on which it will hear of the core."""
    config_read, config_write = os.pipe()
    info_read, info_write = os.pipe()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": metrics_dir}
    process = subprocess.Popen(
        [sys.executable, "-m", "pagedserve.server.frontend_process", str(config_read),
         str(info_read), str(sock.fileno())],
        pass_fds=(config_read, info_read, sock.fileno()), env=env)
    os.close(config_read)
    os.close(info_read)
    settings = argparse.Namespace(**{k: v for k, v in vars(args).items() if k != "func"})
    settings.client_index = index
    with open(config_write, "wb") as pipe:
        pickle.dump((settings, limits, card, input_address, output_address, metrics_dir), pipe)
    return process, info_write


def _tell(frontends, message) -> None:
    data = pickle.dumps(message)
    for process, fd in frontends:
        try:
            with open(fd, "wb") as pipe:
                pipe.write(data)
        except OSError:  # it has exited already: its status tells
            logger.debug("front end %d is gone", process.pid)


def _watch(frontends, core: subprocess.Popen, stop: threading.Event) -> int:
    """Until every front end has exited: 0 if they all exited 0, 1 as soon as one process
    died on its own (the others are then stopped)."""
    while True:
        codes = [process.poll() for process, _ in frontends]
        if all(code is not None for code in codes):
            return int(any(codes))
        failed = [code for code in codes if code not in (None, 0)]
        if failed or (core.poll() is not None and not stop.is_set()):
            if core.poll() is not None:
                logger.error("the engine core exited with status %s", core.returncode)
            else:
                logger.error("a front end exited with status %s; stopping the others",
                             failed[0])
            for process, _ in frontends:
                if process.poll() is None:
                    process.send_signal(signal.SIGINT)
            return 1
        time.sleep(POLL_S)


def _forward_signals(frontends, stop: threading.Event) -> dict:
    def forward(sig, frame) -> None:
        stop.set()
        if sig == signal.SIGTERM:  # Ctrl-C reaches the front ends by itself (same group)
            for process, _ in frontends:
                if process.poll() is None:
                    process.send_signal(sig)

    return {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}


def _wait(process: subprocess.Popen, timeout: float) -> None:
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _stop_core(core: subprocess.Popen, input_address: str) -> None:
    """Tell the core to stop (it ignores signals meant for the front ends)."""
    import zmq

    from pagedserve.engine import transport
    from pagedserve.engine.core_client import stop_process
    from pagedserve.engine.messages import Shutdown

    if core.poll() is None:
        context = zmq.Context()
        try:
            push = context.socket(zmq.PUSH)
            push.setsockopt(zmq.LINGER, 1000)
            push.connect(input_address)
            push.send(transport.encoder().encode(Shutdown()))
        finally:
            context.destroy(linger=1000)
    stop_process(core)
