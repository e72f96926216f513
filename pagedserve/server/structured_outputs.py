"""Structured outputs and tool calls on both APIs, as engine constraints and answer parsers.

Translation and policy only; the engine constrains (:mod:`pagedserve.structured`). What a
request may ask for, and which field a 400 names:

    OpenAI  response_format {"type": "json_object"} | {"type": "json_schema", "json_schema":
            {"name", "schema", "strict"}}; vLLM's structured_outputs {json | regex | choice |
            grammar | json_object}; tools + tool_choice none | auto | required | a function
    Ollama  format "json" | a JSON schema; tools (the model decides, as tool_choice auto)

At most one constraint per request: response_format, structured_outputs and a tool_choice
that forces calls (required, a named function) exclude each other. ``auto`` constrains
nothing: the answer is read by the tool-call parser (``--tool-call-parser``, else the one the
chat template's format calls for, else hermes). ``required`` is the parser's own format forced
by a grammar; a named function's arguments are forced by its parameters' schema.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from pagedserve.server.errors import APIError
from pagedserve.server.ollama_protocol import ChatRequest as OllamaChatRequest
from pagedserve.server.openai_protocol import (
    REMOVED_GUIDED_FIELDS,
    ChatMessage,
    NamedToolChoice,
)
from pagedserve.structured import Constraint
from pagedserve.structured.tool_parsers import TOOL_PARSERS, NamedParser, ToolParser

DEFAULT_TOOL_PARSER = "hermes"


@dataclass(slots=True)
class ToolPlan:
    """How a request's tools shape the prompt, the constraint and the reading of answers."""

    tools: list[dict[str, Any]] = field(default_factory=list)  # for the chat template
    parser: ToolParser | None = None  # reads the answer; None: the answer is plain text
    constraint: Constraint | None = None  # required or a named function


def _bad(field_name: str, message: str) -> APIError:
    return APIError.bad_request(f"{field_name}: {message}", param=field_name)


def _constraint(make, *args) -> Constraint:
    try:
        return make(*args)
    except ValueError as exc:
        raise APIError.bad_request(str(exc), param=args[-1]) from exc


# -- OpenAI ------------------------------------------------------------------------------------


def openai_constraint(body: Any) -> Constraint | None:
    """The constraint of ``response_format`` or ``structured_outputs``; 400 for both at once,
    for removed fields, or for a kind that is not set up right."""
    for name in REMOVED_GUIDED_FIELDS:
        if getattr(body, name, None) is not None:
            raise _bad(name, "this field was removed (as in vLLM); use structured_outputs "
                       '(e.g. {"json": schema}, {"regex": ...}) or response_format')
    found: list[Constraint] = []
    fmt = body.response_format
    if fmt is not None and fmt.type == "json_object":
        found.append(Constraint.json_object("response_format"))
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise _bad("response_format.json_schema", "a schema is required with type "
                       '"json_schema": {"name": ..., "schema": {...}}')
        found.append(_constraint(Constraint.json_schema, fmt.json_schema.schema_,
                                 "response_format.json_schema.schema"))
    if body.structured_outputs is not None:
        found.append(_structured_outputs(body.structured_outputs))
    if len(found) > 1:
        raise _bad("structured_outputs", "response_format and structured_outputs both "
                   "constrain the answer; send one of them")
    return found[0] if found else None


def _structured_outputs(so: Any) -> Constraint:
    kinds = {"json": so.json_, "regex": so.regex, "choice": so.choice, "grammar": so.grammar,
             "json_object": so.json_object or None}
    given = [k for k, v in kinds.items() if v is not None]
    if len(given) != 1:
        raise _bad("structured_outputs", "set exactly one of json, regex, choice, grammar, "
                   f"json_object; got {', '.join(given) or 'none'}")
    kind = given[0]
    where = f"structured_outputs.{kind}"
    value = kinds[kind]
    if kind == "json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as exc:
                raise _bad(where, f"not valid JSON: {exc}") from exc
        return _constraint(Constraint.json_schema, value, where)
    if kind == "json_object":
        return Constraint.json_object(where)
    make = {"regex": Constraint.regex, "choice": Constraint.choice,
            "grammar": Constraint.grammar}[kind]
    return _constraint(make, value, where)


