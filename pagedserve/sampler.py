"""Turns a batch of logits into next tokens, each row with its own sampling parameters.

Order of operations (the one vLLM and transformers use): penalties on the raw logits, then
greedy argmax for temperature 0, else temperature, top-k, top-p, min-p and a draw. A seeded row
draws from its own generator seeded by (seed, output index), so the same seed gives the same
tokens whatever else shares the batch and whether or not the request was preempted. Unseeded
rows share the engine's generator, seeded at random unless the engine was given a seed (as
Ollama and vLLM do: without a seed, answers vary from one run to the next). Drawing is
done with the exponential race (argmax of p / Exp(1)), which equals a categorical draw and
needs one random vector per row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagedserve.request import Request


@dataclass(slots=True)
class SampledToken:
    token_id: int
    logprob: float | None = None  # of the sampled token, under the raw model distribution
    top: list[tuple[int, float]] | None = None  # (token id, logprob) alternatives


class Sampler:
    def __init__(self, seed: int | None = None):
        self.generator = torch.Generator()
        if seed is None:
            self.generator.seed()  # from the OS's entropy
        else:
            self.generator.manual_seed(seed)

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> list[SampledToken]:
        logits = logits.float()  # (B, V)
        B, V = logits.shape
        params = [r.params for r in requests]
        want_logprobs = [p.logprobs is not None for p in params]
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(want_logprobs) else None

        if any(_needs_penalties(r) or r.num_output_tokens < r.params.min_tokens
               for r in requests):
            logits = logits.clone()  # the caller's logits stay untouched
            self._apply_penalties(logits, requests)
            self._suppress_stop_before_min_tokens(logits, requests)

        temps = torch.tensor([p.temperature for p in params])
        greedy = temps == 0
        tokens = logits.argmax(dim=-1)
        if not bool(greedy.all()):
            rows = (~greedy).nonzero().flatten()
            sampled = self._sample(logits[rows], [requests[i] for i in rows.tolist()])
            tokens[rows] = sampled

        token_list = tokens.tolist()
        out = [SampledToken(t) for t in token_list]
        if raw_logprobs is not None:
            for i, p in enumerate(params):
                if p.logprobs is None:
                    continue
                out[i].logprob = float(raw_logprobs[i, token_list[i]])
                if p.logprobs:
                    values, ids = raw_logprobs[i].topk(p.logprobs)
                    out[i].top = list(zip(ids.tolist(), values.tolist(), strict=True))
                else:
                    out[i].top = []
        return out

    def _sample(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        params = [r.params for r in requests]
        logits = logits / torch.tensor([p.temperature for p in params]).unsqueeze(1)
        top_k = [p.top_k for p in params]
        if any(top_k):
            V = logits.shape[1]
            k = torch.tensor([t if t else V for t in top_k]).clamp(max=V)
            kth = logits.sort(dim=-1, descending=True).values.gather(1, (k - 1).unsqueeze(1))
            logits = logits.masked_fill(logits < kth, float("-inf"))
        top_p = torch.tensor([p.top_p for p in params])
        if bool((top_p < 1).any()):
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
            # drop a token when the mass before it already reaches top_p (keep at least one)
            drop = (cum - sorted_logits.softmax(dim=-1)) >= top_p.unsqueeze(1)
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.empty_like(logits).scatter_(1, order, sorted_logits)
        probs = logits.softmax(dim=-1)
        min_p = torch.tensor([p.min_p for p in params])
        if bool((min_p > 0).any()):
            threshold = min_p.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
            probs = probs.masked_fill(probs < threshold, 0.0)
        noise = torch.empty_like(probs)
        for i, r in enumerate(requests):
            seed = r.params.seed
            if seed is None:
                noise[i].exponential_(generator=self.generator)
            else:
                g = torch.Generator().manual_seed(hash((seed, r.num_output_tokens)) & (2**63 - 1))
                noise[i].exponential_(generator=g)
        return (probs / noise).argmax(dim=-1)

    @staticmethod
    def _apply_penalties(logits: torch.Tensor, requests: list[Request]) -> None:
        for i, r in enumerate(requests):
            p = r.params
            if p.repetition_penalty != 1.0:
                seen = torch.tensor(sorted(set(r.all_token_ids)), dtype=torch.long)
                vals = logits[i, seen]
                logits[i, seen] = torch.where(
                    vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty
                )
            if (p.presence_penalty or p.frequency_penalty) and r.output_token_ids:
                ids = torch.tensor(r.output_token_ids, dtype=torch.long)
                counts = torch.zeros(logits.shape[1]).index_add_(0, ids, torch.ones(len(ids)))
                logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)

    @staticmethod
    def _suppress_stop_before_min_tokens(logits: torch.Tensor, requests: list[Request]) -> None:
        for i, r in enumerate(requests):
            if r.num_output_tokens < r.params.min_tokens:
                stops = set(r.params.stop_token_ids)
                if not r.params.ignore_eos:
                    stops |= r.eos_token_ids
                if stops:
                    logits[i, sorted(stops)] = float("-inf")


def _needs_penalties(r: Request) -> bool:
    p = r.params
    return p.repetition_penalty != 1.0 or bool(p.presence_penalty or p.frequency_penalty)
