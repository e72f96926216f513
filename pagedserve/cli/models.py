"""`pagedserve list | show | ps | pull | rm | cp`: the models on this machine, and a server's."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pagedserve.engine_args import add_engine_args, engine_config_from_args, flag_of
from pagedserve.hub import registry
from pagedserve.hub.store import ModelIntegrityError

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1:11434"
TEMPLATE_PREVIEW_LINES = 8
# the engine flags that change an execution plan (worker/execution_plan.py)
PLAN_ENGINE_FLAGS = ("dtype", "kv_cache_dtype", "device", "tensor_parallel_size", "num_threads",
                     "async_scheduling", "enforce_eager", "kv_cache_memory", "kv_layout",
                     "max_parallel", "num_ctx", "gpu_memory_utilization")


def register(subparsers: argparse._SubParsersAction) -> None:
    raw = argparse.RawDescriptionHelpFormatter

    p = subparsers.add_parser(
        "list", aliases=["ls"], help="list models found in every store", formatter_class=raw,
        description="List every model pagedserve can run: its own store ($PAGEDSERVE_HOME or "
        "~/.pagedserve), an Ollama store ($OLLAMA_MODELS or ~/.ollama/models), the Hugging Face "
        "cache ($HF_HOME/hub) and the bundled model. A name resolves to the first source listed.",
        epilog="example:\n  pagedserve list\n  pagedserve list --json | jq '.[].name'",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_list)

    p = subparsers.add_parser(
        "show", help="show a model's architecture, parameters, template and defaults",
        formatter_class=raw,
        description="Show what a model is (architecture, parameters, context length, "
        "quantization) and the defaults that apply to it (Ollama params and system layers, "
        "generation_config.json).",
        epilog="examples:\n  pagedserve show smollm2:135m\n  pagedserve show llama3.2 --template"
        "\n  pagedserve show ./model.gguf\n  pagedserve show --plan\n"
        "  pagedserve show qwen2.5:0.5b --plan --dtype bfloat16 --threads 4",
    )
    p.add_argument("model", metavar="MODEL", nargs="?", default=None,
                   help="name, ORG/NAME or path (default: the bundled smollm2:135m)")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--template", action="store_true", help="print the whole chat template")
    what.add_argument("--parameters", action="store_true", help="print the default parameters")
    what.add_argument("--system", action="store_true", help="print the system prompt")
    what.add_argument("--plan", action="store_true",
                      help="print how an engine would compute this model on this machine "
                      "under the engine flags below: each decision, its value and why")
    add_engine_args(p.add_argument_group("engine (with --plan; as serve takes them)"),
                    PLAN_ENGINE_FLAGS)
    p.set_defaults(func=cmd_show)

    p = subparsers.add_parser(
        "ps", help="show the models a running server has loaded", formatter_class=raw,
        description="Ask a running `pagedserve serve` (GET /api/ps) what it has loaded.",
        epilog="example:\n  pagedserve ps --host 127.0.0.1:8000",
    )
    p.add_argument("--host", default=os.environ.get("PAGEDSERVE_HOST", DEFAULT_HOST),
                   help="server address, HOST:PORT or a URL (default: $PAGEDSERVE_HOST or "
                   f"{DEFAULT_HOST})")
    p.set_defaults(func=cmd_ps)

    p = subparsers.add_parser(
        "pull", help="copy or download a model into pagedserve's store", formatter_class=raw,
        description="Copy (or hard-link) a model into pagedserve's store, checking its sha256. "
        "REF is a .gguf file, a Hugging Face model directory, a model in an Ollama store, a "
        "Hugging Face repository ORG/NAME (downloaded with huggingface_hub; its local cache is "
        "used when the network is unreachable), or else a model of an Ollama registry, "
        "NAME[:TAG] or HOST/NAMESPACE/NAME[:TAG], downloaded from $PAGEDSERVE_REGISTRY "
        "(default https://registry.ollama.ai) or the HOST named; a cut download resumes.",
        epilog="examples:\n  pagedserve pull ./SmolLM2-135M-Instruct.Q4_1.gguf --name smol\n"
        "  pagedserve pull llama3.2:1b             # ~/.ollama/models, else registry.ollama.ai\n"
        "  pagedserve pull Qwen/Qwen2.5-0.5B-Instruct\n"
        "  pagedserve pull localhost:5000/library/tiny --insecure",
    )
    p.add_argument("ref", metavar="REF", help="path, Ollama name or ORG/NAME")
    p.add_argument("--name", help="store it under this NAME[:TAG] (default: from REF)")
    p.add_argument("--link", action="store_true",
                   help="hard-link instead of copying when on the same file system (saves "
                   "disk; the source must not be modified afterwards)")
    p.add_argument("--insecure", action="store_true",
                   help="reach the registry over http rather than https")
    p.add_argument("--revision", metavar="REV",
                   help="of a Hugging Face repository ORG/NAME: the branch, tag or commit hash "
                   "to download (default main; a commit hash pins the exact files)")
    p.set_defaults(func=cmd_pull)

    p = subparsers.add_parser(
        "rm", help="remove a model from pagedserve's store", formatter_class=raw,
        description="Remove models from pagedserve's own store, and the blobs no other model "
        "uses. Ollama's store and the Hugging Face cache are never touched.",
        epilog="example:\n  pagedserve rm smol",
    )
    p.add_argument("models", metavar="MODEL", nargs="+")
    p.set_defaults(func=cmd_rm)

    p = subparsers.add_parser(
        "cp", help="give a model of pagedserve's store a second name", formatter_class=raw,
        description="Name a model of pagedserve's store anew; both names share its blobs "
        "(nothing is copied). A model already named DESTINATION is replaced.",
        epilog="example:\n  pagedserve cp smol my-smol:v1",
    )
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("destination", metavar="DESTINATION")
    p.set_defaults(func=cmd_cp)


# ---------------------------------------------------------------------------------------------
# Formatting


def human_size(nbytes: int | None) -> str:
    """Decimal units, as Ollama prints them: 98 MB, 1.3 GB."""
    if nbytes is None:
        return "?"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if nbytes >= scale:
            value = nbytes / scale
            return f"{value:.1f} {unit}" if value < 10 else f"{value:.0f} {unit}"
    return f"{nbytes} B"


def human_count(n: int | None) -> str:
    """A parameter count as Ollama's parameter_size: 135M, 1.2B."""
    if not n:
        return "?"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            value = n / scale
            return f"{value:.1f}{unit}" if value < 10 else f"{value:.0f}{unit}"
    return str(n)


