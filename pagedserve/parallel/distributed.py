"""The tensor-parallel process group: who the ranks are, and the collectives the model needs.

Two groups over the same ranks, as vLLM keeps a CPU group beside the device group:

- the **compute** group runs the model's collectives: an all-reduce after each row-parallel
  matmul (o_proj, down_proj), one after the vocab-parallel embedding, an all-gather of the
  LM head's logits. Backend ``nccl`` on CUDA (device ``cuda:LOCAL_RANK``), ``gloo`` on a CPU;
  its timeout (``PAGEDSERVE_TP_TIMEOUT``, seconds) bounds how long a rank waits for a peer
  that hangs inside a step: then the collective raises and the engine core fails.
- the **control** group (gloo, always: it moves pickled host objects) carries rank 0's step
  plans to the workers, who wait there between steps for as long as the server is idle: its
  timeout is long. A peer that dies closes its sockets, so a rank waiting on it in either
  group gets an error at once (measured: ~30 ms on loopback), not at the timeout.

A gloo broadcast's root waits until every receiver is ready, whatever the timeout, so a worker
that hangs (stopped, deadlocked) would hold rank 0 in the plan's broadcast for ever. Rank 0
therefore times its own blocking calls with a watchdog thread: past the collective timeout it
calls ``on_hang`` (engine/workers.py kills the local workers, which turns the wait into an
error), the same bound the compute group's timeout gives.

The ranks meet torchrun's way: ``MASTER_ADDR``/``MASTER_PORT`` (rank 0's store), ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` (:class:`Rendezvous`), so that ranks on other hosts start
exactly as torchrun or a Kubernetes LeaderWorkerSet would start them.

Collectives are timed (:attr:`TensorParallelGroup.collective_seconds`): on a CPU they are
synchronous, so the wall time is their cost, waiting for the slowest rank included.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from pagedserve.errors import TensorParallelError
from pagedserve.parallel.tensor_shard import TensorShard

logger = logging.getLogger(__name__)

__all__ = ["Rendezvous", "TensorParallelError", "TensorParallelGroup"]

DEFAULT_TIMEOUT_S = 120.0  # a collective waits this long for a peer inside a step
IDLE_TIMEOUT = datetime.timedelta(days=365)  # workers wait for the next step without limit


@dataclass(slots=True)
class Rendezvous:
    """Where and as whom a rank joins the group (torchrun's environment variables)."""

    rank: int
    world_size: int
    master_addr: str
    master_port: int
    local_rank: int = 0

    @classmethod
    def from_env(cls, world_size: int) -> Rendezvous:
        """This process's place from RANK, WORLD_SIZE (must agree with `world_size`),
        LOCAL_RANK, MASTER_ADDR and MASTER_PORT."""
        env = os.environ
        missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in env]
        if missing:
            raise ValueError(f"tensor_parallel_size: a worker needs {', '.join(missing)} in "
                             "its environment (torchrun's variables)")
        if int(env.get("WORLD_SIZE", world_size)) != world_size:
            raise ValueError(f"tensor_parallel_size {world_size} disagrees with WORLD_SIZE "
                             f"{env['WORLD_SIZE']}")
        return cls(int(env["RANK"]), world_size, env["MASTER_ADDR"], int(env["MASTER_PORT"]),
                   int(env.get("LOCAL_RANK", env["RANK"])))


def collective_timeout() -> datetime.timedelta:
    return datetime.timedelta(seconds=float(os.environ.get("PAGEDSERVE_TP_TIMEOUT",
                                                           DEFAULT_TIMEOUT_S)))


