"""Tool-call parsers on recorded model texts: whole, and streamed split at every point."""

from __future__ import annotations

import json

import pytest

from pagedserve.structured.tool_parsers import (
    HermesParser,
    Llama3JsonParser,
    Parsed,
    ToolParser,
    detect_tool_parser,
)

QWEN_TWO_CALLS = (
    "Let me check both.\n<tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n'
    "</tool_call>\n<tool_call>\n"
    '{"name": "get_time", "arguments": {"tz": "Europe/Paris"}}\n</tool_call>')
CASES = [
    (HermesParser(), QWEN_TWO_CALLS, "Let me check both.\n",
     [("get_weather", {"city": "Paris", "unit": "celsius"}),
      ("get_time", {"tz": "Europe/Paris"})]),
    (HermesParser(), '<tool_call>\n{"name": "echo", "arguments": {"text": "a \\"}\\" b {"}}\n'
     "</tool_call>", "", [("echo", {"text": 'a "}" b {'})]),
    (HermesParser(), "<tool_call>\n"
     '{"arguments": {"q": [1, {"r": null}]}, "name": "search"}\n</tool_call>', "",
     [("search", {"q": [1, {"r": None}]})]),
    (HermesParser(), "No tools needed: 3 < 4, and <tool isn't a tag. <tool_ca",
     "No tools needed: 3 < 4, and <tool isn't a tag. <tool_ca", []),
    (HermesParser(), '<tool_call>\n{"name": "x" "arguments": {"a": 1}}\n</tool_call>',
     '<tool_call>\n{"name": "x" "arguments": {"a": 1}}\n</tool_call>', []),
    (Llama3JsonParser(), '{"name": "get_weather", "parameters": {"city": "San Francisco"}}', "",
     [("get_weather", {"city": "San Francisco"})]),
    (Llama3JsonParser(), '<|python_tag|>{"name": "a", "parameters": {}}; '
     '{"name": "b", "parameters": {"x": [1, 2.5e3, true]}}', "",
     [("a", {}), ("b", {"x": [1, 2500.0, True]})]),
    (Llama3JsonParser(), "The weather is nice {today}.", "The weather is nice {today}.", []),
    (Llama3JsonParser(), '{"not": "a call"}', '{"not": "a call"}', []),
]


def whole(parser: ToolParser, text: str):
    parsed = parser.parse(text)
    return parsed.content, [(c.name, json.loads(c.arguments)) for c in parsed.calls]


def streamed(parser: ToolParser, pieces: list[str]):
    stream = parser.stream()
    content, names, arguments, ids = "", {}, {}, {}
    for piece in pieces + [None]:
        c, deltas = stream.finish() if piece is None else stream.feed(piece)
        content += c
        for d in deltas:
            if d.name is not None:
                assert d.index not in names, "a call's name and id come once"
                names[d.index], ids[d.index] = d.name, d.id
                assert d.id.startswith("call_")
            assert d.index in names, "arguments come after the name"
            arguments[d.index] = arguments.get(d.index, "") + d.arguments
    assert sorted(names) == list(range(len(names)))
    return content, [(names[i], json.loads(arguments[i])) for i in sorted(names)]


@pytest.mark.parametrize("parser, text, content, calls", CASES)
def test_whole_text(parser, text, content, calls):
    assert whole(parser, text) == (content, calls)


@pytest.mark.parametrize("parser, text, content, calls", CASES)
def test_streamed_split_at_every_point(parser, text, content, calls):
    for i in range(len(text) + 1):
        assert streamed(parser, [text[:i], text[i:]]) == (content, calls), i
    assert streamed(parser, list(text)) == (content, calls)


def test_arguments_stream_in_fragments_after_the_name():
    stream = HermesParser().stream()
    text = QWEN_TWO_CALLS
    seen = []
    for i in range(0, len(text), 7):
        seen += stream.feed(text[i:i + 7])[1]
    seen += stream.finish()[1]
    first = [d for d in seen if d.index == 0]
    assert first[0].name == "get_weather" and first[0].id
    assert len([d for d in first if d.arguments]) > 3  # fragments, not one piece


def test_required_grammars_are_what_their_parsers_read():
    import llguidance

    tools = [{"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
    for parser, text in [(HermesParser(), QWEN_TWO_CALLS.split("Let me check both.\n")[1]
                          .split("\n<tool_call>\n{\"name\": \"get_time\"")[0]),
                         (Llama3JsonParser(), '{"name": "get_weather", "parameters": '
                          '{"city": "Paris"}}')]:
        grammar = parser.required_grammar(tools, parallel=True)
        lark = llguidance.LLMatcher.grammar_from_lark(grammar)
        assert llguidance.LLMatcher.validate_grammar(lark) == "", grammar
        assert whole(parser, text)[1][0][0] == "get_weather"


def test_the_parser_is_chosen_from_the_chat_template():
    assert detect_tool_parser("{% if tools %}<tool_call>{% endif %}") == "hermes"
    assert detect_tool_parser("{% if tools %}<|python_tag|>{% endif %}") == "llama3_json"
    assert detect_tool_parser("{{ messages }}") is None
    assert detect_tool_parser(None) is None


@pytest.mark.parametrize("cut", [False, True])
def test_a_streamed_answer_carries_the_calls_of_the_whole_answer(cut):
    """Including an answer cut off by max_tokens inside its second call, split anywhere."""
    text = QWEN_TWO_CALLS[:QWEN_TWO_CALLS.index("Europe")]
    parsed = HermesParser().parse(text, cut=cut)
    assert parsed.content == "Let me check both.\n"
    assert [(c.name, c.complete) for c in parsed.calls] == [("get_weather", True),
                                                            ("get_time", False)]
    assert json.loads(parsed.calls[0].arguments) == {"city": "Paris", "unit": "celsius"}
    assert parsed.calls[1].arguments == '{"tz": "'
    for i in range(len(text) + 1):
        stream = HermesParser().stream()
        stream.feed(text[:i])
        stream.feed(text[i:])
        stream.finish(cut=cut)
        assert stream.content == parsed.content
        assert [(c.name, c.arguments, c.complete) for c in stream.calls] == [
            (c.name, c.arguments, c.complete) for c in parsed.calls]


def test_a_call_cut_before_its_name_never_shows_as_content():
    text = 'Sure.\n<tool_call>\n{"name": "get_wea'
    assert HermesParser().parse(text, cut=True) == Parsed("Sure.\n", [])
    # an answer that ended by itself there was text, markup and all
    assert HermesParser().parse(text).content == text
