"""Offline throughput: the engine alone (no HTTP), side by side with transformers' generate.

Every batch gets ``num_prompts`` unique random token sequences of ``input_len`` tokens, each
asked for exactly ``output_len`` tokens (EOS ignored), all submitted at once. Throughput is
output tokens over wall time, prefill included; the ratio to the peer is what to quote, since
absolute numbers drift with the machine's load.

One engine serves every batch size in turn, so start-up, KV sizing and CUDA graph capture
happen once; each batch has its own prompts, so no batch hits another's prefix cache. The
decode step time is the median of the steps in which every request of the batch decoded (on
CUDA a step ends with the sampled ids on the host, so its wall time is the GPU's time).
"""

from __future__ import annotations

import logging
import random
import statistics
import time
from dataclasses import asdict, dataclass

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from pagedserve.engine import Engine, EngineObserver, StepStats
from pagedserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class OfflineResult:
    label: str
    num_prompts: int
    input_len: int
    output_len: int
    dtype: str
    duration: float  # seconds, wall clock
    output_tokens: int
    device: str = "cpu"
    decode_step_ms: float | None = None  # median step with the whole batch decoding
    tensor_parallel_size: int = 1
    weight_bytes_per_rank: list[int] | None = None
    # tensor parallel: share of the batch's wall time rank 0 spent in the model's collectives
    # (all-reduces and the logits' gather, waiting for the other ranks included)
    collective_share: float | None = None

    @property
    def output_tok_s(self) -> float:
        return self.output_tokens / self.duration

    def to_dict(self) -> dict:
        return {**asdict(self), "output_tok_s": self.output_tok_s}


def make_prompts(num_prompts: int, input_len: int, vocab_size: int, seed: int = 0
                 ) -> list[list[int]]:
    """Unique prompts: random ids from the vocabulary's ordinary range (no special tokens)."""
    rng = random.Random(seed)
    low = min(1000, vocab_size // 4)
    return [[rng.randrange(low, vocab_size) for _ in range(input_len)] for _ in range(num_prompts)]


class _DecodeSteps(EngineObserver):
    """Durations of the steps that decoded every request of a batch of `batch_size`."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.durations: list[float] = []

    def on_step(self, stats: StepStats) -> None:
        if stats.num_prompt_tokens == 0 and stats.num_scheduled_tokens == self.batch_size:
            self.durations.append(stats.duration)

    def median_ms(self) -> float | None:
        return 1000 * statistics.median(self.durations) if self.durations else None


def warm_up(engine: Engine, prompt: list[int]) -> None:
    engine.add_request(prompt[:8], SamplingParams(max_tokens=2))
    while engine.has_unfinished_requests():
        engine.step()


def run_batch(engine: Engine, prompts: list[list[int]], output_len: int,
              progress: bool = True, label: str = "pagedserve") -> OfflineResult:
    """All `prompts` at once on a warm engine, until every one has `output_len` tokens."""
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    steps = _DecodeSteps(len(prompts))
    engine.observers.append(steps)
    total = len(prompts) * output_len
    workers = engine.core.workers
    collective_before = workers.group.collective_seconds if workers is not None else 0.0
    start = time.perf_counter()
    for p in prompts:
        engine.add_request(p, params)
    done = 0
    try:
        with _progress(progress, label, total) as (bar, task):
            while engine.has_unfinished_requests():
                n = sum(len(o.delta_token_ids) for o in engine.step())
                done += n
                bar.advance(task, n)
    finally:
        engine.observers.remove(steps)
    duration = time.perf_counter() - start
    if workers is not None:
        weights = list(workers.weight_bytes)
        share = (workers.group.collective_seconds - collective_before) / duration
    else:
        weights, share = [engine.runner.model.weight_bytes()], None
    return OfflineResult(label, len(prompts), len(prompts[0]), output_len, engine.config.dtype,
                         duration, done, engine.config.device, steps.median_ms(),
                         engine.config.tensor_parallel_size, weights, share)


class _progress:  # noqa: N801 (a context manager used like a function)
    def __init__(self, enabled: bool, label: str, total: int):
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("tokens"), TimeElapsedColumn(), disable=not enabled,
                            transient=True)
        self.label, self.total = label, total

    def __enter__(self):
        self.bar.start()
        return self.bar, self.bar.add_task(self.label, total=self.total)

    def __exit__(self, *exc) -> None:
        self.bar.stop()