def openai_tool_plan(body: Any, parser_name: str | None,
                     constraint: Constraint | None) -> ToolPlan | None:
    """What ``tools`` and ``tool_choice`` ask for; None when the request has no tools."""
    choice = body.tool_choice
    if not body.tools:
        if choice not in (None, "none", "auto"):
            raise _bad("tool_choice", "a tool choice needs tools")
        return None
    functions = [t.function for t in body.tools]
    names = [f.name for f in functions]
    if len(set(names)) != len(names):
        raise _bad("tools", "function names must be unique")
    choice = choice or "auto"
    if choice == "none":
        return ToolPlan()
    tools = [{"type": "function", "function": f.model_dump(exclude_none=True)}
             for f in functions]
    if choice == "auto":
        return ToolPlan(tools, _parser(parser_name))
    if constraint is not None:
        raise _bad("tool_choice", "a tool choice that forces calls constrains the answer; it "
                   "cannot be combined with response_format or structured_outputs")
    if isinstance(choice, NamedToolChoice):
        wanted = choice.function.name
        if wanted not in names:
            raise _bad("tool_choice", f"function {wanted!r} is not in tools "
                       f"({', '.join(names)})")
        parameters = functions[names.index(wanted)].parameters or {"type": "object"}
        return ToolPlan(tools, NamedParser(wanted),
                        _constraint(Constraint.json_schema, parameters, "tools"))
    parser = _parser(parser_name)
    specs = [{"name": f.name, "parameters": f.parameters} for f in functions]
    parallel = body.parallel_tool_calls is not False
    return ToolPlan(tools, parser,
                    Constraint.grammar(parser.required_grammar(specs, parallel), "tools"))


def openai_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Chat messages as chat templates read them: tool calls with arguments as objects."""
    out = []
    for m in messages:
        message: dict[str, Any] = {"role": {"developer": "system", "function": "tool"}.get(
            m.role, m.role), "content": m.text()}
        if m.name is not None:
            message["name"] = m.name
        if m.tool_call_id is not None:
            message["tool_call_id"] = m.tool_call_id
        if m.tool_calls:
            message["tool_calls"] = [
                {"id": c.id, "type": "function",
                 "function": {"name": c.function.name,
                              "arguments": _arguments_object(c.function.arguments)}}
                for c in m.tool_calls]
        out.append(message)
    return out


def _arguments_object(arguments: str | dict[str, Any]) -> Any:
    if isinstance(arguments, dict):
        return arguments
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments  # the template shows what the client sent


# -- Ollama ------------------------------------------------------------------------------------


def ollama_constraint(fmt: Any) -> Constraint | None:
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return Constraint.json_object("format")
    return _constraint(Constraint.json_schema, fmt, "format")


def ollama_tool_plan(body: OllamaChatRequest, parser_name: str | None) -> ToolPlan | None:
    if not body.tools:
        return None
    tools = [{"type": "function", "function": t.function.model_dump(exclude_none=True)}
             for t in body.tools]
    return ToolPlan(tools, _parser(parser_name))


def ollama_messages(body: OllamaChatRequest) -> list[dict[str, Any]]:
    out = []
    for m in body.messages or []:
        message: dict[str, Any] = {"role": m.role, "content": m.content or ""}
        if m.tool_calls:
            message["tool_calls"] = [
                {"type": "function", "function": {"name": c.function.name,
                                                  "arguments": c.function.arguments}}
                for c in m.tool_calls]
        if m.tool_name is not None:
            message["tool_name"] = message["name"] = m.tool_name
        out.append(message)
    return out


def _parser(name: str | None) -> ToolParser:
    return TOOL_PARSERS[name or DEFAULT_TOOL_PARSER]()
