"""Tools for chat templates that cannot show them: the tools and earlier calls as plain text.

A Hugging Face chat template takes a request's tools through its ``tools`` variable and
renders earlier calls and tool results in its model's own format. Many templates have no such
variable (SmolLM2's, Gemma's, Llama 2's): their prompt is the same with tools or without, and
a model that never sees its tools never calls one. For those templates the conversation is
rewritten before rendering, into messages any template can render:

    system     the system prompt, if any, then TOOLS_PROMPT with each tool as one line of
               JSON ({"name", "description", "parameters"}) between <tools> and </tools>
               (first user message instead, for a template that takes no system message)
    assistant  an earlier answer's text, then each of its calls as the model must write them:
               <tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>
    user       tool results (role "tool"), each as <tool_response name="f">\\n...\\n
               </tool_response>; results in a row, and a user message right after them, make
               one user turn (templates that insist on alternating turns accept it)

The answer is read by the hermes parser, and constrained by a grammar to that same format
(structured_outputs.py), so the format the prompt asks for is the only one the model can use.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

TOOLS_PROMPT = """\
You can call these functions (one JSON object each, parameters as a JSON schema):
<tools>
{tools}
</tools>
To call functions, write one block per call:
<tool_call>
{{"name": "<function name>", "arguments": <the arguments as a JSON object>}}
</tool_call>
Results come back inside <tool_response></tool_response>. Otherwise answer in plain text."""


def tools_text(tools: Sequence[dict[str, Any]]) -> str:
    """The tool instructions for the system prompt; ``tools`` in OpenAI's shape."""
    lines = []
    for tool in tools:
        function = tool["function"]
        entry = {"name": function["name"]}
        if function.get("description"):
            entry["description"] = function["description"]
        entry["parameters"] = function.get("parameters") or {"type": "object",
                                                              "properties": {}}
        lines.append(json.dumps(entry, ensure_ascii=False))
    return TOOLS_PROMPT.format(tools="\n".join(lines))


def call_text(name: str, arguments: Any) -> str:
    """One call as the model must write it (and as the grammar forces it)."""
    if isinstance(arguments, str):  # a client's JSON text; shown as sent if it is not JSON
        try:
            arguments = json.loads(arguments)
        except ValueError:
            pass
    body = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"<tool_call>\n{body}\n</tool_call>"


def generic_tool_messages(messages: Sequence[dict[str, Any]],
                          tools: Sequence[dict[str, Any]] | None,
                          takes_system: bool) -> list[dict[str, Any]]:
    """``messages`` (as the API modules build them for templates) rewritten in the generic
    format: see the module docstring. ``tools``: the tools offered, or None."""
    out: list[dict[str, Any]] = []
    names: dict[str, str] = {}  # tool_call_id -> function name, for results that name none
    results: list[str] = []
    for message in messages:
        role = message.get("role")
        if role == "tool":
            name = message.get("name") or names.get(message.get("tool_call_id") or "")
            results.append(_result_text(name, message.get("content")))
            continue
        if results:
            out.append({"role": "user", "content": "\n".join(results)})
            results = []
            if role == "user":  # one user turn: the results, then what the user says
                out[-1]["content"] += "\n\n" + _text(message.get("content"))
                continue
        if role == "assistant" and message.get("tool_calls"):
            out.append(_assistant_with_calls(message, names))
        else:
            out.append({k: v for k, v in message.items() if k not in ("tool_calls", "name",
                                                                       "tool_call_id")})
    if results:
        out.append({"role": "user", "content": "\n".join(results)})
    if tools:
        _add_instructions(out, tools_text(tools), takes_system)
    return out


def _assistant_with_calls(message: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    parts = [_text(message.get("content"))] if message.get("content") else []
    for call in message["tool_calls"]:
        function = call.get("function") or {}
        name = function.get("name", "")
        if call.get("id"):
            names[call["id"]] = name
        parts.append(call_text(name, function.get("arguments", {})))
    return {"role": "assistant", "content": "\n".join(parts)}


def _result_text(name: str | None, content: Any) -> str:
    opening = f'<tool_response name="{name}">' if name else "<tool_response>"
    return f"{opening}\n{_text(content)}\n</tool_response>"


def _add_instructions(out: list[dict[str, Any]], text: str, takes_system: bool) -> None:
    if out and out[0].get("role") == "system":
        first = _text(out[0].get("content"))
        out[0] = {**out[0], "content": f"{first}\n\n{text}" if first else text}
    elif takes_system:
        out.insert(0, {"role": "system", "content": text})
    else:
        for i, message in enumerate(out):
            if message.get("role") == "user":
                out[i] = {**message, "content": f"{text}\n\n{_text(message.get('content'))}"}
                return
        out.insert(0, {"role": "user", "content": text})


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(str(part.get("text", "")) if isinstance(part, dict) else str(part)
                     for part in content)
