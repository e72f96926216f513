"""Where one decode step's time goes: the engine's own steps, timed, then profiled by op.

Runs the bundled model (or MODEL) with BATCH sequences decoding greedily, times STEPS decode
steps (wall clock per step, no profiler), then runs the same steps under the torch profiler and
prints the ops that take the most self CPU time, and the share of the step spent outside any op
(Python and dispatch between ops). It is the profile docs/performance.md quotes for what bounds
a decode step.

    PYTHONPATH=. python scripts/profile_decode.py --dtype bfloat16 --threads 1 --batch 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from pagedserve.config import EngineConfig
from pagedserve.llm import LLM
from pagedserve.sampling_params import SamplingParams


def _decode_steps(engine, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default=None)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--input-len", type=int, default=80)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()

    config = EngineConfig(dtype=args.dtype, num_threads=args.threads)
    engine = LLM(args.model, engine_config=config).engine
    params = SamplingParams(temperature=0, max_tokens=3 * args.steps + 8, ignore_eos=True)
    for i in range(args.batch):
        engine.add_request([1000 + i + j for j in range(args.input_len)], params)
    while any(r.num_computed_tokens < len(r.prompt_token_ids)  # prefill, then 4 warm steps
              for r in engine.scheduler.running + list(engine.scheduler.waiting)):
        engine.step()
    _decode_steps(engine, 4)

    wall = _decode_steps(engine, args.steps)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        profiled = _decode_steps(engine, args.steps)
    events = prof.key_averages()
    step_ms = 1000 * statistics.median(wall)
    # top-level ops only: their self times plus their children's make up the time inside ops
    inside_ms = sum(e.cpu_time_total for e in prof.events() if e.cpu_parent is None) / 1000
    inside_ms /= args.steps
    print(f"dtype {engine.runner.dtype}, threads {torch.get_num_threads()}, batch {args.batch}: "
          f"decode step {step_ms:.1f} ms median ({1000 * args.batch / step_ms:.1f} tok/s), "
          f"{1000 * statistics.median(profiled):.1f} ms under the profiler")
    ops = sum(e.count for e in events) / args.steps
    print(f"ops per step (every aten op, nested ones included): {ops:.0f}; "
          f"time inside top-level ops: {inside_ms:.1f} ms per step "
          f"({100 * inside_ms / (1000 * statistics.median(profiled)):.0f}% of the profiled step)")
    rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:args.top]
    print(f"{'op':<44} {'calls/step':>10} {'self ms/step':>12}")
    for e in rows:
        print(f"{e.key[:44]:<44} {e.count / args.steps:>10.1f} "
              f"{e.self_cpu_time_total / 1000 / args.steps:>12.2f}")


if __name__ == "__main__":
    main()
