"""The engine's command-line flags, declared once for ``run``, ``serve`` and ``bench offline``.

As vLLM's ``EngineArgs``: every flag that ends in an :class:`EngineConfig` field is described here,
with its type, choices and help, and :func:`engine_config_from_args` turns parsed arguments into
the config. A command picks which of the flags it offers (``run`` fewer than ``serve``), the
argument group they appear in, and its own defaults where they differ from the engine's (``bench
offline`` runs ``--device cpu`` and 256 sequences unless told otherwise); the help names the
default in force.

:func:`add_engine_args` records the fields it added on the parser (``engine_fields``), so that
:func:`engine_config_from_args` reads exactly those: ``run``'s ``--seed`` is a sampling flag, not
the engine's seed, and is never read as one.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterable
from typing import Any

from pagedserve.arg_types import parse_bytes
from pagedserve.config import DTYPE_CHOICES, EngineConfig
from pagedserve.structured.limits import GrammarLimits

ENGINE_FIELDS_DEST = "engine_fields"  # where the parser keeps the fields its flags set


def _default(field: str) -> str:
    """The engine's default for `field`, as the help shows it."""
    return str(next(f.default for f in dataclasses.fields(EngineConfig) if f.name == field))


@dataclasses.dataclass(frozen=True, slots=True)
class EngineFlag:
    field: str  # the EngineConfig field it sets
    flag: str
    help: str
    default_help: str | None  # what an unset flag means; None: say nothing
    options: dict[str, Any] = dataclasses.field(default_factory=dict)  # type, choices, action

    @property
    def dest(self) -> str:
        return self.flag[2:].replace("-", "_")


_FLAGS = (
    EngineFlag("max_num_seqs", "--max-num-seqs", "most requests in one batch",
               _default("max_num_seqs"), {"type": int}),
    EngineFlag("max_num_batched_tokens", "--max-num-batched-tokens",
               "most tokens computed in one step", _default("max_num_batched_tokens"),
               {"type": int}),
    EngineFlag("kv_cache_memory", "--kv-cache-memory",
               "memory for the KV cache, e.g. 512MiB or 2GiB", "a share of free memory",
               {"type": parse_bytes, "metavar": "BYTES"}),
    EngineFlag("max_model_len", "--max-model-len", "context length",
               "the model's, capped by the KV cache", {"type": int}),
    EngineFlag("block_size", "--block-size", "tokens per KV block",
               _default("block_size"), {"type": int}),
    EngineFlag("enable_prefix_caching", "--enable-prefix-caching",
               "reuse the KV blocks of shared prompt prefixes", "on",
               {"action": argparse.BooleanOptionalAction}),
    EngineFlag("kv_layout", "--kv-layout",
               "paged blocks, or static slots as Ollama/llama.cpp reserve them",
               _default("kv_layout"), {"choices": ["paged", "static"]}),
    EngineFlag("max_parallel", "--max-parallel",
               "static layout: number of slots, like OLLAMA_NUM_PARALLEL",
               _default("max_parallel"), {"type": int}),
    EngineFlag("num_ctx", "--num-ctx", "static layout: tokens reserved per slot, like num_ctx",
               _default("num_ctx"), {"type": int}),
    EngineFlag("dtype", "--dtype",
               "compute dtype (the KV cache's: --kv-cache-dtype); auto: bfloat16 where the CPU "
               "computes it natively (AVX-512 BF16, AMX), else float32; float32 is the exact "
               "reference", "auto", {"choices": list(DTYPE_CHOICES), "default": "auto"}),
    EngineFlag("kv_cache_dtype", "--kv-cache-dtype",
               "K and V in the cache; auto: as --dtype, but float16 where auto chose float32 on "
               "a CPU, as llama.cpp (half the memory and of attention's reads)", "auto",
               {"choices": list(DTYPE_CHOICES), "default": "auto"}),
    EngineFlag("device", "--device",
               "cpu or cuda, which needs a CUDA build of torch (README: 'With a GPU')",
               _default("device")),
    EngineFlag("tensor_parallel_size", "--tensor-parallel-size",
               "split the model across N ranks (worker processes; on CUDA one GPU each, on a "
               "CPU sharing its cores); docs/tensor-parallel.md", _default("tensor_parallel_size"),
               {"type": int, "metavar": "N"}),
    EngineFlag("num_threads", "--threads", "torch CPU threads",
               "what the CPU affinity and cgroup quota allow", {"type": int}),
    EngineFlag("seed", "--seed", "engine seed for requests that bring none",
               "random at each start, so answers vary between runs", {"type": int}),
    EngineFlag("async_scheduling", "--async-scheduling",
               "schedule and prepare each step while the device runs the one before (its "
               "tokens are read one step late; vLLM's flag)", "on CUDA only",
               {"action": argparse.BooleanOptionalAction}),
    EngineFlag("enforce_eager", "--enforce-eager",
               "CUDA: run decode steps eagerly, without CUDA graphs", None,
               {"action": "store_true", "default": None}),
    EngineFlag("gpu_memory_utilization", "--gpu-memory-utilization",
               "CUDA: share of the GPU's memory this process may use; the KV cache gets what "
               "the weights and activations leave", _default("gpu_memory_utilization"),
               {"type": float, "metavar": "FRACTION"}),
    EngineFlag("max_prompt_chars", "--max-prompt-chars",
               "answer 400 to longer prompt texts before tokenizing them",
               "what the context can hold at the vocabulary's longest token",
               {"type": int, "metavar": "N"}),
)
ENGINE_FLAGS = {f.field: f for f in _FLAGS}


