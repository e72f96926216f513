"""Tools for chat templates that cannot take them (the generic format), without a server:
which templates can, what the prompt holds, and what the grammars let the bundled model's
vocabulary write."""

from __future__ import annotations

import json

import pytest

from pagedserve.server.structured_outputs import ToolFormat
from pagedserve.server.tool_prompt import call_text, generic_tool_messages
from pagedserve.structured.tool_parsers import HermesParser, tool_spec
from pagedserve.tokenizer import Tokenizer

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
ROUND_TRIP = [
    {"role": "user", "content": "Weather in Paris and Oslo?"},
    {"role": "assistant", "content": "Checking.", "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
        {"id": "call_2", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C, dry"},
    {"role": "tool", "tool_call_id": "call_2", "content": "3 C, snow"},
    {"role": "user", "content": "Which is warmer?"}]
NATIVE = ("{% if tools %}{% for t in tools %}{{ t.function.name }};{% endfor %}{% endif %}"
          "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}")
NO_SYSTEM = ("{% for m in messages %}{% if m.role == 'system' %}"
             "{{ raise_exception('System role not supported') }}{% endif %}"
             "<{{ m.role }}>{{ m.content }}{% endfor %}")


@pytest.fixture(scope="module")
def smollm_tokenizer(smollm_gguf) -> Tokenizer:
    from pagedserve.loader.gguf import GGUFFile, tokenizer_from_gguf

    return tokenizer_from_gguf(GGUFFile(smollm_gguf))


def _with_template(tokenizer: Tokenizer, template: str) -> Tokenizer:
    return Tokenizer(tokenizer.backend, eos_token_ids=tokenizer.eos_token_ids,
                     chat_template=template)


def test_the_template_is_probed_for_tools_and_system(smollm_tokenizer):
    assert not smollm_tokenizer.template_renders_tools  # SmolLM2's template has no tools
    assert smollm_tokenizer.template_takes_system
    native = _with_template(smollm_tokenizer, NATIVE)
    assert native.template_renders_tools
    assert not _with_template(smollm_tokenizer, NO_SYSTEM).template_takes_system
    assert ToolFormat.of(native, None).parser_name == "hermes"
    assert ToolFormat.of(native, "llama3_json").parser_name == "llama3_json"
    assert ToolFormat.of(smollm_tokenizer, "llama3_json") == ToolFormat(False, "hermes", True)


def test_a_round_trip_renders_calls_and_results_as_text(smollm_tokenizer):
    fmt = ToolFormat.of(smollm_tokenizer, None)
    messages, tools = fmt.chat(ROUND_TRIP, None)  # a follow-up that offers no tools
    assert tools is None
    prompt = smollm_tokenizer.apply_chat_template(messages)
    assert ("<|im_start|>assistant\nChecking.\n<tool_call>\n"
            '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n'
            "</tool_call><|im_end|>") in prompt
    # the results, named after their calls, and the next question: one user turn
    assert ('<|im_start|>user\n<tool_response name="get_weather">\n18 C, dry\n'
            '</tool_response>\n<tool_response name="get_weather">\n3 C, snow\n'
            "</tool_response>\n\nWhich is warmer?<|im_end|>") in prompt
    assert "<|im_start|>tool" not in prompt


def test_offered_tools_go_into_the_system_prompt(smollm_tokenizer):
    fmt = ToolFormat.of(smollm_tokenizer, None)
    plain = smollm_tokenizer.apply_chat_template(ROUND_TRIP[:1])
    from pagedserve.server.structured_outputs import ToolPlan

    messages, _ = fmt.chat([{"role": "system", "content": "Be brief."}, ROUND_TRIP[0]],
                           ToolPlan([WEATHER]))
    prompt = smollm_tokenizer.apply_chat_template(messages)
    assert prompt != plain
    system = prompt.split("<|im_end|>")[0]
    assert system.startswith("<|im_start|>system\nBe brief.\n\n")
    line = json.dumps({"name": "get_weather", "description": "Weather in a city",
                       "parameters": WEATHER["function"]["parameters"]})
    assert f"<tools>\n{line}\n</tools>" in system and "<tool_call>" in system
    # a template without a system role: the first user message carries them
    no_system = ToolFormat.of(_with_template(smollm_tokenizer, NO_SYSTEM), None)
    messages, _ = no_system.chat(ROUND_TRIP[:1], ToolPlan([WEATHER]))
    assert [m["role"] for m in messages] == ["user"]
    assert messages[0]["content"].endswith("\n\nWeather in Paris and Oslo?")
    assert "<tools>" in messages[0]["content"]


def test_call_text_is_what_the_grammar_writes():
    assert call_text("f", '{"a": 1}') == '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n' \
        "</tool_call>"
    assert generic_tool_messages([{"role": "tool", "content": "x"}], None, True) == [
        {"role": "user", "content": "<tool_response>\nx\n</tool_response>"}]


# -- grammars, on the bundled model's vocabulary ----------------------------------------------

SPECS = [tool_spec(WEATHER["function"]), tool_spec({"name": "now"})]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.fixture(scope="module")
def accepts(smollm_tokenizer):
    import llguidance

    vocab = llguidance.LLTokenizer(smollm_tokenizer.backend.to_str(),
                                   n_vocab=smollm_tokenizer.vocab_size,
                                   eos_token=smollm_tokenizer.eos_token_ids)

    def accepts(grammar: str, text: str) -> bool:
        """Whether the grammar lets the model write ``text`` and stop there."""
        matcher = llguidance.LLMatcher(vocab, llguidance.LLMatcher.grammar_from_lark(grammar),
                                       log_level=0)
        assert not matcher.is_error(), matcher.get_error()
        ids = smollm_tokenizer.encode(text, add_special_tokens=False)
        return all(matcher.consume_token(i) for i in ids) and matcher.is_accepting()

    return accepts


@pytest.mark.parametrize("text, ok", [
    ("It is sunny in Paris.", True),
    ("", True),
    (CALL, True),
    ("Let me check.\n" + CALL, True),  # text before the calls is the content
    (CALL + "\n" + CALL.replace("Paris", "Oslo"), True),
    ('<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>', True),
    ("Sure: <tool_call> is how I call tools", False),  # the marker starts a call, always
    ('<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>', False),
    (CALL.replace('"Paris"}', '"Paris", "days": 2}'), False),  # keys it does not define
    ('<tool_call>\n{"name": "now", "arguments": {"x": 1}}\n</tool_call>', False),
    (CALL + " and more text", False),
])
def test_the_auto_grammar_is_text_or_calls_that_validate(accepts, text, ok):
    assert accepts(HermesParser().auto_grammar(SPECS, parallel=True), text) is ok


def test_the_auto_grammar_bounds_parallel_calls_and_takes_an_answer_schema(accepts):
    parser = HermesParser()
    assert not accepts(parser.auto_grammar(SPECS, parallel=False), CALL + "\n" + CALL)
    assert not accepts(parser.auto_grammar(SPECS, parallel=True), "\n".join([CALL] * 5))
    answer = '%json {"type": "object", "properties": {"ok": {"type": "boolean"}}, ' \
             '"required": ["ok"], "additionalProperties": false}'
    grammar = parser.auto_grammar(SPECS, parallel=True, answer=answer)
    assert accepts(grammar, '{"ok": true}') and accepts(grammar, CALL)
    assert not accepts(grammar, "It is sunny.")


def test_required_arguments_take_only_the_keys_the_tool_defines(accepts):
    grammar = HermesParser().required_grammar(SPECS, parallel=False)
    assert accepts(grammar, CALL)
    assert not accepts(grammar, CALL.replace('"Paris"}', '"Paris", "days": 2}'))
    assert not accepts(grammar, "It is sunny.")
