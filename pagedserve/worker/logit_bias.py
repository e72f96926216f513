"""OpenAI's ``logit_bias``: a per-request bias added to chosen tokens' logits before sampling.

A request brings at most a few hundred (token id, bias) pairs (``SamplingParams.logit_bias``), so
the biases of a batch are one sparse scatter-add into the flattened logits::

    logits.view(-1)[row * V + token] += bias        for every (row, token, bias) of the step

Applied first, before penalties and the grammar's mask (vLLM's order). The caller's raw logits
are never written: logprobs are those of the raw distribution, as vLLM's are by default.
"""

from __future__ import annotations

import torch

from pagedserve.core.request import Request


def with_logit_bias(raw: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    """The logits (B, V) with each row's biases added; ``raw`` itself when no row has one."""
    V = raw.shape[1]
    flat_index: list[int] = []
    biases: list[float] = []
    for row, r in enumerate(requests):
        for token, bias in (r.params.logit_bias or {}).items():
            if token < V:  # the input processor checked the ids against the vocabulary
                flat_index.append(row * V + token)
                biases.append(bias)
    if not flat_index:
        return raw
    device = raw.device
    index = torch.tensor(flat_index, dtype=torch.long).to(device, non_blocking=True)
    values = torch.tensor(biases, dtype=raw.dtype).to(device, non_blocking=True)
    logits = raw.clone(memory_format=torch.contiguous_format)
    logits.view(-1).index_add_(0, index, values)
    return logits
