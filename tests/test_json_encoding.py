"""Streamed JSON survives clients that split lines as ``str.splitlines`` does."""

from __future__ import annotations

import json

import httpx

from pagedserve.server.json_encoding import encode_json


def test_line_separators_in_text_are_escaped_and_decode_to_the_same_text():
    text = "a\u0085b\u2028c\u2029d é 😀 \n\r\t"
    data = encode_json({"text": text, "n": 1})
    assert b"\xc2\x85" not in data and b"\xe2\x80\xa8" not in data and b"\xe2\x80\xa9" not in data
    assert json.loads(data) == {"text": text, "n": 1}
    assert len(data.decode().splitlines()) == 1  # one event, one line


def test_an_ndjson_stream_reads_back_line_by_line_through_httpx():
    """What the Ollama client does (httpx's aiter_lines): every event whole."""
    events = [{"response": s} for s in ("x\u2028y", "\u0085", "plain", "\u2029z")]
    body = b"".join(encode_json(e) + b"\n" for e in events)
    response = httpx.Response(200, content=body)
    assert [json.loads(line) for line in response.iter_lines()] == events
