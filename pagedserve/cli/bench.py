"""`pagedserve bench serve | plot | compare`: load-test a server, plot results, compare layouts."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from pagedserve.bench import offline_cli
from pagedserve.bench.clients import CLIENTS

if TYPE_CHECKING:  # imported by the commands: matplotlib alone takes a second or two
    from pagedserve.bench.loadgen import Workload

log = logging.getLogger(__name__)

DEFAULT_URL = "http://127.0.0.1:11434"  # where `pagedserve serve` listens by default
DEFAULT_CONCURRENCY = "1,2,4,8,16,32"
# llama.cpp's server with 4 slots sharing 16k tokens (its default, and Ollama's usual setting),
# and tuned for many users: 64 slots over one unified KV cache; the report takes the best of them
LLAMA_CPP_DEFAULTS = ("-np 4 -c 16384", "-np 64 -kvu -c 32768")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _add_workload_args(parser: argparse.ArgumentParser, *, num_prompts: str) -> None:
    parser.add_argument("--api", choices=sorted(CLIENTS), default="openai",
                        help="wire format: openai (/v1/completions), openai-chat, "
                        "ollama (/api/generate) (default: %(default)s)")
    parser.add_argument("--concurrency", type=_int_list, default=_int_list(DEFAULT_CONCURRENCY),
                        help=f"comma-separated levels (default: {DEFAULT_CONCURRENCY})")
    parser.add_argument("--num-prompts", type=_int_list, default=None,
                        help=f"requests per level: one count, or one per level "
                        f"(default: {num_prompts})")
    parser.add_argument("--input-len", type=int, default=128, help="prompt tokens (about)")
    parser.add_argument("--output-len", type=int, default=64, help="output tokens (exactly)")
    parser.add_argument("--request-rate", type=float, default=None,
                        help="Poisson arrivals at this many requests/s, concurrency as a cap "
                        "(default: closed loop)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shared-prefix-len", type=int, default=0,
                        help="tokens every prompt shares at its start (default: none)")


def _num_prompts(args: argparse.Namespace, default_per_level) -> int | list[int]:
    if args.num_prompts is None:
        return [default_per_level(c) for c in args.concurrency]
    return args.num_prompts[0] if len(args.num_prompts) == 1 else args.num_prompts


def _workload(args: argparse.Namespace, default_per_level) -> Workload:
    from pagedserve.bench.loadgen import Workload

    return Workload(
        input_len=args.input_len, output_len=args.output_len,
        num_prompts=_num_prompts(args, default_per_level), seed=args.seed,
        shared_prefix_len=args.shared_prefix_len, request_rate=args.request_rate,
    )


def _serve_prompts(concurrency: int) -> int:
    return max(16, 4 * concurrency)


def cmd_serve(args: argparse.Namespace) -> int:
    from pagedserve.bench.compare import sweep_run
    from pagedserve.bench.plot import plot_runs
    from pagedserve.bench.progress import RichProgress, output_console, summary_table

    console = output_console()
    workload = _workload(args, _serve_prompts)
    label = args.label or args.url
    with RichProgress(console, label) as progress:
        run = sweep_run(args.url, label=label, api=args.api, model=args.model, workload=workload,
                        concurrency=args.concurrency, observer=progress)
    console.print(summary_table(f"{label}: {run.model}", run.levels))
    out = run.save(args.out)
    plots = plot_runs([run], out.parent, prefix=out.stem)
    console.print(f"results: {out}; plots: {', '.join(str(p) for p in plots)}")
    return 0 if all(lv.successful for lv in run.levels) else 1


def cmd_plot(args: argparse.Namespace) -> int:
    from pagedserve.bench.plot import plot_runs
    from pagedserve.bench.progress import output_console
    from pagedserve.bench.results import RunResult

    runs = [RunResult.load(path) for path in args.results]
    plots = plot_runs(runs, args.out, prefix=args.prefix)
    output_console().print("plots: " + ", ".join(str(p) for p in plots))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from pagedserve.bench.compare import compare, layout_targets, llama_cpp_targets, parse_peer
    from pagedserve.bench.progress import RichProgress, output_console, summary_table

    console = output_console()
    workload = _workload(args, _compare_prompts)
    threads = args.threads or os.cpu_count() or 1
    paged_args = shlex.split(args.paged_args)
    if args.threads and "--threads" not in paged_args:
        paged_args += ["--threads", str(args.threads)]
    try:
        targets = layout_targets(args.max_parallel, args.num_ctx, paged_args=paged_args,
                                 static_args=shlex.split(args.static_args),
                                 layouts=[x.strip() for x in args.layouts.split(",") if x.strip()])
        targets += [parse_peer(spec) for spec in args.peer]
        if args.llama_server:
            from pagedserve.hub.registry import resolve

            targets += llama_cpp_targets(args.llama_server, resolve(args.model).path,
                                         threads=threads,
                                         configs=args.llama_server_args or LLAMA_CPP_DEFAULTS)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    if not targets:
        log.error("nothing to compare: --layouts is empty and there is no peer")
        return 2
    command = "pagedserve bench " + shlex.join(sys.argv[sys.argv.index("compare"):]) \
        if "compare" in sys.argv else None
    progress = RichProgress(console, "")

    def observer_for(label: str) -> RichProgress:
        progress.title = label
        return progress

    with progress:
        result = compare(args.model, targets, workload, args.concurrency, api=args.api,
                         out_dir=args.out, observer_for=observer_for, command=command,
                         section=args.section)
    for run in result.runs:
        console.print(summary_table(f"{run.label}: {run.model}", run.levels))
    console.print(f"report: {result.report}")
    console.print("plots: " + ", ".join(str(p) for p in result.plots))
    console.print("results: " + ", ".join(str(p) for p in result.result_files))
    return 0


def _compare_prompts(concurrency: int) -> int:
    return max(16, 3 * concurrency)


def register(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser(
        "bench", help="load-test servers, plot results, compare paged and static KV",
        description="Benchmarks: a streaming load generator, plots, and the paged vs static "
        "KV-cache comparison.",
    )
    sub = bench.add_subparsers(dest="bench_command", metavar="BENCH_COMMAND", required=True)

    serve = sub.add_parser(
        "serve", help="sweep concurrency levels against a running server",
        description="Streams requests to a running OpenAI- or Ollama-compatible server at each "
        "concurrency level; writes a JSON result and PNG plots next to it.",
    )
    serve.add_argument("--url", default=DEFAULT_URL, help="server base URL (default: %(default)s)")
    serve.add_argument("--model", default=None,
                       help="model name in requests (default: the server's first listed model)")
    serve.add_argument("--label", default=None, help="name of this run in tables and plots")
    serve.add_argument("--out", type=Path, default=Path("bench-result.json"),
                       help="result JSON (default: %(default)s)")
    _add_workload_args(serve, num_prompts="max(16, 4 x concurrency)")
    serve.set_defaults(func=cmd_serve)

    plot = sub.add_parser("plot", help="plot result files together",
                          description="Output tok/s and TTFT p99 vs concurrency, one line per "
                          "result file.")
    plot.add_argument("results", nargs="+", type=Path, help="JSON files from bench serve/compare")
    plot.add_argument("--out", type=Path, default=Path("."), help="directory for the PNGs")
    plot.add_argument("--prefix", default="bench", help="file name prefix (default: %(default)s)")
    plot.set_defaults(func=cmd_plot)

    comp = sub.add_parser(
        "compare", help="paged vs static KV layout (and peers), report and plots",
        description="Starts `pagedserve serve` with the paged and then the static KV layout, "
        "each on a free port, sweeps both (and any --peer), and writes benchmarks.md, plots "
        "and JSON results into --out.",
    )
    comp.add_argument("model", nargs="?", default=None,
                      help="model to serve (default: the bundled one)")
    comp.add_argument("--max-parallel", type=int, default=4,
                      help="static layout: slots (default: %(default)s)")
    comp.add_argument("--num-ctx", type=int, default=4096,
                      help="static layout: tokens reserved per slot (default: %(default)s)")
    comp.add_argument("--paged-args", default="", help="extra `serve` arguments, paged run")
    comp.add_argument("--static-args", default="", help="extra `serve` arguments, static run")
    comp.add_argument("--layouts", default="paged,static",
                      help="our runs, in order: paged, static, or both (default: %(default)s; "
                      "the first run is the one ratios are taken of)")
    comp.add_argument("--peer", action="append", default=[], metavar="URL[=LABEL]",
                      help="a running server to add to the sweep (repeatable)")
    comp.add_argument("--llama-server", metavar="PATH", default=None,
                      help="llama.cpp's llama-server binary: started on the same GGUF file, "
                      "once per --llama-server-args, and compared by its best configuration "
                      "at each level")
    comp.add_argument("--llama-server-args", action="append", default=None, metavar="ARGS",
                      help="one llama-server configuration (repeatable; default: "
                      + " and ".join(repr(c) for c in LLAMA_CPP_DEFAULTS) + ")")
    comp.add_argument("--threads", type=int, default=None,
                      help="CPU threads for llama-server and pagedserve's paged run (default: "
                      "llama-server gets every core, pagedserve its own default)")
    comp.add_argument("--section", default="",
                      help="name of this comparison's part of benchmarks.md and prefix of its "
                      "files, so several comparisons share the page (default: the unnamed one)")
    comp.add_argument("--out", type=Path, default=Path("docs"),
                      help="directory for benchmarks.md, plots and results (default: %(default)s)")
    _add_workload_args(comp, num_prompts="max(16, 3 x concurrency)")
    comp.set_defaults(func=cmd_compare)

    offline_cli.add_parser(sub)
