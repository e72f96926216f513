"""Request bodies before any model sees them: JSON, depth, Unicode, and the limits' own checks."""

from __future__ import annotations

import json

import pytest

from pagedserve.server.errors import APIError
from pagedserve.server.limits import ServerLimits
from pagedserve.server.openai_protocol import ChatCompletionRequest
from pagedserve.server.request_body import parse_body, parse_json


def rejected(raw: bytes, max_depth: int = 8) -> APIError:
    with pytest.raises(APIError) as info:
        parse_json(raw, max_depth)
    assert info.value.status == 400
    return info.value


def test_plain_json_passes_and_surrogate_pairs_are_fine():
    assert parse_json(b'{"a": [1, {"b": "x"}]}', 8) == {"a": [1, {"b": "x"}]}
    # an escaped pair is one valid character (an emoji), not a lone surrogate
    assert parse_json(b'{"p": "\\ud83d\\ude00"}', 8) == {"p": "\U0001f600"}


def test_depth_beyond_the_limit_names_where():
    assert parse_json(b'{"a": [[[1]]]}', 4) == {"a": [[[1]]]}
    error = rejected(b'{"a": [[[[1]]]]}', 4)
    assert error.message.startswith("request body: JSON nested deeper than 4 levels at a.0.0")
    assert error.code == "json_too_deep"
    # brackets inside strings do not count
    assert parse_json(json.dumps({"a": "[[[[[[[[[["}).encode(), 4) == {"a": "[[[[[[[[[["}


def test_nesting_past_pythons_recursion_limit_is_a_400_not_a_crash():
    error = rejected(b"[" * 100_000 + b"]" * 100_000)
    assert "nested deeper than 8 levels" in error.message


@pytest.mark.parametrize(("raw", "field", "index"), [
    (b'{"prompt": "\\ud800"}', "prompt", 0),
    (b'{"messages": [{"role": "user", "content": "ok \\udfff"}]}', "messages.0.content", 3),
    (b'{"model": "x\\uDBFF"}', "model", 1),
])
def test_lone_surrogates_are_refused_naming_the_field(raw, field, index):
    error = rejected(raw)
    assert error.message.startswith(f"{field}: text is not valid Unicode")
    assert f"at character {index}" in error.message
    assert error.param == field


def test_a_lone_surrogate_in_a_key_is_refused():
    error = rejected(b'{"options": {"\\ud800": 1}}')
    assert error.message.startswith("options: text is not valid Unicode")


@pytest.mark.parametrize("raw", [b"{not json", b"\xff\xfe\xfa", b'{"n": ' + b"9" * 5000 + b"}",
                                 b""])
def test_malformed_json_is_a_400(raw):
    assert rejected(raw).code == "invalid_json"


def test_bodies_must_be_objects_and_fit_the_model():
    with pytest.raises(APIError, match="must be a JSON object"):
        parse_body(b"[1, 2]", ChatCompletionRequest, 8)
    with pytest.raises(APIError) as info:
        parse_body(b'{"messages": [{"role": "wizard", "content": "hi"}]}',
                   ChatCompletionRequest, 8)
    assert info.value.param.startswith("messages")


@pytest.mark.parametrize("kwargs", [{"max_request_body": 0}, {"max_json_depth": -1},
                                    {"max_n": True}, {"max_queue": -1}])
def test_limits_are_validated(kwargs):
    field = next(iter(kwargs))
    with pytest.raises(ValueError, match=f"^{field}"):
        ServerLimits(**kwargs)
