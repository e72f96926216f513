"""Served against offline: the same engine over HTTP and alone, at the same concurrency levels.

For each core set (``--cores 0,1`` pins the engine, the HTTP side and the load generator to
those cores with taskset; ``all`` leaves them free), runs ``pagedserve bench offline`` with a
batch of C sequences for each level C, then ``pagedserve bench compare --layouts paged`` (our
server, closed-loop streaming clients) at the same levels, and prints served output tok/s as a
share of offline, with TPOT beside the offline decode step. It is issue 9's measure of what the
server costs: on a 2-core machine everything shares the two cores; on a machine with spare cores
only the engine's threads are busy with the engine.

    python scripts/served_vs_offline.py --cores 0,1 --cores all --out /tmp/svo
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path


def run(cmd: list[str], cores: str, threads: int) -> None:
    if cores != "all":
        if shutil.which("taskset") is None:
            raise SystemExit("taskset is needed for --cores")
        cmd = ["taskset", "-c", cores, *cmd]
    print("+", " ".join(cmd), flush=True)
    # the offline engine takes torch's default thread count: the same as the server's
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default=None, help="default: the bundled model")
    parser.add_argument("--cores", action="append", default=None,
                        help="a taskset core list, or 'all' (repeatable; default: all)")
    parser.add_argument("--threads", type=int, default=2, help="engine threads (default 2)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--num-prompts", default="8,32,128", help="served requests per level")
    parser.add_argument("--input-len", type=int, default=80)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--out", default="served-vs-offline")
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = [args.model] if args.model else []
    rows = []
    for cores in args.cores or ["all"]:
        tag = "all" if cores == "all" else "cores-" + re.sub(r"[^0-9]+", "-", cores)
        offline_json = out / f"offline-{tag}.json"
        run([sys.executable, "-m", "pagedserve", "bench", "offline", *model,
             "--batch-sizes", args.concurrency, "--input-len", str(args.input_len),
             "--output-len", str(args.output_len), "--dtype", args.dtype,
             "--out", str(offline_json)], cores, args.threads)
        serve_args = f"--threads {args.threads} --dtype {args.dtype}"
        run([sys.executable, "-m", "pagedserve", "bench", "compare", *model,
             "--layouts", "paged", "--paged-args", serve_args, "--concurrency",
             args.concurrency, "--num-prompts", args.num_prompts, "--input-len",
             str(args.input_len), "--output-len", str(args.output_len), "--section", tag,
             "--out", str(out)], cores, args.threads)
        offline = {r["num_prompts"]: r for r in json.loads(offline_json.read_text())}
        served = json.loads((out / f"bench-{tag}-paged.json").read_text())
        for level in served["levels"]:
            c = level["concurrency"]
            o = offline[c]
            rows.append((cores, c, o["output_tok_s"], level["output_throughput"],
                         o.get("decode_step_ms"), level["tpot_ms"]["p50"]))
    lines = ["| cores | concurrency | offline tok/s | served tok/s | served / offline "
             "| offline decode step (ms) | served TPOT p50 (ms) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for cores, c, off, srv, step, tpot in rows:
        step_text = f"{step:.1f}" if step is not None else "-"
        lines.append(f"| {cores} | {c} | {off:.1f} | {srv:.1f} | {srv / off:.0%} | {step_text} "
                     f"| {tpot:.1f} |")
    table = "\n".join(lines)
    (out / "served-vs-offline.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
