"""Tool calls in a model's text: parsed whole (``parse``) or as it streams (``ToolStream``).

Each parser reads one format (``--tool-call-parser``):

    hermes       <tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>   (Qwen2.5,
                 Hermes, many ChatML tool templates); text before the first call is content
    llama3_json  {"name": "f", "parameters": {...}} at the start of the answer, maybe after
                 <|python_tag|>, several separated by ";" (Llama 3.1-3.3 JSON tool calling)
    named        the whole answer is the arguments of one known function (OpenAI's
                 tool_choice naming a function, enforced by its parameters' schema)

Streaming is a snapshot of the text so far that only ever grows: content that could still be
the start of a marker is held back, a call's name shows once its string is closed, and its
arguments are the raw JSON text of the value scanned so far. Each delta is the difference of
two snapshots, so the deltas of any split of a text add up to the parse of the whole text.
Each parser also writes the Lark grammar that forces its own format (``tool_choice:
"required"``), so the same parser reads what the grammar made the model write.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from pagedserve.structured.constraint import JSON_WHITESPACE

# Calls one answer may make when several are allowed (tool_choice "required"): without a bound
# a small model at temperature 0.8 repeats the same call until max_tokens (measured on the
# bundled model: 1 answer in 3), and that answer, cut short, holds no call that parses.
MAX_PARALLEL_CALLS = 4

@dataclass(slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text of an object


@dataclass(slots=True)
class ToolCallDelta:
    index: int
    id: str | None = None  # with the name, in the call's first delta only
    name: str | None = None
    arguments: str = ""


@dataclass(slots=True)
class Parsed:
    content: str
    calls: list[ToolCall] = field(default_factory=list)


@dataclass(slots=True)
class _Call:
    name: str | None  # None until its string is complete
    arguments: str  # raw JSON text of the value so far
    complete: bool = False  # the value has ended


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolParser:
    """Splits an answer into content and tool calls; see the module docstring."""

    name = ""
    arguments_key = "arguments"

    def snapshot(self, text: str, final: bool) -> tuple[str, list[_Call]]:
        raise NotImplementedError

    def required_grammar(self, tools: list[dict[str, Any]], parallel: bool) -> str:
        """Lark for 'at least one call of these tools': exactly one unless ``parallel``, else
        at most :data:`MAX_PARALLEL_CALLS`."""
        raise NotImplementedError

    def parse(self, text: str) -> Parsed:
        content, calls = self.snapshot(text, final=True)
        parsed = []
        for call in calls:
            if call.name is None or not _is_object(call.arguments):
                return Parsed(text)  # not well-formed calls: the model answered in text
            parsed.append(ToolCall(new_call_id(), call.name, call.arguments))
        return Parsed(content, parsed)

    def stream(self) -> ToolStream:
        return ToolStream(self)

    def _call_schema(self, tool: dict[str, Any]) -> dict[str, Any]:
        return {"type": "object",
                "properties": {"name": {"const": tool["name"]},
                               self.arguments_key: tool.get("parameters") or {"type": "object"}},
                "required": ["name", self.arguments_key], "additionalProperties": False}

    def _json_rule(self, tools: list[dict[str, Any]]) -> str:
        schema = {"anyOf": [self._call_schema(t) for t in tools],
                  "x-guidance": {"whitespace_pattern": JSON_WHITESPACE}}
        return f"call_json: %json {json.dumps(schema, ensure_ascii=False)}\n"


class HermesParser(ToolParser):
    name = "hermes"
    START, END = "<tool_call>", "</tool_call>"

    def snapshot(self, text: str, final: bool) -> tuple[str, list[_Call]]:
        first = text.find(self.START)
        if first < 0:
            return (text if final else _hold_back(text, self.START)), []
        calls, pos = [], first
        while pos >= 0:
            body_start = pos + len(self.START)
            end = text.find(self.END, body_start)
            body = text[body_start:] if end < 0 else text[body_start:end]
            calls.append(_scan_call(body, self.arguments_key, whole=end >= 0 or final))
            pos = -1 if end < 0 else text.find(self.START, end + len(self.END))
        return text[:first], calls

    def required_grammar(self, tools: list[dict[str, Any]], parallel: bool) -> str:
        repeat = f' ("\\n" call){{0,{MAX_PARALLEL_CALLS - 1}}}' if parallel else ""
        return (f"start: call{repeat}\n"
                'call: "<tool_call>\\n" call_json "\\n</tool_call>"\n' + self._json_rule(tools))


class Llama3JsonParser(ToolParser):
    name = "llama3_json"
    arguments_key = "parameters"
    TAG = "<|python_tag|>"

    def snapshot(self, text: str, final: bool) -> tuple[str, list[_Call]]:
        stripped = text.lstrip()
        if stripped.startswith(self.TAG):
            body = stripped[len(self.TAG):]
        elif stripped.startswith("{"):
            body = stripped
        elif not final and self.TAG.startswith(stripped):
            return "", []  # nothing yet, or maybe the tag: undecided
        else:
            return text, []
        calls, pos = [], 0
        while True:
            pos = _skip(body, pos, " \t\r\n;")
            if pos >= len(body):
                break
            end = _value_end(body, pos)
            whole = end is not None or final
            calls.append(_scan_call(body[pos:end], self.arguments_key, whole))
            if end is None:
                break
            pos = end
        return "", calls

    def required_grammar(self, tools: list[dict[str, Any]], parallel: bool) -> str:
        repeat = f' ("; " call_json){{0,{MAX_PARALLEL_CALLS - 1}}}' if parallel else ""
        return f"start: call_json{repeat}\n" + self._json_rule(tools)


class NamedParser(ToolParser):
    """The answer is one function's arguments (its grammar is the parameters' schema)."""

    def __init__(self, function: str) -> None:
        self.function = function

    def snapshot(self, text: str, final: bool) -> tuple[str, list[_Call]]:
        return "", [_Call(self.function, text, final)]


TOOL_PARSERS: dict[str, type[ToolParser]] = {"hermes": HermesParser,
                                             "llama3_json": Llama3JsonParser}


def detect_tool_parser(chat_template: str | None) -> str | None:
    """The parser a chat template's tool format calls for, if it has one we know."""
    if not chat_template or "tools" not in chat_template:
        return None
    if "<tool_call>" in chat_template:
        return "hermes"
    if "<|python_tag|>" in chat_template or '"parameters"' in chat_template:
        return "llama3_json"
    return None


