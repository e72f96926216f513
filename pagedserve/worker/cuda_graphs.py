"""CUDA graphs for decode steps: one graph per batch-size bucket, replayed with padded rows.

A decode step launches ~10 kernels per layer from Python; replaying a captured graph launches
them all at once. A graph is frozen at the shapes it was captured with, so decode steps are
grouped into buckets::

    sizes   1, 2, 4, 8, 16, 24, 32, ... (every 8) ..., max_num_seqs (always included)
    step    n decodes -> the smallest size b >= n; rows [n, b) are padding

Padding rows are the ones :class:`~pagedserve.worker.step_inputs.StepInputs` writes for ``pad_to``:
slot -1 (no KV written), seq_len 0 (no KV read, output 0); their hidden states are dropped.
Prefill and mixed steps, and decode batches above the largest size, run eagerly.

Invariants the capture relies on:

- every graph reads the runner's persistent step inputs, KV caches and weights, whose addresses
  never change, and writes its hidden states into its own output tensor;
- the attention backend reads only device tensors and per-bucket constants (batch size, split
  count chosen for ``max_model_len``), never a step's lengths from the host;
- graphs are captured largest first into one shared memory pool: they run one at a time, so
  the smaller ones reuse the largest one's scratch memory.

Capture is bounded by :data:`CAPTURE_BUDGET_S`; sizes not captured in time fall to the next
larger captured size.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable

import torch

from pagedserve.worker.step_inputs import StepBatch

logger = logging.getLogger(__name__)

CAPTURE_BUDGET_S = 120.0
BUCKET_STEP = 8


def graph_batch_sizes(max_num_seqs: int, step: int = BUCKET_STEP) -> list[int]:
    """Powers of two under `step` (1, 2, 4), then every `step` up to `max_num_seqs`, which is
    always the last size."""
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
    powers = [1 << i for i in range(step.bit_length()) if 1 << i < step]
    sizes = [s for s in powers + list(range(step, max_num_seqs + 1, step)) if s <= max_num_seqs]
    if not sizes or sizes[-1] != max_num_seqs:
        sizes.append(max_num_seqs)
    return sizes


def pick_bucket(n: int, sizes: list[int]) -> int | None:
    """The smallest size >= n (sizes ascending), or None when n is above them all."""
    i = bisect.bisect_left(sizes, n)
    return sizes[i] if i < len(sizes) else None


class DecodeGraphs:
    """Captured decode graphs by batch size; ``replay(b)`` returns that graph's hidden states
    (b, hidden_size), computed from whatever the step inputs hold for rows [0, b)."""

    def __init__(self) -> None:
        self.sizes: list[int] = []  # captured, ascending
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.capture_seconds = 0.0

    def bucket_for(self, n: int) -> int | None:
        return pick_bucket(n, self.sizes)

    @torch.inference_mode()
    def capture(self, sizes: list[int], pad_inputs: Callable[[int], StepBatch],
                forward: Callable[[StepBatch], torch.Tensor],
                budget_s: float = CAPTURE_BUDGET_S) -> None:
        """`pad_inputs(b)` fills the step inputs with b padding rows (host work and the copy,
        outside the capture); `forward(batch)` runs the model on them (captured)."""
        pool = torch.cuda.graph_pool_handle()
        start = time.perf_counter()
        for b in sorted(sizes, reverse=True):
            if time.perf_counter() - start > budget_s:
                logger.warning("CUDA graph capture passed its %.0f s budget; batches under %d "
                               "pad up to a larger size", budget_s, b + 1)
                break
            batch = pad_inputs(b)
            forward(batch)  # warm-up: compiles kernels, settles the allocator
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = forward(batch)
            self._graphs[b] = (graph, out)
        torch.cuda.synchronize()
        self.sizes = sorted(self._graphs)
        self.capture_seconds = time.perf_counter() - start
        if self.sizes:
            logger.info("captured %d decode CUDA graphs (batch sizes %d..%d) in %.1f s",
                        len(self.sizes), self.sizes[0], self.sizes[-1], self.capture_seconds)

    def replay(self, b: int, batch: StepBatch) -> torch.Tensor:
        """`batch`: the step, already in the inputs the graph reads (padded to b rows)."""
        graph, out = self._graphs[b]
        graph.replay()
        return out