def format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["   ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in [header, *rows]]
    return "\n".join(lines)


def _where(entry: registry.ModelEntry) -> str:
    home = str(Path.home())
    where = str(entry.path)
    if where.startswith(home + os.sep):
        where = "~" + where[len(home):]
    return f"{where} ({entry.problem})" if entry.problem else where


def format_list(entries: list[registry.ModelEntry]) -> str:
    header = ["NAME", "SOURCE", "FORMAT", "QUANT", "FAMILY", "PARAMS", "SIZE", "WHERE"]
    rows = [[e.name, e.source, e.format, e.quantization, e.family,
             human_count(e.parameter_count), human_size(e.size), _where(e)] for e in entries]
    return format_table(header, rows)


def _chat_template(resolved: registry.ResolvedModel, info: Any) -> str | None:
    """The jinja chat template pagedserve renders: GGUF metadata or tokenizer_config.json."""
    metadata = getattr(info, "metadata", None) or {}
    if template := metadata.get("tokenizer.chat_template"):
        return str(template)
    if resolved.path.is_dir():
        jinja = resolved.path / "chat_template.jinja"
        if jinja.is_file():
            return jinja.read_text()
        config = resolved.path / "tokenizer_config.json"
        if config.is_file():
            template = json.loads(config.read_text()).get("chat_template")
            if isinstance(template, str):
                return template
    return None


def _format_value(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _parameter_lines(defaults: dict[str, Any]) -> list[tuple[str, str]]:
    rows = []
    for key in sorted(defaults):
        value = defaults[key]
        if isinstance(value, list):
            rows.extend((key, _format_value(v)) for v in value)
        else:
            rows.append((key, _format_value(value)))
    return rows


def format_show(resolved: registry.ResolvedModel, info: Any) -> str:
    template = _chat_template(resolved, info)
    model_rows = [
        ("name", resolved.name),
        ("source", resolved.source),
        ("path", str(resolved.path)),
        ("format", info.format),
        ("architecture", info.architecture),
        ("family", info.family),
        ("parameters", human_count(info.parameter_count)),
        ("context length", str(info.context_length)),
        ("quantization", info.quantization),
        ("size", human_size(info.file_size)),
    ]
    sections = [("Model", model_rows)]
    sections.append(("Parameters", _parameter_lines(resolved.sampling_defaults)))
    out: list[str] = []
    for title, rows in sections:
        out.append(f"  {title}")
        if not rows:
            out.append("    (none: pagedserve's defaults apply)")
        width = max((len(k) for k, _ in rows), default=0) + 4
        out.extend(f"    {key.ljust(width)}{value}" for key, value in rows)
        out.append("")
    if resolved.system:
        out.append("  System")
        out.extend(f"    {line}" for line in resolved.system.strip().splitlines())
        out.append("")
    out.append("  Template")
    if template is None:
        out.append("    (none: the model has no chat template; prompts are sent as written)")
    else:
        lines = template.strip().splitlines()
        out.extend(f"    {line}" for line in lines[:TEMPLATE_PREVIEW_LINES])
        if len(lines) > TEMPLATE_PREVIEW_LINES:
            out.append(f"    ... ({len(lines) - TEMPLATE_PREVIEW_LINES} more lines: "
                       "--template prints it all)")
    if resolved.template:
        out.append("")
        out.append("  Ollama template (informational: pagedserve renders the jinja one above)")
        out.extend(f"    {line}" for line in resolved.template.strip().splitlines()
                   [:TEMPLATE_PREVIEW_LINES])
    return "\n".join(out).rstrip() + "\n"


# ---------------------------------------------------------------------------------------------
# Commands


def _fail(message: str) -> int:
    print(f"Error: {message}", file=sys.stderr)
    return 1


def cmd_list(args: argparse.Namespace) -> int:
    entries = registry.list_models()
    if args.json:
        rows = [{"name": e.name, "source": e.source, "path": str(e.path), "size": e.size,
                 "format": e.format, "quantization": e.quantization, "family": e.family,
                 "parameter_count": e.parameter_count, "context_length": e.context_length,
                 "problem": e.problem} for e in entries]
        print(json.dumps(rows, indent=2))
    else:
        print(format_list(entries))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from pagedserve.loader import ModelLoadError

    try:
        resolved = registry.resolve(args.model)
        info = registry.model_info(resolved.path)
    except (registry.ModelNotFoundError, ModelIntegrityError, ModelLoadError) as exc:
        logger.debug("cannot show %s", args.model, exc_info=True)  # --verbose: the traceback
        return _fail(str(exc))
    if args.plan:
        return _show_plan(args, resolved)
    if args.template:
        template = _chat_template(resolved, info) or resolved.template or ""
        print(template.rstrip())
    elif args.parameters:
        lines = _parameter_lines(resolved.sampling_defaults)
        for key, value in lines:
            print(f"{key:<20}{value}")
        if not lines:  # on stderr: a script reading stdout still gets nothing
            print(f"{resolved.name} sets no default parameters: pagedserve's defaults apply",
                  file=sys.stderr)
    elif args.system:
        if resolved.system:
            print(resolved.system.rstrip())
        else:
            template = _chat_template(resolved, info) or ""
            print(f"{resolved.name} has no system prompt of its own"
                  + ("; its chat template may add one to a conversation without one "
                     "(--template shows it)" if "system" in template else ""), file=sys.stderr)
    else:
        print(format_show(resolved, info), end="")
    return 0


def _show_plan(args: argparse.Namespace, resolved: registry.ResolvedModel) -> int:
    """`show --plan`: the execution plan an engine of these flags would resolve here. It only
    looks: CPU kernels that are not built are reported, not compiled."""
    from pagedserve.device import check_device
    from pagedserve.loader.encoder import encoder_architecture
    from pagedserve.ops.cpu_kernels import KernelUnavailable
    from pagedserve.worker.execution_plan import Machine, resolve_dtype, resolve_execution_plan

    try:
        config = engine_config_from_args(args)
        check_device(config.device)
        if encoder_architecture(resolved.path) is not None:  # an EncoderCore: dtype only
            dtype = resolve_dtype(config.dtype, config.device)
            why = f"--dtype {dtype}" if config.dtype != "auto" else (
                "auto: bfloat16 or float16 on CUDA, else bfloat16 where the CPU computes it "
                "natively, else float32")
            print(format_plan(resolved.name, config.device, [("dtype", dtype, why)],
                              "an embedding model: torch's kernels, no KV cache"), end="")
            return 0
        plan = resolve_execution_plan(config, Machine(build_kernels=False))
    except (ValueError, KernelUnavailable) as exc:
        field, _, rest = str(exc).partition(" ")
        flag = flag_of(field)
        return _fail(f"{flag} {rest}" if flag else str(exc))
    print(format_plan(resolved.name, plan.device, plan.rows()), end="")
    return 0


def format_plan(name: str, device: str, rows: list[tuple[str, str, str]],
                note: str | None = None) -> str:
    """The plan as a table: decision, value, why."""
    table = [("decision", "value", "why"), *rows]
    widths = [max(len(row[i]) for row in table) + 2 for i in range(2)]
    out = [f"  Execution plan: {name} on {device}"]
    if note:
        out.append(f"    ({note})")
    out.extend(f"    {d.ljust(widths[0])}{v.ljust(widths[1])}{why}".rstrip()
               for d, v, why in table)
    return "\n".join(out) + "\n"


def _base_url(host: str) -> str:
    return host.rstrip("/") if "://" in host else f"http://{host.rstrip('/')}"


def _until(expires_at: str | None) -> str:
    if not expires_at:
        return "-"
    try:
        when = datetime.fromisoformat(expires_at.replace("Z", "+00:00"))
    except ValueError:
        return expires_at
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    if when - datetime.now(UTC) > timedelta(days=3650):  # loaded for the life of the server
        return "Forever"
    return when.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def format_ps(models: list[dict[str, Any]]) -> str:
    header = ["NAME", "ID", "SIZE", "PROCESSOR", "DTYPE", "CONTEXT", "UNTIL"]
    rows = []
    for m in models:
        size = int(m.get("size") or 0)
        vram = int(m.get("size_vram") or 0)
        if size and vram >= size:
            processor = "100% GPU"
        elif vram:
            processor = f"{100 * vram // size}% GPU"
        else:
            processor = "100% CPU"
        digest = str(m.get("digest") or "").removeprefix("sha256:")
        rows.append([str(m.get("name") or m.get("model") or "?"), digest[:12] or "-",
                     human_size(size) if size else "-", processor,
                     str((m.get("details") or {}).get("dtype") or "-"),  # pagedserve's own
                     str(m.get("context_length") or "-"), _until(m.get("expires_at"))])
    return format_table(header, rows)


def cmd_ps(args: argparse.Namespace) -> int:
    import httpx

    url = _base_url(args.host) + "/api/ps"
    try:
        response = httpx.get(url, timeout=5.0)
        response.raise_for_status()
        models = response.json().get("models") or []
    except httpx.ConnectError:
        return _fail(f"no server is running at {_base_url(args.host)}; start one with "
                     "`pagedserve serve`, or give its address with --host")
    except (httpx.HTTPError, ValueError) as exc:
        return _fail(f"{url} did not answer as a pagedserve or Ollama server: {exc}")
    print(format_ps(models))
    return 0


class RichProgress:
    """The store's ProgressHook drawn as a rich progress bar on stderr."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
            TransferSpeedColumn(), TimeRemainingColumn(), console=Console(stderr=True),
        )
        self._task: Any = None
        self._started = False

    def __enter__(self) -> RichProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._started:
            self.progress.stop()

    def begin(self, label: str, total: int) -> None:
        if not self._started:  # nothing drawn when a pull fails before copying
            self.progress.start()
            self._started = True
        self._task = self.progress.add_task(label, total=total)

    def advance(self, nbytes: int) -> None:
        self.progress.advance(self._task, nbytes)

    def end(self) -> None:
        pass


def cmd_pull(args: argparse.Namespace) -> int:
    try:
        with RichProgress() as progress:
            resolved = registry.pull(args.ref, args.name, link=args.link,
                                     insecure=args.insecure, progress=progress,
                                     revision=args.revision)
    except (registry.PullError, registry.ModelNotFoundError, ModelIntegrityError,
            ValueError) as exc:
        return _fail(str(exc))
    print(f"pulled {args.ref} as {resolved.name} (sha256 verified): {resolved.path}")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    status = 0
    for model in args.models:
        try:
            freed = registry.remove(model)
        except registry.ModelNotFoundError as exc:
            status = _fail(str(exc))
            continue
        print(f"deleted '{model}' ({len(freed)} blob{'s' if len(freed) != 1 else ''} freed)")
    return status


def cmd_cp(args: argparse.Namespace) -> int:
    try:
        registry.copy(args.source, args.destination)
    except (registry.ModelNotFoundError, ValueError) as exc:
        return _fail(str(exc))
    print(f"copied '{args.source}' to '{args.destination}'")
    return 0