def add_engine_args(group: argparse._ActionsContainer, fields: Iterable[str], *,
                    defaults: dict[str, Any] | None = None,
                    default_help: dict[str, str] | None = None) -> None:
    """Add the flags of `fields` (EngineConfig field names) to `group`, in that order.

    `defaults`: the command's own default for a field (the help names it); `default_help`: what
    an unset flag means for this command, where the engine's own words do not fit."""
    defaults, default_help = defaults or {}, default_help or {}
    added = []
    for name in fields:
        spec = ENGINE_FLAGS[name]
        options = dict(spec.options)
        described = spec.default_help
        if name in defaults:
            options["default"] = defaults[name]
            described = str(defaults[name])
        described = default_help.get(name, described)
        help_text = spec.help + (f" (default: {described})" if described else "")
        group.add_argument(spec.flag, dest=spec.dest, help=help_text, **options)
        added.append(name)
    already = group.get_default(ENGINE_FIELDS_DEST) or ()
    group.set_defaults(**{ENGINE_FIELDS_DEST: (*already, *added)})


def add_grammar_limit_args(parser: argparse.ArgumentParser) -> None:
    """The structured-output limits (:class:`GrammarLimits`), one flag per field."""
    d = GrammarLimits()
    g = parser.add_argument_group(
        "structured outputs (what one client's grammar may cost; over a limit is a 400)")
    g.add_argument("--grammar-compile-timeout", type=float, metavar="SECONDS",
                   default=d.compile_seconds,
                   help=f"most time a grammar may take to compile, queueing included "
                   f"(default {d.compile_seconds:g})")
    g.add_argument("--grammar-compile-threads", type=int, metavar="N",
                   default=d.compile_threads,
                   help=f"grammars compiled at once (default {d.compile_threads})")
    g.add_argument("--grammar-compile-queue", type=int, metavar="N", default=d.compile_queue,
                   help=f"grammars that may wait for a compile thread; more are a 503 "
                   f"(default {d.compile_queue})")
    g.add_argument("--grammar-cache-size", type=int, metavar="N", default=d.cache_entries,
                   help=f"compiled grammars kept for reuse (default {d.cache_entries})")
    g.add_argument("--grammar-cache-memory", type=parse_bytes, metavar="BYTES",
                   default=d.cache_memory,
                   help=f"memory the kept grammars may hold, e.g. 256MiB (default "
                   f"{d.cache_memory >> 20}MiB); one over a quarter of it is not kept")
    g.add_argument("--grammar-mask-budget", type=float, metavar="SECONDS",
                   default=d.mask_seconds,
                   help="most time one request's token mask may take in a step; over it the "
                   f"request ends with an error (default {d.mask_seconds:g})")
    g.add_argument("--grammar-max-schema-properties", type=int, metavar="N",
                   default=d.max_schema_properties,
                   help=f"object properties in one JSON schema (default "
                   f"{d.max_schema_properties}, OpenAI's limit)")
    g.add_argument("--grammar-max-regex-repeat", type=int, metavar="N",
                   default=d.max_regex_repeat,
                   help=f"characters a regex's counted repetitions may spell: (a{{100}}){{300}} "
                   f"spells 30000 (default {d.max_regex_repeat})")
    g.add_argument("--grammar-lexer-fuel", type=int, metavar="N", default=d.lexer_fuel,
                   help=f"llguidance's initial_lexer_fuel: building the lexer and the first "
                   f"token mask (default {d.lexer_fuel})")
    g.add_argument("--grammar-step-fuel", type=int, metavar="N", default=d.step_lexer_fuel,
                   help=f"llguidance's step_lexer_fuel: one token mask's lexer work "
                   f"(default {d.step_lexer_fuel})")
    g.add_argument("--grammar-step-items", type=int, metavar="N", default=d.step_max_items,
                   help=f"llguidance's step_max_items: one token mask's parser items "
                   f"(default {d.step_max_items})")
    g.add_argument("--grammar-lexer-states", type=int, metavar="N", default=d.max_lexer_states,
                   help=f"llguidance's max_lexer_states, 1-2 KB each (default "
                   f"{d.max_lexer_states})")
    g.add_argument("--grammar-max-symbols", type=int, metavar="N",
                   default=d.max_grammar_symbols,
                   help=f"llguidance's max_grammar_size, in symbols (default "
                   f"{d.max_grammar_symbols})")
    already = g.get_default(ENGINE_FIELDS_DEST) or ()
    g.set_defaults(**{ENGINE_FIELDS_DEST: (*already, "grammar_limits")})


