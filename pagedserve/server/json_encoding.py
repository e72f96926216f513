"""JSON for the streamed answers: one object per token per client, so its encoder matters.

msgspec's encoder writes UTF-8 bytes straight away (no ``str`` to encode again), several times
faster than the standard library's for the small dicts of a stream; non-ASCII text stays as it
is, as ``json.dumps(..., ensure_ascii=False)`` keeps it. Non-finite floats (a logprob of -inf)
become ``null``: JSON has no such numbers.

Three characters are escaped although JSON allows them raw: NEL (U+0085) and the line and
paragraph separators (U+2028, U+2029). A stream is read line by line, and many clients split
lines as Python's ``str.splitlines`` does (httpx's ``aiter_lines``, which the Ollama client
uses), which ends a line at each of them: a token holding one would cut its event in two and
the client would fail to parse it. Escaped (``\\u2028``), the text the client decodes is the
same. In UTF-8 their byte sequences cannot occur inside another character, and JSON's own
syntax is ASCII, so a replacement on the bytes touches only string contents.
"""

from __future__ import annotations

from typing import Any

import msgspec

_encoder = msgspec.json.Encoder()
# UTF-8 of U+0085, U+2028, U+2029 -> their JSON escapes
_LINE_BREAKS = ((b"\xc2\x85", b"\\u0085"), (b"\xe2\x80\xa8", b"\\u2028"),
                (b"\xe2\x80\xa9", b"\\u2029"))


def encode_json(obj: Any) -> bytes:
    data = _encoder.encode(obj)
    for raw, escaped in _LINE_BREAKS:
        if raw in data:
            data = data.replace(raw, escaped)
    return data
