"""The comparison in one call: the paged and the static KV layout of the same engine, served in
turn by child processes, swept with the same workload; peers already running join the sweep.

Both servers run the same model, kernels and sampler, so the difference measured is the memory
architecture: the static layout runs at most ``max_parallel`` requests, each holding ``num_ctx``
KV positions whatever its length, and queues the rest; the paged one admits requests while KV
blocks are free. Every run's JSON, the plots and the Markdown report land in ``out_dir``.
"""

from __future__ import annotations

import asyncio
import logging
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx

from pagedserve.bench.clients import make_client
from pagedserve.bench.loadgen import LoadGenerator, SweepObserver, Workload
from pagedserve.bench.machine import describe_machine
from pagedserve.bench.plot import plot_runs
from pagedserve.bench.report import render, write_report
from pagedserve.bench.results import RunResult
from pagedserve.bench.server_process import ServerProcess

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Target:
    """A server to sweep: one we start (``serve_args``) or one already running (``url``)."""

    label: str
    serve_args: list[str] | None = None
    url: str | None = None
    description: str = ""


@dataclass(slots=True)
class Comparison:
    runs: list[RunResult] = field(default_factory=list)
    result_files: list[Path] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)
    report: Path | None = None


def layout_targets(max_parallel: int, num_ctx: int, *, paged_args: Sequence[str] = (),
                   static_args: Sequence[str] = ()) -> list[Target]:
    paged = ["--kv-layout", "paged", *paged_args]
    static = ["--kv-layout", "static", "--max-parallel", str(max_parallel),
              "--num-ctx", str(num_ctx), *static_args]
    return [
        Target("paged", paged, description="pagedserve, paged KV cache, continuous batching "
               f"(`{shlex.join(paged)}`)"),
        Target(f"static N={max_parallel}", static,
               description=f"pagedserve, static KV slots: {max_parallel} x {num_ctx} tokens, "
               f"the Ollama/llama.cpp layout (`{shlex.join(static)}`)"),
    ]


def parse_peer(spec: str) -> Target:
    """``URL[=label]`` -> a target; the label defaults to the URL's host:port."""
    url, _, label = spec.partition("=")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"peer must be URL[=label] with an http(s) URL, got {spec!r}")
    return Target(label or httpx.URL(url).netloc.decode(), url=url, description=url)


def served_model(url: str, api: str, fallback: str | None) -> str:
    """The model name to put in requests: the caller's, else the server's first listed model."""
    if fallback:
        return fallback
    route, key = ("/api/tags", "models") if api == "ollama" else ("/v1/models", "data")
    try:
        entries = httpx.get(url.rstrip("/") + route, timeout=10.0).json().get(key) or []
    except (httpx.HTTPError, ValueError) as exc:
        raise RuntimeError(f"cannot list models at {url}{route} ({exc}); pass --model") from exc
    if not entries:
        raise RuntimeError(f"{url}{route} lists no model; pass --model")
    return entries[0].get("id") or entries[0].get("name")


def sweep_run(url: str, *, label: str, api: str, model: str | None, workload: Workload,
              concurrency: Sequence[int], observer: SweepObserver | None = None,
              server: dict | None = None) -> RunResult:
    """Sweep one running server and wrap the levels with the run's metadata."""
    name = served_model(url, api, model)
    generator = LoadGenerator(url, make_client(api, name))
    created = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    levels = asyncio.run(generator.sweep(workload, concurrency, observer))
    return RunResult(
        label=label, url=url, api=api, model=name, input_len=workload.input_len,
        output_len=workload.output_len, seed=workload.seed,
        shared_prefix_len=workload.shared_prefix_len, created=created,
        machine=describe_machine(), server=server or {}, levels=levels,
    )


def compare(model: str | None, targets: Sequence[Target], workload: Workload,
            concurrency: Sequence[int], *, api: str = "openai", out_dir: str | Path = "docs",
            observer_for: Callable[[str], SweepObserver] | None = None,
            command: str | None = None) -> Comparison:
    out = Path(out_dir)
    result = Comparison()
    for target in targets:
        observer = observer_for(target.label) if observer_for else None
        server = {"description": target.description}
        if target.serve_args is not None:
            server["argv"] = ["serve", *([model] if model else []), *target.serve_args]
            with ServerProcess(model, target.serve_args) as proc:
                run = sweep_run(proc.url, label=target.label, api=api, model=None,
                                workload=workload, concurrency=concurrency, observer=observer,
                                server=server)
        else:
            run = sweep_run(target.url, label=target.label, api=api, model=model,
                            workload=workload, concurrency=concurrency, observer=observer,
                            server=server)
        result.runs.append(run)
        result.result_files.append(run.save(out / f"bench-{_slug(target.label)}.json"))
    result.plots = plot_runs(result.runs, out)
    section = render(result.runs, plots=result.plots, doc_dir=out, command=command)
    result.report = write_report(out / "benchmarks.md", section)
    return result


def _slug(label: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in label.lower()).strip("-")
