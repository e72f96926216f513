"""Structured outputs and tool calls on both APIs, as engine constraints and answer parsers.

Translation and policy only; the engine constrains (:mod:`pagedserve.structured`). What a
request may ask for, and which field a 400 names:

    OpenAI  response_format {"type": "json_object"} | {"type": "json_schema", "json_schema":
            {"name", "schema", "strict"}}; vLLM's structured_outputs {json | regex | choice |
            grammar | json_object}; tools + tool_choice none | auto | required | a function
    Ollama  format "json" | a JSON schema; tools (the model decides, as tool_choice auto)

Tools reach the model in one of two ways (:class:`ToolFormat`, probed once per model):

    native   the chat template renders them (its ``tools`` variable), and earlier calls and
             tool results; answers are read by the tool-call parser of its format
             (``--tool-call-parser``, else the one the template's text calls for, else
             hermes). ``auto`` constrains nothing.
    generic  the template cannot (no ``tools`` variable): they go into the system prompt in
             hermes' format (server/tool_prompt.py), and ``auto`` is a grammar too: text, or
             calls whose arguments validate (a request's JSON schema or choices take the
             place of the text)

``required`` is the parser's format forced by a grammar, at least one call; a named function
is the same with that one tool. Arguments validate against the tool's parameters exactly (an
object schema takes no keys it does not list, unless it says so). At most one constraint
otherwise: response_format, structured_outputs and a tool_choice that forces calls exclude
each other.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pagedserve.server.errors import APIError
from pagedserve.server.ollama_protocol import ChatRequest as OllamaChatRequest
from pagedserve.server.openai_protocol import (
    REMOVED_GUIDED_FIELDS,
    ChatMessage,
    NamedToolChoice,
)
from pagedserve.server.tool_prompt import generic_tool_messages
from pagedserve.structured import Constraint
from pagedserve.structured.constraint import JSON_WHITESPACE
from pagedserve.structured.tool_parsers import (
    TOOL_PARSERS,
    HermesParser,
    ToolParser,
    tool_spec,
)

if TYPE_CHECKING:
    from pagedserve.tokenizer import Tokenizer

DEFAULT_TOOL_PARSER = "hermes"
GENERIC_TOOL_PARSER = HermesParser.name  # the generic format's (tool_prompt.py)


@dataclass(frozen=True, slots=True)
class ToolFormat:
    """How the served model is shown tools and writes calls."""

    native: bool  # its chat template renders tools, earlier calls and tool results
    parser_name: str  # the format calls are written in
    takes_system: bool  # its chat template renders a system message

    @classmethod
    def of(cls, tokenizer: Tokenizer | None, parser_name: str | None) -> ToolFormat:
        """``parser_name``: the server's choice or the template's format (None: unknown)."""
        if tokenizer is None:
            return cls(False, GENERIC_TOOL_PARSER, True)
        native = tokenizer.template_renders_tools
        return cls(native, (parser_name or DEFAULT_TOOL_PARSER) if native
                   else GENERIC_TOOL_PARSER, tokenizer.template_takes_system)

    def parser(self) -> ToolParser:
        return TOOL_PARSERS[self.parser_name]()

    def chat(self, messages: Sequence[dict[str, Any]], plan: ToolPlan | None
             ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
        """The messages and the ``tools`` for the chat template: as they are for a native
        template, else rewritten in the generic format (earlier calls and tool results too,
        whether or not this request offers tools)."""
        tools = plan.tools if plan is not None else []
        if self.native:
            return list(messages), tools or None
        return generic_tool_messages(messages, tools, self.takes_system), None


@dataclass(slots=True)
class ToolPlan:
    """How a request's tools shape the prompt, the constraint and the reading of answers."""

    tools: list[dict[str, Any]] = field(default_factory=list)  # offered, in OpenAI's shape
    parser: ToolParser | None = None  # reads the answer; None: the answer is plain text
    # the answer's constraint when set, in place of the request's own (which the generic
    # format's auto takes into its grammar)
    constraint: Constraint | None = None


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


def openai_tool_plan(body: Any, fmt: ToolFormat,
                     constraint: Constraint | None) -> ToolPlan | None:
    """What ``tools`` and ``tool_choice`` ask for; None when the request has no tools.
    ``constraint``: the request's own (response_format, structured_outputs)."""
    choice = body.tool_choice
    if not body.tools:
        if choice not in (None, "none", "auto"):
            raise _bad("tool_choice", "a tool choice needs tools")
        return None
    functions = [t.function.model_dump(exclude_none=True) for t in body.tools]
    names = [f["name"] for f in functions]
    if len(set(names)) != len(names):
        raise _bad("tools", "function names must be unique")
    choice = choice or "auto"
    if choice == "none":
        return ToolPlan()
    tools = [{"type": "function", "function": f} for f in functions]
    specs = [tool_spec(f) for f in functions]
    parallel = body.parallel_tool_calls is not False
    if choice == "auto":
        return _auto_plan(tools, specs, parallel, fmt, constraint)
    if constraint is not None:
        raise _bad("tool_choice", "a tool choice that forces calls constrains the answer; it "
                   "cannot be combined with response_format or structured_outputs")
    if isinstance(choice, NamedToolChoice):
        wanted = choice.function.name
        if wanted not in names:
            raise _bad("tool_choice", f"function {wanted!r} is not in tools "
                       f"({', '.join(names)})")
        specs, parallel = [specs[names.index(wanted)]], False
    parser = fmt.parser()
    return ToolPlan(tools, parser,
                    Constraint.grammar(parser.required_grammar(specs, parallel), "tools"))


def _auto_plan(tools: list[dict[str, Any]], specs: list[dict[str, Any]], parallel: bool,
               fmt: ToolFormat, constraint: Constraint | None) -> ToolPlan:
    """``tool_choice: "auto"``: the model's own format is read, unconstrained; the generic
    format is constrained to text (or the request's JSON schema or choices) or calls."""
    if fmt.native:
        return ToolPlan(tools, fmt.parser())
    parser = HermesParser()  # the generic format's
    if constraint is None:
        return ToolPlan(tools, parser, Constraint.grammar(
            parser.auto_grammar(specs, parallel), "tools"))
    if constraint.kind == "json_schema":
        schema = json.loads(constraint.spec)
        schema = {"allOf": [schema]} if isinstance(schema, bool) else schema
        schema["x-guidance"] = {"whitespace_pattern": JSON_WHITESPACE}
        answer = f"%json {json.dumps(schema, ensure_ascii=False)}"
    elif constraint.kind == "choice":
        answer = constraint.lark().removeprefix("start: ").strip()
    else:
        raise _bad(constraint.field, "tools offered to this model are read through a grammar "
                   "(its chat template cannot show them), which cannot be combined with a "
                   f"{constraint.kind}; send a JSON schema, choices, or no tools")
    return ToolPlan(tools, parser, Constraint.grammar(
        parser.auto_grammar(specs, parallel, answer), constraint.field))


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


def ollama_tool_plan(body: OllamaChatRequest, fmt: ToolFormat,
                     constraint: Constraint | None) -> ToolPlan | None:
    """Ollama's tools: the model decides (OpenAI's ``"auto"``, calls in parallel)."""
    if not body.tools:
        return None
    functions = [t.function.model_dump(exclude_none=True) for t in body.tools]
    names = [f["name"] for f in functions]
    if len(set(names)) != len(names):
        raise _bad("tools", "function names must be unique")
    tools = [{"type": "function", "function": f} for f in functions]
    return _auto_plan(tools, [tool_spec(f) for f in functions], True, fmt, constraint)


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

