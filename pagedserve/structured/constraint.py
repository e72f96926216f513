"""What a request's answer must match: a JSON schema, a regex, one of some strings, a grammar.

A :class:`Constraint` is a value object: the kind, the specification as text (canonical JSON
for a schema, so that equal schemas share one compiled grammar), and the request field it came
from, which error messages name (``response_format``, ``structured_outputs.regex``,
``format``, ``tools``). It is checked for shape here; whether the grammar compiles is the
compiler's business (see :mod:`pagedserve.structured.compiler`).

An object schema that lists its properties takes no others unless it says so
(``additionalProperties``), as llama.cpp's and Ollama's grammars have it and as OpenAI's strict
mode requires: a pydantic model's schema leaves the keyword out, and a small model given the
freedom invents keys until ``max_tokens``.

JSON whitespace is capped: between two JSON tokens nothing, one space, or one line break and
up to :data:`MAX_JSON_INDENT` spaces or tabs of indentation: enough for compact and for
pretty-printed JSON, never a runaway (Ollama's JSON mode could loop on whitespace until the
context was full).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

ConstraintKind = Literal["json_schema", "regex", "choice", "grammar"]
KINDS: tuple[str, ...] = ("json_schema", "regex", "choice", "grammar")
MAX_JSON_INDENT = 16
# llguidance's lexeme between JSON tokens
JSON_WHITESPACE = rf"( |\r?\n[ \t]{{0,{MAX_JSON_INDENT}}})?"
MAX_CHOICES = 1024


@dataclass(frozen=True, slots=True)
class Constraint:
    kind: ConstraintKind
    spec: str  # schema JSON, regex, JSON list of choices, or a Lark / GBNF grammar
    field: str = field(default="structured_outputs", compare=False)  # for error messages

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"{self.field}: unknown constraint kind {self.kind!r}; one of "
                             f"{', '.join(KINDS)}")
        if not isinstance(self.spec, str) or not self.spec.strip():
            raise ValueError(f"{self.field} must not be empty")

    @classmethod
    def json_schema(cls, schema: Any, field: str) -> Constraint:
        if not isinstance(schema, dict | bool):  # true: anything, false: nothing
            raise ValueError(f"{field} must be a JSON schema (an object), got "
                             f"{type(schema).__name__}")
        return cls("json_schema", json.dumps(closed(schema), ensure_ascii=False), field)

    @classmethod
    def json_object(cls, field: str) -> Constraint:
        """Any JSON object (OpenAI's ``json_object``, Ollama's ``format: "json"``)."""
        return cls.json_schema({"type": "object"}, field)

    @classmethod
    def regex(cls, pattern: Any, field: str) -> Constraint:
        if not isinstance(pattern, str):
            raise ValueError(f"{field} must be a string (a regular expression)")
        return cls("regex", pattern, field)

    @classmethod
    def choice(cls, choices: Any, field: str) -> Constraint:
        if not isinstance(choices, list) or not choices:
            raise ValueError(f"{field} must be a non-empty list of strings")
        if len(choices) > MAX_CHOICES:
            raise ValueError(f"{field} must hold at most {MAX_CHOICES} strings, got "
                             f"{len(choices)}")
        for c in choices:
            if not isinstance(c, str) or not c:
                raise ValueError(f"{field} must hold non-empty strings, got {c!r}")
        return cls("choice", json.dumps(choices, ensure_ascii=False), field)

    @classmethod
    def grammar(cls, text: Any, field: str) -> Constraint:
        if not isinstance(text, str):
            raise ValueError(f"{field} must be a string (a Lark or GBNF grammar)")
        return cls("grammar", text, field)

    @property
    def key(self) -> tuple[str, str]:
        """What the compiled grammar depends on (not the field a request named)."""
        return self.kind, self.spec

    def lark(self) -> str:
        """The grammar as llguidance's Lark, for the kinds that are not compiled directly."""
        if self.kind == "choice":
            alternatives = " | ".join(json.dumps(c, ensure_ascii=False)
                                      for c in json.loads(self.spec))
            return f"start: {alternatives}\n"
        if self.kind == "grammar":
            return self.spec
        raise ValueError(f"{self.kind} has no Lark form here")


# keywords whose value is a schema, a list of schemas, or a mapping of names to schemas
_SCHEMA_KEYS = ("items", "additionalItems", "contains", "not", "if", "then", "else",
                "propertyNames", "additionalProperties", "unevaluatedProperties")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def closed(schema: Any) -> Any:
    """A copy of ``schema`` where every object schema with ``properties`` and no word on
    other properties (``additionalProperties``, ``patternProperties``) takes no others."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if (isinstance(out.get("properties"), dict) and "additionalProperties" not in out
            and "patternProperties" not in out and "unevaluatedProperties" not in out):
        out["additionalProperties"] = False
    for key, value in out.items():
        if key in _SCHEMA_KEYS:
            out[key] = closed(value)
        elif key in _SCHEMA_LISTS and isinstance(value, list):
            out[key] = [closed(v) for v in value]
        elif key in _SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: closed(v) for name, v in value.items()}
    return out
