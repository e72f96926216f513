"""The engine core in a process of its own: it loads the model, then loops, busy while there
is work.

Started by the front end (``serve``) or by the supervisor of several front ends
(``--api-server-count``) as a fresh interpreter (no threads or locks inherited from an HTTP
server). Its life:

1. load the model (an embedding-only model gets an :class:`EncoderCore`); report
   ``("ready", EngineInfo)`` or ``("failed", reason)`` on a pipe to the parent, which waits
   for one of them (a load that dies reports nothing: the pipe closes);
2. loop (:class:`CoreLoop`): take requests and aborts from the input socket (without waiting
   while requests run, up to a second while idle), step, send each front end its outputs;
3. stop at a ``Shutdown`` message or when its parent is gone (a pidfd on the parent: the core
   never outlives the server, holding a GPU). If the loop fails, every front end gets a last
   message saying why (``dead``) and the process exits with status 1.

SIGINT and SIGTERM are ignored here: they reach the whole process group (Ctrl-C in a terminal,
systemd), and the front end decides what they mean (SIGTERM drains: the core must keep stepping
until the front end says stop).
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import subprocess
import sys
from dataclasses import dataclass

from pagedserve.config import EngineConfig
from pagedserve.engine.core_loop import GRAMMAR_WAIT_S, CoreLoop
from pagedserve.engine.info import EngineInfo

logger = logging.getLogger(__name__)

IDLE_POLL_MS = 1000  # an idle core looks at its parent this often


class EngineCoreStartError(RuntimeError):
    """The core process could not load the model; the message is its one-line reason."""


@dataclass(slots=True)
class CoreProcessConfig:
    model: str  # a path, or dummy:NAME
    engine_config: EngineConfig
    model_name: str
    input_address: str
    output_addresses: list[str]  # one per front end
    load_format: str = "auto"
    progress: bool = False
    log_level: int = logging.INFO


def start_core_process(config: CoreProcessConfig) -> tuple[subprocess.Popen, EngineInfo]:
    """Start the core and wait for its model to load; EngineCoreStartError if it cannot.

    A fresh interpreter (``python -m pagedserve.engine.core_process``), not a fork: the
    caller may be an HTTP server with threads and locks. The config goes down one pipe
    (pickled), the verdict comes back up another.
    """
    config.log_level = logging.getLogger().getEffectiveLevel()
    config_read, config_write = os.pipe()
    ready_read, ready_write = os.pipe()
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "pagedserve.engine.core_process", str(config_read),
             str(ready_write)], pass_fds=(config_read, ready_write), close_fds=True)
    finally:
        os.close(config_read)
        os.close(ready_write)
    with open(config_write, "wb") as pipe:
        pickle.dump(config, pipe)
    with open(ready_read, "rb") as pipe:
        try:
            kind, payload = pickle.load(pipe)
        except EOFError:  # it closed the pipe without a word: it died
            kind, payload = "failed", None
    if kind != "ready":
        code = process.wait(10)
        raise EngineCoreStartError(payload or f"the engine core process exited with status "
                                   f"{code} while loading the model")
    return process, payload


def main(config_fd: int, ready_fd: int) -> int:
    """The process's main: exits 0 when told to stop (or orphaned), 1 when it failed."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with open(config_fd, "rb") as pipe:
        config: CoreProcessConfig = pickle.load(pipe)
    logging.basicConfig(level=config.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    parent = os.getppid()
    with open(ready_fd, "wb") as ready:
        try:
            from pagedserve.engine.encoder_core import load_core

            core = load_core(config.model, config.engine_config, model_name=config.model_name,
                             load_format=config.load_format, progress=config.progress)
        except BaseException as exc:  # noqa: BLE001 - reported as the one-line reason
            logger.debug("loading the model failed", exc_info=True)
            pickle.dump(("failed", load_failure_reason(exc, config.model_name)), ready)
            return 1
        info = core.info()
        info.core_pid = os.getpid()
        pickle.dump(("ready", info), ready)
    return _serve(core, config, parent)


def load_failure_reason(exc: BaseException, model_name: str) -> str:
    """One line: the message of an error written for users (a bad file, a missing device),
    else (a bug, memory) what it was and that the model could not load."""
    from pagedserve.loader import ModelLoadError

    text = " ".join(str(exc).split())
    if isinstance(exc, (ModelLoadError, ValueError, LookupError, OSError)) and text:
        return text
    return f"cannot load {model_name}: {type(exc).__name__}: {text}".rstrip(": ")


def _serve(core, config: CoreProcessConfig, parent: int) -> int:
    import zmq

    from pagedserve.engine import transport
    from pagedserve.engine.messages import EngineCoreOutputs, Shutdown

    context = zmq.Context()
    inputs = context.socket(zmq.PULL)
    inputs.setsockopt(zmq.RCVHWM, 0)
    inputs.bind(config.input_address)
    outputs = []
    for address in config.output_addresses:
        socket = context.socket(zmq.PUSH)
        socket.setsockopt(zmq.SNDHWM, 0)
        socket.setsockopt(zmq.LINGER, 2000)  # the last messages still go out at exit
        socket.connect(address)
        outputs.append(socket)
    encoder = transport.encoder()
    decoder = transport.inputs_decoder()

    def emit(index: int, message: EngineCoreOutputs) -> None:
        outputs[index].send(encoder.encode(message), copy=False)

    loop = CoreLoop(core, emit, num_clients=len(outputs))
    poller = zmq.Poller()
    poller.register(inputs, zmq.POLLIN)
    parent_fd = _pidfd(parent)
    if parent_fd is not None:
        poller.register(parent_fd, zmq.POLLIN)
    logger.info("engine core ready (pid %d): %d front end(s)", os.getpid(), len(outputs))
    status = 0
    try:
        while True:
            if loop.busy:
                timeout = 0
            elif loop.waiting_for_grammars:
                timeout = int(GRAMMAR_WAIT_S * 1000)
            else:
                timeout = IDLE_POLL_MS
            events = dict(poller.poll(timeout))
            if (parent_fd is not None and parent_fd in events) or os.getppid() != parent:
                logger.info("the server process is gone: the engine core stops")
                break
            stop = False
            while True:
                try:
                    frame = inputs.recv(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                message = decoder.decode(frame.buffer)
                if isinstance(message, Shutdown):
                    stop = True
                    break
                loop.handle(message)
            if stop:
                break
            loop.run_once()
    except BaseException as exc:  # noqa: BLE001 - every front end must hear of it
        logger.exception("the engine core loop failed")
        reason = f"{type(exc).__name__}: {exc}"
        for index in range(len(outputs)):
            emit(index, EngineCoreOutputs(dead=reason))
        status = 1
    finally:
        core.close()
        if parent_fd is not None:
            os.close(parent_fd)
        context.destroy(linger=2000)
    return status


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):  # no pidfd: the getppid() check in the loop still works
        return None


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]), int(sys.argv[2])))
