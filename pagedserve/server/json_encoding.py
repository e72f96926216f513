"""JSON for the streamed answers: one object per token per client, so its encoder matters.

msgspec's encoder writes UTF-8 bytes straight away (no ``str`` to encode again), several times
faster than the standard library's for the small dicts of a stream; non-ASCII text stays as it
is, as ``json.dumps(..., ensure_ascii=False)`` keeps it. Non-finite floats (a logprob of -inf)
become ``null``: JSON has no such numbers.
"""

from __future__ import annotations

from typing import Any

import msgspec

_encoder = msgspec.json.Encoder()


def encode_json(obj: Any) -> bytes:
    return _encoder.encode(obj)
