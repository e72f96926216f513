"""The token bitmask of one sampling step: constrained rows masked, the others untouched.

The sampler asks ``GrammarBatch.of(requests)`` (None when no row is constrained, the usual
case, at the cost of one pass over the requests) and hands the logits to :meth:`apply`.
llguidance fills the mask on the host, one int32 word per 32 tokens, several rows in parallel;
on CPU numpy expands it in place (``unpackbits``, one thread), on another device the mask
travels there (pinned and non-blocking on CUDA) and is expanded there:

    words    (C, W)      int32, W = ceil(V' / 32); bit j of word w: token 32 w + j allowed
    bytes    (C, 4 W)    the same memory as uint8 (little-endian: byte k of word w holds
                         tokens 32 w + 8 k ... + 7)
    allowed  (C, 32 W)   _BITS[bytes] -> bool, cut to the logits' V

Rows not allowed get -inf; the unconstrained rows of the batch are not touched, so they
sample exactly as they would without constrained neighbours.

Each row's mask is timed and reported to its :class:`GrammarState` (which ends a request over
its budget). Rows filled in parallel share one time; when that is over the budget they are
all suspects, and suspects are filled one by one (and timed alone) until cleared.
"""

from __future__ import annotations

import functools
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pagedserve.core.request import Request
from pagedserve.device import on_device

if TYPE_CHECKING:
    from pagedserve.structured.state import GrammarState

_NEG_INF = float("-inf")
PARALLEL_ROWS = 8  # from this many constrained rows on, fill them in llguidance's threads
_BITS: dict[torch.device, torch.Tensor] = {}  # (256, 8) bool: bit b of byte value x
_executor: Any = None  # llguidance.LLExecutor: fills the rows of a batch in parallel
assert sys.byteorder == "little", "the bitmask is read as little-endian bytes"


@dataclass(slots=True)
class GrammarBatch:
    rows: list[int]  # indices into the batch of the constrained requests
    states: list[GrammarState]
    vocab_size: int  # bitmask width in tokens (the compiler's)

    @classmethod
    def of(cls, requests: list[Request]) -> GrammarBatch | None:
        rows, states = [], []
        for i, r in enumerate(requests):
            if r.grammar is not None:
                rows.append(i)
                states.append(r.grammar)
        if not rows:
            return None
        return cls(rows, states, requests[rows[0]].grammar.vocab_size)

    def fill(self) -> torch.Tensor:
        """(C, W) int32 on the host: each constrained row's allowed tokens."""
        words = -(-self.vocab_size // 32)
        mask = torch.empty(len(self.rows), words, dtype=torch.int32,
                           pin_memory=_pinned())
        row_bytes = words * 4
        # llguidance writes each row straight into the tensor's memory (it checks the size)
        together = {i for i, s in enumerate(self.states) if not s.suspect}
        if len(together) < PARALLEL_ROWS:
            together = set()
        else:
            start = time.perf_counter()
            _llg_executor().unsafe_compute_mask_ptr(
                [(self.states[i].matcher, i) for i in sorted(together)], mask.data_ptr(),
                row_bytes, len(self.states))
            seconds = time.perf_counter() - start
            for i in together:
                self.states[i].after_mask(seconds, shared=True)
        for i, state in enumerate(self.states):
            if i not in together:
                start = time.perf_counter()
                state.matcher.unsafe_compute_mask_ptr(mask.data_ptr() + i * row_bytes,
                                                      row_bytes)
                state.after_mask(time.perf_counter() - start, shared=False)
        return mask

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Mask ``logits`` (B, V) in place on its device; returns it."""
        words = self.fill()
        if logits.device.type == "cpu" and logits.dtype == torch.float32 \
                and logits.is_contiguous():
            _apply_on_host(logits, words, self.rows)
        else:
            _apply_on_device(logits, words, self.rows)
        return logits


def _apply_on_host(logits: torch.Tensor, words: torch.Tensor, rows: list[int]) -> None:
    """numpy, one thread: on a CPU busy with the model's threads, torch's parallel kernels
    wait for each other longer than this work takes."""
    V = logits.shape[1]
    allowed = np.unpackbits(words.numpy().view(np.uint8), axis=1, count=V,
                            bitorder="little")  # (C, V) 0 or 1
    values = logits.numpy()
    for j, row in enumerate(rows):
        np.copyto(values[row], _NEG_INF, where=allowed[j] == 0)


def _apply_on_device(logits: torch.Tensor, words: torch.Tensor, rows: list[int]) -> None:
    V = logits.shape[1]
    device = logits.device
    words = words.to(device, non_blocking=True)
    allowed = _bits(device)[words.view(torch.uint8).long()]  # (C, 4 W, 8)
    allowed = allowed.view(len(rows), -1)[:, :V]  # (C, V)
    if len(rows) == logits.shape[0]:
        logits.masked_fill_(~allowed, _NEG_INF)
        return
    index = on_device(rows, torch.long, device)
    logits.index_copy_(0, index, logits.index_select(0, index).masked_fill_(~allowed, _NEG_INF))


def _bits(device: torch.device) -> torch.Tensor:
    table = _BITS.get(device)
    if table is None:
        values = torch.arange(256, device=device).unsqueeze(1)
        table = (values >> torch.arange(8, device=device)) & 1 == 1
        _BITS[device] = table
    return table


@functools.cache
def _pinned() -> bool:
    return torch.cuda.is_available()


def _llg_executor() -> Any:
    global _executor
    if _executor is None:
        import llguidance

        _executor = llguidance.LLExecutor()
    return _executor
