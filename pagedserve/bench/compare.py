"""The comparison in one call: the paged and the static KV layout of the same engine, served in
turn by child processes, swept with the same workload; peers already running join the sweep.

Both servers run the same model, kernels and sampler, so the difference measured is the memory
architecture: the static layout runs at most ``max_parallel`` requests, each holding ``num_ctx``
KV positions whatever its length, and queues the rest; the paged one admits requests while KV
blocks are free. Every run's JSON, the plots and the Markdown report land in ``out_dir``.

Peers join either running (``--peer URL``) or started here like our own servers: llama.cpp's
``llama-server`` on the same GGUF file with the same thread count, once per configuration
(:func:`llama_cpp_targets`). A peer's configurations form a group, and the report compares our
first run with the group's best at each level, as a user who tuned that server would see it.
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
    """A server to sweep: pagedserve started with ``serve_args``, another server started with
    ``command`` (``{port}`` filled in), or one already running at ``url``."""

    label: str
    serve_args: list[str] | None = None
    url: str | None = None
    description: str = ""
    command: list[str] | None = None
    group: str = ""  # the peer this run is one configuration of ("" for our own runs)



@dataclass(slots=True)
class Comparison:
    runs: list[RunResult] = field(default_factory=list)
    result_files: list[Path] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)
    report: Path | None = None


def layout_targets(max_parallel: int, num_ctx: int, *, paged_args: Sequence[str] = (),
                   static_args: Sequence[str] = (),
                   layouts: Sequence[str] = ("paged", "static")) -> list[Target]:
    paged = ["--kv-layout", "paged", *paged_args]
    static = ["--kv-layout", "static", "--max-parallel", str(max_parallel),
              "--num-ctx", str(num_ctx), *static_args]
    targets = {
        "paged": Target("paged", paged, description="pagedserve, paged KV cache, continuous "
                        f"batching (`{shlex.join(paged)}`)"),
        "static": Target(f"static N={max_parallel}", static,
                         description=f"pagedserve, static KV slots: {max_parallel} x {num_ctx} "
                         f"tokens, the Ollama/llama.cpp layout (`{shlex.join(static)}`)"),
    }
    unknown = [name for name in layouts if name not in targets]
    if unknown:
        raise ValueError(f"unknown layout {unknown[0]!r}: choose from paged, static")
    return [targets[name] for name in layouts]


def llama_cpp_targets(binary: str | Path, model_path: str | Path, *, threads: int,
                      configs: Sequence[str]) -> list[Target]:
    """llama.cpp's ``llama-server`` on ``model_path``, one target per configuration (extra
    arguments such as ``-np 4 -c 16384``), with the given CPU threads."""
    binary = Path(binary)
    if not binary.is_file():
        raise ValueError(f"--llama-server: no such file {str(binary)!r} (build it with "
                         "../shared/peers/llama-server.sh, or pass the path of yours)")
    targets = []
    for config in configs:
        extra = shlex.split(config)
        command = [str(binary), "-m", str(model_path), "--host", "{host}", "--port", "{port}",
                   "-t", str(threads), *extra]
        targets.append(Target(
            f"llama.cpp {config}".strip(), command=command, group="llama.cpp",
            description=f"llama.cpp's server, `llama-server -t {threads} {config}`".rstrip(),
        ))
    return targets


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
            command: str | None = None, section: str = "") -> Comparison:
    """Sweep every target in turn and write the report; ``section`` names the report's part of
    ``benchmarks.md`` (and prefixes the file names), so several comparisons share the page."""
    out = Path(out_dir)
    prefix = f"bench-{_slug(section)}" if section else "bench"
    result = Comparison()
    for target in targets:
        observer = observer_for(target.label) if observer_for else None
        server = {"description": target.description, "group": target.group}
        if target.serve_args is not None:
            server["argv"] = ["serve", *([model] if model else []), *target.serve_args]
            with ServerProcess(model, target.serve_args) as proc:
                run = sweep_run(proc.url, label=target.label, api=api, model=None,
                                workload=workload, concurrency=concurrency, observer=observer,
                                server=server)
        elif target.command is not None:
            with ServerProcess(None, command=target.command) as proc:
                server["argv"] = proc.argv
                run = sweep_run(proc.url, label=target.label, api=api, model=None,
                                workload=workload, concurrency=concurrency, observer=observer,
                                server=server)
        else:
            run = sweep_run(target.url, label=target.label, api=api, model=model,
                            workload=workload, concurrency=concurrency, observer=observer,
                            server=server)
        result.runs.append(run)
        result.result_files.append(run.save(out / f"{prefix}-{_slug(target.label)}.json"))
    result.plots = plot_runs(result.runs, out, prefix=prefix)
    text = render(result.runs, plots=result.plots, doc_dir=out, command=command)
    result.report = write_report(out / "benchmarks.md", text, section=section)
    return result


def _slug(label: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in label.lower()).strip("-")
