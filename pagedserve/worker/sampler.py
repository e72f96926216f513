"""Turns a batch of logits into next tokens, each row with its own sampling parameters.

Everything runs on the logits' device as batched tensor ops; Python only reads the requests'
parameters into a few small per-step tensors. One small copy brings the sampled ids (and the
logprobs asked for) to the host: pinned memory and ``non_blocking`` on CUDA.

Order of operations (vLLM's and transformers'):

1. ``logit_bias`` (:mod:`pagedserve.worker.logit_bias`), penalties and ``min_tokens`` on the raw
   logits (:mod:`pagedserve.worker.penalties`), then the grammar's token bitmask on constrained rows
   (:mod:`pagedserve.structured.bitmask`);
2. temperature below :data:`GREEDY_EPSILON`: argmax (vLLM's epsilon; a tinier divisor would turn
   logits into inf);
3. otherwise logits / temperature, then top-k (every token tied with the k-th is kept), top-p on
   what is left (a token goes when the mass before it reaches ``top_p``), min-p (a token goes
   when its probability is below ``min_p`` times the top one's), and a draw;
4. logprobs (of the sampled token and the top N) come from the raw distribution, before 1.

The draw is the Gumbel-max trick: ``argmax(logits / T + g)`` with one Gumbel(0, 1) variate per
(row, token) is a draw from ``softmax(logits / T)``. The variates are not taken from a stateful
generator but hashed from (row key, token id) with integer tensor ops (products of operands below
2**31, so int64 never overflows), which gives the same numbers on CPU and CUDA. A seeded request's
row key is a function of (seed, output index): its tokens do not depend on batch companions, and
after preemption the recomputed steps draw exactly the same. An unseeded row's key comes from the
sampler's own ``random.Random(seed)``: seeded from the OS unless the engine was given a seed (as
Ollama and vLLM do, answers vary from run to run), and then a whole offline run repeats.
Keyed by token id, a variate is the same whichever candidates survive the filters.

Where the filters act, only the candidates are worked on:

    rows with top_k (k < V):       topk(max k + 1) -> the k kept, ties too -> top-p, min-p, draw
    rows with top_p < 1, no top_k: the best 256 -> top-p -> min-p, draw
    rows with neither:             the whole vocabulary in place, min-p as a logit threshold

so the Gumbel variates (the costly part on CPU) are computed for the candidates, not the
vocabulary. Candidates are ordered by (logit descending, token id ascending) whatever order topk
returns ties in, so that ties cannot make a row's result depend on its companions.

Candidates can fall short: ties of the k-th logit beyond topk(k + 1), a nucleus wider than 256
tokens. Such rows are flagged, the flags travel in the one copy, and only then are those rows
(rarely any) drawn again exactly with the same keys: 4096 candidates, then a full sort. A usual
step reads nothing back from the device before its one copy.

Non-finite logits never crash and never yield an id outside [0, V): NaN counts as -inf (a row
of nothing but NaN or -inf yields some id), +inf as the largest finite float. Gumbel variates have
23 bits of resolution: a token more than ~19 nats below the best can never be drawn (probability
below ~1e-8 of the best's).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pagedserve.core.request import Request
from pagedserve.device import on_device
from pagedserve.sampling_params import SamplingParams
from pagedserve.structured.bitmask import GrammarBatch
from pagedserve.worker.logit_bias import with_logit_bias
from pagedserve.worker.penalties import penalized

GREEDY_EPSILON = 1e-5  # temperatures below this are greedy

_MASK31 = (1 << 31) - 1
_MASK64 = (1 << 64) - 1
# Odd multipliers below 2**31: a product with a 31-bit operand stays below 2**62.
_M1, _M2 = 0x5BD1E995, 0x2C1B3C6D
# Nucleus candidates tried before a full sort (a sort of 49k logits costs ~60x a topk of 256).
_NUCLEUS_WIDTHS = (256, 4096)
_FLOAT_MAX = torch.finfo(torch.float32).max
_NEG_INF = float("-inf")


@dataclass(slots=True)
class SampledToken:
    token_id: int
    logprob: float | None = None  # of the sampled token, under the raw model distribution
    top: list[tuple[int, float]] | None = None  # (token id, logprob) alternatives


# (B, V) float logits -> (values (B,), indices (B,)): each row's largest and its first index
RowsMax = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _torch_rows_max(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    values, indices = logits.max(dim=-1)
    return values, indices


class Sampler:
    def __init__(self, seed: int | None = None, rows_max: RowsMax | None = None):
        """`rows_max`: what takes the greedy rows' maxima (torch.max(dim=-1) by default; the
        CPU kernels' own where they run, see :meth:`use_rows_max`)."""
        self._rng = random.Random(seed)  # row keys of unseeded requests; None: from the OS
        self._token_hashes: dict[tuple[int, torch.device], torch.Tensor] = {}
        self._rows_max: RowsMax = _torch_rows_max
        if rows_max is not None:
            self.use_rows_max(rows_max)

    def use_rows_max(self, rows_max: RowsMax) -> None:
        """Take the greedy rows' maxima with `rows_max` (float32 CPU logits only), as exact as
        torch's: same values, same first index of a tie, NaN where a row holds one."""
        self._rows_max = rows_max

    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> list[SampledToken]:
        """One token per row of ``logits`` (B, V), any float dtype, on any device."""
        return self.launch(logits, requests).result()

    @torch.inference_mode()
    def launch(self, logits: torch.Tensor, requests: list[Request]) -> PendingSample:
        """Sample on the device and start the one copy to the host; nothing here waits for the
        device. The ids stay on the device (``PendingSample.tokens``) for a next step that
        needs them before the host has read them."""
        B, V = logits.shape
        params = [r.params for r in requests]
        raw = logits.float()  # (B, V); the caller's tensor when it is float32 already
        logits = penalized(with_logit_bias(raw, requests), requests)
        grammars = GrammarBatch.of(requests)  # None unless a row is constrained
        if grammars is not None:
            logits = grammars.apply(logits.clone() if logits is raw else logits)
        drawn = [i for i, p in enumerate(params) if p.temperature >= GREEDY_EPSILON]
        numbers = self._row_numbers([requests[i] for i in drawn], V, logits.device)
        # (B,) ids; the greedy maxima (B,) or (0,); flags (S,) of the drawn rows to settle
        tokens, greedy_max, unsettled = self._choose(logits, drawn, numbers, params)

        to_host = [tokens, greedy_max, unsettled]
        wanted = [i for i, p in enumerate(params) if p.logprobs is not None]
        num_top = min(max((params[i].logprobs for i in wanted), default=0), V)
        if wanted:
            to_host += _logprobs(raw, tokens, wanted, num_top)
        return PendingSample(self, tokens, HostCopy(to_host), raw, logits, drawn, numbers,
                             params, wanted, num_top)

    def _choose(self, logits: torch.Tensor, drawn: list[int], numbers: torch.Tensor,
                params: list[SamplingParams]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Token ids (B,): argmax for greedy rows, a draw for the ``drawn`` ones; the row
        maxima (B,) if any row is greedy; flags (S,) of drawn rows to settle after the copy."""
        B = logits.shape[0]
        drawn_params = [params[i] for i in drawn]
        if len(drawn) == B:
            tokens, unsettled = self._draw(logits, numbers, drawn_params, exact=False)
            return tokens, logits[:0, 0], unsettled
        greedy_max, tokens = self._rows_max(logits)
        if not drawn:
            return tokens, greedy_max, tokens[:0]
        rows = on_device(drawn, torch.long, logits.device)
        sampled, unsettled = self._draw(logits.index_select(0, rows), numbers, drawn_params,
                                        exact=False)
        return tokens.index_copy(0, rows, sampled), greedy_max, unsettled

    def _settle(self, token_ids: list[int], rows: list[int], logits: torch.Tensor,
                drawn: list[int], numbers: torch.Tensor, params: list[SamplingParams]) -> None:
        """Redo, exactly, the rare rows whose first answer was not sure: a greedy row with
        NaN, a top-k row with ties beyond its candidates, a nucleus wider than the first
        candidates. Same row keys, so the same answer as if it had been exact at once."""
        position = {i: j for j, i in enumerate(drawn)}
        for i in rows:
            if i not in position:
                token_ids[i] = int(logits[i].nan_to_num(nan=_NEG_INF).argmax())
        redo = [i for i in rows if i in position]
        if redo:
            device = logits.device
            sampled, _ = self._draw(
                logits.index_select(0, torch.tensor(redo, device=device)),
                numbers.index_select(0, torch.tensor([position[i] for i in redo],
                                                     device=device)),
                [params[i] for i in redo], exact=True)
            for i, t in zip(redo, sampled.tolist(), strict=True):
                token_ids[i] = t

    def _row_numbers(self, requests: list[Request], vocab: int, device: torch.device
                     ) -> torch.Tensor:
        """(S, 6) float64 on the device, see :class:`_Rows`; draws the unseeded rows' keys."""
        if not requests:
            return torch.empty(0, 6, dtype=torch.float64)  # unused: every row is greedy
        rows = []
        for r in requests:
            p = r.params
            rows.append([p.temperature, p.top_p if p.top_p < 1 else math.inf,
                         math.log(p.min_p) if p.min_p > 0 else _NEG_INF,
                         min(p.top_k, vocab) if p.top_k > 0 else vocab, *self._row_keys(r)])
        return on_device(rows, torch.float64, device).reshape(-1, 6)

    def _draw(self, logits: torch.Tensor, numbers: torch.Tensor, params: list[SamplingParams],
              exact: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Sampled ids (S,) for rows that are not greedy, grouped by how they filter, and (S,)
        flags of rows whose candidates may have missed a token (never when ``exact``)."""
        S, V = logits.shape
        groups: dict[str, list[int]] = {"top_k": [], "top_p": [], "free": []}
        for i, p in enumerate(params):
            groups["top_k" if 0 < p.top_k < V else "top_p" if p.top_p < 1 else "free"].append(i)
        tokens = unsettled = None
        for name, members in groups.items():
            if not members:
                continue
            whole = len(members) == S
            index = None if whole else on_device(members, torch.long, logits.device)
            group = [params[i] for i in members]
            rows = _Rows(logits if whole else logits.index_select(0, index),
                         numbers if whole else numbers.index_select(0, index),
                         any(p.min_p > 0 for p in group))
            if name == "top_k":
                sampled, doubt = self._draw_top_k(rows, max(p.top_k for p in group), exact)
            elif name == "top_p":
                widths = _NUCLEUS_WIDTHS[1:] if exact else _NUCLEUS_WIDTHS[:1]
                sampled, doubt = self._draw_nucleus(rows.scaled(), rows, widths, exact)
            else:
                sampled = self._draw_free(rows)
                doubt = torch.zeros_like(sampled, dtype=torch.bool)
            if whole:
                return sampled, doubt
            if tokens is None:
                tokens = torch.empty(S, dtype=torch.long, device=logits.device)
                unsettled = torch.empty(S, dtype=torch.bool, device=logits.device)
            tokens.index_copy_(0, index, sampled)
            unsettled.index_copy_(0, index, doubt)
        assert tokens is not None and unsettled is not None
        return tokens, unsettled

    def _draw_free(self, rows: _Rows) -> torch.Tensor:
        """No top-k, no top-p: the whole vocabulary, min-p as a threshold on the logits."""
        scores = rows.scaled()  # (S, V)
        if rows.min_p:
            best = scores.max(dim=-1, keepdim=True).values
            scores.masked_fill_(scores < best + rows.log_min_p, _NEG_INF)
        hashes = self._token_hash_table(scores.shape[1], scores.device).unsqueeze(0)  # (1, V)
        scores.add_(_gumbel(hashes, rows.keys))
        return scores.argmax(dim=-1)

    def _draw_top_k(self, rows: _Rows, k_max: int, exact: bool
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """top_k < V: the k best of each row (with ties), then top-p renormalized over them."""
        values, ids, spilled = _top_k(rows.scaled(), rows.k, k_max, grow=exact)  # (S, C)
        drop = _beyond_nucleus(values.softmax(dim=-1), rows.top_p)
        return self._finish(values.masked_fill_(drop, _NEG_INF), ids, rows), spilled

    def _draw_nucleus(self, scores: torch.Tensor, rows: _Rows, widths: tuple[int, ...],
                      exact: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """top_p < 1 without top_k: the nucleus, found among the best ``widths[0]`` tokens.

        The candidates settle a row when its nucleus ends before the last candidate with a
        value above it: every token the full sort would keep is then among them, in the same
        order. Rows they do not settle are flagged, or when ``exact`` tried with the next
        width and, past the last, a full sort. Decided per row: companions do not matter.
        """
        S, V = scores.shape
        if not widths or widths[0] + 1 >= V:
            values, ids = scores.sort(dim=-1, descending=True, stable=True)
            drop = _beyond_nucleus(values.softmax(dim=-1), rows.top_p)
            tokens = self._finish(values.masked_fill_(drop, _NEG_INF), ids, rows)
            return tokens, torch.zeros(S, dtype=torch.bool, device=scores.device)
        width = widths[0] + 1
        values, ids = _canonical(*scores.topk(width, dim=-1))  # (S, width)
        drop = _beyond_nucleus(scores.softmax(dim=-1).gather(1, ids), rows.top_p)
        kept = width - drop.sum(dim=-1, keepdim=True)  # a prefix of at least one
        unsettled = ~((kept < width) & (values.gather(1, kept - 1) > values[:, -1:])).squeeze(1)
        tokens = self._finish(values.masked_fill_(drop, _NEG_INF), ids, rows)
        if not exact:
            return tokens, unsettled
        if bool(unsettled.any()):
            rest = unsettled.nonzero().squeeze(1)
            again, _ = self._draw_nucleus(scores.index_select(0, rest), rows.select(rest),
                                          widths[1:], exact)
            tokens.index_copy_(0, rest, again)
        return tokens, torch.zeros_like(unsettled)

    def _finish(self, values: torch.Tensor, ids: torch.Tensor, rows: _Rows) -> torch.Tensor:
        """Min-p and the draw over candidates (S, C) sorted best first; their token ids."""
        if rows.min_p:
            values = values.masked_fill_(values < values[:, :1] + rows.log_min_p, _NEG_INF)
        hashes = self._token_hash_table(rows.logits.shape[1], ids.device)[ids]  # (S, C)
        best = values.add_(_gumbel(hashes, rows.keys)).argmax(dim=-1, keepdim=True)
        return ids.gather(1, best).squeeze(1)

    def _row_keys(self, request: Request) -> tuple[int, int]:
        """Two 31-bit hash keys: from (seed, output index) if seeded, else from the stream."""
        seed = request.params.seed
        if seed is None:
            z = self._rng.getrandbits(62)
        else:
            z = _splitmix64(_splitmix64(seed & _MASK64) ^ request.num_output_tokens)
        return z & _MASK31, (z >> 31) & _MASK31

    def _token_hash_table(self, vocab: int, device: torch.device) -> torch.Tensor:
        """(V,) int64: a fixed 31-bit scramble of each token id, the input to the row hash."""
        table = self._token_hashes.get((vocab, device))
        if table is None:
            ids = torch.arange(vocab, dtype=torch.long, device=device)
            table = _mix(_mix(ids, 0x3C6EF372, _M2), 0x1B873593, _M1)
            self._token_hashes[(vocab, device)] = table
        return table


class PendingSample:
    """A step's sampled ids, on the device at once and on the host once the copy has landed.

    ``tokens`` may feed the next step before :meth:`result` reads them. They are final for
    every row but the rare unsure ones (a greedy row with NaN, a top-k or nucleus draw whose
    candidates fell short), which :meth:`result` draws again exactly: :attr:`changed` then
    names the rows whose final id differs from ``tokens``.
    """

    def __init__(self, sampler: Sampler, tokens: torch.Tensor, copy: HostCopy,
                 raw: torch.Tensor, logits: torch.Tensor, drawn: list[int],
                 numbers: torch.Tensor, params: list[SamplingParams], wanted: list[int],
                 num_top: int) -> None:
        self.tokens = tokens  # (B,) int64 on the device
        self.changed: list[int] = []
        self._sampler, self._copy, self._raw, self._logits = sampler, copy, raw, logits
        self._drawn, self._numbers, self._params = drawn, numbers, params
        self._wanted, self._num_top = wanted, num_top

    @torch.inference_mode()
    def result(self) -> list[SampledToken]:
        params, drawn, wanted, num_top = self._params, self._drawn, self._wanted, self._num_top
        host = self._copy.wait()  # the one copy from the device
        token_ids = [int(t) for t in host[0]]
        # a greedy row with NaN, which argmax took for the largest value
        unsure = [i for i, m in enumerate(host[1])
                  if m != m and params[i].temperature < GREEDY_EPSILON]
        unsure += [drawn[j] for j, flag in enumerate(host[2]) if flag]
        if unsure:
            first = list(token_ids)
            self._sampler._settle(token_ids, unsure, self._logits, drawn, self._numbers,
                                  params)
            self.changed = [i for i in unsure if token_ids[i] != first[i]]

        out = [SampledToken(t) for t in token_ids]
        if wanted:
            chosen, top_values, top_ids = host[3], host[4], host[5]
            for j, i in enumerate(wanted):
                n = params[i].logprobs
                out[i].logprob = chosen[j]
                row = slice(j * num_top, j * num_top + min(n, num_top))
                out[i].top = [(int(t), v) for t, v in
                              zip(top_ids[row], top_values[row], strict=True)]
            for i in set(unsure) & set(wanted):
                out[i].logprob = float(self._raw[i].log_softmax(dim=-1)[token_ids[i]])
        self._raw = self._logits = self._numbers = None  # free the step's (B, V) tensors
        return out


class HostCopy:
    """Tensors on their way to the host as flat Python lists, in one device-to-host copy.

    On CUDA they travel packed in one float64 vector (token ids below 2**53 are exact) into
    pinned memory, without waiting: :meth:`wait` waits for that copy alone (an event), not for
    whatever the device was given after it. Integer tensors come back as floats, which callers
    turn into ints. On the CPU there is nothing to wait for.
    """

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        device = tensors[0].device
        self._sizes = [t.numel() for t in tensors]
        self._event = None
        if device.type == "cpu":
            self._lists: list[list] | None = [
                (t if t.dim() == 1 else t.reshape(-1)).tolist() for t in tensors]
            return
        self._lists = None
        packed = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors])
        if device.type == "cuda":
            self._host = torch.empty(packed.shape, dtype=torch.float64, pin_memory=True)
            self._host.copy_(packed, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(device))
        else:
            self._host = packed.cpu()

    def wait(self) -> list[list]:
        if self._lists is None:
            if self._event is not None:
                self._event.synchronize()
            values = self._host.tolist()
            self._lists, start = [], 0
            for size in self._sizes:
                self._lists.append(values[start:start + size])
                start += size
        return self._lists


@dataclass(slots=True)
class _Rows:
    """A group of drawn rows: their logits (S, V) and per-row numbers (S, 6) on the device."""

    logits: torch.Tensor
    numbers: torch.Tensor
    min_p: bool  # whether any row has min_p > 0

    def select(self, index: torch.Tensor) -> _Rows:
        return _Rows(self.logits.index_select(0, index), self.numbers.index_select(0, index),
                     self.min_p)

    def scaled(self) -> torch.Tensor:
        """logits / temperature as a new tensor, NaN -> -inf, +inf -> the largest float."""
        scores = self.logits / self.numbers[:, 0:1].float()
        return scores.nan_to_num_(nan=_NEG_INF, posinf=_FLOAT_MAX, neginf=_NEG_INF)

    @property
    def top_p(self) -> torch.Tensor:  # (S, 1) float32
        return self.numbers[:, 1:2].float()

    @property
    def log_min_p(self) -> torch.Tensor:  # (S, 1) float32
        return self.numbers[:, 2:3].float()

    @property
    def k(self) -> torch.Tensor:  # (S, 1) int64
        return self.numbers[:, 3:4].long()

    @property
    def keys(self) -> torch.Tensor:  # (S, 2) int64
        return self.numbers[:, 4:6].long()


def _top_k(scores: torch.Tensor, k: torch.Tensor, k_max: int, grow: bool
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row's top-k tokens with every tie of the k-th, as (values, ids) of shape (S, C) in
    :func:`_canonical` order, positions past a row's own set at -inf; and (S,) flags of rows
    whose ties may lie beyond the candidates.

    topk(k_max + 1) usually holds every tie: a row's set is sure when its last candidate is
    below its k-th value. With ``grow``, the width doubles until every row is sure (or the
    whole vocabulary is sorted); without, unsure rows are flagged.
    """
    S, V = scores.shape
    width = k_max + 1
    while width < V:
        values, ids = scores.topk(width, dim=-1)  # ties in no particular order
        kth = values.gather(1, k - 1)
        spilled = (values[:, -1:] >= kth).squeeze(1)
        if not grow or not bool(spilled.any()):
            values, ids = _canonical(values, ids)
            return values.masked_fill_(values < kth, _NEG_INF), ids, spilled
        width *= 2
    values, ids = scores.sort(dim=-1, descending=True, stable=True)
    kth = values.gather(1, k - 1)
    spilled = torch.zeros(S, dtype=torch.bool, device=scores.device)
    return values.masked_fill_(values < kth, _NEG_INF), ids, spilled


def _canonical(values: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidates ordered by value descending, then token id ascending: what a stable sort of
    the whole row gives, whatever order topk returned ties in."""
    ids, order = ids.sort(dim=-1)
    values, order = values.gather(1, order).sort(dim=-1, descending=True, stable=True)
    return values, ids.gather(1, order)


def _mix(x: torch.Tensor, key: int | torch.Tensor, multiplier: int) -> torch.Tensor:
    """One hash round over 31-bit values: xor a key, multiply, fold the high half into the low.

    Operands stay below 2**31, so the int64 product cannot overflow; the result is 31 bits.
    """
    x = x ^ key
    x.mul_(multiplier)
    return x.bitwise_xor_(x >> 31).bitwise_and_(_MASK31)


def _beyond_nucleus(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Which candidates (sorted best first) top-p drops: those whose predecessors already hold
    ``top_p`` of the mass. The best one always stays, even for a top_p that rounds to 0."""
    drop = (probs.cumsum(dim=-1) - probs) >= top_p  # never where top_p is inf
    drop[:, 0] = False
    return drop


def _gumbel(token_hashes: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) variates (S, C), float32, from token hashes (S or 1, C) and row keys (S, 2)."""
    x = _mix(token_hashes, keys[:, 0:1], _M1)  # a new (S, C) tensor: the rest is in place
    x.bitwise_xor_(keys[:, 1:2]).mul_(_M2)
    x.bitwise_xor_(x >> 31).bitwise_and_(_MASK31)
    # 23 bits: (x + 0.5) / 2**23 is exact in float32 and lies strictly inside (0, 1)
    u = (x >> 8).float().add_(0.5).mul_(2.0**-23)
    return u.log_().neg_().log_().neg_()


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _logprobs(raw: torch.Tensor, tokens: torch.Tensor, wanted: list[int], num_top: int
              ) -> list[torch.Tensor]:
    """Raw-distribution logprobs of the sampled tokens (R,), and the top ``num_top`` (R, N)
    values and ids, for the rows in ``wanted``."""
    if len(wanted) < raw.shape[0]:
        rows = on_device(wanted, torch.long, raw.device)
        raw, tokens = raw.index_select(0, rows), tokens.index_select(0, rows)
    logprobs = raw.log_softmax(dim=-1)  # (R, V); cheaper than logsumexp on CPU
    chosen = logprobs.gather(1, tokens.unsqueeze(1))
    if num_top:
        top_values, top_ids = logprobs.topk(num_top, dim=-1)
    else:
        top_values = top_ids = raw[:, :0]
    return [chosen, top_values, top_ids]