class TensorParallelGroup:
    """This process's rank in the group, and the collectives the sharded model calls."""

    def __init__(self, rendezvous: Rendezvous, device: str) -> None:
        self.rank, self.world_size = rendezvous.rank, rendezvous.world_size
        self.shard = TensorShard(self.rank, self.world_size)
        if device.startswith("cuda"):
            backend = "nccl"
            self.device = torch.device("cuda", rendezvous.local_rank)
            torch.cuda.set_device(self.device)
        else:
            backend, self.device = "gloo", torch.device(device)
        self.backend = backend
        url = f"tcp://{rendezvous.master_addr}:{rendezvous.master_port}"
        dist.init_process_group(backend, init_method=url, rank=self.rank,
                                world_size=self.world_size, timeout=collective_timeout())
        self.control = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
        self.failed = False  # a collective failed: the group cannot be trusted to stop cleanly
        # rank 0: called (from the watchdog's thread) when one of its calls outlives the timeout
        self.on_hang: Callable[[float], None] | None = None
        self._timeout_s = collective_timeout().total_seconds()
        self._waiting_since: float | None = None
        if self.is_leader:
            threading.Thread(target=self._watch, name="tp-watchdog", daemon=True).start()
        self.collective_seconds = 0.0  # time inside the compute group's collectives
        self.num_collectives = 0
        logger.info("rank %d of %d joined the tensor-parallel group at %s (%s)", self.rank,
                    self.world_size, url, backend)

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def _watch(self) -> None:
        period = min(1.0, self._timeout_s / 4)
        while True:
            time.sleep(period)
            since = self._waiting_since
            if since is not None and time.monotonic() - since > self._timeout_s:
                self._waiting_since = None
                waited = time.monotonic() - since
                logger.error("rank 0 waited %.0f s for the other ranks inside a step", waited)
                if self.on_hang is not None:
                    self.on_hang(waited)

    @contextlib.contextmanager
    def _waiting(self):
        """Rank 0's blocking calls, seen by the watchdog (workers wait idle without limit)."""
        if not self.is_leader:
            yield
            return
        self._waiting_since = time.monotonic()
        try:
            yield
        finally:
            self._waiting_since = None

    # -- the model's collectives -------------------------------------------------------------
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the ranks, in place (the partial outputs of a row-parallel matmul)."""
        start = time.perf_counter()
        try:
            with self._waiting():
                dist.all_reduce(x)
        except (RuntimeError, dist.DistBackendError) as exc:
            self.failed = True
            raise TensorParallelError(f"all-reduce across {self.world_size} ranks failed: "
                                      f"{exc}") from exc
        self.collective_seconds += time.perf_counter() - start
        self.num_collectives += 1
        return x

    def gather_vocab(self, logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """(N, V/world) logits of each rank's vocabulary rows -> (N, V) on every rank."""
        per = self.shard.vocab_per_rank(vocab_size)
        if logits.shape[-1] < per:  # the last rank's rows may be fewer: equal sizes to gather
            logits = torch.nn.functional.pad(logits, (0, per - logits.shape[-1]))
        parts = [torch.empty_like(logits) for _ in range(self.world_size)]
        start = time.perf_counter()
        try:
            with self._waiting():
                dist.all_gather(parts, logits.contiguous())
        except (RuntimeError, dist.DistBackendError) as exc:
            self.failed = True
            raise TensorParallelError(f"gathering logits across {self.world_size} ranks "
                                      f"failed: {exc}") from exc
        self.collective_seconds += time.perf_counter() - start
        self.num_collectives += 1
        return torch.cat(parts, dim=-1)[..., :vocab_size]

    # -- rank 0 -> workers ---------------------------------------------------------------------
    def broadcast(self, message: Any = None) -> Any:
        """Rank 0 sends `message` to every worker; a worker receives (and returns) it."""
        box = [message]
        try:
            with self._waiting():
                dist.broadcast_object_list(box, src=0, group=self.control)
        except (RuntimeError, dist.DistBackendError) as exc:
            self.failed = True
            raise TensorParallelError(f"rank {self.rank}: the control group failed: "
                                      f"{exc}") from exc
        return box[0]

    def gather_to_leader(self, value: Any) -> list[Any] | None:
        """Every rank's `value`, in rank order, on rank 0 (None elsewhere)."""
        out = [None] * self.world_size if self.is_leader else None
        try:
            dist.gather_object(value, out, dst=0, group=self.control)
        except (RuntimeError, dist.DistBackendError) as exc:
            self.failed = True
            raise TensorParallelError(f"rank {self.rank}: the control group failed: "
                                      f"{exc}") from exc
        return out

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