_GRAMMAR_FLAGS = {  # GrammarLimits field -> the flag's dest
    "compile_seconds": "grammar_compile_timeout",
    "compile_threads": "grammar_compile_threads",
    "compile_queue": "grammar_compile_queue",
    "cache_entries": "grammar_cache_size",
    "cache_memory": "grammar_cache_memory",
    "mask_seconds": "grammar_mask_budget",
    "max_schema_properties": "grammar_max_schema_properties",
    "max_regex_repeat": "grammar_max_regex_repeat",
    "lexer_fuel": "grammar_lexer_fuel",
    "step_lexer_fuel": "grammar_step_fuel",
    "step_max_items": "grammar_step_items",
    "max_lexer_states": "grammar_lexer_states",
    "max_grammar_symbols": "grammar_max_symbols",
}


def grammar_limits_from_args(args: argparse.Namespace) -> GrammarLimits:
    """The :class:`GrammarLimits` the flags ask for (ValueError names a bad one)."""
    try:
        return GrammarLimits(**{name: getattr(args, dest) for name, dest in
                                _GRAMMAR_FLAGS.items()})
    except ValueError as exc:  # "compile_seconds must be ..." -> "--grammar-compile-timeout ..."
        name, _, rest = str(exc).partition(" ")
        flag = "--" + _GRAMMAR_FLAGS.get(name, name).replace("_", "-")
        raise ValueError(f"{flag} {rest}") from None


def engine_config_from_args(args: argparse.Namespace, **fields: Any) -> EngineConfig:
    """The :class:`EngineConfig` of the engine flags the command added and the user set (an
    unset one keeps the engine's default); `fields`: the command's own settings, over those.
    ValueError names the field (:func:`flag_of` turns it into the flag)."""
    knobs: dict[str, Any] = {}
    for name in getattr(args, ENGINE_FIELDS_DEST, ()):
        if name == "grammar_limits":
            knobs[name] = grammar_limits_from_args(args)
        elif (value := getattr(args, ENGINE_FLAGS[name].dest)) is not None:
            knobs[name] = value
    knobs.update((k, v) for k, v in fields.items() if v is not None)
    return EngineConfig(**knobs)


def flag_of(field: str) -> str | None:
    """The flag that sets EngineConfig `field` (``num_threads`` -> ``--threads``), if any."""
    spec = ENGINE_FLAGS.get(field)
    return spec.flag if spec is not None else None
