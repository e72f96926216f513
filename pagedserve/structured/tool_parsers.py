"""Tool calls in a model's text: as it streams (``ToolStream``) or whole (``parse``).

Each parser reads one format (``--tool-call-parser``):

    hermes       <tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>   (Qwen2.5,
                 Hermes, many ChatML tool templates, and the generic format of templates that
                 cannot take tools); text before the first call is content
    llama3_json  {"name": "f", "parameters": {...}} at the start of the answer, maybe after
                 <|python_tag|>, several separated by ";" (Llama 3.1-3.3 JSON tool calling)

Streaming is a snapshot of the text so far that only ever grows: content that could still be
the start of a marker is held back, a call's name shows once its string is closed, and its
arguments are the raw JSON text of the value scanned so far. Each delta is the difference of
two snapshots. A whole answer is parsed by streaming it in one piece, so a streamed answer and
the same answer not streamed carry the same content and the same calls.

An answer that ends without any call whose name could be read was text: all of it is the
content. An answer cut off (``max_tokens``) inside a call keeps its complete calls and the
cut one, marked incomplete (its arguments are what was written); a call cut before its name
is dropped, and its markup never shows as content.

Each parser also writes the Lark grammars that force its own format (``tool_choice:
"required"`` or a named function), so the same parser reads what the grammar made the model
write; hermes also writes the grammar of ``"auto"`` (text, or calls that parse).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from pagedserve.structured.constraint import JSON_WHITESPACE, closed

# Calls one answer may make when several are allowed: without a bound a small model at
# temperature 0.8 repeats the same call until max_tokens (measured on the bundled model: 1
# answer in 3), and that answer, cut short, holds no call that parses.
MAX_PARALLEL_CALLS = 4
# OpenAI's rule for a function's name; it also keeps names out of the markup they sit in
TOOL_NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"


def check_tool_name(name: str) -> str:
    """``name`` if it is a valid function name (as OpenAI checks them), else ValueError."""
    if re.fullmatch(TOOL_NAME_PATTERN, name) is None:
        raise ValueError(f"a function name is 1 to 64 letters, digits, underscores or dashes "
                         f"({TOOL_NAME_PATTERN}), got {name[:80]!r}")
    return name


@dataclass(slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text of an object, or what was written of it when cut off
    complete: bool = True  # False: the answer ended inside its arguments


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


def tool_spec(function: dict[str, Any]) -> dict[str, Any]:
    """A function's name and parameters schema as the grammars take them: no ``parameters``
    is a function of no arguments (as OpenAI reads it)."""
    parameters = function.get("parameters")
    if parameters is None:
        parameters = {"type": "object", "properties": {}}
    return {"name": function["name"], "parameters": parameters}


class ToolParser:
    """Splits an answer into content and tool calls; see the module docstring."""

    name = ""
    arguments_key = "arguments"

    def snapshot(self, text: str, final: bool) -> tuple[str, list[_Call]]:
        raise NotImplementedError

    def required_grammar(self, tools: list[dict[str, Any]], parallel: bool) -> str:
        """Lark for 'at least one call of these tools' (``tool_spec`` shapes): exactly one
        unless ``parallel``, else at most :data:`MAX_PARALLEL_CALLS`."""
        raise NotImplementedError

    def parse(self, text: str, cut: bool = False) -> Parsed:
        """A whole answer; ``cut``: it ended at ``max_tokens``, not where the model stopped."""
        stream = self.stream()
        content, _ = stream.feed(text)
        more, _ = stream.finish(cut)
        return Parsed(content + more, stream.calls)

    def stream(self) -> ToolStream:
        return ToolStream(self)

    def _call_schema(self, tool: dict[str, Any]) -> dict[str, Any]:
        # closed: arguments take only the keys the tool defines, unless its schema says
        # otherwise (constraint.py)
        return {"type": "object",
                "properties": {"name": {"const": tool["name"]},
                               self.arguments_key: closed(tool["parameters"])},
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
        return ('start: "<tool_call>" call_rest' + self._more(parallel) + "\n"
                + self._call_rules(tools))

    def auto_grammar(self, tools: list[dict[str, Any]], parallel: bool,
                     answer: str | None = None) -> str:
        """Lark for 'text, or calls of these tools' (``tool_choice: "auto"``): text that,
        once it writes ``<tool_call>``, must go on as a call of one of the tools whose
        arguments validate. ``answer``: a Lark expression the text must match instead (a
        ``response_format`` schema as ``%json {...}``); then there is no text before calls.
        """
        more = self._more(parallel)
        if answer is not None:
            start = f'start: answer | "<tool_call>" call_rest{more}\nanswer: {answer}\n'
        else:
            # the lazy lexeme ends at the first marker and commits: free text never holds
            # one, so whatever follows it is a call
            start = (f"start: TEXT | lead call_rest{more}\n"
                     'lead[lazy]: TEXT "<tool_call>"\n'
                     "TEXT: /(?s:.*)/\n")
        return "%llguidance {}\n" + start + self._call_rules(tools)

    def _more(self, parallel: bool) -> str:
        if not parallel:
            return ""
        return f' ("\\n<tool_call>" call_rest){{0,{MAX_PARALLEL_CALLS - 1}}}'

    def _call_rules(self, tools: list[dict[str, Any]]) -> str:
        return 'call_rest: "\\n" call_json "\\n</tool_call>"\n' + self._json_rule(tools)


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
    """Deltas of content and tool calls as text arrives; see the module docstring.

    ``content`` and ``calls`` are what the deltas so far add up to.
    """

    def __init__(self, parser: ToolParser) -> None:
        self.parser = parser
        self.text = ""
        self.content = ""
        self.calls: list[ToolCall] = []
        self._seen: list[_Call] = []  # the last snapshot's calls (nameless ones emptied)

    def feed(self, delta: str, final: bool = False) -> tuple[str, list[ToolCallDelta]]:
        self.text += delta
        content, calls = self.parser.snapshot(self.text, final)
        out_content = content[len(self.content):] if content.startswith(self.content) else ""
        self.content += out_content
        deltas = []
        for i, call in enumerate(calls):
            before = self._seen[i] if i < len(self._seen) else _Call(None, "")
            d = ToolCallDelta(i)
            if call.name is not None and before.name is None:
                self.calls.append(ToolCall(new_call_id(), call.name, "", call.complete))
                d.id, d.name = self.calls[i].id, call.name
            if call.name is not None and len(call.arguments) > len(before.arguments):
                d.arguments = call.arguments[len(before.arguments):]
                self.calls[i].arguments += d.arguments
            if call.name is not None:
                self.calls[i].complete = call.complete
            if d.name is not None or d.arguments:
                deltas.append(d)
        self._seen = [c if c.name is not None else _Call(None, "") for c in calls]
        return out_content, deltas

    def finish(self, cut: bool = False) -> tuple[str, list[ToolCallDelta]]:
        """The last deltas, once the answer has ended; ``cut``: at ``max_tokens``."""
        content, deltas = self.feed("", final=True)
        if not self.calls and not cut and self.text.startswith(self.content):
            # no call came out: what looked like the start of one is the answer's text
            content += self.text[len(self.content):]
            self.content = self.text
        return content, deltas

    @property
    def num_calls(self) -> int:
        return len(self.calls)


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
