"""How a front end reaches its engine core: in a thread of its own process, or in another.

Both clients run the same :class:`~pagedserve.engine.core_loop.CoreLoop` and give the front end
the same calls (made on its event loop): ``add_request``, ``add_embed_request``,
``abort_requests``, and the core's outputs delivered to ``on_outputs`` on that loop, one message
per core iteration.

- :class:`InprocClient`: the core in a thread (tests that reach into the engine; ``serve`` did
  this before the core had a process). Messages pass as objects through a locked inbox.
- :class:`MPClient`: the core in a process of its own (:mod:`pagedserve.engine.core_process`),
  messages as msgpack over ZeroMQ (:mod:`pagedserve.engine.transport`): the core's busy loop
  never waits for the GIL of the HTTP side, and the HTTP side never waits for a step.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from pagedserve.engine import transport
from pagedserve.engine.core import EngineCore
from pagedserve.engine.core_loop import GRAMMAR_WAIT_S, CoreLoop
from pagedserve.engine.encoder_core import EncoderCore
from pagedserve.engine.info import EngineInfo
from pagedserve.engine.messages import (
    AbortRequests,
    AddEmbedRequest,
    AddRequest,
    CoreInput,
    EmbedRequest,
    EngineCoreOutputs,
    EngineCoreRequest,
    EngineStats,
    Shutdown,
)
from pagedserve.errors import EngineDeadError

if TYPE_CHECKING:
    import subprocess

logger = logging.getLogger(__name__)

OnOutputs = Callable[[EngineCoreOutputs], None]
OnDead = Callable[[BaseException], None]
SHUTDOWN_TIMEOUT_S = 10.0  # how long a core process may take to stop before it is killed


class EngineCoreClient:
    """The front end's handle on its core; subclasses say where the core runs."""

    info: EngineInfo

    def start(self, on_outputs: OnOutputs, on_dead: OnDead) -> None:
        raise NotImplementedError

    def add_request(self, request: EngineCoreRequest) -> None:
        raise NotImplementedError

    def add_embed_request(self, request: EmbedRequest) -> None:
        raise NotImplementedError

    def abort_requests(self, request_ids: list[str]) -> None:
        raise NotImplementedError

    def stats(self) -> EngineStats:
        raise NotImplementedError

    async def shutdown(self) -> None:
        raise NotImplementedError


class InprocClient(EngineCoreClient):
    """The core in a daemon thread of this process."""

    def __init__(self, core: EngineCore | EncoderCore) -> None:
        self.core = core
        self.info = core.info()
        self._lock = threading.Lock()
        self._inbox: list[CoreInput] = []
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self, on_outputs: OnOutputs, on_dead: OnDead) -> None:
        loop = asyncio.get_running_loop()

        def emit(index: int, outputs: EngineCoreOutputs) -> None:
            loop.call_soon_threadsafe(on_outputs, outputs)

        self._thread = threading.Thread(target=self._run, args=(CoreLoop(self.core, emit), loop,
                                                                on_dead),
                                        name="pagedserve-engine", daemon=True)
        self._thread.start()

    def add_request(self, request: EngineCoreRequest) -> None:
        self._put(AddRequest(request))

    def add_embed_request(self, request: EmbedRequest) -> None:
        self._put(AddEmbedRequest(request))

    def abort_requests(self, request_ids: list[str]) -> None:
        self._put(AbortRequests(list(request_ids)))

    def stats(self) -> EngineStats:
        # read live from the engine thread's objects: only counters and running totals
        return self.core.stats()

    async def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, SHUTDOWN_TIMEOUT_S)

    def _put(self, message: CoreInput) -> None:
        with self._lock:
            self._inbox.append(message)
        self._wake.set()

    def _run(self, core_loop: CoreLoop, loop: asyncio.AbstractEventLoop, on_dead: OnDead) -> None:
        try:
            while not self._stopping:
                with self._lock:
                    inbox, self._inbox = self._inbox, []
                for message in inbox:
                    core_loop.handle(message)
                core_loop.run_once()
                if core_loop.busy:
                    continue
                self._wake.wait(GRAMMAR_WAIT_S if core_loop.waiting_for_grammars else None)
                self._wake.clear()
        except BaseException as exc:  # the loop must never die silently
            logger.exception("engine loop failed")
            loop.call_soon_threadsafe(on_dead, exc)


