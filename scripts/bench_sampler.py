"""Time the sampler alone on CPU tensors: one call per step, the shapes of a real decode step.

    python scripts/bench_sampler.py                               # this checkout's sampler
    git show <rev>:pagedserve/worker/sampler.py > /tmp/old_sampler.py
    python scripts/bench_sampler.py --baseline /tmp/old_sampler.py  # both, interleaved

With ``--baseline`` each scenario alternates the two samplers call by call, so that both see the
same machine load. Requests carry a 512-token prompt and 64 output tokens (what the penalties
read); logits are float32 random normals scaled like a model's.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import statistics
import sys
import time

import torch

from pagedserve.core.request import Request
from pagedserve.outputs import RequestMetrics
from pagedserve.sampling_params import SamplingParams
from pagedserve.worker.sampler import Sampler

OLLAMA = {"temperature": 0.8, "top_k": 40, "top_p": 0.9, "repetition_penalty": 1.1,
          "repeat_last_n": 64}
SCENARIOS: dict[str, list[dict]] = {
    "greedy": [{"temperature": 0}],
    "temperature 1": [{"temperature": 1.0}],
    "temperature 1, seeded": [{"temperature": 1.0, "seed": 7}],
    "ollama defaults": [OLLAMA],
    "top_p 0.9": [{"temperature": 0.7, "top_p": 0.9}],
    "penalties": [{"temperature": 0, "repetition_penalty": 1.2, "presence_penalty": 0.5,
                   "frequency_penalty": 0.5}],
    "greedy + logprobs 5": [{"temperature": 0, "logprobs": 5}],
    "mixed": [{"temperature": 0}, {"temperature": 1.0}, OLLAMA, {"temperature": 0.7,
              "top_p": 0.9, "seed": 3}, {"temperature": 1.0, "min_p": 0.05, "logprobs": 2}],
}


def load_sampler(path: str) -> type:
    spec = importlib.util.spec_from_file_location("baseline_sampler", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module.Sampler


def requests_for(kinds: list[dict], rows: int, vocab: int) -> list[Request]:
    rng = random.Random(0)
    out = []
    for i in range(rows):
        values = dict(kinds[i % len(kinds)])
        if "seed" in values:
            values["seed"] += i
        params = SamplingParams(max_tokens=1000, **values)
        prompt = [rng.randrange(vocab) for _ in range(512)]
        r = Request(f"r{i}", prompt, params, frozenset({0}), 1000, RequestMetrics(0.0))
        for _ in range(64):
            r.append_output_token(rng.randrange(vocab))
        out.append(r)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[64, 1])
    ap.add_argument("--vocab", type=int, default=49152, help="the bundled SmolLM2's")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--calls", type=int, default=15, help="timed calls per sampler and scenario")
    ap.add_argument("--baseline", help="path of another sampler.py to time beside this one")
    ap.add_argument("--only", nargs="*", help="scenario names to run")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    samplers = {"this": Sampler(0)}
    if args.baseline:
        samplers = {"baseline": load_sampler(args.baseline)(0), **samplers}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, vocab {args.vocab}; "
          "median (min) ms per call")
    header = f"{'scenario':24s} {'rows':>4s}" + "".join(f" {n:>18s}" for n in samplers)
    print(header)
    for rows in args.rows:
        logits = torch.randn(rows, args.vocab, generator=torch.Generator().manual_seed(0)) * 3
        for name, kinds in SCENARIOS.items():
            if args.only and name not in args.only:
                continue
            requests = requests_for(kinds, rows, args.vocab)
            times: dict[str, list[float]] = {n: [] for n in samplers}
            for s in samplers.values():  # warm-up
                s(logits, requests)
            for _ in range(args.calls):
                for n, s in samplers.items():
                    start = time.perf_counter()
                    s(logits, requests)
                    times[n].append((time.perf_counter() - start) * 1e3)
            cells = "".join(
                f" {statistics.median(t):9.2f} ({min(t):6.2f})" for t in times.values())
            print(f"{name:24s} {rows:4d}{cells}", flush=True)


if __name__ == "__main__":
    main()
