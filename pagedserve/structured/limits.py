"""How much a client's grammar may cost the server: compile time, memory, mask time.

One value object, :class:`GrammarLimits`, carries every knob from ``pagedserve serve``'s flags
to the :class:`~pagedserve.structured.compiler.GrammarCompiler`. A constraint over a limit is
refused with a 400 naming its field before anything is queued; one that goes over its mask
budget while it is generating ends with ``finish_reason: "error"``.

The knobs, by the cost they bound:

    compile time   compile_seconds (each grammar, queueing included), compile_threads,
                   compile_queue; before llguidance starts: max_schema_properties (its JSON
                   compiler is quadratic in an object's property count), max_regex_repeat
                   (a pattern such as (a{1000}){3000} spells three million forced bytes)
    llguidance     lexer_fuel, step_lexer_fuel, step_max_items, max_lexer_states,
                   max_grammar_symbols: its own ``LLParserLimits``; lexer_fuel also bounds the
                   forced bytes the first mask walks (the compiler computes it)
    memory         cache_entries, cache_memory: the compiled grammars kept for reuse
    engine time    mask_seconds: one request's token mask in one step
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

MiB = 1 << 20


@dataclass(slots=True, frozen=True)
class GrammarLimits:
    compile_seconds: float = 10.0  # from the request's arrival to its grammar, queue included
    compile_threads: int = 2
    compile_queue: int = 64  # compilations waiting for a thread; more are a 503
    cache_entries: int = 256  # compiled (or refused) grammars kept, most recently used
    cache_memory: int = 128 * MiB  # bytes the kept grammars may hold
    mask_seconds: float = 0.1  # one request's token mask in one step
    max_schema_properties: int = 5000  # object properties in one schema (OpenAI's limit)
    max_regex_repeat: int = 10_000  # characters one regex's counted repetitions may spell
    # llguidance's LLParserLimits. Its own initial fuel (1,000,000) lets the first mask walk
    # half a million forced bytes of (a{1000}){3000} (seconds, 166 MiB) before it fails;
    # 200,000 stops it in tens of milliseconds and still builds schemas of 5000 properties.
    # A run of forced bytes met later is walked on a step's fuel: 100,000 (half its own
    # default) walks what max_regex_repeat lets through in tens of milliseconds, and gives up
    # on a longer one in as long, where 200,000 took 0.2-0.3 s on the engine thread.
    lexer_fuel: int = 200_000  # initial_lexer_fuel: building the lexer and the first mask
    step_lexer_fuel: int = 100_000  # one mask's lexer work
    step_max_items: int = 50_000  # one mask's Earley items
    max_lexer_states: int = 250_000  # about 1-2 KB each
    max_grammar_symbols: int = 500_000  # max_grammar_size

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ValueError(f"{f.name} must be a positive number, got {value!r}")
            if f.type == "int" and not isinstance(value, int):
                raise ValueError(f"{f.name} must be an integer, got {value!r}")

    @property
    def max_cached_grammar_bytes(self) -> int:
        """A grammar bigger than this is used by the requests that wait for it, not kept: a
        quarter of the cache, so that one huge grammar cannot push out all the others."""
        return self.cache_memory // 4

    def parser_limits(self) -> Any:
        """llguidance's ``LLParserLimits`` for these limits; errors name no parser state."""
        import llguidance

        return llguidance.LLParserLimits(
            initial_lexer_fuel=self.lexer_fuel, step_lexer_fuel=self.step_lexer_fuel,
            step_max_items=self.step_max_items, max_lexer_states=self.max_lexer_states,
            max_grammar_size=self.max_grammar_symbols, verbose_errors=False)
