"""Tensor-parallel worker processes: ranks 1..N-1 of an engine whose core is rank 0.

Who does what::

    rank 0 (the engine core's process)        rank r > 0 (a worker)
    ----------------------------------        ---------------------
    starts the local workers (spawn)          joins the group (distributed.py)
    joins the group                           loads its shard of the weights from the file
    loads its shard                           builds a ModelRunner over it
    gathers every rank's weight bytes   <-    reports its weight bytes (or why it failed)
    sizes the KV cache, broadcasts it   ->    allocates the same number of blocks
    each step: schedules, broadcasts    ->    runs the step's passes in lockstep
      the plan, runs it, samples              (ModelRunner.follow), meeting in the collectives
    close: broadcasts None              ->    exits 0

Ranks are started torchrun's way (distributed.Rendezvous): with no MASTER_ADDR in its
environment rank 0 starts every worker on this host, at 127.0.0.1 and a free port. With
MASTER_ADDR, MASTER_PORT and WORLD_SIZE set, rank 0 starts only the ranks of its own host
(``LOCAL_WORLD_SIZE``, default all) and the others are started on their hosts with
``python -m pagedserve.engine.workers MODEL --tensor-parallel-size N`` and RANK set
(docs/tensor-parallel.md).

Failure: a worker that dies closes its sockets, so rank 0's next collective raises (gloo
reports it in milliseconds); one that hangs inside a step makes rank 0's collective time out
(``PAGEDSERVE_TP_TIMEOUT``). Either is a :class:`TensorParallelError` out of the core's step,
which ends the core (the server answers 503 and exits 1). Rank 0 also looks at its local
workers' exit status before every step. A local worker watches its parent (a pidfd) and exits
when the engine core is gone, so that no worker outlives it.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import socket
import sys
import threading
from dataclasses import dataclass

from pagedserve.config import EngineConfig
from pagedserve.errors import TensorParallelError

logger = logging.getLogger(__name__)

JOIN_TIMEOUT_S = 10.0  # a worker told to stop has this long before it is killed


@dataclass(slots=True)
class WorkerSpec:
    """What a worker needs to join: the model file, and where and as whom the group meets.
    The engine's config comes from rank 0 once joined, so that a worker started by hand on
    another host computes exactly as rank 0 plans."""

    model: str
    load_format: str
    device: str
    world_size: int
    rank: int
    master_addr: str
    master_port: int
    local_rank: int
    parent_pid: int | None  # a local worker exits when this process is gone
    log_level: int = logging.INFO


class TensorParallelWorkers:
    """Rank 0's side: the group, the local worker processes and each rank's weight bytes."""

    def __init__(self, group, processes: list[multiprocessing.Process]) -> None:
        self.group = group  # distributed.TensorParallelGroup
        self.processes = processes
        self.weight_bytes: list[int] = []  # per rank, filled by collect_reports
        group.on_hang = self._hung

    def _hung(self, waited: float) -> None:
        """A rank has not answered for the collective timeout: kill the local workers, which
        turns rank 0's wait into an error. Ranks on other hosts cannot be killed from here:
        then this process exits, as a dead engine core does."""
        for process in self.processes:
            if process.exitcode is None:
                logger.error("killing worker %s (pid %d): no answer for %.0f s", process.name,
                             process.pid, waited)
                process.kill()
        if len(self.processes) < self.group.world_size - 1:
            logger.critical("a rank on another host does not answer: the engine core exits")
            os._exit(1)

    @classmethod
    def start(cls, model: str, load_format: str, config: EngineConfig) -> TensorParallelWorkers:
        """Start the local workers and join the group as rank 0."""
        from pagedserve.parallel.distributed import Rendezvous, TensorParallelGroup

        world = config.tensor_parallel_size
        env = os.environ
        if "MASTER_ADDR" in env:
            addr, port = env["MASTER_ADDR"], int(env.get("MASTER_PORT", "29500"))
            local = int(env.get("LOCAL_WORLD_SIZE", world))
        else:
            addr, port, local = "127.0.0.1", _free_port(), world
        context = multiprocessing.get_context("spawn")
        processes = []
        for rank in range(1, min(local, world)):
            spec = WorkerSpec(model, load_format, config.device, world, rank, addr, port, rank,
                              os.getpid(), logging.getLogger().getEffectiveLevel())
            process = context.Process(target=_worker_process, args=(spec,), daemon=True,
                                      name=f"pagedserve-tp-rank{rank}")
            process.start()
            processes.append(process)
        logger.info("tensor parallel: %d ranks, %d started here, meeting at %s:%d", world,
                    len(processes), addr, port)
        try:
            group = _join_watching(processes, lambda: TensorParallelGroup(
                Rendezvous(0, world, addr, port), config.device))
            group.broadcast(config)
        except BaseException:
            _stop_processes(processes, 0)
            raise
        return cls(group, processes)

    def collect_reports(self, own_weight_bytes: int) -> None:
        """Every rank's weight bytes, once each has loaded; a worker's load failure is raised
        here, with its reason."""
        reports = self.group.gather_to_leader(own_weight_bytes)
        failures = [f"rank {r}: {report}" for r, report in enumerate(reports)
                    if isinstance(report, str)]
        if failures:
            raise ValueError("tensor_parallel_size: a worker could not load the model: "
                             + "; ".join(failures))
        self.weight_bytes = reports
        logger.info("weights per rank: %s MiB",
                    ", ".join(f"{b / 2**20:.1f}" for b in self.weight_bytes))

    def check(self) -> None:
        """TensorParallelError if a local worker has exited."""
        for process in self.processes:
            if process.exitcode is not None:
                raise TensorParallelError(f"tensor-parallel worker {process.name} (pid "
                                          f"{process.pid}) exited with status "
                                          f"{process.exitcode}")

    def close(self) -> None:
        """Tell the workers to stop, wait for them (killing those that do not), leave. After a
        failed collective a worker may hang, so the survivors are killed without a word."""
        healthy = not self.group.failed and all(p.exitcode is None for p in self.processes)
        if healthy:
            try:
                self.group.broadcast(None)
            except TensorParallelError as exc:  # a worker is gone already
                logger.warning("could not tell every worker to stop: %s", exc)
                healthy = False
        _stop_processes(self.processes, JOIN_TIMEOUT_S if healthy else 0.5)
        if healthy:
            self.group.close()


def _join_watching(processes: list[multiprocessing.Process], join):
    """`join()` (which waits for every rank to arrive) in a thread, while watching the local
    workers: one that exits before the group forms is an error now, not at the timeout."""
    from multiprocessing.connection import wait

    done_read, done_write = os.pipe()
    result: list = []

    def run() -> None:
        try:
            result.append(join())
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            result.append(exc)
        os.write(done_write, b"x")

    threading.Thread(target=run, name="tp-rendezvous", daemon=True).start()
    try:
        ready = wait([done_read, *(p.sentinel for p in processes)])
    finally:
        if done_read not in ready:  # the thread still waits for the store: let it time out
            os.close(done_read)
    if done_read not in ready:
        dead = [p for p in processes if p.sentinel in ready]
        for p in dead:
            p.join(5)  # its sentinel closes as it exits: reap it for its status
        raise TensorParallelError("tensor_parallel_size: worker "
                                  + ", ".join(f"{p.name} exited with status {p.exitcode}"
                                              for p in dead) + " before the group formed")
    os.close(done_read)
    os.close(done_write)
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


def _stop_processes(processes: list[multiprocessing.Process], timeout: float) -> None:
    for process in processes:
        process.join(timeout)
        if process.exitcode is None:
            logger.warning("worker %s did not stop: killing it", process.name)
            process.kill()
            process.join(5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _exit_with_parent(pid: int) -> None:
    """A thread that ends this process when `pid` is gone (the engine core died)."""
    import select

    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        return

    def watch() -> None:
        select.select([fd], [], [])
        logging.getLogger(__name__).error("the engine core (pid %d) is gone: worker exits", pid)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _worker_process(spec: WorkerSpec) -> None:
    sys.exit(run_worker(spec))


def run_worker(spec: WorkerSpec) -> int:
    """A worker's life: join, load its shard, report, follow rank 0's plans until told to
    stop. Returns the exit status."""
    logging.basicConfig(level=spec.log_level, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s rank{spec.rank} %(name)s: "
                        "%(message)s", datefmt="%H:%M:%S")
    if spec.parent_pid is not None:
        _exit_with_parent(spec.parent_pid)
    from pagedserve.loader import load_model
    from pagedserve.parallel.distributed import Rendezvous, TensorParallelGroup
    from pagedserve.worker.model_runner import ModelRunner

    group = TensorParallelGroup(
        Rendezvous(spec.rank, spec.world_size, spec.master_addr, spec.master_port,
                   spec.local_rank), spec.device)
    try:
        config: EngineConfig = group.broadcast()
    except TensorParallelError as exc:
        logger.error("rank %d: rank 0 is gone before the start: %s", spec.rank, exc)
        return 1
    runner = None
    try:
        loaded = load_model(spec.model, load_format=spec.load_format, dtype=config.dtype,
                            device=str(group.device), shard=group.shard)
        runner = ModelRunner(loaded.config, loaded.weights, config, consume_weights=True,
                             tp=group)
        report: int | str = runner.model.weight_bytes()
    except Exception as exc:  # noqa: BLE001 - reported to rank 0, which raises it
        logger.exception("rank %d could not load the model", spec.rank)
        report = f"{type(exc).__name__}: {exc}"
    group.gather_to_leader(report)
    if runner is None:
        return 1
    try:
        while (plan := group.broadcast()) is not None:
            runner.follow(plan)
    except TensorParallelError as exc:
        logger.error("rank %d stops: %s", spec.rank, exc)
        return 1
    group.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """A worker on another host: ``python -m pagedserve.engine.workers MODEL
    --tensor-parallel-size N [--device cuda]``, with RANK, MASTER_ADDR and MASTER_PORT (and
    LOCAL_RANK on CUDA) in the environment; the other engine settings come from rank 0."""
    from pagedserve.parallel.distributed import Rendezvous

    parser = argparse.ArgumentParser(prog="python -m pagedserve.engine.workers")
    parser.add_argument("model", help="the model's path on this host")
    parser.add_argument("--load-format", default="auto")
    parser.add_argument("--tensor-parallel-size", type=int, required=True, metavar="N")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    place = Rendezvous.from_env(args.tensor_parallel_size)
    spec = WorkerSpec(args.model, args.load_format, args.device, place.world_size, place.rank,
                      place.master_addr, place.master_port, place.local_rank, None)
    return run_worker(spec)


if __name__ == "__main__":
    sys.exit(main())
