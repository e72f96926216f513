"""Penalties and ``min_tokens`` on raw logits, for every row of a batch at once.

Repetition divides a positive logit by the penalty and multiplies a negative one, then
``frequency * count + presence * (count > 0)`` is subtracted (llama.cpp's order; vLLM's too).
Stop and EOS tokens sit at -inf while a request has produced fewer than ``min_tokens``.

Which tokens count (``SamplingParams.repeat_last_n``):

    None    repetition: prompt + output; presence, frequency: output   (vLLM, OpenAI)
    N > 0   all three: the last N tokens of prompt + output             (llama.cpp's
            penalty_last_n; Ollama feeds it the prompt too, and its repeat_last_n is 64)
    0       no penalties

Python gathers each penalized row's window into one padded tensor; the counting and the
penalizing are tensor ops on the logits' device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagedserve.core.request import Request
from pagedserve.device import on_device
from pagedserve.sampling_params import SamplingParams

_NEG_INF = float("-inf")


def penalized(raw: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    """The logits after penalties and min_tokens; ``raw`` itself when no row has either."""
    V = raw.shape[1]
    windows = _penalty_windows(requests)
    suppressed = [i * V + t for i, r in enumerate(requests)
                  if r.num_output_tokens < r.params.min_tokens
                  for t in _stop_ids(r) if t < V]
    if not windows and not suppressed:
        return raw
    logits = raw.clone(memory_format=torch.contiguous_format)
    if windows:
        _apply_penalties(logits, windows)
    if suppressed:
        logits.view(-1).index_fill_(0, on_device(suppressed, torch.long, raw.device), _NEG_INF)
    return logits


@dataclass(slots=True)
class _Window:
    row: int
    tokens: list[int]  # what the repetition penalty reads
    counted_from: int  # tokens[counted_from:] are what presence and frequency count
    params: SamplingParams


def _penalty_windows(requests: list[Request]) -> list[_Window]:
    windows = []
    for i, r in enumerate(requests):
        p = r.params
        repetition = p.repetition_penalty != 1.0
        additive = bool(p.presence_penalty or p.frequency_penalty)
        if not (repetition or additive) or p.repeat_last_n == 0:
            continue
        if p.repeat_last_n is not None:
            tokens, counted_from = r.all_token_ids[-p.repeat_last_n:], 0
        elif repetition:
            tokens = r.all_token_ids
            counted_from = len(tokens) - r.num_output_tokens
        else:
            tokens, counted_from = r.output_token_ids, 0
        if tokens:
            windows.append(_Window(i, tokens, counted_from, p))
    return windows


def _apply_penalties(logits: torch.Tensor, windows: list[_Window]) -> None:
    """Penalize each window's tokens in place, all rows at once.

    Windows are padded to one width with copies of their first token: every occurrence of a
    token id in a row computes the same new value, so writing them all back is well defined.

        ids      (P, L)   window tokens, padded
        counted  (P, L)   True where presence/frequency count the position (not padding)
        count    (P, L)   occurrences of ids[p, j] among the counted positions of row p
    """
    V = logits.shape[1]
    device = logits.device
    width = max(len(w.tokens) for w in windows)
    flat: list[int] = []
    for w in windows:
        flat += w.tokens
        flat += [w.tokens[0]] * (width - len(w.tokens))
    ids = on_device(flat, torch.long, device).view(len(windows), width)
    ints = on_device([[w.row, w.counted_from, len(w.tokens)] for w in windows], torch.long,
                     device)
    floats = on_device([[w.params.repetition_penalty, w.params.presence_penalty,
                         w.params.frequency_penalty] for w in windows], torch.float32, device)
    position = torch.arange(width, device=device).unsqueeze(0)
    counted = (position >= ints[:, 1:2]) & (position < ints[:, 2:3])
    ordered = ids.masked_fill(~counted, V).sort(dim=-1).values  # V sorts after every token
    count = (torch.searchsorted(ordered, ids, right=True) - torch.searchsorted(ordered, ids))
    where = ints[:, 0:1] * V + ids  # flat index into logits
    values = logits.view(-1)[where]
    repetition = floats[:, 0:1]
    values = torch.where(values > 0, values / repetition, values * repetition)
    values -= floats[:, 2:3] * count + floats[:, 1:2] * (count > 0)
    logits.view(-1)[where] = values


def _stop_ids(r: Request) -> set[int]:
    stops = set(r.params.stop_token_ids)
    if not r.params.ignore_eos:
        stops |= r.eos_token_ids
    return stops
