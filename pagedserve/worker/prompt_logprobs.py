"""The logprobs of a prompt's own tokens (``SamplingParams.prompt_logprobs``), computed in prefill.

The final hidden state at position p predicts token p + 1, so the rows of a prefill chunk
that a plain step throws away (only the last one samples) give the prompt's logprobs::

    chunk positions   [lo .............................. hi)
    rows wanted       [max(lo, next - 1) ...... min(hi, n - 1))     n = prompt length
    their targets      prompt tokens [row + 1]

``next`` is the first prompt token whose logprob has not been sent (``Request.
prompt_logprobs_next``, from 1: the first token is predicted by nothing), so a prompt split over
several steps (chunked prefill) yields its logprobs in pieces, and a request recomputed after
preemption does not send any twice. Prefix-cache hits are not taken while a request still owes
prompt logprobs (the scheduler's rule, as vLLM's): a cached block has K and V, not the hidden
states these rows need.

The LM head runs on those rows in blocks of at most :data:`BLOCK_ELEMENTS` logits, so a long
prompt never holds its whole (rows, vocabulary) matrix at once: per block, float32 logits ->
log_softmax -> the target's logprob, its rank, and the top k. Always with the dense LM head
(``small_step=False``), whatever the number of rows, so that a logprob does not depend on how
the prompt was cut into steps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from pagedserve.core.request import Request
from pagedserve.worker.step_inputs import StepChunk

# logits computed at once: 64 MiB of float32 (341 rows of a 49k vocabulary, 111 of 151k)
BLOCK_ELEMENTS = 1 << 24


@dataclass(slots=True)
class PromptLogprobs:
    """Logprobs of prompt tokens [start, start + len(logprobs)) under the raw distribution."""

    start: int
    logprobs: list[float] = field(default_factory=list)
    ranks: list[int] = field(default_factory=list)  # 1 + how many tokens are more likely
    top_ids: list[list[int]] = field(default_factory=list)  # the k most likely, best first
    top_logprobs: list[list[float]] = field(default_factory=list)

    @property
    def end(self) -> int:
        return self.start + len(self.logprobs)

    def extend(self, later: PromptLogprobs) -> None:
        """Append the piece that follows (a chunk cut in two attends as two pieces)."""
        if later.start != self.end:
            raise ValueError(f"prompt logprobs of tokens from {later.start} cannot follow "
                             f"those up to {self.end}")
        self.logprobs += later.logprobs
        self.ranks += later.ranks
        self.top_ids += later.top_ids
        self.top_logprobs += later.top_logprobs


LMHead = Callable[[torch.Tensor], torch.Tensor]  # hidden (N, H) -> logits (N, V) float32


def collect(lm_head: LMHead, vocab_size: int, hidden: torch.Tensor,
            chunks: Sequence[StepChunk], requests: Sequence[Request],
            into: dict[str, PromptLogprobs]) -> None:
    """Add to ``into`` the prompt logprobs owed by the chunks of one forward pass.

    ``hidden`` (T, H) holds the pass's rows, chunk after chunk in order (then padding);
    ``requests[i]`` owns ``chunks[i]``.
    """
    row = 0
    for chunk, request in zip(chunks, requests, strict=True):
        lo, n = chunk.start, len(chunk.token_ids)
        num_top = request.params.prompt_logprobs
        if num_top is not None:
            first = max(lo, request.prompt_logprobs_next - 1)
            last = min(lo + n, request.num_prompt_tokens - 1)
            if first < last:
                targets = request.prompt_token_ids[first + 1 : last + 1]
                piece = compute(lm_head, hidden[row + first - lo : row + last - lo], targets,
                                num_top, first + 1, vocab_size)
                earlier = into.get(request.request_id)
                if earlier is None:
                    into[request.request_id] = piece
                else:
                    earlier.extend(piece)
        row += n


@torch.inference_mode()
def compute(lm_head: LMHead, hidden: torch.Tensor, targets: list[int], num_top: int,
            start: int, vocab_size: int) -> PromptLogprobs:
    """The logprobs of ``targets`` (R,) under the rows of ``hidden`` (R, H) that predict them,
    their ranks and the ``num_top`` best alternatives, block by block; prompt token index of
    the first target: ``start``."""
    out = PromptLogprobs(start)
    target = torch.tensor(targets, dtype=torch.long).to(hidden.device, non_blocking=True)
    k = min(num_top, vocab_size)
    block = max(1, BLOCK_ELEMENTS // vocab_size)
    for a in range(0, hidden.shape[0], block):
        logprobs = lm_head(hidden[a : a + block]).float().log_softmax(dim=-1)  # (r, V)
        r = logprobs.shape[0]
        chosen = logprobs.gather(1, target[a : a + r].unsqueeze(1))  # (r, 1)
        ranks = (logprobs > chosen).sum(dim=-1)  # (r,) tokens more likely than the target
        top_values, top_ids = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0],) * 2
        # one copy to the host: ids and ranks are exact in float64
        values = torch.cat([chosen.squeeze(1).double(), ranks.double(),
                            top_values.double().reshape(-1),
                            top_ids.double().reshape(-1)]).cpu().tolist()
        tops, ids = values[2 * r : 2 * r + r * k], values[2 * r + r * k :]
        out.logprobs += values[:r]
        out.ranks += [int(x) + 1 for x in values[r : 2 * r]]
        out.top_logprobs += [tops[i * k : (i + 1) * k] for i in range(r)]
        out.top_ids += [[int(t) for t in ids[i * k : (i + 1) * k]] for i in range(r)]
    return out
