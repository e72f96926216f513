"""What users get through ``pagedserve serve`` against what the engine does offline, one table.

The check behind ``scripts/gpu-check --served`` (the 8B shape on a GPU), which runs as well on
a CPU with a tiny shape (``--cpu``, and the tests), in one process, in this order:

    offline     the engine in this process: greedy batches of 1 and of the mixed level's size
                (tok/s, the decode step), then freed (the server needs the memory)
    served      ``serve MODEL`` (engine core in its own process, overlap on by default on
                CUDA): closed-loop users at each level, a Poisson arrival run, and a batch of
                mixed sampling (half top-p 0.9, a quarter with penalties, a quarter with
                logprobs 5) at the mixed level
    static      ``serve --kv-layout static --max-parallel 4`` (Ollama's layout) at the mixed
                level, for the seed's paged-vs-static ratio on the same device

and the acceptance rows of issue 21: served at the mixed level against offline, one user's TPOT
against the offline decode step, TTFT p99, mixed sampling against greedy offline.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pagedserve.bench.clients import OpenAICompletions
from pagedserve.bench.loadgen import LoadGenerator, Workload
from pagedserve.bench.results import LevelResult

logger = logging.getLogger(__name__)

Report = Callable[[str, bool | None, str], None]  # (check, passed or None for info, detail)


@dataclass(slots=True)
class ServedCheck:
    model: str  # dummy:llama-3.1-8b on a GPU; a tiny shape on a CPU
    device: str = "cuda"
    levels: list[int] = field(default_factory=lambda: [1, 32, 128, 256])
    prompts_per_user: int = 2  # closed loop: each level sends users x this many requests
    input_len: int = 128
    output_len: int = 128
    request_rate: float = 40.0  # requests/s of the Poisson run
    poisson_prompts: int = 256
    mixed_level: int = 128
    static_parallel: int = 4
    server_args: list[str] = field(default_factory=list)
    # acceptance (issue 21, one H100, the 8B shape); None: report without a bar (a CPU run)
    min_served_share: float | None = 0.9
    min_served_tok_s: dict[int, float] = field(default_factory=lambda: {128: 9500, 256: 12000})
    max_tpot_excess: float | None = 0.10
    max_ttft_p99_s: float | None = 1.0
    max_mixed_loss: float | None = 0.10


class MixedSampling(OpenAICompletions):
    """Streamed completions whose sampling cycles through a mix: of every four requests, two
    draw with top-p 0.9, one draws with penalties, one is greedy with 5 logprobs."""

    name = "openai-mixed"
    MIX = ({"temperature": 0.8, "top_p": 0.9}, {"temperature": 0.8, "top_p": 0.9},
           {"temperature": 0.8, "presence_penalty": 0.5, "repetition_penalty": 1.1},
           {"temperature": 0.0, "logprobs": 5})

    def __init__(self, model: str) -> None:
        super().__init__(model)
        self._next = itertools.cycle(self.MIX)

    def body(self, prompt: str, output_len: int) -> dict:
        return {**super().body(prompt, output_len), **next(self._next)}


def run(check: ServedCheck, report: Report) -> dict[str, object]:
    """Every section in turn; returns the numbers by name (also reported as they come)."""
    numbers: dict[str, object] = {}
    offline(check, report, numbers)
    served(check, report, numbers)
    static(check, report, numbers)
    accept(check, report, numbers)
    return numbers


def offline(check: ServedCheck, report: Report, numbers: dict) -> None:
    from pagedserve.bench.offline import make_prompts, run_batch, warm_up
    from pagedserve.config import EngineConfig
    from pagedserve.engine import Engine

    engine = Engine.from_model(check.model, EngineConfig(
        device=check.device, max_num_seqs=max(check.mixed_level, 1),
        max_num_batched_tokens=max(2048, check.input_len * 4),
        kv_cache_memory=None if check.device.startswith("cuda") else 256 << 20))
    vocab = engine.model_config.vocab_size
    warm_up(engine, make_prompts(1, check.input_len, vocab)[0])
    for n in (1, check.mixed_level):
        result = run_batch(engine, make_prompts(n, check.input_len, vocab, seed=n),
                           check.output_len, progress=False, label=f"offline {n}")
        numbers[f"offline {n}"] = result
        step = f", decode step {result.decode_step_ms:.2f} ms" if result.decode_step_ms else ""
        report(f"offline {n} seq", None, f"{result.output_tok_s:,.0f} tok/s{step}")
    del engine
    gc.collect()
    if check.device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def served(check: ServedCheck, report: Report, numbers: dict) -> None:
    from pagedserve.bench.server_process import ServerProcess

    args = ["--device", check.device, "--max-num-seqs", str(max(check.levels)),
            "--max-model-len", str(4 * (check.input_len + check.output_len)),
            *check.server_args]
    with ServerProcess(check.model, args) as server:
        start = time.perf_counter()
        closed = _sweep(server.url, check.model, check.levels,
                        [max(2, check.prompts_per_user * c) for c in check.levels], check)
        for level in closed:
            numbers[f"served {level.concurrency}"] = level
            report(f"served {level.concurrency} users", level.failed == 0, _describe(level))
        [poisson] = _sweep(server.url, check.model, [max(check.levels)],
                           [check.poisson_prompts], check, request_rate=check.request_rate)
        numbers["served poisson"] = poisson
        report(f"served poisson {check.request_rate:g}/s", poisson.failed == 0,
               _describe(poisson))
        [mixed] = _sweep(server.url, check.model, [check.mixed_level],
                         [check.prompts_per_user * check.mixed_level], check,
                         client=MixedSampling(check.model))
        numbers["served mixed"] = mixed
        report(f"served mixed sampling {check.mixed_level}", mixed.failed == 0, _describe(mixed))
        logger.info("served sections took %.0f s", time.perf_counter() - start)


def static(check: ServedCheck, report: Report, numbers: dict) -> None:
    from pagedserve.bench.server_process import ServerProcess

    context = 2 * (check.input_len + check.output_len)
    args = ["--device", check.device, "--kv-layout", "static", "--max-parallel",
            str(check.static_parallel), "--num-ctx", str(context), *check.server_args]
    with ServerProcess(check.model, args) as server:
        [level] = _sweep(server.url, check.model, [check.mixed_level],
                         [max(2 * check.static_parallel, check.mixed_level // 2)], check)
    numbers["static"] = level
    report(f"static N={check.static_parallel}, {check.mixed_level} users", level.failed == 0,
           _describe(level))


def accept(check: ServedCheck, report: Report, numbers: dict) -> None:
    """Issue 21's bars, each a row; informational where the check has no bar (CPU)."""
    m = check.mixed_level
    offline_m, offline_1 = numbers[f"offline {m}"], numbers["offline 1"]
    served_m = numbers.get(f"served {m}")
    if served_m is not None:
        share = served_m.output_throughput / offline_m.output_tok_s
        ok = None if check.min_served_share is None else share >= check.min_served_share
        report(f"served / offline at {m}", ok, f"{share:.0%} ({served_m.output_throughput:,.0f} "
               f"/ {offline_m.output_tok_s:,.0f} tok/s)")
        ttft = served_m.ttft_ms.p99 / 1000
        ok = None if check.max_ttft_p99_s is None else ttft < check.max_ttft_p99_s
        report(f"TTFT p99 at {m} users", ok, f"{ttft:.3f} s")
    for level, bar in check.min_served_tok_s.items():
        served_level = numbers.get(f"served {level}")
        if served_level is not None:
            report(f"served tok/s at {level}", served_level.output_throughput >= bar,
                   f"{served_level.output_throughput:,.0f} (bar {bar:,.0f})")
    one = numbers.get("served 1")
    if one is not None and offline_1.decode_step_ms:
        excess = one.tpot_ms.p50 / offline_1.decode_step_ms - 1
        ok = None if check.max_tpot_excess is None else excess <= check.max_tpot_excess
        report("one user's TPOT vs the offline step", ok,
               f"{one.tpot_ms.p50:.2f} ms vs {offline_1.decode_step_ms:.2f} ms ({excess:+.0%})")
    mixed = numbers.get("served mixed")
    if mixed is not None:
        loss = 1 - mixed.output_throughput / offline_m.output_tok_s
        ok = None if check.max_mixed_loss is None else loss <= check.max_mixed_loss
        report("mixed sampling vs greedy offline", ok,
               f"{mixed.output_throughput:,.0f} vs {offline_m.output_tok_s:,.0f} tok/s "
               f"({-loss:+.0%})")
    paged, static_level = numbers.get(f"served {m}"), numbers.get("static")
    if paged is not None and static_level is not None:
        report(f"paged vs static N={check.static_parallel} at {m} users", None,
               f"{paged.output_throughput / static_level.output_throughput:.1f}x throughput, "
               f"TTFT p99 {paged.ttft_ms.p99 / 1000:.2f} vs "
               f"{static_level.ttft_ms.p99 / 1000:.2f} s")


def _sweep(url: str, model: str, levels: list[int], prompts: list[int], check: ServedCheck,
           request_rate: float | None = None, client=None) -> list[LevelResult]:
    workload = Workload(input_len=check.input_len, output_len=check.output_len,
                        num_prompts=prompts, request_rate=request_rate)
    generator = LoadGenerator(url, client or OpenAICompletions(model))
    return asyncio.run(generator.sweep(workload, levels))


def _describe(level: LevelResult) -> str:
    failed = f", {level.failed} FAILED ({level.errors[:1]})" if level.failed else ""
    return (f"{level.output_throughput:,.0f} tok/s, TTFT p50/p99 {level.ttft_ms.p50:.0f}/"
            f"{level.ttft_ms.p99:.0f} ms, TPOT p50 {level.tpot_ms.p50:.2f} ms, "
            f"{level.num_prompts} requests{failed}")