class MPClient(EngineCoreClient):
    """The core in a process of its own; see :mod:`pagedserve.engine.core_process`."""

    def __init__(self, info: EngineInfo, input_address: str, output_address: str,
                 process: subprocess.Popen | None = None) -> None:
        self.info = info
        self.process = process  # when this front end started the core (else a supervisor did)
        self._input_address = input_address
        self._output_address = output_address
        self._encoder = transport.encoder()
        self._decoder = transport.outputs_decoder()
        self._stats = EngineStats()
        self._context = None
        self._input = self._output = None
        self._output_fd: int | None = None
        self._on_outputs: OnOutputs | None = None
        self._pidfd: int | None = None
        self._dead = False
        self._on_dead: OnDead | None = None

    @classmethod
    def launch(cls, model: str, config, model_name: str, load_format: str = "auto",
               progress: bool = False) -> MPClient:
        """Start a core process for ``model`` and wait until it has loaded it (call it from a
        thread: loading takes seconds to minutes). Raises EngineCoreStartError with the core's
        one-line reason if the model cannot be loaded."""
        from pagedserve.engine.core_process import CoreProcessConfig, start_core_process

        input_address, [output_address] = transport.ipc_addresses(1)
        process, info = start_core_process(CoreProcessConfig(
            model=model, engine_config=config, model_name=model_name, load_format=load_format,
            progress=progress, input_address=input_address, output_addresses=[output_address]))
        return cls(info, input_address, output_address, process)

    def start(self, on_outputs: OnOutputs, on_dead: OnDead) -> None:
        import zmq

        self._on_dead, self._on_outputs = on_dead, on_outputs
        self._context = zmq.Context()
        self._output = self._context.socket(zmq.PULL)
        self._output.setsockopt(zmq.RCVHWM, 0)
        self._output.bind(self._output_address)
        self._input = self._context.socket(zmq.PUSH)
        self._input.setsockopt(zmq.SNDHWM, 0)  # a request is never dropped nor blocks
        self._input.setsockopt(zmq.LINGER, 1000)
        self._input.connect(self._input_address)
        # The output socket's descriptor in the event loop, drained by a plain callback: the
        # asyncio flavour of pyzmq makes a future and re-registers its reader for every message,
        # ~50 us of the front end's CPU per streamed token at one user. ZeroMQ's descriptor
        # signals edges, so each wake-up reads until nothing is left.
        loop = asyncio.get_running_loop()
        self._output_fd = self._output.getsockopt(zmq.FD)
        loop.add_reader(self._output_fd, self._drain)
        loop.call_soon(self._drain)  # what arrived before the reader was added
        self._watch_core_process()

    def add_request(self, request: EngineCoreRequest) -> None:
        self._send(AddRequest(request))

    def add_embed_request(self, request: EmbedRequest) -> None:
        self._send(AddEmbedRequest(request))

    def abort_requests(self, request_ids: list[str]) -> None:
        self._send(AbortRequests(list(request_ids)))

    def stats(self) -> EngineStats:
        return self._stats

    async def shutdown(self) -> None:
        if self._input is not None and not self._dead:
            self._send(Shutdown())
        self._stop_reading()
        if self._pidfd is not None:
            asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        if self.process is not None:
            await asyncio.to_thread(stop_process, self.process)
            transport.remove_ipc_directory(self._input_address)
        if self._context is not None:
            self._context.destroy(linger=0)
            self._context = None

    def close_unstarted(self) -> None:
        """Stop the core of a client that never started (the server stopped during the
        load): nothing was sent to it, so nothing is lost."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            transport.remove_ipc_directory(self._input_address)

    # -- internals -----------------------------------------------------------------------------

    def _send(self, message: CoreInput) -> None:
        if self._input is None or self._dead:
            raise EngineDeadError("the engine core is not running")
        import zmq

        self._input.send(self._encoder.encode(message), flags=zmq.NOBLOCK)

    def _drain(self) -> None:
        import zmq

        while not self._dead and self._output_fd is not None:
            try:
                frame = self._output.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                outputs = self._decoder.decode(frame.buffer)
                if outputs.stats is not None:
                    self._stats = outputs.stats
                if outputs.dead is not None:
                    self._stop_reading()
                    self._died(EngineDeadError(outputs.dead))
                    return
                self._on_outputs(outputs)
            except Exception as exc:  # noqa: BLE001 - a message we cannot read or hand on
                logger.exception("reading the engine core's outputs failed")
                self._stop_reading()
                self._died(exc)
                return

    def _stop_reading(self) -> None:
        if self._output_fd is not None:
            asyncio.get_running_loop().remove_reader(self._output_fd)
            self._output_fd = None

    def _watch_core_process(self) -> None:
        """A pidfd becomes readable when the core process exits, however it exits."""
        pid = self.info.core_pid
        if pid is None:
            return
        try:
            self._pidfd = os.pidfd_open(pid)
        except (AttributeError, OSError) as exc:  # no pidfd (old kernel): outputs still tell
            logger.debug("cannot watch the engine core process: %s", exc)
            return
        asyncio.get_running_loop().add_reader(self._pidfd, self._core_exited)

    def _core_exited(self) -> None:
        asyncio.get_running_loop().remove_reader(self._pidfd)
        code = self.process.poll() if self.process is not None else None
        self._died(EngineDeadError(
            "the engine core process exited" + (f" with status {code}" if code is not None
                                                else "")))

    def _died(self, exc: BaseException) -> None:
        if self._dead:
            return
        self._dead = True
        if self._on_dead is not None:
            self._on_dead(exc)


def stop_process(process: subprocess.Popen, timeout: float = SHUTDOWN_TIMEOUT_S) -> None:
    """Wait for a core process that was asked to stop; kill it if it lingers (it ignores
    SIGTERM, which means "drain" to the front end)."""
    import subprocess

    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        logger.warning("the engine core did not stop within %.0f s; killing it", timeout)
        process.kill()
        process.wait()