class ToolStream:
    """Deltas of content and tool calls as text arrives; see the module docstring."""

    def __init__(self, parser: ToolParser) -> None:
        self.parser = parser
        self.text = ""
        self._content = ""
        self._calls: list[_Call] = []
        self.ids: list[str] = []

    def feed(self, delta: str, final: bool = False) -> tuple[str, list[ToolCallDelta]]:
        self.text += delta
        content, calls = self.parser.snapshot(self.text, final)
        out_content = content[len(self._content):] if content.startswith(self._content) else ""
        self._content = max(content, self._content, key=len)
        deltas = []
        for i, call in enumerate(calls):
            before = self._calls[i] if i < len(self._calls) else _Call(None, "")
            d = ToolCallDelta(i)
            if call.name is not None and before.name is None:
                self.ids.append(new_call_id())
                d.id, d.name = self.ids[i], call.name
            if call.name is not None and len(call.arguments) > len(before.arguments):
                d.arguments = call.arguments[len(before.arguments):]
            if d.name is not None or d.arguments:
                deltas.append(d)
        self._calls = [c if c.name is not None else _Call(None, "") for c in calls]
        return out_content, deltas

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        content, deltas = self.feed("", final=True)
        if not self.ids:  # no call came out: what looked like one is the answer's text
            whole = self.parser.parse(self.text).content
            if whole.startswith(self._content):
                content += whole[len(self._content):]
                self._content = whole
        return content, deltas

    @property
    def num_calls(self) -> int:
        return len(self.ids)


# -- scanning ----------------------------------------------------------------------------------

_PREFIX = r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"%s"\s*:\s*'


def _scan_call(body: str, arguments_key: str, whole: bool) -> _Call:
    """A call's name and the raw text of its arguments value so far. ``whole``: the body is
    all there is (then keys in another order are read too)."""
    match = re.match(_PREFIX % arguments_key, body)
    if match is None:
        if whole:
            return _loose_call(body, arguments_key)
        return _Call(None, "")
    name = json.loads(f'"{match.group(1)}"')
    start = match.end()
    end = _value_end(body, start)
    if end is None:
        return _Call(name, body[start:].rstrip() if whole else _open_value(body[start:]))
    return _Call(name, body[start:end], True)


def _loose_call(body: str, arguments_key: str) -> _Call:
    try:
        value = json.loads(body)
    except ValueError:
        return _Call(None, body)
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return _Call(None, body)
    arguments = value.get(arguments_key, value.get("arguments", {}))
    return _Call(value["name"], json.dumps(arguments, ensure_ascii=False), True)


def _open_value(text: str) -> str:
    """The part of an unfinished JSON value that is surely in the final text: all of it but
    trailing whitespace (which may turn out to lie after the value)."""
    return text.rstrip(" \t\r\n")


def _value_end(text: str, start: int) -> int | None:
    """Index just past the JSON value beginning at ``start``, None if it has not ended."""
    depth, in_string, escaped, i = 0, False, False, start
    if start >= len(text):
        return None
    if text[start] not in '{["':  # a number or literal ends at a delimiter
        m = re.compile(r"[^,\]}\s;]*").match(text, start)
        end = m.end()
        return end if end < len(text) else None
    while i < len(text):
        c = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
                if depth == 0:
                    return i + 1
        elif c == '"':
            in_string = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


def _skip(text: str, pos: int, chars: str) -> int:
    while pos < len(text) and text[pos] in chars:
        pos += 1
    return pos


def _hold_back(text: str, marker: str) -> str:
    """``text`` without a suffix that could be the beginning of ``marker``."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return text[:-n]
    return text


def _is_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False
