"""Does the engine keep its fair share of a CPU that other processes keep busy? (issue 28)

Runs ``LLM()`` on the bundled model twice, back to back in one process: quiet, then beside a
CPU hog (Python busy loops in --hogs processes, 8 by default: a load of ~4x a 2-core machine,
each bounded in time and ended by this script). Reports output tokens per second of each and
what a fair share would be: quiet tok/s x cores / load, the load being the hogs plus the
engine's threads (each runnable thread's share of the cores). The bar is 60% of it.

    python scripts/cpu_contention.py                    # 1 and 64 sequences, 8 hogs
    python scripts/cpu_contention.py --sequences 1 --hogs 4 --threads 1

The machine may carry load of its own (other users): /proc/loadavg before and after each run is
in the report; a quiet run slowed by it lowers the bar with it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import time


def _hog(deadline: float) -> None:
    while time.time() < deadline:
        pass


def _loadavg() -> float:
    try:
        with open("/proc/loadavg") as f:
            return float(f.read().split()[0])
    except OSError:
        return float("nan")


def _run(llm, sequences: int, output_len: int, rounds: int) -> float:
    from pagedserve.sampling_params import SamplingParams

    prompts = [[3 + (7 * i + j) % 4000 for i in range(80)] for j in range(sequences)]
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    best = 0.0
    for _ in range(rounds):
        start = time.perf_counter()
        llm.generate(prompts, params)
        best = max(best, sequences * output_len / (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sequences", default="1,64",
                        help="comma-separated batch sizes (default 1,64)")
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--hogs", type=int, default=8, help="busy-loop processes (default 8)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each, the best kept")
    parser.add_argument("--threads", type=int, default=None,
                        help="engine threads (default: what the CPU budget allows)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    from pagedserve.config import EngineConfig
    from pagedserve.hub.bundled import bundled_model_path
    from pagedserve.llm import LLM
    from pagedserve.ops.cpu_kernels.threads import affinity_cpus

    llm = LLM(str(bundled_model_path()), engine_config=EngineConfig(num_threads=args.threads))
    threads = llm.engine.runner.threads
    cores = affinity_cpus()
    _run(llm, 1, 4, 1)  # warm
    results = []
    for sequences in (int(s) for s in args.sequences.split(",")):
        before = _loadavg()
        quiet = _run(llm, sequences, args.output_len, args.rounds)
        # the hogs live a little longer than a loaded run should take, and are ended after it
        budget = 4 * args.rounds * sequences * args.output_len / max(quiet, 1e-3) * (
            args.hogs + threads) / cores + 30
        deadline = time.time() + budget
        hogs = [multiprocessing.Process(target=_hog, args=(deadline,), daemon=True)
                for _ in range(args.hogs)]
        for p in hogs:
            p.start()
        try:
            time.sleep(1.0)  # the hogs running before the engine starts
            loaded = _run(llm, sequences, args.output_len, args.rounds)
            during = _loadavg()
        finally:
            for p in hogs:
                p.terminate()
            for p in hogs:
                p.join()
        load = args.hogs + threads
        fair = quiet * cores / load
        results.append({"sequences": sequences, "quiet_tok_s": round(quiet, 1),
                        "loaded_tok_s": round(loaded, 1), "fair_share_tok_s": round(fair, 1),
                        "share_of_fair": round(loaded / fair, 2), "cores": cores,
                        "threads": threads, "hogs": args.hogs,
                        "loadavg_before": before, "loadavg_during": during})
        print(f"{sequences:>3} sequences: quiet {quiet:.1f} tok/s, beside {args.hogs} hogs "
              f"{loaded:.1f} tok/s = {loaded / fair:.0%} of a fair share ({fair:.1f} = quiet x "
              f"{cores} cores / {load} threads); {threads} engine threads, load average "
              f"{before:.1f} before, {during:.1f} during", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    os.environ.setdefault("PAGEDSERVE_LOG_LEVEL", "WARNING")
    main()
